"""Benchmark the explorer's feature page: a real `featurescope serve` on 127.0.0.1, a bounded number of
requests for random feature pages from 8 concurrent keep-alive clients, HTML and JSON. Prints p50/p99
latency, requests/s, and the CPU each request cost the server and the client (read from /proc, so it
holds on a busy machine). No assertions: the figures are for reading (targets: p50 <= 20 ms, >= 200
requests/s).

Every feature of the "cold" pass is one the server has not been asked for yet, so nothing about it is
cached; the "warm" pass asks again, in random order, for the last 100 features of the cold pass (a
cache's best case). HTML and JSON use different features.

    .venv/bin/python bench/serve.py --data-dir data      # the demo's published data (8,192 features)
    .venv/bin/python bench/serve.py                      # a factory database instead (6,144 features)
    .venv/bin/python bench/serve.py --workers 1          # one server process (default: serve's, one per core)

The client is a few lines of asyncio on raw sockets (HTTP/1.1 keep-alive), because it shares the
machine's cores with the server: an HTTP library's parsing would cost the server CPU time.
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
from dataclasses import dataclass
from pathlib import Path

from featurescope.app.serving import default_workers

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 100  # features asked for before measuring: vocab, contexts and pools load
REVISITED = 100  # features of the warm pass, all among the last ones of the cold pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_bench_data(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))  # the test factories build the benchmark database
    from factories import SAESpec, make_db

    started = time.perf_counter()
    make_db(folder / "db" / "bench.duckdb", model_id="bench-model", n_contexts=2048, context_len=128, n_top=20,
            n_bins=5, per_bin=3, saes=(SAESpec("8-res-4k", 8, "res", 4096, l0=60.0, fvu=0.2, delta_loss=0.05),
                                       SAESpec("12-res-2k", 12, "res", 2048, l0=40.0)))
    print(f"bench data: 6,144 features, 2,048 contexts x 128 tokens, built in {time.perf_counter() - started:.1f} s")
    return folder


def start_server(data_dir: Path, port: int, log: Path, workers: int) -> subprocess.Popen:
    """`featurescope serve --no-live`: the page is measured without a model loading beside it."""
    with open(log, "wb") as out:  # a file, not a pipe nobody reads: a full pipe would block the server's logging
        server = subprocess.Popen([str(ROOT / ".venv/bin/featurescope"), "serve", "--data-dir", str(data_dir), "--port",
                                   str(port), "--workers", str(workers), "--no-live"],
                                  stdout=subprocess.DEVNULL, stderr=out, cwd=ROOT)
    deadline = time.monotonic() + 300  # a slow start is slow, not an error
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/health", timeout=1) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (uvicorn workers), from /proc."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:  # fields[1]: parent pid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def all_features(base: str) -> list[str]:
    with urllib.request.urlopen(f"{base}/.json") as r:
        home = json.load(r)
    return [f"/{m['id']}/{s['id']}/{i}" for m in home["models"] for s in m["saes"] for i in range(s["d_sae"])]


async def fetch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    """One GET on a kept-alive connection; returns the status. The body is read in full and dropped."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(":", 1) for line in header_lines if line)
    length = {k.lower(): v for k, v in headers.items()}.get("content-length")
    if length is None:
        raise RuntimeError(f"{path}: response without Content-Length")
    await reader.readexactly(int(length))
    return int(status_line.split()[1])


@dataclass
class Pass:
    latencies: list[float]
    seconds: float
    errors: int
    server_cpu: float
    client_cpu: float


async def run_load(port: int, paths: list[str], clients: int, server_pid: int) -> Pass:
    queue = list(reversed(paths))
    latencies: list[float] = []
    errors = 0

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while queue:
            path = queue.pop()
            started = time.perf_counter()
            status = await fetch(reader, writer, path)
            latencies.append(time.perf_counter() - started)
            errors += status != 200
        writer.close()

    server_cpu, client_cpu, started = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return Pass(latencies, time.perf_counter() - started, errors, cpu_seconds(server_pid) - server_cpu,
                time.process_time() - client_cpu)


def report(name: str, p: Pass) -> None:
    ms = sorted(x * 1000 for x in p.latencies)
    n = len(ms)
    p99 = ms[min(n - 1, int(n * 0.99))]
    print(f"{name:<18} {n:>5} requests  p50 {statistics.median(ms):6.1f} ms  p99 {p99:6.1f} ms  {n / p.seconds:6.1f} requests/s  "
          f"CPU/request: server {p.server_cpu / n * 1000:5.2f} ms, client {p.client_cpu / n * 1000:4.2f} ms  errors {p.errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="Serve this data dir instead of building a factory database.")
    parser.add_argument("--requests", type=int, default=2000, help="Requests per pass (HTML and JSON, cold and warm).")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients.")
    parser.add_argument("--workers", type=int, default=default_workers(live=False),
                        help="Server processes (featurescope serve --workers; the default is serve's with --no-live).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="featurescope-bench-") as tmp:
        data_dir = args.data_dir or build_bench_data(Path(tmp))
        port = free_port()
        log = Path(tmp) / "server.log"
        server = start_server(data_dir, port, log, args.workers)
        base = f"http://127.0.0.1:{port}"
        try:
            features = all_features(base)
            if WARMUP + 2 * args.requests > len(features):
                sys.exit(f"--requests {args.requests} needs {WARMUP + 2 * args.requests} features (no feature twice in "
                         f"the cold passes); the data has {len(features)}")
            rng.shuffle(features)
            warmup, html, js = features[:WARMUP], features[WARMUP:][:args.requests], features[WARMUP + args.requests:][:args.requests]
            print(f"server: featurescope serve --no-live --workers {args.workers} on {base}, {os.cpu_count()} CPU cores, "
                  f"{args.clients} concurrent clients, load average before: {os.getloadavg()[0]:.1f}")
            asyncio.run(run_load(port, warmup + [p + ".json" for p in warmup], args.clients, server.pid))
            for name, paths in (("feature HTML", html), ("feature JSON", [p + ".json" for p in js])):
                report(f"{name} cold", asyncio.run(run_load(port, paths, args.clients, server.pid)))
                again = [rng.choice(paths[-REVISITED:]) for _ in paths]
                report(f"{name} warm", asyncio.run(run_load(port, again, args.clients, server.pid)))
        finally:
            server.terminate()
            server.wait(timeout=10)
            if log.stat().st_size:
                print(f"server log (last 2,000 characters):\n{log.read_text()[-2000:]}")


if __name__ == "__main__":
    main()
