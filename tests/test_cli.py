"""The installed `featurescope` command: help on every command, real runs, and clear errors (exit 2)."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import random_sae_params

EXE = shutil.which("featurescope") or str(Path(sys.executable).parent / "featurescope")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0
    for command in ("demo", "encode", "sites", "sae-info"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["demo", "encode", "sites", "sae-info", "contrast", "detect"])
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout


def test_encode_prints_each_tokens_features_and_marks_bos_as_excluded(tiny_gemma2_path, tmp_path):
    np.savez(tmp_path / "params.npz", **random_sae_params(64, 32, threshold=0.0))
    result = run("encode", "The capital of France", "--model", str(tiny_gemma2_path),
                 "--sae", str(tmp_path / "params.npz"), "--site", "1-res", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("'<bos>'" in line and "excluded" in line for line in lines)
    assert any("' capital'" in line and "#" in line for line in lines)


def test_sae_info_describes_an_sae(tmp_path):
    np.savez(tmp_path / "params.npz", **random_sae_params(64, 32))
    result = run("sae-info", str(tmp_path), "--site", "blocks.3.hook_mlp_out")
    assert result.returncode == 0
    assert "blocks.3.hook_mlp_out" in result.stdout and "d_sae        32" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["sae-info", "/no/such/sae"], "neither an existing file or folder"),
    (["sae-info", "google/gemma-scope-2b-pt-res/layer_20/average_l0_71"], "does not parse"),
    (["encode", "hi", "--model", "./no/model", "--sae", "/no/sae"], "neither an existing file"),
])
def test_user_errors_print_one_clear_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unknown_site_on_the_command_line_is_a_clear_error(tiny_gemma2_path, tmp_path):
    np.savez(tmp_path / "params.npz", **random_sae_params(64, 32))
    result = run("encode", "hi", "--model", str(tiny_gemma2_path), "--sae", str(tmp_path), "--site", "9-res", "--device", "cpu")
    assert result.returncode == 2 and "has 4 layers (0 to 3)" in result.stderr


@pytest.mark.parametrize("workers", [None, "2"])
def test_serve_without_live_encoding_serves_from_one_process_per_core(tmp_path, workers):
    """`featurescope serve --no-live` is the real command, with one worker process per core by default:
    each has its own socket on the port (SO_REUSEPORT), and the kernel spreads connections over all of them."""
    import json
    import os
    import time
    import urllib.request

    from factories import make_data_dir
    from test_browser import free_port

    make_data_dir(tmp_path)
    port = free_port()
    args = [EXE, "serve", "--data-dir", str(tmp_path), "--port", str(port), "--no-live"] + (["--workers", workers] if workers else [])
    expected = int(workers) if workers else min(os.cpu_count() or 1, 8)
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log)
    try:
        base, deadline, bodies = f"http://127.0.0.1:{port}", time.monotonic() + 300, set()
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{base}/-/health", timeout=1):
                    break
            except OSError:
                time.sleep(0.2)
        pids = set()
        for _ in range(40):  # new connections: the kernel spreads them over the worker processes
            with urllib.request.urlopen(f"{base}/tiny-gemma-2/2-res-64/3.json", timeout=60) as response:
                bodies.add(response.read())
            with urllib.request.urlopen(f"{base}/-/health", timeout=60) as response:
                pids.add(json.load(response)["pid"])
        assert len(bodies) == 1 and b'"index":3' in next(iter(bodies))
        assert len(pids) == expected and pids <= set(_children(server.pid)) | {server.pid}
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert f"{expected} server process" in out.decode(), out.decode() + (tmp_path / "serve.log").read_text()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_serve_refuses_a_port_that_is_already_served(tmp_path):
    """Worker sockets share their port (SO_REUSEPORT): a second server on the same port must fail, not
    silently take half of the first one's connections."""
    import socket as socket_module

    from test_browser import free_port

    port = free_port()
    with socket_module.socket() as taken:
        taken.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEADDR, 1)
        taken.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = run("serve", "--data-dir", str(tmp_path), "--port", str(port), "--no-live", "--workers", "2")
    assert result.returncode == 2
    assert f"Cannot serve on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr
