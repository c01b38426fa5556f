"""Start-up of `featurescope serve --no-live` over many published files: seconds from the process start to
/-/health answering 200 (every worker's catalog loaded), against the same server over one file.

    .venv/bin/python bench/catalog_startup.py --files 100
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bench.serve import free_port

ROOT = Path(__file__).resolve().parent.parent


def seconds_to_ready(data_dir: Path, workers: int) -> float:
    port = free_port()
    exe = Path(sys.executable).parent / "featurescope"
    started = time.perf_counter()
    server = subprocess.Popen([str(exe), "serve", "--data-dir", str(data_dir), "--port", str(port), "--no-live",
                               "--workers", str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - started < 120:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/health", timeout=5) as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.05)
        raise SystemExit("the server did not get ready in 120 s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))  # the test factories build the files
    from factories import SAESpec, make_db

    with tempfile.TemporaryDirectory(prefix="featurescope-catalog-") as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        make_db(one / "db" / "m0.duckdb", model_id="model-0", n_contexts=64, context_len=32,
                        saes=(SAESpec("2-res-64", 2, "res", 64),))
        (many / "db").mkdir(parents=True)
        for i in range(args.files):  # one model per file, so every file's SAEs are served (none hides another)
            make_db(many / "db" / f"m{i}.duckdb", model_id=f"model-{i}", n_contexts=64, context_len=32,
                    saes=(SAESpec("2-res-64", 2, "res", 64),))
        for label, folder in (("1 file", one), (f"{args.files} files", many)):
            times = sorted(seconds_to_ready(folder, args.workers) for _ in range(3))
            print(f"{label:>10}: ready in {times[1]:.2f} s (median of 3; {args.workers} workers)", flush=True)


if __name__ == "__main__":
    main()
