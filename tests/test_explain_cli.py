"""`featurescope explain`'s bad input: one sentence and exit 2, before any endpoint is started."""

from __future__ import annotations

import pytest

from factories import make_db
from test_cli import run


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    return make_db(tmp_path_factory.mktemp("explain-cli") / "db" / "tiny.duckdb")


@pytest.mark.parametrize("args,message", [
    (["--sae", "nope", "--features", "0"], "has no SAE 'nope'; it has 2-res-64, 4-mlp-48, 6-att-32."),
    (["--features", "0"], "choose one with --sae."),
    (["--sae", "2-res-64"], "Say which features to explain: --features 0-49 (or 3,7,10-12), or --all."),
    (["--sae", "2-res-64", "--features", "0-64"], "outside the SAE's features 0 to 63."),
    (["--sae", "2-res-64", "--features", "0", "--endpoint", "http://127.0.0.1:9/v1"], "--model names the explainer model"),
    (["--sae", "2-res-64", "--features", "0", "--score", "maybe"], "--score takes detection, fuzz or none, not maybe."),
])
def test_bad_input_gets_one_sentence(run_file, args, message):
    result = run("explain", "--run", str(run_file), *args)
    assert result.returncode == 2 and message in " ".join((result.stderr + result.stdout).split()), result.stderr


def test_a_missing_run_file_is_named(tmp_path):
    result = run("explain", "--run", str(tmp_path / "none.duckdb"), "--features", "0")
    assert result.returncode == 2 and "none.duckdb does not exist" in result.stderr


def test_explain_has_help():
    result = run("explain", "--help")
    assert result.returncode == 0 and "--endpoint" in result.stdout and "--concurrency" in result.stdout
