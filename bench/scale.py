"""Gemma Scope scale on this machine: a synthetic Gemma-2-shaped release (bench/synthetic_release.py),
precomputed in bounded memory, published, and served.

    .venv/bin/python bench/scale.py --work /tmp/scale                          # all three parts
    .venv/bin/python bench/scale.py --work /tmp/scale --parts release --tokens 20480

release  78 SAEs (26 layers x res, mlp, att) x 16,384 features (1.28M features) of a random Gemma 2 with
         gemma-2-2b's layer count and d_model 128, over --tokens tokens of the Python docs: peak RSS of the
         job, per model pass the streaming time against the bare pass (the same truncated forward and every
         SAE's encode of that pass, same process, same batches: the work any tool must do), the finish and
         write times, DB bytes per feature, and the L0 measured on the corpus.
wide     one SAE of width 1,048,576 (12-res) end to end: precompute, publish, then `featurescope serve
         --no-live` (a real uvicorn) answering its SAE page, feature pages and their JSON twins. Run with
         --neighbours 0: exact decoder neighbours are d_sae^2 work (timed on a slice and scaled instead).
wide-pages  only the serving half of wide, over its published run.
growth   the first 1, 3, 9, 26 and 78 SAEs of the release: job time and peak RSS per size.

Every job runs in a child process (`--child-job`), so each peak RSS is that job's own (ru_maxrss).
The release files are written once into --work and reused.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from bench.synthetic_release import GEMMA2_2B_LAYERS, parse_layers, write_synthetic_release
from featurescope.encoder import FeatureEncoder
from featurescope.models import load_model
from featurescope.precompute.corpus_sources import CorpusSpec, iter_texts
from featurescope.precompute.job import PrecomputeConfig, default_sae_ids, run_precompute
from featurescope.precompute.static_stats import neighbour_tile
from featurescope.corpus import pack_contexts
from featurescope.sae_loading import load_sae
from featurescope.sae_sources import expand_sae_sources, width_label



def release_saes(root: Path, width: int) -> list[str]:
    """The release's SAE folders in forward-pass order (the job sorts its groups the same way)."""
    return expand_sae_sources([str(root / "gemma-scope-2b-pt-*" / "layer_*" / f"width_{width_label(width)}" / "*")])


def ensure_release(root: Path, width: int, layers: list[int] | None, kinds: tuple[str, ...]) -> None:
    if (root / "model" / "config.json").exists() and (root / "done").exists():
        return
    started = time.time()
    write_synthetic_release(root, width=width, d_model=128, kinds=kinds, layers=layers)
    (root / "done").write_text(f"{time.time() - started:.0f} s\n")
    print(f"wrote the release in {root} in {time.time() - started:.0f} s", flush=True)


class Phases:
    """Where a job's time and memory go: the seconds spent in each phase (exclusive of the phases inside it) and
    the peak resident memory while it ran, sampled every 20 ms by a thread. A phase is the innermost of the
    job's functions wrapped with `track` that is running ("load" before any)."""

    def __init__(self) -> None:
        self.label, self.peaks, self.seconds, self._stop = "load", {}, {}, threading.Event()
        self._since = time.perf_counter()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        with open("/proc/self/statm") as statm:
            while not self._stop.wait(0.02):
                statm.seek(0)
                rss = int(statm.read().split()[1]) * self._page
                label = self.label
                self.peaks[label] = max(self.peaks.get(label, 0), rss)

    def _switch(self, label: str) -> str:
        now = time.perf_counter()
        self.seconds[self.label] = self.seconds.get(self.label, 0.0) + now - self._since
        self._since, outer, self.label = now, self.label, label
        return outer

    def track(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def tracked(*args, **kwargs):
            outer = self._switch(label)
            try:
                return original(*args, **kwargs)
            finally:
                self._switch(outer)

        setattr(owner, name, tracked)

    def stop(self) -> dict[str, dict[str, float]]:
        self._switch(self.label)
        self._stop.set()
        self._thread.join()
        return {label: {"s": self.seconds.get(label, 0.0), "rss": self.peaks.get(label, 0)}
                for label in dict.fromkeys([*self.seconds, *self.peaks])}


def child_job(spec: dict) -> dict:
    """One precompute job in this process, then the bare passes over the same contexts: a JSON-able dict."""
    from featurescope.precompute import job
    from featurescope.precompute.feature_stats import FeatureStats

    phases = Phases()
    for owner, name, label in ((job, "_stream_group", "stream"), (FeatureStats, "update", "stats update"),
                               (FeatureStats, "finalize", "finalize"),
                               (job, "publish", "write"), (job, "_example_pass", "example pass"),
                               (job, "cross_layer_links", "links"), (job, "logit_effect", "logit effect"),
                               (job, "decoder_neighbours", "neighbours")):
        phases.track(owner, name, label)
    torch.manual_seed(0)
    lm = load_model(spec["model"], device="cpu")
    cfg = PrecomputeConfig(model=spec["model"], saes=spec["saes"], max_tokens=spec["tokens"], batch_size=spec["batch_size"],
                           device="cpu", data_dir=spec["data_dir"], progress=False, force=True,
                           neighbours=spec.get("neighbours", PrecomputeConfig.neighbours))
    timings: dict = {}
    lines: list[str] = []
    started = time.time()
    db = run_precompute(cfg, lm=lm, log=lines.append, timings=timings)
    job_seconds = time.time() - started
    job_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    phase_rss = phases.stop()
    contexts = pack_contexts(lm, iter_texts(CorpusSpec()), cfg.context_len, cfg.max_tokens)
    loaded = [load_sae(src) for src in cfg.saes]
    saes = dict(zip(default_sae_ids(loaded), loaded))  # the job's ids (no --sae-id given)
    passes = []
    for names, stream_seconds in timings["passes"]:
        bare, mean_l0 = None, None
        if spec.get("bare", True):
            encoder = FeatureEncoder(lm, {n: saes[n] for n in names})
            l0 = {n: [0, 0] for n in names}
            bare_started = time.time()
            for first in range(0, len(contexts), cfg.batch_size):
                for name, acts, mask in encoder.encode_each(contexts[first:first + cfg.batch_size]):
                    l0[name][0] += int(((acts > 0) & mask[..., None]).sum())
                    l0[name][1] += int(mask.sum())
            bare = time.time() - bare_started
            mean_l0 = sum(a / max(b, 1) for a, b in l0.values()) / len(l0)
        passes.append({"saes": len(names), "first": names[0], "last": names[-1], "stream_s": stream_seconds,
                       "bare_s": bare, "l0": mean_l0})
    n_features = sum(s.d_sae for s in saes.values())
    skipped = {}
    if cfg.neighbours == 0:  # what the skipped decoder neighbours would cost: decoder_neighbours' tiles for 1,024 features
        W = next(iter(saes.values())).W_dec
        W = W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)
        tile = neighbour_tile(W.shape[0])
        sample_started = time.time()
        for start in range(0, 1024, tile):
            (W[start:start + tile] @ W.T).topk(PrecomputeConfig.neighbours, 1)
        skipped = {"neighbours_s_estimate": (time.time() - sample_started) * W.shape[0] / 1024}
    return {"db": str(db), "db_bytes": db.stat().st_size, "n_features": n_features, "n_tokens": int(contexts.numel()),
            "job_s": job_seconds, "peak_rss": job_rss, "phase_rss": phase_rss, "passes": passes,
            **{k: timings[k] for k in ("stream", "finish", "write", "links")}, "plan": lines[0], **skipped}


def phase_line(r: dict) -> str:
    """Each phase's own seconds and the peak RSS while it ran."""
    return "phases (s, peak RSS GiB): " + ", ".join(f"{label} {p['s']:.1f} s {p['rss'] / 2**30:.2f}"
                                                    for label, p in r["phase_rss"].items())


def run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.scale", "--child-job", json.dumps(spec)], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"child job failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_release(work: Path, tokens: int, batch_size: int, width: int, layers: list[int] | None) -> None:
    root = work / f"release-{width_label(width)}"
    ensure_release(root, width, layers, ("res", "mlp", "att"))
    saes = release_saes(root, width)
    print(f"\n(a) {len(saes)} SAEs x {width:,} features over {tokens:,} tokens, batch {batch_size}", flush=True)
    r = run_child({"model": str(root / "model"), "saes": saes, "tokens": tokens, "batch_size": batch_size,
                   "data_dir": str(work / "data-release")})
    print(r["plan"])
    print(f"{'pass':>4} {'SAEs':>5} {'sites':<16} {'stream s':>9} {'bare s':>8} {'bare/stream':>12} {'L0':>6}")
    for i, p in enumerate(r["passes"], 1):
        sites = p["first"].rsplit("-", 1)[0] + " .. " + p["last"].rsplit("-", 1)[0]
        print(f"{i:>4} {p['saes']:>5} {sites:<16} "
              f"{p['stream_s']:>9.1f} {p['bare_s']:>8.1f} {p['bare_s'] / p['stream_s']:>12.2f} {p['l0']:>6.1f}")
    print(f"job {r['job_s']:.0f} s (stream {r['stream']:.0f}, finish {r['finish']:.0f} incl. links {r['links']:.0f}, "
          f"write {r['write']:.0f}); peak RSS {r['peak_rss'] / 2**30:.2f} GiB; DB {r['db_bytes'] / 2**20:.0f} MiB = "
          f"{r['db_bytes'] / r['n_features']:.0f} bytes per feature ({r['n_features']:,} features, {r['n_tokens']:,} tokens)",
          flush=True)
    print(phase_line(r), flush=True)


def part_growth(work: Path, tokens: int, batch_size: int, sizes: list[int], width: int, layers: list[int] | None) -> None:
    root = work / f"release-{width_label(width)}"
    ensure_release(root, width, layers, ("res", "mlp", "att"))
    saes = release_saes(root, width)
    print(f"\n(c) growth over {tokens:,} tokens: the first n SAEs of the release (forward-pass order)")
    print(f"{'SAEs':>5} {'features':>10} {'job s':>7} {'stream s':>9} {'finish s':>9} {'write s':>8} {'peak RSS GiB':>13} {'DB bytes/feature':>17}")
    for n in sizes:
        r = run_child({"model": str(root / "model"), "saes": saes[:n], "tokens": tokens, "batch_size": batch_size,
                       "data_dir": str(work / f"data-growth-{n}"), "bare": False})
        print(f"{n:>5} {r['n_features']:>10,} {r['job_s']:>7.0f} {r['stream']:>9.0f} {r['finish']:>9.0f} {r['write']:>8.0f} "
              f"{r['peak_rss'] / 2**30:>13.2f} {r['db_bytes'] / r['n_features']:>17.0f}", flush=True)
        print(f"      {phase_line(r)}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_get(url: str) -> tuple[int, float, int]:
    started = time.time()
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            body = response.read()
            return response.status, time.time() - started, len(body)
    except urllib.error.HTTPError as exc:
        return exc.code, time.time() - started, 0
    except (urllib.error.URLError, ConnectionError):  # not listening yet
        return 0, time.time() - started, 0


def part_wide(work: Path, tokens: int, width: int) -> None:
    root = work / f"release-{width_label(width)}"
    ensure_release(root, width, [12], ("res",))
    (sae,) = release_saes(root, width)
    print(f"\n(b) one SAE of width {width:,} (12-res) over {tokens:,} tokens, batch 2", flush=True)
    data_dir = work / "data-wide"
    r = run_child({"model": str(root / "model"), "saes": [sae], "tokens": tokens, "batch_size": 2, "data_dir": str(data_dir),
                   "neighbours": 0})
    (p,) = r["passes"]
    print(f"decoder neighbours skipped (--neighbours 0): exact ones would take ~{r['neighbours_s_estimate'] / 60:.0f} min "
          f"on this CPU (1,024 features' tiles timed, scaled to {width:,})")
    print(f"job {r['job_s']:.0f} s (stream {r['stream']:.0f} s against a bare pass of {p['bare_s']:.0f} s: ratio "
          f"{p['bare_s'] / r['stream']:.2f}; finish {r['finish']:.0f} s, write {r['write']:.0f} s); peak RSS "
          f"{r['peak_rss'] / 2**30:.2f} GiB; DB {r['db_bytes'] / 2**20:.0f} MiB = {r['db_bytes'] / r['n_features']:.0f} bytes per feature")
    print(phase_line(r), flush=True)
    serve_wide(data_dir, width)


def serve_wide(data_dir: Path, width: int) -> None:
    """`featurescope serve --no-live` over the wide SAE's run: each page's first and second answer."""
    port = free_port()
    exe = Path(sys.executable).parent / "featurescope"
    server = subprocess.Popen([str(exe), "serve", "--data-dir", str(data_dir), "--port", str(port), "--no-live", "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline and timed_get(base + "/-/health")[0] != 200:
            time.sleep(0.5)
        model = json.loads(urllib.request.urlopen(base + "/.json", timeout=60).read())["models"][0]["id"]
        sae_id = f"12-res-{width_label(width)}"
        print(f"{'page':<48} {'status':>6} {'first s':>8} {'again s':>8} {'bytes':>9}")
        sae_page = f"/{model}/{sae_id}"
        for path in (sae_page, sae_page + ".json", sae_page + "?sort=density&desc=true", sae_page + "?sort=max_act&desc=true",
                     sae_page + "?q=def", sae_page + ".json?token=%20the", f"{sae_page}/0", f"{sae_page}/{width // 2}",
                     f"{sae_page}/{width - 1}.json", f"{sae_page}/{width}"):
            status, first, size = timed_get(base + path)
            _, again, _ = timed_get(base + path)
            print(f"{path:<48} {status:>6} {first:>8.3f} {again:>8.3f} {size:>9,}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/featurescope-scale", help="release files and run data go here")
    parser.add_argument("--parts", default="release,wide,growth")
    parser.add_argument("--tokens", type=int, default=20480)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--growth", default="1,3,9,26,78", help="SAE counts for the growth table")
    parser.add_argument("--width", type=int, default=16384, help="features per SAE of the release")
    parser.add_argument("--wide-width", type=int, default=1 << 20, help="features of the one wide SAE")
    parser.add_argument("--layers", default="all", help="layers of the release: 'all' (26) or e.g. 0-2")
    parser.add_argument("--child-job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_job:
        print(json.dumps(child_job(json.loads(args.child_job))))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {load}; {GEMMA2_2B_LAYERS} layers, d_model 128")
    parts, layers = args.parts.split(","), parse_layers(args.layers)
    if "release" in parts:
        part_release(work, args.tokens, args.batch_size, args.width, layers)
    if "wide" in parts:
        part_wide(work, args.tokens, args.wide_width)
    if "wide-pages" in parts:  # the pages of (b) again, over its published run
        serve_wide(work / "data-wide", args.wide_width)
    if "growth" in parts:
        part_growth(work, args.tokens, args.batch_size, [int(n) for n in args.growth.split(",")], args.width, layers)


if __name__ == "__main__":
    main()
