"""No wrong answers at start-up: a server never answers 404 for a feature whose file it has not read yet,
and /-/health is green only when every worker process is ready."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from factories import make_app_client, make_data_dir, make_db
from test_browser import free_port

EXE = str(Path(sys.executable).with_name("featurescope"))
FEATURE = "/tiny-gemma-2/2-res-64/{}.json"


def _slow_data_dir(root: Path, copies: int = 40) -> Path:
    """A data dir whose first scan takes a while: many published files, each attached and read at start."""
    make_data_dir(root)
    for i in range(copies):
        shutil.copy(root / "db" / "tiny.duckdb", root / "db" / f"copy-{i:02d}.duckdb")
    return root


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_no_request_right_after_start_meets_a_worker_that_has_not_read_its_files(tmp_path):
    """Many requests on new connections right after /-/health turns green, with two workers and a slow start:
    every one is answered from the data (the bug: a worker answered 404 "Unknown model" while it scanned)."""
    _slow_data_dir(tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen([EXE, "serve", "--data-dir", str(tmp_path), "--port", str(port), "--no-live", "--workers", "2"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                status, body = _get(f"{base}/-/health")
            except OSError:
                time.sleep(0.05)
                continue
            if status == 200:
                health = json.loads(body)
                break
            assert status == 503 and json.loads(body)["status"] == "starting"
            time.sleep(0.05)
        assert health is not None, (tmp_path / "serve.log").read_text()
        assert health["workers"] == health["workers_ready"] == 2
        with ThreadPoolExecutor(16) as pool:  # urllib opens a new connection per request
            answers = list(pool.map(lambda i: _get(base + FEATURE.format(i % 64)), range(80)))
        assert [status for status, _ in answers] == [200] * 80, [body[:200] for status, body in answers if status != 200]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_concurrent_first_requests_wait_for_the_first_scan(tmp_path, monkeypatch):
    """In one process: requests arriving while the first scan is still opening files wait for it."""
    import featurescope.app.databases as databases
    from featurescope.app.catalog import CatalogSource

    make_data_dir(tmp_path)
    slow_open = databases.DataFile.__init__

    def opening_slowly(self, *args, **kwargs):
        time.sleep(0.3)
        slow_open(self, *args, **kwargs)

    monkeypatch.setattr(databases.DataFile, "__init__", opening_slowly)
    source = CatalogSource(databases.DataDir(tmp_path / "db"))
    start = threading.Barrier(8)

    def first_request(_: int) -> bool:
        start.wait()
        return source.current().has_sae("tiny-gemma-2", "2-res-64")

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(first_request, range(8)))


def test_a_file_published_after_the_last_scan_is_found_not_404(tmp_path):
    """A shared link to a run published a moment ago works at once, even between two scheduled rescans."""
    make_data_dir(tmp_path)
    with make_app_client(tmp_path, rescan_seconds=3600) as client:
        assert client.get("/tiny-gemma-2.json").status_code == 200
        assert client.get("/new-model/2-res-64/3.json").status_code == 404
        make_db(tmp_path / "db" / ".new.duckdb.tmp", model_id="new-model")
        (tmp_path / "db" / ".new.duckdb.tmp").rename(tmp_path / "db" / "new.duckdb")  # as the writer publishes
        assert client.get("/new-model/2-res-64/3.json").json()["index"] == 3
        assert client.get("/new-model").status_code == 200
        assert client.get("/new-model.json").json()["model"]["id"] == "new-model"


def test_health_is_not_green_while_a_worker_is_starting(tmp_path):
    from fastapi.testclient import TestClient

    from featurescope.app import Settings, create_app

    make_data_dir(tmp_path)
    workers_ready = [1]
    app = create_app(Settings(data_dir=tmp_path, live=False), readiness=lambda: (workers_ready[0], 2))
    with TestClient(app) as client:
        starting = client.get("/-/health")
        assert starting.status_code == 503 and starting.headers["Retry-After"] == "1"
        assert starting.json()["status"] == "starting" and starting.json()["workers_ready"] == 1
        workers_ready[0] = 2
        ready = client.get("/-/health")
        assert ready.status_code == 200 and ready.json()["status"] == "ok"


def test_a_server_without_live_encoding_never_imports_torch(tmp_path):
    """`serve --no-live` serves stored pages only: building the app, starting it and answering every kind of
    page (live ones with 503) load no torch, which is most of a worker's memory and start-up time."""
    make_data_dir(tmp_path)
    script = f"""
import sys
from pathlib import Path
from fastapi.testclient import TestClient
from featurescope.app import Settings, create_app
from featurescope.app import serving  # what a worker process imports

with TestClient(create_app(Settings(data_dir=Path({str(tmp_path)!r}), live=False))) as client:
    for path in ("/", "/tiny-gemma-2", "/tiny-gemma-2/2-res-64", "/tiny-gemma-2/2-res-64/3",
                 "/tiny-gemma-2/2-res-64/3.json", "/tiny-gemma-2/2-res-64/3/-/lineage"):
        assert client.get(path).status_code == 200, path
    assert client.get("/tiny-gemma-2/-/encode.json", params={{"text": "hi"}}).status_code == 503
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
