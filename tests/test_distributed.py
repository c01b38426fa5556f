"""The precompute job on a real local Ray cluster (ray.cluster_utils.Cluster: a head and a second node as
processes on this machine, CPU only) with a tiny Gemma 2 and three SAEs in two model passes: the published
database equals the single-process run's in every table, after a worker SIGKILLed mid-task and after a
driver killed mid-run; bad input fails before any task with one sentence."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from conftest import random_sae_params, require_test_tool
from featurescope.precompute.distributed import plan_tasks
from featurescope.precompute.job import PrecomputeConfig, PrecomputeError, run_precompute
from featurescope.sae_loading import load_sae, save_sae

try:
    import ray
    from ray.cluster_utils import Cluster
except ImportError:  # the test install (scripts/install.sh test) has it: the `ray` extra
    ray = None

pytestmark = pytest.mark.slow
EXE = str(Path(sys.executable).parent / "featurescope")
TOKENS = 6_000
MEMORY_BUDGET = 650_000  # two model passes: (1-res, 2-res) and (3-res)


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes (head + one more), one CPU each, shared by every test of this module."""
    require_test_tool(ray is not None, "Ray is not installed (bash scripts/install.sh test installs it)")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory) -> list[str]:
    """Three SAE folders at layers 1, 2, 3, biased so each feature fires on a minority of tokens."""
    root = tmp_path_factory.mktemp("saes")
    paths = []
    for layer in (1, 2, 3):
        params = random_sae_params(64, 48, seed=layer, threshold=0.0)
        params["b_enc"] -= 1.5
        np.savez(root / "params.npz", **params)
        paths.append(str(save_sae(load_sae(str(root / "params.npz"), site=f"{layer}-res"), root / f"l{layer}")))
    return paths


def _args(model: Path, saes: list[str], data_dir: Path) -> list[str]:
    return ["precompute", "--model", str(model), *[a for s in saes for a in ("--sae", s)], "--tokens", str(TOKENS),
            "--context-len", "32", "--batch-size", "4", "--top-k", "5", "--n-intervals", "3",
            "--examples-per-interval", "2", "--device", "cpu", "--memory-budget", str(MEMORY_BUDGET),
            "--data-dir", str(data_dir)]


def _config(model: Path, saes: list[str], data_dir: Path, **overrides) -> PrecomputeConfig:
    values = dict(model=str(model), saes=saes, max_tokens=TOKENS, context_len=32, batch_size=4, top_k=5, n_intervals=3,
                  examples_per_interval=2, device="cpu", memory_budget=MEMORY_BUDGET, data_dir=str(data_dir),
                  progress=False)
    return PrecomputeConfig(**{**values, **overrides})


def _tables(path: Path) -> dict:
    """Every table of a published file, the run's timings left out (they differ between any two runs)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = [row[0] for row in con.execute("SELECT table_name FROM information_schema.tables "
                                                "WHERE table_type = 'BASE TABLE' ORDER BY 1").fetchall()]
        out = {}
        for table in tables:
            columns = [c for (c,) in con.execute(f"SELECT column_name FROM information_schema.columns WHERE "
                                                 f"table_name = '{table}' ORDER BY ordinal_position").fetchall()
                       if not (table == "runs" and c in ("seconds", "started_at", "finished_at"))]
            out[table] = con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY ALL").fetchall()
        return out
    finally:
        con.close()


@pytest.fixture(scope="module")
def single_run(tiny_gemma2, tiny_gemma2_path, sae_dirs, tmp_path_factory):
    """The reference: the same run in this process, without Ray."""
    path = run_precompute(_config(tiny_gemma2_path, sae_dirs, tmp_path_factory.mktemp("single")), lm=tiny_gemma2,
                          log=lambda *_: None)
    return _tables(path), path


def test_tasks_cover_every_context_once_in_whole_batches():
    tasks = plan_tasks(n_contexts=103, group=1, batch_size=4, workers=2)
    assert [(t.first, t.last) for t in tasks][:2] == [(0, 16), (16, 32)] and tasks[-1].last == 103
    assert sorted(c for t in tasks for c in range(t.first, t.last)) == list(range(103))
    assert all(t.first % 4 == 0 and t.group == 1 for t in tasks)


def test_a_ray_run_publishes_the_single_process_database(cluster, single_run, tiny_gemma2, tiny_gemma2_path,
                                                         sae_dirs, tmp_path):
    tables, single_path = single_run
    timings, lines = {}, []
    path = run_precompute(_config(tiny_gemma2_path, sae_dirs, tmp_path, ray=cluster.address), lm=tiny_gemma2,
                          log=lines.append, timings=timings)
    assert path.name == single_path.name
    assert _tables(path) == tables
    assert timings["workers"] == 2 and timings["tasks"] > 2 * 2  # several tasks per worker and group
    assert sum(line.startswith("  worker ") for line in lines) == 2  # each worker's throughput
    assert not list((tmp_path / "runs").glob("*/*.pt"))


def _kill_a_worker_mid_task(stop: threading.Event, killed: list) -> None:
    """SIGKILL the first Ray worker process seen running a task (Ray titles it ray::PrecomputeWorker.run)."""
    while not stop.is_set() and not killed:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::PrecomputeWorker.run"):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.005)


def test_a_worker_killed_mid_task_is_retried_and_the_database_is_the_same(cluster, single_run, tiny_gemma2,
                                                                          tiny_gemma2_path, sae_dirs, tmp_path):
    tables, _ = single_run
    stop, killed, timings = threading.Event(), [], {}
    killer = threading.Thread(target=_kill_a_worker_mid_task, args=(stop, killed))
    killer.start()
    try:
        path = run_precompute(_config(tiny_gemma2_path, sae_dirs, tmp_path, ray=cluster.address), lm=tiny_gemma2,
                              log=lambda *_: None, timings=timings)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was seen running a task"
    assert timings["retried"] >= 1
    assert _tables(path) == tables


def test_a_driver_killed_mid_run_resumes_with_the_same_command(cluster, single_run, tiny_gemma2_path, sae_dirs,
                                                               tmp_path):
    tables, _ = single_run
    args = [EXE, *_args(tiny_gemma2_path, sae_dirs, tmp_path), "--ray", cluster.address, "--checkpoint-every", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not list(tmp_path.glob("runs/*/ray-checkpoint-*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob("runs/*/ray-checkpoint-*.pt")), "no checkpoint was written before the kill"
    assert not list(tmp_path.glob("db/*.duckdb")), "the run finished before it could be killed"

    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming group" in resumed.stdout
    (path,) = tmp_path.glob("db/*.duckdb")
    assert _tables(path) == tables


def test_an_unreachable_address_fails_with_one_sentence(tiny_gemma2_path, sae_dirs, tmp_path):
    result = subprocess.run([EXE, *_args(tiny_gemma2_path, sae_dirs, tmp_path), "--ray", "127.0.0.1:9"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Cannot reach a Ray cluster at '127.0.0.1:9'" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize("ray_value, message", [
    ("localhost", "--ray takes no value"),  # neither an address nor a keyword
])
def test_a_bad_address_fails_before_ray_is_asked(tiny_gemma2, tiny_gemma2_path, sae_dirs, tmp_path, ray_value, message):
    with pytest.raises(PrecomputeError, match=message):
        run_precompute(_config(tiny_gemma2_path, sae_dirs, tmp_path, ray=ray_value), lm=tiny_gemma2, log=lambda *_: None)


def test_an_unknown_sae_fails_before_any_task(cluster, tiny_gemma2, tiny_gemma2_path, sae_dirs, tmp_path):
    with pytest.raises(Exception, match="no-such-sae"):
        run_precompute(_config(tiny_gemma2_path, [*sae_dirs, str(tmp_path / "no-such-sae")], tmp_path, ray=cluster.address),
                       lm=tiny_gemma2, log=lambda *_: None)
    assert not ray.is_initialized()  # the driver never connected: nothing was scheduled


@pytest.mark.parametrize("argv, value", [(["--ray"], "local"), (["--ray", "auto"], "auto"),
                                         (["--ray", "ray://head:10001"], "ray://head:10001"), ([], None)])
def test_the_ray_option_takes_an_optional_address(argv, value):
    from typer.main import get_command

    from featurescope.cli import app, with_optional_values

    command = get_command(app).commands["precompute"]
    for args in (["--sae", "x", *argv], [*argv, "--sae", "x"]):
        assert command.make_context("precompute", with_optional_values(args)).params["ray"] == value


def test_more_workers_than_the_cluster_has_cpus_fails_before_any_task(cluster, tiny_gemma2, tiny_gemma2_path,
                                                                      sae_dirs, tmp_path):
    cfg = _config(tiny_gemma2_path, sae_dirs, tmp_path, ray=cluster.address, ray_workers=3)
    with pytest.raises(PrecomputeError, match=r"--ray-workers 3 asks for more than the cluster's 2 CPUs"):
        run_precompute(cfg, lm=tiny_gemma2, log=lambda *_: None)
    assert not list(tmp_path.glob("runs/*/*.pt")) and not (tmp_path / "db").exists()
