"""The precompute job in SAE groups (precompute/plan.py): a memory budget that splits the SAEs into several
model passes stores exactly what one pass stores, shows its plan first, resumes inside the group it was
in, and release patterns name the same run as the SAEs they expand to."""

import dataclasses

import numpy as np
import pytest

from conftest import random_sae_params
from featurescope.precompute import job
from featurescope.precompute.feature_stats import FeatureStats, expected_memory_bytes
from featurescope.precompute.job import PrecomputeConfig, PrecomputeError, pass_bytes, run_precompute, with_expanded_sources
from featurescope.precompute.plan import SAESpec
from featurescope.sae_loading import load_sae, save_sae
from featurescope.sites import parse_site
from test_precompute_job import _tables

LAYERS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Four SAEs, one per layer, in the Gemma Scope layout (release/gemma-scope-2b-pt-res/layer_L/...)."""
    root = tmp_path_factory.mktemp("release")
    for layer in LAYERS:
        params = random_sae_params(64, 40, seed=layer, threshold=0.0)
        params["b_enc"] -= 1.5
        folder = root / "gemma-scope-2b-pt-res" / f"layer_{layer}" / "width_40" / "average_l0_9"
        folder.mkdir(parents=True)
        np.savez(folder / "params.npz", **params)
    return root


@pytest.fixture(scope="module")
def sae_dirs(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("saes")
    return [str(save_sae(load_sae(str(release / "gemma-scope-2b-pt-res" / f"layer_{layer}" / "width_40" / "average_l0_9"
                                      / "params.npz"), site=f"{layer}-res"), out / f"l{layer}")) for layer in LAYERS]


def _config(tmp_path, model, saes, **overrides) -> PrecomputeConfig:
    values = dict(model=str(model), saes=saes, max_tokens=1500, context_len=32, batch_size=4, top_k=4, n_intervals=3,
                  examples_per_interval=2, device="cpu", data_dir=str(tmp_path / "data"), progress=False,
                  sae_ids=[f"{layer}-res-40" for layer in LAYERS])
    values.update(overrides)
    return PrecomputeConfig(**values)


def _budget_for(tiny_gemma2, cfg: PrecomputeConfig, saes_per_group: float) -> int:
    spec = SAESpec("x", parse_site("0-res"), 64, 40)
    state = spec.weight_bytes + expected_memory_bytes(40, cfg.top_k, cfg.examples_per_interval)
    return pass_bytes(tiny_gemma2, cfg.batch_size, cfg.context_len, 40) + int(state * saes_per_group)


@pytest.fixture(scope="module")
def one_pass(tiny_gemma2, tiny_gemma2_path, sae_dirs, tmp_path_factory):
    cfg = _config(tmp_path_factory.mktemp("one"), tiny_gemma2_path, sae_dirs)
    lines: list[str] = []
    return cfg, run_precompute(cfg, lm=tiny_gemma2, log=lines.append), lines


def test_one_group_runs_when_everything_fits_and_the_plan_is_shown_first(one_pass):
    _, _, lines = one_pass
    assert lines[0].startswith("1 model pass for 4 SAEs (160 features)")


def test_a_budget_for_two_saes_per_pass_gives_two_passes_and_the_same_database(one_pass, tiny_gemma2, tmp_path):
    cfg, path, _ = one_pass
    lines: list[str] = []
    grouped = dataclasses.replace(cfg, data_dir=str(tmp_path / "data"), memory_budget=_budget_for(tiny_gemma2, cfg, 2.5))
    assert grouped.run_id() == cfg.run_id()
    published = run_precompute(grouped, lm=tiny_gemma2, log=lines.append)
    plan = lines[0].splitlines()  # the table: heading, columns, one row per group, totals
    assert plan[0].startswith("2 model passes for 4 SAEs")
    assert "0-res .. 1-res" in plan[2] and "layer 1" in plan[2] and "2-res .. 3-res" in plan[3]
    assert any(line.startswith("First batches:") and "for the 2 passes left" in line for line in lines)
    assert _tables(published) == _tables(path)  # links between the groups included


def test_examples_collected_one_sae_per_pass_store_the_same_database(one_pass, tiny_gemma2, tmp_path, monkeypatch):
    cfg, path, _ = one_pass
    monkeypatch.setattr(job, "EXAMPLE_PASS_FEATURES", 40)
    timings: dict = {}
    published = run_precompute(dataclasses.replace(cfg, data_dir=str(tmp_path / "data")), lm=tiny_gemma2,
                               log=lambda *_: None, timings=timings)
    assert [names for names, _ in timings["passes"]] == [["0-res-40", "1-res-40", "2-res-40", "3-res-40"]]
    assert _tables(published) == _tables(path)


def test_a_job_killed_in_its_second_group_resumes_there_with_the_same_result(one_pass, tiny_gemma2, tmp_path, monkeypatch):
    cfg, path, _ = one_pass
    grouped = dataclasses.replace(cfg, data_dir=str(tmp_path / "data"), memory_budget=_budget_for(tiny_gemma2, cfg, 1.5),
                                  checkpoint_every=2)
    real_update, calls = FeatureStats.update, []

    def dies_in_group_three(self, *args, **kwargs):
        calls.append(self.d_sae)
        if len(calls) == 2 * 12 + 5:  # group 1 and 2 done (12 batches each), then batch 5 of group 3
            raise KeyboardInterrupt
        return real_update(self, *args, **kwargs)
    monkeypatch.setattr(FeatureStats, "update", dies_in_group_three)
    with pytest.raises(KeyboardInterrupt):
        run_precompute(grouped, lm=tiny_gemma2, log=lambda *_: None)
    work_dir = tmp_path / "data" / "runs" / cfg.run_id()
    assert sorted(p.name for p in work_dir.glob("*.pt")) == [
        "checkpoint-group-2-of-4.pt", "group-0-of-4.pt", "group-1-of-4.pt"]
    monkeypatch.setattr(FeatureStats, "update", real_update)
    lines: list[str] = []
    # A bigger budget now would plan one pass: the run keeps the plan it started with.
    resumed = run_precompute(dataclasses.replace(grouped, memory_budget=None), lm=tiny_gemma2, log=lines.append)
    assert lines[0].startswith("Using the plan of this run's first start: 4 model passes")
    assert "Group 1/4 was done before (group-0-of-4.pt)." in lines and "Group 2/4 was done before (group-1-of-4.pt)." in lines
    assert any(line.startswith(f"Resuming run {cfg.run_id()} from context 16") for line in lines), lines
    assert _tables(resumed) == _tables(path)
    assert not list(work_dir.glob("*.pt")) and not (work_dir / job.PLAN_FILE).exists()


def test_an_sae_bigger_than_the_budget_fails_before_any_work_naming_it(one_pass, tiny_gemma2, tmp_path):
    cfg, _, _ = one_pass
    small = dataclasses.replace(cfg, data_dir=str(tmp_path / "data"), memory_budget=_budget_for(tiny_gemma2, cfg, 0.5))
    with pytest.raises(PrecomputeError, match=r"SAE 0-res-40 \(0-res, 40 features\) needs .* --memory-budget"):
        run_precompute(small, lm=tiny_gemma2, log=lambda *_: None)
    assert not (tmp_path / "data" / "db").exists()


def test_a_release_pattern_names_the_same_run_as_the_saes_it_expands_to(release, tiny_gemma2_path, tmp_path):
    folders = [str(release / "gemma-scope-2b-pt-res" / f"layer_{layer}" / "width_40" / "average_l0_9") for layer in LAYERS]
    pattern = _config(tmp_path, tiny_gemma2_path, [str(release / "gemma-scope-2b-pt-res" / "layer_*" / "width_40" / "*")])
    expanded = with_expanded_sources(pattern)
    assert expanded.saes == folders
    assert expanded.run_id() == _config(tmp_path, tiny_gemma2_path, folders).run_id()
    listed = tmp_path / "saes.txt"
    listed.write_text("# the release, layer by layer\n" + "\n".join(folders[2:]) + "\n")
    from_file = with_expanded_sources(_config(tmp_path, tiny_gemma2_path, folders[:2], sae_list=str(listed)))
    assert from_file.saes == folders and from_file.run_id() == expanded.run_id()


def test_a_pattern_that_matches_nothing_fails_before_loading_the_model(tmp_path):
    cfg = PrecomputeConfig(model="no-such-model", saes=[str(tmp_path / "layer_*" / "width_16k" / "*")], data_dir=str(tmp_path))
    with pytest.raises(PrecomputeError, match="matches no"):
        run_precompute(cfg, log=lambda *_: None)
