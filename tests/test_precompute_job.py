"""The precompute job end to end on a tiny Gemma 2: what it stores equals what the live encoder computes,
it resumes after kill -9 with the same result, re-runs are no-ops, and bad input writes nothing."""

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from conftest import random_sae_params
from featurescope import db as fsdb
from featurescope.encoder import FeatureEncoder
from featurescope.positions import WARMUP_POSITIONS, warmup_positions
from featurescope.sae_loading import load_sae, save_sae
from featurescope.precompute.corpus_sources import CorpusSpec
from featurescope.precompute.job import PrecomputeConfig, PrecomputeError, run_precompute

EXE = shutil.which("featurescope") or str(Path(sys.executable).parent / "featurescope")


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory) -> list[str]:
    """Two SAE folders (params.npz + card) at layers 1 and 3; biased so each feature fires on a minority of tokens."""
    root = tmp_path_factory.mktemp("saes")
    paths = []
    for layer, seed in ((1, 1), (3, 2)):
        params = random_sae_params(64, 48, seed=seed, threshold=0.0)
        params["b_enc"] -= 1.5
        np.savez(root / "params.npz", **params)
        paths.append(str(save_sae(load_sae(str(root / "params.npz"), site=f"{layer}-res"), root / f"l{layer}")))
    return paths


def _config(tmp_path, sae_dirs, **overrides) -> PrecomputeConfig:
    values = dict(model="unused", saes=[sae_dirs[0]], max_tokens=2500, context_len=32, batch_size=4,
                  top_k=5, n_intervals=3, examples_per_interval=2, device="cpu", data_dir=str(tmp_path / "data"),
                  progress=False)
    values.update(overrides)
    return PrecomputeConfig(**values)


def _tables(path: Path) -> dict:
    con = duckdb.connect(str(path), read_only=True)
    try:
        out = {}
        for table, order in [("features", "sae_id, feature"), ("examples", "sae_id, feature, kind, bin, rank"),
                             ("contexts", "context_id"), ("saes", "id"), ("vocab", "token_id"), ("models", "id"),
                             ("links", "sae_id, feature, other_sae_id")]:
            out[table] = con.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
        return out
    finally:
        con.close()


@pytest.fixture(scope="module")
def one_run(tiny_gemma2, tiny_gemma2_path, sae_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    cfg = _config(tmp, sae_dirs, model=str(tiny_gemma2_path), saes=sae_dirs, sae_ids=["1-res-a", "3-res-b"])
    path = run_precompute(cfg, lm=tiny_gemma2, log=lambda *_: None)
    return cfg, path


def test_each_feature_row_holds_its_examples_in_order_with_their_peak_tokens(one_run):
    _, path = one_run
    con = duckdb.connect(str(path), read_only=True)
    rows = con.execute("SELECT sae_id, feature, feature_key, examples, peak_token_ids FROM features ORDER BY sae_id, feature").fetchall()
    numbers = dict(con.execute("SELECT id, number FROM saes").fetchall())
    contexts = dict(con.execute("SELECT context_id, token_ids FROM contexts").fetchall())
    con.close()
    assert sorted(numbers.values()) == list(range(len(numbers)))
    fired = 0
    for sae_id, feature, key, examples, peaks in rows:
        assert key == (numbers[sae_id] << 32) + feature
        order = [(e["kind"] != "top", e["bin"], e["rank"]) for e in examples]
        assert order == sorted(order)  # top examples by rank, then intervals by bin and rank
        top = [e for e in examples if e["kind"] == "top"]
        assert [e["rank"] for e in top] == list(range(len(top)))
        assert peaks == [contexts[e["context_id"]][e["max_pos"]] for e in top]
        fired += bool(top)
    assert fired > 0


def test_a_published_run_has_the_indexes_of_a_migrated_file_and_finds_a_feature_through_feature_key(one_run, tmp_path):
    _, path = one_run
    migrated = tmp_path / "migrated.duckdb"
    fsdb.upgrade(migrated)
    indexes = "SELECT table_name, index_name, is_unique, expressions FROM duckdb_indexes() ORDER BY index_name"
    with duckdb.connect(str(migrated), read_only=True) as con:
        expected = con.execute(indexes).fetchall()
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute(indexes).fetchall() == expected
        key = con.execute("SELECT max(feature_key) FROM features").fetchone()[0]
        plan = con.execute("EXPLAIN ANALYZE SELECT * FROM features WHERE feature_key = ?", [key]).fetchall()[0][1]
        assert "Type: Index Scan" in plan  # the scan as run (plain EXPLAIN shows the planned sequential scan)
    assert any(name == "ix_features_feature_key" and unique for _, name, unique, _ in expected)


def test_stored_per_token_activations_equal_the_live_encoder(one_run, tiny_gemma2):
    cfg, path = one_run
    lm = tiny_gemma2
    encoder = FeatureEncoder(lm, {"1-res-a": load_sae(cfg.saes[0]), "3-res-b": load_sae(cfg.saes[1])})
    con = duckdb.connect(str(path), read_only=True)
    rows = con.execute("SELECT e.sae_id, e.feature, e.kind, e.max_act, e.max_pos, e.positions, e.acts, c.starts_document, "
                       "c.token_ids FROM examples e JOIN contexts c USING (run_id, context_id) "
                       # 100 of each: contexts that start a document and mid-document ones, a fixed pseudo-random choice
                       "QUALIFY row_number() OVER (PARTITION BY c.starts_document ORDER BY hash(e.sae_id, e.feature, e.kind, "
                       "e.bin, e.rank)) <= 100").fetchall()
    con.close()
    assert {r[2] for r in rows} == {"top", "interval"}
    contexts, starts = torch.tensor([r[-1] for r in rows]), torch.tensor([r[-2] for r in rows])
    assert starts.any() and not starts.all()
    encoded = [encoder.encode_with_masks(contexts[i:i + 32], starts_document=starts[i:i + 32]) for i in range(0, len(rows), 32)]
    for i, (sae_id, feature, kind, max_act, max_pos, positions, acts, _, token_ids) in enumerate(rows):
        acts_of, masks = encoded[i // 32]
        live = acts_of[sae_id][i % 32, :, feature].clone()  # [T]
        live[~masks[sae_id][i % 32]] = 0.0  # BOS/EOS/pad and the warm-up of a mid-document context do not count
        stored = torch.zeros_like(live)
        stored[torch.tensor(positions, dtype=torch.long)] = torch.tensor(acts, dtype=torch.float32)
        torch.testing.assert_close(stored, live, rtol=1e-5, atol=1e-6)
        assert max_act == pytest.approx(float(live.max()), rel=1e-5)
        assert live[max_pos] == live.max()


def test_special_tokens_never_count(one_run, tiny_gemma2):
    _, path = one_run
    con = duckdb.connect(str(path), read_only=True)
    special = sorted(tiny_gemma2.special_token_ids)
    at_special = con.execute(
        "SELECT count(*) FROM examples e JOIN contexts c USING (run_id, context_id), unnest(e.positions) AS p(pos) "
        "WHERE list_contains(?, c.token_ids[pos + 1])", [special]).fetchone()[0]
    bos_first = con.execute("SELECT bool_and(token_ids[1] = ?) FROM contexts", [tiny_gemma2.bos_token_id]).fetchone()[0]
    n_tokens, n_contexts, ctx_len = con.execute("SELECT n_tokens, n_contexts, context_len FROM runs").fetchone()
    n_special = con.execute("SELECT sum(len(list_filter(token_ids, lambda t: list_contains(?, t)))) FROM contexts", [special]).fetchone()[0]
    con.close()
    assert at_special == 0 and bos_first
    assert n_tokens == n_contexts * ctx_len - n_special


def test_top_examples_are_the_strongest_contexts(one_run, tiny_gemma2):
    """Brute force over every stored context: feature f's top-k maxima are the k largest per-context maxima."""
    cfg, path = one_run
    lm = tiny_gemma2
    encoder = FeatureEncoder(lm, {"1-res-a": load_sae(cfg.saes[0])})
    con = duckdb.connect(str(path), read_only=True)
    rows = con.execute("SELECT token_ids, starts_document FROM contexts ORDER BY context_id").fetchall()
    contexts, starts = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    top = con.execute("SELECT feature, list(max_act ORDER BY rank), list(max_pos ORDER BY rank), list(context_id ORDER BY rank) "
                      "FROM examples WHERE sae_id = '1-res-a' AND kind = 'top' GROUP BY feature").fetchall()
    density = dict(con.execute("SELECT feature, density FROM features WHERE sae_id = '1-res-a'").fetchall())
    con.close()
    acts = torch.cat([encoder(contexts[i:i + 16])["1-res-a"] for i in range(0, len(contexts), 16)])  # [N, T, F]
    # what counts: not BOS/EOS/pad, and not the warm-up of a context that starts mid-document
    counted = ~torch.isin(contexts, torch.tensor(sorted(lm.special_token_ids))) & ~warmup_positions(starts, contexts.shape[1])
    acts[~counted] = 0
    per_context_max = acts.amax(1)  # [N, F]
    for feature, maxima, peaks, context_ids in top:
        expected = per_context_max[:, feature].topk(len(maxima)).values
        torch.testing.assert_close(torch.tensor(maxima), expected, rtol=1e-5, atol=1e-6)
        assert all(starts[c] or p > WARMUP_POSITIONS for p, c in zip(peaks, context_ids))
        firing = (acts[:, :, feature] > 0).sum().item()
        assert density[feature] == pytest.approx(firing / counted.sum().item(), rel=1e-5)


def test_a_finished_run_is_a_no_op_and_force_redoes_it(one_run, tiny_gemma2):
    cfg, path = one_run
    messages = []
    mtime = path.stat().st_mtime_ns
    assert run_precompute(cfg, lm=tiny_gemma2, log=messages.append) == path
    assert any("Already complete" in m for m in messages) and path.stat().st_mtime_ns == mtime
    before = _tables(path)
    cfg.force = True
    try:
        run_precompute(cfg, lm=tiny_gemma2, log=lambda *_: None)
    finally:
        cfg.force = False
    assert path.stat().st_mtime_ns != mtime and _tables(path) == before


@pytest.mark.parametrize("overrides,message", [
    (dict(corpus=CorpusSpec("EMPTY")), "no complete context"),
    (dict(context_len=1024), "over model"),
    (dict(corpus=CorpusSpec("JSONL", text_column="body")), "has no column 'body'"),
    (dict(saes=["WIDE"]), "has d_in=2304"),
])
def test_bad_input_fails_clearly_and_writes_nothing(tiny_gemma2, sae_dirs, tmp_path, overrides, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "c.jsonl").write_text('{"text": "hello world"}\n')
    np.savez(tmp_path / "wide.npz", **random_sae_params(2304, 8))
    wide = str(save_sae(load_sae(str(tmp_path / "wide.npz"), site="1-res"), tmp_path / "wide"))
    subst = {"EMPTY": str(tmp_path / "empty.txt"), "JSONL": str(tmp_path / "c.jsonl"), "WIDE": wide}
    if "corpus" in overrides:
        c = overrides["corpus"]
        overrides["corpus"] = CorpusSpec(subst[c.source], text_column=c.text_column)
    if "saes" in overrides:
        overrides["saes"] = [subst[s] for s in overrides["saes"]]
    cfg = _config(tmp_path, sae_dirs, **overrides)
    with pytest.raises(PrecomputeError if "d_in" not in message else Exception, match=message):
        run_precompute(cfg, lm=tiny_gemma2, log=lambda *_: None)
    assert not (tmp_path / "data" / "db").exists() or not any((tmp_path / "data" / "db").iterdir())


def test_kill_9_then_rerun_gives_the_same_result_as_an_uninterrupted_run(tiny_gemma2_path, sae_dirs, tmp_path):
    args = ["precompute", "--model", str(tiny_gemma2_path), "--sae", sae_dirs[0], "--sae", sae_dirs[1],
            "--tokens", "12000", "--context-len", "32", "--batch-size", "4", "--top-k", "5", "--n-intervals", "3",
            "--examples-per-interval", "2", "--checkpoint-every", "3", "--device", "cpu"]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([EXE, *args, "--data-dir", str(killed_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not list(killed_dir.glob("runs/*/checkpoint-*.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(killed_dir.glob("runs/*/checkpoint-*.pt")), "no checkpoint was written before the kill"
    assert not list(killed_dir.glob("db/*.duckdb")), "the run finished before it could be killed"

    resumed = subprocess.run([EXE, *args, "--data-dir", str(killed_dir)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming run" in resumed.stdout
    straight = subprocess.run([EXE, *args, "--data-dir", str(tmp_path / "straight")], capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    (killed_db,), (straight_db,) = list(killed_dir.glob("db/*.duckdb")), list((tmp_path / "straight").glob("db/*.duckdb"))
    assert killed_db.name == straight_db.name
    assert _tables(killed_db) == _tables(straight_db)
    assert not list(killed_dir.glob("runs/*/*.pt"))


def test_two_shards_merged_equal_one_run(one_run, tiny_gemma2, tmp_path):
    cfg, path = one_run
    sharded = PrecomputeConfig(**{**cfg.__dict__, "data_dir": str(tmp_path / "data")})
    for i in range(2):
        sharded.shard = (i, 2)
        work_dir = run_precompute(sharded, lm=tiny_gemma2, log=lambda *_: None)
        assert (work_dir / f"shard-{i}-of-2-group-0-of-1.pt").exists()
    assert not (tmp_path / "data" / "db").exists()
    sharded.shard, sharded.merge_shards = None, 2
    merged = run_precompute(sharded, lm=tiny_gemma2, log=lambda *_: None)
    assert merged.name == path.name and _tables(merged) == _tables(path)


def test_merging_before_every_shard_is_done_names_the_missing_ones(one_run, tiny_gemma2, tmp_path):
    cfg, _ = one_run
    sharded = PrecomputeConfig(**{**cfg.__dict__, "data_dir": str(tmp_path / "data"), "shard": (1, 3)})
    run_precompute(sharded, lm=tiny_gemma2, log=lambda *_: None)
    sharded.shard, sharded.merge_shards = None, 3
    with pytest.raises(PrecomputeError, match="shard-0-of-3-group-0-of-1.pt, shard-2-of-3-group-0-of-1.pt not found"):
        run_precompute(sharded, lm=tiny_gemma2, log=lambda *_: None)


def test_another_batch_size_publishes_the_same_database(one_run, tiny_gemma2, tmp_path):
    """Both the streaming pass and the examples' re-encoding see other batch-mates: nothing stored changes."""
    cfg, path = one_run
    rebatched = PrecomputeConfig(**{**cfg.__dict__, "data_dir": str(tmp_path / "data"), "batch_size": 3})
    assert rebatched.run_id() == cfg.run_id()
    assert _tables(run_precompute(rebatched, lm=tiny_gemma2, log=lambda *_: None)) == _tables(path)


def test_norm_outliers_named_by_an_sae_card_count_like_bos(tiny_gemma2, sae_dirs, tmp_path):
    """SAEs trained here skip attention-sink tokens; their card's scale and ratio make precompute skip them too."""
    from featurescope.positions import sae_max_norm

    sae = load_sae(sae_dirs[0])
    folder = save_sae(sae, tmp_path / "sae", card={"input_scale": 1 / 16, "train_config": {"max_norm_ratio": 1.1}})
    sae = load_sae(str(folder))
    assert sae_max_norm(sae) == pytest.approx(17.6)
    cfg = _config(tmp_path, [str(folder)], model="tiny", sae_ids=["1-res-x"])
    path = run_precompute(cfg, lm=tiny_gemma2, log=lambda *_: None)
    con = duckdb.connect(str(path), read_only=True)
    rows = con.execute("SELECT e.positions, c.token_ids FROM examples e JOIN contexts c USING (run_id, context_id)").fetchall()
    total_firing = con.execute("SELECT sum(n_firing) FROM features").fetchone()[0]
    con.close()
    encoder = FeatureEncoder(tiny_gemma2, {"1-res-x": sae})
    contexts = torch.tensor([r[1] for r in rows])
    _, masks = encoder.encode_with_masks(contexts)
    counted = masks["1-res-x"]
    special = torch.isin(contexts, torch.tensor(sorted(tiny_gemma2.special_token_ids)))
    assert (~counted & ~special).any(), "the chosen limit excludes no ordinary token: the test would prove nothing"
    for i, (positions, _) in enumerate(rows):
        assert all(counted[i, p] for p in positions)
    assert total_firing > 0


def test_cli_no_links_publishes_a_run_without_cross_layer_links(tiny_gemma2_path, sae_dirs, tmp_path):
    args = ["precompute", "--model", str(tiny_gemma2_path), "--sae", sae_dirs[0], "--sae", sae_dirs[1], "--tokens", "1500",
            "--context-len", "32", "--batch-size", "4", "--top-k", "3", "--device", "cpu", "--data-dir", str(tmp_path)]
    done = subprocess.run([EXE, *args, "--no-links"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with_links = subprocess.run([EXE, *args, "--links-per-neighbour", "2"], capture_output=True, text=True, timeout=300)
    assert with_links.returncode == 0, with_links.stderr
    counts = []
    for path in sorted(tmp_path.glob("db/*.duckdb"), key=lambda p: p.stat().st_mtime):
        con = duckdb.connect(str(path), read_only=True)
        counts.append(con.execute("SELECT count(*), max(len(other_features)) FROM links").fetchone())
        con.close()
    assert counts[0][0] == 0 and counts[1][0] > 0 and counts[1][1] <= 2 * 2  # 2 by co-activation + 2 by weights


def test_neighbours_setting_sets_how_many_decoder_neighbours_each_feature_keeps_and_zero_skips_them(
        tiny_gemma2, sae_dirs, tmp_path):
    lengths = []
    for n in (0, 3):
        cfg = _config(tmp_path / str(n), sae_dirs, model="tiny", neighbours=n, links=False)
        path = run_precompute(cfg, lm=tiny_gemma2, log=lambda *_: None)
        with duckdb.connect(str(path), read_only=True) as con:
            lengths.append(con.execute("SELECT min(len(neighbour_ids)), max(len(neighbour_cos)), count(*) FROM features").fetchone())
    assert lengths[0][:2] == (0, 0) and lengths[1][:2] == (3, 3) and lengths[0][2] == lengths[1][2] > 0


def test_given_site_activations_of_the_runs_contexts_give_the_same_database_as_the_model_pass(
        tiny_gemma2, tiny_gemma2_path, sae_dirs, tmp_path, one_run):
    from featurescope.precompute.job import _contexts
    from featurescope.sites import parse_site
    from featurescope.training import capture_contexts

    cfg, path = one_run
    again = _config(tmp_path, sae_dirs, model=cfg.model, saes=cfg.saes, sae_ids=cfg.sae_ids)
    contexts = _contexts(again, tiny_gemma2).ids
    captured = capture_contexts(tiny_gemma2, contexts, [parse_site("1-res"), parse_site("3-res")], cfg.batch_size)
    given = run_precompute(again, lm=tiny_gemma2, log=lambda *_: None, site_acts=captured)
    assert _tables(given) == _tables(path)
    other = _config(tmp_path / "other", sae_dirs, model=cfg.model, saes=cfg.saes, max_tokens=1200)
    with pytest.raises(PrecomputeError, match="other contexts"):
        run_precompute(other, lm=tiny_gemma2, log=lambda *_: None, site_acts=captured)


def test_spread_sample_reads_the_contexts_training_takes_from_the_corpus(tiny_gemma2, sae_dirs, tmp_path):
    from featurescope.precompute.job import _contexts
    from featurescope.training import TrainConfig, default_contexts

    spread = _config(tmp_path, sae_dirs, sample="spread", max_tokens=31 * 20)
    train, held = default_contexts(tiny_gemma2, TrainConfig(sites=("1-res",), context_len=32, corpus_tokens=31 * 20,
                                                            held_out_contexts=5))
    contexts = _contexts(spread, tiny_gemma2).ids
    assert torch.equal(contexts, train) and len(contexts) == 20
    assert not any(torch.equal(h, c) for h in held for c in contexts)  # held-out contexts are never trained on
    first = _contexts(_config(tmp_path, sae_dirs, max_tokens=31 * 20), tiny_gemma2).ids
    assert torch.equal(first[0], contexts[0]) and not torch.equal(first, contexts)  # spread over the whole corpus
    assert spread.run_id() != _config(tmp_path, sae_dirs, max_tokens=31 * 20).run_id()


def _another(value):
    """A different value of the same kind, for any PrecomputeConfig field."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, "other"]
    if isinstance(value, CorpusSpec):
        return dataclasses.replace(value, source=value.source + "-other")
    return (0, 2) if value is None else None


def test_every_field_that_can_change_the_result_changes_the_run_id_and_no_other_does(tmp_path, sae_dirs):
    base = _config(tmp_path, sae_dirs)
    for f in dataclasses.fields(PrecomputeConfig):
        other = dataclasses.replace(base, **{f.name: _another(getattr(base, f.name))})
        changes_result = f.metadata.get("result", True)
        assert (other.run_id() != base.run_id()) == changes_result, f.name
        assert (f.name in other.result_config()) == changes_result, f.name
    # a field added later is part of the id unless it says it cannot change the result
    Extended = dataclasses.make_dataclass("Extended", [("new_knob", int, 1)], bases=(PrecomputeConfig,))
    assert Extended(**base.__dict__).run_id() != base.run_id()
