"""Precompute throughput against the bare truncated forward pass, same process, same tokens, same batch.

    .venv/bin/python bench/precompute.py                 # demo SAEs from data/saes (run the demo first)
    .venv/bin/python bench/precompute.py --tokens 32768 --batch-size 16

For one demo SAE and for all demo SAEs at once it prints: bare forward tok/s (stopped at the deepest
SAE's layer), precompute tok/s for the streaming pass and for the whole job (finish + DuckDB write
included), their ratios, the share of time spent writing DuckDB, peak memory and DB size. With several
SAEs it also prints the cross-layer links' own time (the job's timer: peak co-activations while streaming
+ link computation at the end) and, with --links-ab, the whole job again without links for the difference.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


from featurescope.corpus import pack_contexts  # noqa: E402
from featurescope.models import load_model  # noqa: E402
from featurescope.sae_loading import load_sae  # noqa: E402
from featurescope.sites import parse_site, run_truncated  # noqa: E402
from featurescope.training import DEMO_CONFIG, cached_saes  # noqa: E402
from featurescope.precompute.corpus_sources import CorpusSpec, iter_texts  # noqa: E402
from featurescope.precompute.job import PrecomputeConfig, run_precompute  # noqa: E402


def bare_forward_seconds(lm, contexts: torch.Tensor, last_layer: int, batch_size: int) -> float:
    started = time.time()
    with torch.no_grad():
        for first in range(0, len(contexts), batch_size):
            run_truncated(lm, contexts[first: first + batch_size].to(lm.device), last_layer)
    return time.time() - started


def job_timings(lm, paths: list[str], args, links: bool = True) -> tuple[dict, float]:
    """Seconds per phase of one whole precompute job in a temporary data dir, and its DB size in MB."""
    with tempfile.TemporaryDirectory() as tmp:
        timings: dict = {}
        cfg = PrecomputeConfig(model="smollm2-135m", saes=paths, max_tokens=args.tokens, context_len=args.context_len,
                               batch_size=args.batch_size, device="cpu", data_dir=tmp, progress=False, links=links)
        db_path = run_precompute(cfg, lm=lm, log=lambda *_: None, timings=timings)
        return timings, db_path.stat().st_size / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--links-ab", action="store_true", help="also run all SAEs without cross-layer links")
    args = parser.parse_args()

    lm = load_model("smollm2-135m", device="cpu")
    sae_dirs = cached_saes(lm, DEMO_CONFIG, Path(args.data_dir) / "saes")
    if sae_dirs is None:
        sys.exit(f"No demo SAEs in {args.data_dir}/saes: run `bash scripts/demo.sh` (or featurescope demo --no-serve) first.")
    sae_paths = [str(p) for _, p in sorted(sae_dirs.items())]
    contexts = pack_contexts(lm, iter_texts(CorpusSpec()), args.context_len, args.tokens)
    n_tok = contexts.numel()
    print(f"machine: {torch.get_num_threads()} torch threads, {torch.__version__}; model smollm2-135m fp32 on cpu")
    print(f"tokens: {n_tok} ({len(contexts)} contexts x {args.context_len}), batch {args.batch_size}\n")
    header = f"{'SAEs':<22}{'last layer':>10}{'bare tok/s':>12}{'stream tok/s':>14}{'ratio':>7}{'job tok/s':>11}{'ratio':>7}{'write %':>9}{'DB MB':>8}"
    print(header)
    for label, paths in (("one SAE (" + parse_site(load_sae(sae_paths[1]).cfg.hook_name).short_name + ")", sae_paths[1:2]),
                         (f"all {len(sae_paths)} demo SAEs", sae_paths)):
        last_layer = max(parse_site(load_sae(p).cfg.hook_name).layer for p in paths)
        bare_forward_seconds(lm, contexts[: args.batch_size * 2], last_layer, args.batch_size)  # warm-up
        bare = bare_forward_seconds(lm, contexts, last_layer, args.batch_size)
        timings, size_mb = job_timings(lm, paths, args)
        print(f"{label:<22}{last_layer:>10}{n_tok / bare:>12.0f}{n_tok / timings['stream']:>14.0f}"
              f"{bare / timings['stream']:>7.2f}{n_tok / timings['total']:>11.0f}{bare / timings['total']:>7.2f}"
              f"{100 * timings['write'] / timings['total']:>8.1f}%{size_mb:>8.1f}")
        print(f"{'':<22}phases: stream {timings['stream']:.1f} s, finish {timings['finish']:.1f} s, write {timings['write']:.1f} s; bare {bare:.1f} s")
        if len(paths) > 1:
            print(f"{'':<22}cross-layer links: {timings['links']:.1f} s by the job's timer = {100 * timings['links'] / timings['total']:.1f}% of the job")
        if len(paths) > 1 and args.links_ab:
            without, _ = job_timings(lm, paths, args, links=False)
            print(f"{'':<22}without links: job {without['total']:.1f} s -> links add {100 * (timings['total'] / without['total'] - 1):+.1f}% "
                  f"(stream {100 * (timings['stream'] / without['stream'] - 1):+.1f}%)")
    print(f"\npeak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
