"""Benchmark live encoding: a real uvicorn server in this process (so the bare forward pass it is compared
with runs in the same process, same dtype), and HTTP clients in a separate process on 127.0.0.1.
No assertions: the figures are for reading. Prints, each beside its own baseline:

  1. server time of a 64-token prompt (Server-Timing "total", p50/p99) with one SAE and with all SAEs,
     divided by the bare forward pass of the same prompt stopped at the same layer (target <= 1.15);
  2. requests/s with 16 concurrent clients versus the same requests one at a time, beside the bare
     forward's own batching gain (one batch of 16 prompts versus 16 single forwards);
  3. the server's resident memory before and after a few thousand requests.

    .venv/bin/python bench/live.py --data-dir data          # the demo's published data (scripts/demo.sh)
    .venv/bin/python bench/live.py --data-dir data --requests 50 --memory-requests 500   # quicker
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ client
async def _client(port: int, paths: list[str], concurrency: int) -> dict:
    """GET every path over `concurrency` keep-alive connections; per request: wall ms and server total ms."""
    queue: asyncio.Queue = asyncio.Queue()
    for p in paths:
        queue.put_nowait(p)
    wall, server, statuses = [], [], {}

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while not queue.empty():
            path = queue.get_nowait()
            started = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            await reader.readexactly(int(headers.get("content-length", 0)))
            wall.append((time.perf_counter() - started) * 1000)
            statuses[status] = statuses.get(status, 0) + 1
            for part in headers.get("server-timing", "").split(","):
                name, _, dur = part.strip().partition(";dur=")
                if name == "total":
                    server.append(float(dur))
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"seconds": time.perf_counter() - started, "wall_ms": wall, "server_ms": server, "statuses": statuses}


def run_client(port: int, paths: list[str], concurrency: int) -> dict:
    """The client runs in its own process so it never competes with the server for this process's GIL."""
    spec = json.dumps({"port": port, "paths": paths, "concurrency": concurrency})
    out = subprocess.run([sys.executable, __file__, "--client"], input=spec, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


# ------------------------------------------------------------------------------------------------ server
def start_server(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


# -------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--requests", type=int, default=100, help="requests per latency series")
    parser.add_argument("--throughput-requests", type=int, default=96, help="requests per throughput series")
    parser.add_argument("--memory-requests", type=int, default=2000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    from featurescope.app import Settings, create_app
    from featurescope.app.catalog import CatalogSource
    from featurescope.app.databases import DataDir
    from featurescope.app.live import LiveService, resolve_source
    from featurescope.corpus import pack_contexts, python_docs_corpus
    from featurescope.models import load_model
    from featurescope.sites import run_truncated

    settings = Settings(data_dir=args.data_dir.resolve(), device=args.device, max_batch=16, max_queue=256)
    catalog = CatalogSource(DataDir(settings.db_dir)).current()
    if not catalog.models:
        sys.exit(f"No published data in {settings.db_dir}: run bash scripts/demo.sh first (or pass --data-dir).")
    model = next(iter(catalog.models.values()))
    saes = list(model.saes.values())
    one = next((s for s in saes if s.layer == sorted(x.layer for x in saes)[len(saes) // 2]), saes[0])
    print(f"model {model.id}, SAEs {', '.join(s.id for s in saes)}; one-SAE series uses {one.id}")

    lm = load_model(resolve_source(model.source, settings.data_dir), device=args.device, name=model.id)
    torch.set_num_threads(torch.get_num_threads())
    contexts = pack_contexts(lm, python_docs_corpus(), args.tokens)[:400]  # BOS + (tokens - 1) corpus tokens each
    prompts = [",".join(map(str, row.tolist())) for row in contexts]
    rng = random.Random(0)

    service = LiveService(settings, preloaded={model.id: lm})
    app = create_app(settings, service)
    port = free_port()
    server, thread = start_server(app, port)
    print(f"server on 127.0.0.1:{port}, torch threads {torch.get_num_threads()}, device {lm.device}, dtype {lm.dtype}")

    def paths(n: int, sae_ids: list[str] | None) -> list[str]:
        from urllib.parse import urlencode
        out = []
        for _ in range(n):
            params = [("ids", rng.choice(prompts))] + [("saes", s) for s in (sae_ids or [])]
            out.append(f"/{model.id}/-/encode.json?{urlencode(params)}")
        return out

    run_client(port, paths(8, None), 1)  # warm-up: loads every SAE, caches labels

    print(f"\n1. Server time of a {args.tokens}-token prompt vs the bare truncated forward (same process, {lm.dtype})")
    for label, sae_ids, layer in ((f"one SAE ({one.id})", [one.id], one.layer),
                                  (f"all {len(saes)} SAEs", None, max(s.layer for s in saes))):
        ids = contexts[:1]
        bare = timed(lambda: run_truncated(lm, ids, layer), args.requests // 2)
        result = run_client(port, paths(args.requests, sae_ids), 1)
        srv, wall = result["server_ms"], result["wall_ms"]
        bare_p50 = statistics.median(bare)
        print(f"   {label:<22} bare forward to layer {layer}: p50 {bare_p50:6.1f} ms | server p50 {pct(srv, 50):6.1f} ms, "
              f"p99 {pct(srv, 99):6.1f} ms | client p50 {pct(wall, 50):6.1f} ms, p99 {pct(wall, 99):6.1f} ms "
              f"| ratio server p50 / bare p50 = {pct(srv, 50) / bare_p50:.2f}")

    print("\n2. Throughput: 16 concurrent clients vs one at a time, beside the bare forward's batching gain")
    for label, sae_ids, layer in ((f"one SAE ({one.id})", [one.id], one.layer),
                                  (f"all {len(saes)} SAEs", None, max(s.layer for s in saes))):
        batch = contexts[:16]
        singles = statistics.median(timed(lambda: [run_truncated(lm, batch[i:i + 1], layer) for i in range(16)], 3))
        batched = statistics.median(timed(lambda: run_truncated(lm, batch, layer), 3))
        bare_gain = singles / batched
        n = args.throughput_requests
        sequential = run_client(port, paths(n, sae_ids), 1)
        concurrent = run_client(port, paths(n, sae_ids), 16)
        seq_rps, con_rps = n / sequential["seconds"], n / concurrent["seconds"]
        gain = con_rps / seq_rps
        captured = (gain - 1) / (bare_gain - 1) if bare_gain > 1 else float("nan")
        print(f"   {label:<22} one at a time {seq_rps:6.1f} req/s | 16 concurrent {con_rps:6.1f} req/s (p50 "
              f"{pct(concurrent['wall_ms'], 50):.0f} ms) | gain {gain:.2f}x vs bare batching gain {bare_gain:.2f}x "
              f"({singles:.0f} ms for 16 singles, {batched:.0f} ms for one batch of 16) | captured {gain / bare_gain:.0%} "
              f"of the gain ({captured:.0%} of the excess over 1x)")

    print(f"\n3. Memory over {args.memory_requests} requests (16 concurrent, one SAE, {args.tokens}-token prompts)")
    before = rss_mb()
    done, statuses = 0, {}
    started = time.perf_counter()
    while done < args.memory_requests:
        chunk = min(500, args.memory_requests - done)
        result = run_client(port, paths(chunk, [one.id]), 16)
        for k, v in result["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
        done += chunk
        print(f"   after {done:>5} requests: RSS {rss_mb():7.1f} MB")
    after = rss_mb()
    print(f"   RSS {before:.1f} MB -> {after:.1f} MB ({after - before:+.1f} MB) over {done} requests in "
          f"{time.perf_counter() - started:.0f} s; statuses {statuses}; served by the encoder: {service.models[model.id].served}")
    server.should_exit = True
    thread.join(timeout=10)


if __name__ == "__main__":
    if sys.argv[1:] == ["--client"]:
        spec = json.loads(sys.stdin.read())
        print(json.dumps(asyncio.run(_client(spec["port"], spec["paths"], spec["concurrency"]))))
    else:
        main()
