"""Benchmark the explorer's feature page: a real `featurescope serve` on 127.0.0.1, a bounded number of
requests for random features from 8 concurrent clients, HTML and JSON. Prints p50/p99 latency and
requests/s. No assertions: the figures are for reading (targets: p50 <= 20 ms, >= 200 requests/s).

    .venv/bin/python bench/serve.py                      # builds a factory database (6,144 features)
    .venv/bin/python bench/serve.py --data-dir data      # the demo's published data instead
    .venv/bin/python bench/serve.py --workers 2                         # two server processes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_bench_data(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from factories import SAESpec, make_db

    started = time.perf_counter()
    make_db(folder / "db" / "bench.duckdb", model_id="bench-model", n_contexts=2048, context_len=128, n_top=20,
            n_bins=5, per_bin=3, saes=(SAESpec("8-res-4k", 8, "res", 4096, l0=60.0, fvu=0.2, delta_loss=0.05),
                                       SAESpec("12-res-2k", 12, "res", 2048, l0=40.0)))
    print(f"bench data: 6,144 features, 2,048 contexts x 128 tokens, built in {time.perf_counter() - started:.1f} s")
    return folder


def start_server(data_dir: Path, port: int, workers: int = 1) -> subprocess.Popen:
    server = subprocess.Popen([str(ROOT / ".venv/bin/featurescope"), "serve", "--data-dir", str(data_dir), "--port", str(port),
                               "--workers", str(workers)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/health", timeout=1) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"server did not start: {server.stderr.read().decode()[-2000:]}")


def feature_urls(base: str, n: int, suffix: str, rng: random.Random) -> list[str]:
    with urllib.request.urlopen(f"{base}/.json") as r:
        home = json.load(r)
    saes = [(m["id"], s["id"], s["d_sae"]) for m in home["models"] for s in m["saes"]]
    return [f"{base}/{m}/{s}/{rng.randrange(d)}{suffix}" for m, s, d in (rng.choice(saes) for _ in range(n))]


async def run_load(urls: list[str], clients: int) -> tuple[list[float], float, int]:
    import httpx

    queue: asyncio.Queue[str] = asyncio.Queue()
    for url in urls:
        queue.put_nowait(url)
    latencies: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        async with httpx.AsyncClient(timeout=30) as http:
            while not queue.empty():
                url = queue.get_nowait()
                started = time.perf_counter()
                response = await http.get(url)
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - started, errors


def report(name: str, latencies: list[float], seconds: float, errors: int) -> None:
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"{name:<14} {len(ms):>6} requests  p50 {statistics.median(ms):6.1f} ms  p99 {p99:6.1f} ms  "
          f"{len(ms) / seconds:7.1f} requests/s  errors {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="Serve this data dir instead of building a factory database.")
    parser.add_argument("--requests", type=int, default=2000, help="Requests per format (HTML, JSON).")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients.")
    parser.add_argument("--workers", type=int, default=1, help="Server processes (featurescope serve --workers).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="featurescope-bench-") as tmp:
        data_dir = args.data_dir or build_bench_data(Path(tmp))
        port = free_port()
        server = start_server(data_dir, port, args.workers)
        base = f"http://127.0.0.1:{port}"
        try:
            print(f"server: featurescope serve --workers {args.workers} on {base}, {os.cpu_count()} CPU cores, "
                  f"{args.clients} concurrent clients, load average before: {os.getloadavg()[0]:.1f}")
            asyncio.run(run_load(feature_urls(base, 100, "", rng), args.clients))  # warm-up: vocab, pools, templates
            for name, suffix in (("feature HTML", ""), ("feature JSON", ".json")):
                latencies, seconds, errors = asyncio.run(run_load(feature_urls(base, args.requests, suffix, rng), args.clients))
                report(name, latencies, seconds, errors)
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
