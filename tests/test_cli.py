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


@pytest.mark.parametrize("command", ["demo", "encode", "sites", "sae-info"])
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
