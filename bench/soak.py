"""Soak benchmark of a live server: N clients for T seconds, a mix of encode pages, feature test boxes,
steering and stored feature pages, against a real `featurescope serve` (live encoding on) on 127.0.0.1.

    python bench/soak.py --data-dir data                       # the demo's data (bash scripts/demo.sh)
    python bench/soak.py --data-dir data --clients 32 64 --seconds 40 --runs 2

Each client sends one request at a time on its own keep-alive connection; on a 503 it waits the
Retry-After it was given (what a well-behaved client does), then goes on. Per client count and run it
prints the accepted requests' p50/p99 per kind and overall, the 503 share, and the server's RSS at the
start and end. The baseline, measured in the same server before the soak: each kind's service time
alone (one client, p50). The admission target: accepted p99 <= --max-wait + one service time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Sparse autoencoders decompose the residual stream of a transformer into interpretable features.",
    "Traceback (most recent call last):\n  File \"main.py\", line 3, in <module>\n    raise ValueError('bad input')",
    "import os\nfor name in os.listdir('.'):\n    if name.endswith('.py'):\n        print(name)",
    "The quick brown fox jumps over the lazy dog while the cat watches from the window.",
    "To install the package, run pip install and then import it in your Python session.",
    "A list comprehension builds a new list: [x * x for x in range(10) if x % 2 == 0].",
]
DEFAULT_MIX = "encode=4,test=3,steer=1,page=2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ------------------------------------------------------------------------------------------- requests
class Targets:
    """The URLs of each kind of request, drawn from what the server serves."""

    def __init__(self, base: str, n_tokens: int, rng: random.Random) -> None:
        with urllib.request.urlopen(f"{base}/.json", timeout=30) as response:
            models = json.load(response)["models"]
        if not models:
            sys.exit("The server has no published data: run bash scripts/demo.sh first (or pass --data-dir).")
        self.model = models[0]
        self.saes = [(s["id"], s["d_sae"]) for s in self.model["saes"]]
        self.n_tokens, self.rng = n_tokens, rng

    def path(self, kind: str) -> tuple[str, dict[str, str]]:
        model, rng = self.model["id"], self.rng
        sae, d_sae = rng.choice(self.saes)
        feature, text = rng.randrange(d_sae), rng.choice(PROMPTS)
        quote = urllib.parse.quote
        if kind == "encode":
            return f"/{model}/-/encode?text={quote(text)}", {}
        if kind == "test":
            return f"/{model}/{sae}/{feature}/-/test?text={quote(text)}", {"HX-Request": "true", "HX-Target": "test-result"}
        if kind == "steer":
            spec = quote(f"{sae}:{feature}")
            return f"/{model}/-/steer.json?text={quote(text)}&feature={spec}&n_tokens={self.n_tokens}&seed=1", {}
        return f"/{model}/{sae}/{feature}", {}


async def _get(reader, writer, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    found = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    await reader.readexactly(int(found.get("content-length", 0)))
    return status, found


async def _soak(port: int, targets: Targets, kinds: list[str], weights: list[float], clients: int, seconds: float,
                max_requests: int) -> list[tuple[str, int, float]]:
    done: list[tuple[str, int, float]] = []
    deadline = time.monotonic() + seconds

    async def client(seed: int) -> None:
        rng = random.Random(seed)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline and len(done) < max_requests:
                kind = rng.choices(kinds, weights)[0]
                path, headers = targets.path(kind)
                started = time.perf_counter()
                status, found = await _get(reader, writer, path, headers)
                done.append((kind, status, (time.perf_counter() - started) * 1000))
                if status == 503:
                    await asyncio.sleep(min(float(found.get("retry-after", 1)), max(0.0, deadline - time.monotonic())))
        finally:
            writer.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return done


# ---------------------------------------------------------------------------------------------- server
def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("featurescope")
    command = [str(exe), "serve", "--data-dir", str(args.data_dir), "--port", str(port), "--load", "startup",
               "--device", "cpu", "--max-wait", str(args.max_wait), "--max-new-tokens", str(max(args.steer_tokens, 1))]
    log = open(args.log, "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited: {Path(args.log).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit("the server did not start within 300 s")


def service_times(port: int, targets: Targets, kinds: list[str], repeats: int) -> dict[str, float]:
    """The baseline: each kind alone, one client, p50 ms (the first requests also wait for the model load)."""
    async def measure() -> dict[str, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        out = {}
        for kind in kinds:
            times = []
            for i in range(repeats + 2):
                path, headers = targets.path(kind)
                started = time.perf_counter()
                status, _ = await _get(reader, writer, path, headers)
                if status != 200:
                    raise RuntimeError(f"{kind} {path} answered {status} while the server was idle")
                if i >= 2:  # warm-up
                    times.append((time.perf_counter() - started) * 1000)
            out[kind] = pct(times, 50)
        writer.close()
        return out

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--clients", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--seconds", type=float, default=40.0, help="Duration of each run.")
    parser.add_argument("--runs", type=int, default=2, help="Consecutive runs per client count (RSS must stay flat).")
    parser.add_argument("--max-requests", type=int, default=20000, help="Bound on requests per run.")
    parser.add_argument("--max-wait", type=float, default=10.0, help="The server's --max-wait.")
    parser.add_argument("--mix", default=DEFAULT_MIX, help="Weights of the request kinds.")
    parser.add_argument("--steer-tokens", type=int, default=16, help="Tokens each steering request generates.")
    parser.add_argument("--baseline-repeats", type=int, default=5, help="Requests of each kind alone, for the baseline.")
    parser.add_argument("--log", default="/tmp/featurescope-soak-server.log")
    args = parser.parse_args()

    mix = dict(part.split("=") for part in args.mix.split(","))
    kinds, weights = list(mix), [float(w) for w in mix.values()]
    port = free_port()
    server = start_server(args, port)
    try:
        targets = Targets(f"http://127.0.0.1:{port}", args.steer_tokens, random.Random(0))
        alone = service_times(port, targets, kinds, repeats=args.baseline_repeats)
        print(f"server pid {server.pid}, --max-wait {args.max_wait:g} s, mix {args.mix}, steering {args.steer_tokens} tokens")
        print("service time alone (p50): " + ", ".join(f"{k} {v:.0f} ms" for k, v in alone.items()))
        for clients in args.clients:
            for run in range(1, args.runs + 1):
                rss_start = rss_mb(server.pid)
                started = time.perf_counter()
                done = asyncio.run(_soak(port, targets, kinds, weights, clients, args.seconds, args.max_requests))
                elapsed = time.perf_counter() - started
                rss_end = rss_mb(server.pid)
                report(clients, run, done, elapsed, rss_start, rss_end, alone, args.max_wait)
    finally:
        server.terminate()
        server.wait(timeout=60)


def report(clients: int, run: int, done: list[tuple[str, int, float]], elapsed: float, rss_start: float, rss_end: float,
           alone: dict[str, float], max_wait: float) -> None:
    accepted = [ms for _, status, ms in done if status == 200]
    refused = sum(1 for _, status, _ in done if status == 503)
    other = len(done) - len(accepted) - refused
    print(f"\n{clients} clients, run {run}: {len(done)} requests in {elapsed:.1f} s ({len(done) / elapsed:.1f}/s), "
          f"accepted {len(accepted)}, 503 {refused} ({refused / max(1, len(done)):.1%}), other {other}; "
          f"server RSS {rss_start:.0f} -> {rss_end:.0f} MB ({(rss_end - rss_start) / rss_start:+.1%})")
    for kind in alone:
        times = [ms for k, status, ms in done if k == kind and status == 200]
        shed = sum(1 for k, status, _ in done if k == kind and status == 503)
        print(f"  {kind:<7} accepted {len(times):>5}  p50 {pct(times, 50):>8.0f} ms  p99 {pct(times, 99):>8.0f} ms  "
              f"503 {shed}")
    worst_service = max(alone.values())
    p99 = pct(accepted, 99)
    print(f"  all     accepted p50 {pct(accepted, 50):.0f} ms, p99 {p99:.0f} ms; target p99 <= max-wait + one service "
          f"time = {max_wait * 1000 + worst_service:.0f} ms: {'met' if p99 <= max_wait * 1000 + worst_service else 'NOT met'}")


if __name__ == "__main__":
    main()
