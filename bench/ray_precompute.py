"""The precompute job on Ray (1 and 2 CPU workers) against the single-process job, same process, same work.

    .venv/bin/python bench/ray_precompute.py                       # SmolLM2 + 2 calibrated random SAEs, 32k tokens
    .venv/bin/python bench/ray_precompute.py --tokens 65536 --width 8192

Writes two Gemma Scope-layout SAEs (6-res, 12-res) calibrated on the embedded SmolLM2-135M
(bench/synthetic_release.py, on 32 random contexts), starts one local Ray instance with as many CPUs as the machine has, and runs
the same job three times: in this process, then on Ray with 1 and with 2 workers (one CPU and one model copy
each). For each it prints the streaming pass's seconds (the Ray driver's: from the first task sent to the
last state merged), the whole job's, their ratio to the single process, the tasks, and the scheduling
overhead per task: the driver's wall time times the workers minus the workers' own streaming seconds,
per task (sending tokens, returning and merging states, idle waits), next to a bare actor round trip.
It also checks that the three published files are equal, and prints the bytes one task moves.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.synthetic_release, run from anywhere

from bench.synthetic_release import write_release  # noqa: E402
from featurescope.models import load_model  # noqa: E402
from featurescope.site_names import Site  # noqa: E402
from featurescope.precompute.feature_stats import expected_memory_bytes  # noqa: E402
from featurescope.precompute.job import PrecomputeConfig, run_precompute  # noqa: E402


def tables(path: Path) -> dict:
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        names = [n for (n,) in con.execute("SELECT table_name FROM information_schema.tables "
                                           "WHERE table_type = 'BASE TABLE' AND table_name != 'runs'").fetchall()]
        return {n: con.execute(f"SELECT * FROM {n} ORDER BY ALL").fetchall() for n in names}
    finally:
        con.close()


def same(tables_: dict, reference: dict) -> str:
    differ = [name for name in reference if tables_[name] != reference[name]]
    return "yes" if not differ else "NO: " + ", ".join(differ)


def round_trip_ms(ray, calls: int = 200) -> float:
    @ray.remote(num_cpus=0)
    class Echo:
        def echo(self, x):
            return x

    echo = Echo.remote()
    ray.get(echo.echo.remote(0))
    started = time.time()
    for i in range(calls):
        ray.get(echo.echo.remote(i))
    seconds = (time.time() - started) / calls
    ray.kill(echo)
    return seconds * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    import ray

    lm = load_model("smollm2-135m", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        written = write_release(Path(tmp) / "saes", lm, args.width, [Site(6, "res"), Site(12, "res")],
                                calibration_contexts=32, log=lambda *_: None)
        saes = [str(paths[0]) for _, paths in sorted(written.items())]
        base = dict(model="smollm2-135m", saes=saes, max_tokens=args.tokens, context_len=args.context_len,
                    batch_size=args.batch_size, device="cpu", progress=False)
        runs = {}
        timings: dict = {}
        path = run_precompute(PrecomputeConfig(**base, data_dir=f"{tmp}/single"), lm=lm, log=lambda *_: None, timings=timings)
        runs["single process"] = (timings, path)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="warning")
        try:
            rt = round_trip_ms(ray)
            for workers in (1, 2):
                timings = {}
                cfg = PrecomputeConfig(**base, data_dir=f"{tmp}/ray{workers}", ray="local", ray_workers=workers)
                path = run_precompute(cfg, lm=lm, log=lambda *_: None, timings=timings)
                runs[f"Ray, {workers} worker{'s' * (workers > 1)}"] = (timings, path)
        finally:
            ray.shutdown()
        report(runs, rt, args, lm)


def report(runs: dict, round_trip: float, args, lm) -> None:
    single = runs["single process"][0]
    reference = tables(runs["single process"][1])
    n_tokens = args.tokens // (args.context_len - 1) * args.context_len
    print(f"SmolLM2-135M (fp32, CPU, {os.cpu_count()} cores), 2 SAEs of width {args.width:,} (6-res, 12-res), "
          f"~{n_tokens:,} tokens, batch {args.batch_size}; bare Ray actor round trip {round_trip:.2f} ms; "
          f"load average at the end {os.getloadavg()[0]:.1f} (other jobs share the cores)")
    print(f"{'run':<18} {'stream s':>9} {'x single':>9} {'job s':>7} {'x single':>9} {'tasks':>6} "
          f"{'overhead/task':>14}  same DB")
    for name, (t, path) in runs.items():
        tasks = t.get("tasks")
        overhead = f"{(t['stream'] * t['workers'] - t['task_seconds']) / tasks * 1e3:.0f} ms" if tasks else "-"
        print(f"{name:<18} {t['stream']:>9.1f} {t['stream'] / single['stream']:>9.2f} {t['total']:>7.1f} "
              f"{t['total'] / single['total']:>9.2f} {tasks or '-':>6} {overhead:>14}  {same(tables(path), reference)}")
    state = 2 * expected_memory_bytes(args.width, 20, 5)
    two = runs["Ray, 2 workers"][0]
    print(f"bytes per task: tokens in {n_tokens // two['tasks'] * 8 / 1e3:.0f} kB (int64, {two['tasks']} tasks), "
          f"statistics back {state / 1e6:.1f} MB (2,004 bytes per feature x {2 * args.width:,} features, whatever the "
          f"task's length); the driver merged each in {two['merge_seconds'] / two['tasks'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
