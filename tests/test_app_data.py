"""The data the explorer reads: the migrated schema equals featurescope/schema.py, migration 0002 keeps
existing rows, automatic labels, and publication: new, replaced and outdated files are picked up by a
running app without a restart."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess

import sqlalchemy as sa

from conftest import require_test_tool
from factories import SAESpec, make_app_client, make_db
from featurescope import db as fsdb
from featurescope.app.databases import DataDir
from featurescope.labels import auto_label, token_for_label
from featurescope.schema import metadata

DUCKDB_NAMES = {"TEXT": "VARCHAR", "TIMESTAMP WITHOUT TIME ZONE": "TIMESTAMP", "DATETIME": "TIMESTAMP"}


def db_columns(path) -> dict[str, list[tuple[str, str]]]:
    engine = fsdb.engine_for(path, read_only=True)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT table_name, column_name, data_type FROM information_schema.columns "
                                    "WHERE table_schema = 'main' AND table_name != 'alembic_version' "
                                    "ORDER BY table_name, ordinal_position")).all()
    engine.dispose()
    found: dict[str, list[tuple[str, str]]] = {}
    for table, column, data_type in rows:
        found.setdefault(table, []).append((column, data_type))
    return found


def test_migrated_schema_has_exactly_the_columns_of_schema_py(tmp_path):
    path = tmp_path / "db.duckdb"
    assert fsdb.upgrade(path) == fsdb.head_revision()
    engine = fsdb.engine_for(path, read_only=True)
    expected = {t.name: [(c.name, DUCKDB_NAMES.get(str(c.type.compile(dialect=engine.dialect)),
                                                   str(c.type.compile(dialect=engine.dialect))))
                         for c in t.columns] for t in metadata.sorted_tables}
    engine.dispose()
    assert db_columns(path) == expected
    assert ("label", "VARCHAR") in expected["features"] and ("label_kind", "VARCHAR") in expected["features"]


def test_migration_0002_keeps_rows_written_at_0001(tmp_path):
    path = tmp_path / "old.duckdb"
    assert fsdb.upgrade(path, "0001") == "0001"
    features = sa.table("features", sa.column("model_id"), sa.column("sae_id"), sa.column("feature"),
                        sa.column("density"), sa.column("hist_counts"))
    engine = fsdb.engine_for(path)
    with engine.begin() as conn:
        conn.execute(sa.insert(features), [{"model_id": "m", "sae_id": "s", "feature": i, "density": i / 10,
                                            "hist_counts": [i, i + 1]} for i in range(3)])
    engine.dispose()
    assert "label" not in [c for c, _ in db_columns(path)["features"]]
    assert fsdb.upgrade(path, "0002") == "0002"
    engine = fsdb.engine_for(path, read_only=True)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT feature, density, hist_counts, label, label_kind FROM features ORDER BY feature")).all()
    engine.dispose()
    assert [(r[0], round(r[1], 6), list(r[2]), r[3], r[4]) for r in rows] == [
        (0, 0.0, [0, 1], None, None), (1, 0.1, [1, 2], None, None), (2, 0.2, [2, 3], None, None)]


def test_migration_0005_leaves_contexts_of_older_runs_without_a_document_flag(tmp_path):
    path = tmp_path / "old.duckdb"
    assert fsdb.upgrade(path, "0004") == "0004"
    contexts = sa.table("contexts", sa.column("run_id"), sa.column("context_id"), sa.column("token_ids"))
    engine = fsdb.engine_for(path)
    with engine.begin() as conn:
        conn.execute(sa.insert(contexts), [{"run_id": "r", "context_id": i, "token_ids": [2, 10 + i, 11]} for i in range(2)])
    engine.dispose()
    assert fsdb.upgrade(path) == fsdb.head_revision()
    engine = fsdb.engine_for(path, read_only=True)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT context_id, token_ids, starts_document FROM contexts ORDER BY context_id")).all()
    engine.dispose()
    # NULL: such a run counted every position after BOS, and its pages grey no warm-up (app/stored.py)
    assert [(r[0], list(r[1]), r[2]) for r in rows] == [(0, [2, 10, 11], None), (1, [2, 11, 11], None)]


# ------------------------------------------------------------------------------------------------ labels
def test_auto_label_counts_peaks_and_lists_promoted_tokens():
    assert auto_label([" Paris", " Rome", " Paris", " London"], [" France", " Italy", " France", " Spain", " x"]) == \
        "Paris, Rome, London → France, Italy, Spain"
    assert auto_label([" Rome", " Paris", " Paris"], []) == "Paris, Rome"
    assert auto_label([], [" the"]) == "→ the"
    assert auto_label([], []) == ""


def test_label_tokens_keep_whitespace_visible():
    assert [token_for_label(t) for t in ["\n", "\n\n", " ", "\t", "  x  y "]] == ["↵", "↵↵", "␣", "⇥", "x y"]
    assert auto_label(["\n", ".\n", "\n"], ["<script>"]) == "↵, . → <script>"


def test_rows_without_labels_get_the_automatic_label(tmp_path):
    make_db(tmp_path / "db" / "bare.duckdb", with_labels=False, saes=(SAESpec("1-res-16", 1, "res", 16),))
    with make_app_client(tmp_path) as client:
        feature = client.get("/tiny-gemma-2/1-res-16/3.json").json()
        peaks = [e["tokens"][e["max_pos"]] for e in feature["top_examples"]]
        promoted = [t["text"] for t in feature["logits"]["promoted"]]
        assert feature["label"] == auto_label(peaks, promoted) != "" and feature["label_kind"] == "auto"
        table = client.get("/tiny-gemma-2/1-res-16.json").json()["features"]
        assert table[3]["label"] == feature["label"]
        assert all(n["label"] for n in feature["neighbours"])


# ----------------------------------------------------------------------------------------- publication
def publish(source, target) -> None:
    """What the precompute writer does: a finished file moved into place in one rename."""
    os.replace(source, target)


def test_new_and_replaced_databases_appear_without_restart(tmp_path):
    staging = tmp_path / "staging"
    with make_app_client(tmp_path / "data", rescan_seconds=0) as client:
        assert client.get("/.json").json()["models"] == []
        assert "No published feature data" in client.get("/").text
        make_db(staging / "a.duckdb", model_id="first", saes=(SAESpec("1-res-8", 1, "res", 8),))
        (tmp_path / "data" / "db").mkdir(parents=True)
        publish(staging / "a.duckdb", tmp_path / "data" / "db" / "run.duckdb")
        assert [m["id"] for m in client.get("/.json").json()["models"]] == ["first"]
        assert client.get("/first/1-res-8/2.json").status_code == 200
        # A re-run publishes over the same path: the app must read the new file, not a cached instance.
        make_db(staging / "b.duckdb", model_id="first", saes=(SAESpec("2-res-12", 2, "res", 12),), seed=5)
        publish(staging / "b.duckdb", tmp_path / "data" / "db" / "run.duckdb")
        saes = [s["id"] for s in client.get("/first.json").json()["model"]["saes"]]
        assert saes == ["2-res-12"]
        assert client.get("/first/1-res-8/2.json").status_code == 404
        assert client.get("/first/2-res-12/11.json").json()["index"] == 11
        (tmp_path / "data" / "db" / "run.duckdb").unlink()
        assert client.get("/.json").json()["models"] == []


def test_a_replaced_file_stays_readable_while_used_and_is_detached_once_released(tmp_path):
    folder, staging = tmp_path / "db", tmp_path / "staging"
    make_db(folder / "run.duckdb", model_id="first", saes=(SAESpec("1-res-8", 1, "res", 8),))
    data_dir = DataDir(folder, rescan_seconds=0)
    (old,) = data_dir.files()[0]
    make_db(staging / "b.duckdb", model_id="first", saes=(SAESpec("2-res-12", 2, "res", 12),), seed=5)
    publish(staging / "b.duckdb", folder / "run.duckdb")
    (new,) = data_dir.files()[0]
    assert new is not old and new.alias != old.alias
    sae_ids = "SELECT id FROM saes"
    with old.connect() as conn:  # a request that began on the old file reads the old file to its end
        assert conn.execute(sa.text(sae_ids)).scalars().all() == ["1-res-8"]
    with new.connect() as conn:
        assert conn.execute(sa.text(sae_ids)).scalars().all() == ["2-res-12"]
    old_alias = old.alias
    del old
    gc.collect()
    with new.connect() as conn:
        attached = set(conn.execute(sa.text("SELECT database_name FROM duckdb_databases()")).scalars())
    assert new.alias in attached and old_alias not in attached


def test_outdated_or_broken_files_are_reported_not_served(tmp_path):
    folder = tmp_path / "db"
    make_db(folder / "good.duckdb", model_id="good", saes=(SAESpec("1-res-8", 1, "res", 8),))
    fsdb.upgrade(folder / "old.duckdb", "0001")
    (folder / "junk.duckdb").write_bytes(b"not a database at all")
    (folder / ".partial.duckdb").write_bytes(b"a writer's work in progress")
    with make_app_client(tmp_path) as client:
        health = client.get("/-/health").json()
        assert health["models"] == 1
        problems = {p["database"]: p["error"] for p in health["problems"]}
        assert set(problems) == {"old.duckdb", "junk.duckdb"}
        assert "schema revision 0001" in problems["old.duckdb"]
        home = client.get("/").text
        assert "Databases not shown" in home and "schema revision 0001" in home


def test_newest_file_wins_when_two_hold_the_same_sae(tmp_path):
    folder = tmp_path / "db"
    make_db(folder / "older.duckdb", model_id="m", saes=(SAESpec("1-res-8", 1, "res", 8, l0=1.0),))
    make_db(folder / "newer.duckdb", model_id="m", saes=(SAESpec("1-res-8", 1, "res", 8, l0=2.0),), seed=3)
    os.utime(folder / "older.duckdb", (1_000_000_000, 1_000_000_000))
    with make_app_client(tmp_path) as client:
        sae = client.get("/m.json").json()["model"]["saes"][0]
        assert sae["l0"] == 2.0 and sae["database"] == "newer"


# --------------------------------------------------------------------------------------- docker compose
def test_docker_compose_file_is_valid():
    binary = shutil.which("docker-compose")
    require_test_tool(binary is not None, "docker-compose is not installed (bash scripts/install_test_tools.sh installs it)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([binary, "-f", os.path.join(root, "docker-compose.yml"), "config"], capture_output=True,
                            text=True, env={**os.environ, "HF_TOKEN": "hf_test"}, timeout=60)
    assert result.returncode == 0, result.stderr
    config = result.stdout
    assert "capabilities:\n            - gpu" in config or "- gpu" in config
    assert "HF_TOKEN: hf_test" in config and "/-/health" in config and "/data:ro" in config


def test_docker_compose_has_a_ray_head_and_a_gpu_worker_that_joins_it():
    import yaml

    binary = shutil.which("docker-compose")
    require_test_tool(binary is not None, "docker-compose is not installed (bash scripts/install_test_tools.sh installs it)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([binary, "-f", os.path.join(root, "docker-compose.yml"), "--profile", "ray", "config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    head, worker = services["ray-head"], services["ray-worker"]
    assert "ray start --head --port 6379" in " ".join(head["command"]) and "[ray]" in " ".join(head["command"])
    assert worker["command"][1:] == ["start", "--address", "ray-head:6379", "--block"]
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert any(v.endswith("/data:/data:rw") for v in head["volumes"])  # the driver publishes on the head


def test_a_files_cached_result_is_built_once_however_many_threads_ask_at_once(tmp_path):
    """DataFile.cached, the one per-file cache (vocab, contexts, histograms, the catalog...): concurrent first
    requests wait for one build instead of each running the query."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from featurescope.app.databases import DataDir

    make_db(tmp_path / "db" / "run.duckdb")
    (data_file,), _ = DataDir(tmp_path / "db").files()
    builds, start = [], threading.Barrier(8)

    def build() -> list[int]:
        builds.append(1)
        time.sleep(0.2)
        return [1, 2, 3]

    def ask(_: int) -> list[int]:
        start.wait()
        return data_file.cached(("histogram", "x"), build)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len(builds) == 1 and all(a is answers[0] for a in answers)
