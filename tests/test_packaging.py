"""FeatureScope installs as one wheel holding one import package, `featurescope`, with its templates, static
files and migrations as package data: run from another folder, nothing comes from the source tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from factories import make_db
from test_browser import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv with the built wheel installed (no editable finder, no source tree on sys.path). Its
    third-party dependencies come from the project's venv through a path entry, so the test installs
    nothing from the network."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(root / "dist"), str(ROOT)], check=True, capture_output=True, cwd=root)
    (wheel,) = (root / "dist").glob("featurescope-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert tops == {"featurescope"}, tops
    for packaged in ("featurescope/templates/feature.html", "featurescope/static/app.css",
                     "featurescope/migrations/env.py", "featurescope/migrations/script.py.mako",
                     "featurescope/migrations/versions/0004_feature_rows.py", "featurescope/app/routes/features.py",
                     "featurescope/precompute/job.py"):
        assert packaged in names, packaged
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "featurescope"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_the_wheel_imports_featurescope_from_itself_not_from_the_source_tree(wheel_venv, tmp_path):
    found = subprocess.run([str(wheel_venv / "bin" / "python"), "-c",
                            "import featurescope.app, featurescope.precompute, featurescope.assets as a;"
                            "print(featurescope.app.__file__); print(a.asset_dir('templates'))"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout.split()
    assert all(str(wheel_venv) in path for path in found), found
    assert "Usage" in _run(wheel_venv, "--help", cwd=tmp_path).stdout


def test_the_wheel_upgrades_a_database_and_serves_its_feature_pages(wheel_venv, tmp_path):
    from alembic import command

    import featurescope.db as fsdb

    path = make_db(tmp_path / "data" / "db" / "run.duckdb")
    cfg, engine = fsdb.alembic_config(path), fsdb.engine_for(path)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0003")
    engine.dispose()
    upgraded = _run(wheel_venv, "db", "upgrade", str(path), cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert fsdb.current_revision(path) == fsdb.head_revision()

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    server = subprocess.Popen([str(wheel_venv / "bin" / "featurescope"), "serve", "--data-dir",
                               str(tmp_path / "data"), "--port", str(port), "--no-live", "--workers", "1"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/-/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()
                time.sleep(0.2)
        with urllib.request.urlopen(f"{base}/tiny-gemma-2/2-res-64/5", timeout=10) as response:
            page = response.read().decode()
        assert "Feature 5" in page or "#5" in page
        with urllib.request.urlopen(f"{base}/-/static/app.css", timeout=10) as response:
            assert response.status == 200
        with urllib.request.urlopen(f"{base}/tiny-gemma-2/2-res-64/5.json", timeout=10) as response:
            assert json.load(response)["index"] == 5
    finally:
        server.terminate()
        server.wait(timeout=30)
