"""Cross-layer links end to end on a tiny Gemma 2 with SAEs at three layers (and two sites of the middle
one): the stored co-activation links equal a brute-force computation over every stored context, the
weight links equal the cosines computed directly from the SAEs' weights."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch

from conftest import random_sae_params
from featurescope.encoder import FeatureEncoder
from featurescope.sae_loading import load_sae, save_sae
from featurescope.precompute.feature_stats import FeatureStats
from featurescope.precompute.job import PrecomputeConfig, run_precompute
from featurescope.precompute.links import LinkPlan, PeakTables
from featurescope.sites import parse_site

SITES = {"1-res-a": "1-res", "2-mlp-b": "2-mlp", "2-res-c": "2-res", "3-res-d": "3-res"}
NEIGHBOURS = {  # previous and next layer with an SAE, and the same layer; direction seen from the key
    "1-res-a": {"2-mlp-b": "down", "2-res-c": "down"},
    "2-mlp-b": {"1-res-a": "up", "2-res-c": "down", "3-res-d": "down"},
    "2-res-c": {"1-res-a": "up", "2-mlp-b": "up", "3-res-d": "down"},
    "3-res-d": {"2-mlp-b": "up", "2-res-c": "up"},
}
TOP_N = 4


@pytest.fixture(scope="module")
def saes(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("link-saes")
    paths = {}
    for seed, (name, site) in enumerate(SITES.items()):
        params = random_sae_params(64, 40, seed=10 + seed, threshold=0.0)
        params["b_enc"] -= 1.2  # each feature fires on a minority of tokens
        np.savez(root / "params.npz", **params)
        paths[name] = str(save_sae(load_sae(str(root / "params.npz"), site=site), root / name))
    return paths


def _run(tiny_gemma2, tiny_gemma2_path, saes, folder, **overrides):
    cfg = PrecomputeConfig(model=str(tiny_gemma2_path), saes=list(saes.values()), sae_ids=list(saes), max_tokens=3000,
                           context_len=32, batch_size=4, top_k=6, n_intervals=2, examples_per_interval=2, device="cpu",
                           data_dir=str(folder), progress=False, links_per_neighbour=TOP_N, **overrides)
    timings: dict = {}
    return run_precompute(cfg, lm=tiny_gemma2, log=lambda *_: None, timings=timings), timings


@pytest.fixture(scope="module")
def run(tiny_gemma2, tiny_gemma2_path, saes, tmp_path_factory):
    path, timings = _run(tiny_gemma2, tiny_gemma2_path, saes, tmp_path_factory.mktemp("links-run"))
    con = duckdb.connect(str(path), read_only=True)
    try:
        contexts = torch.tensor([r[0] for r in con.execute("SELECT token_ids FROM contexts ORDER BY context_id").fetchall()])
        peaks = {}
        for sae_id, feature, ctx, pos in con.execute("SELECT sae_id, feature, context_id, max_pos FROM examples "
                                                     "WHERE kind = 'top' ORDER BY sae_id, feature, rank").fetchall():
            peaks.setdefault((sae_id, feature), []).append((ctx, pos))
        links = {(r[0], r[1], r[2]): r[3:] for r in con.execute(
            "SELECT sae_id, feature, other_sae_id, direction, other_features, coact, coact_rel, cosine FROM links").fetchall()}
        stats = {}
        for sae_id, density, mean_act, max_act in con.execute(
                "SELECT sae_id, list(density ORDER BY feature), list(mean_act ORDER BY feature), "
                "list(max_act ORDER BY feature) FROM features GROUP BY sae_id").fetchall():
            stats[sae_id] = (torch.tensor(density) * torch.tensor(mean_act), torch.tensor(max_act))  # average, max
    finally:
        con.close()
    return path, timings, contexts, peaks, links, stats


@pytest.fixture(scope="module")
def brute_acts(run, tiny_gemma2, saes):
    """Every SAE's activations on every stored context, 0 at positions that do not count: [N, T, F] each."""
    _, _, contexts, _, _, _ = run
    encoder = FeatureEncoder(tiny_gemma2, {name: load_sae(path) for name, path in saes.items()})
    parts = [encoder.encode_with_masks(contexts[i:i + 16]) for i in range(0, len(contexts), 16)]
    return {name: torch.cat([acts[name] * masks[name][..., None] for acts, masks in parts]) for name in saes}


def test_neighbours_are_the_adjacent_layers_and_the_same_layer(run):
    links = run[4]
    found: dict[str, dict[str, str]] = {}
    for (sae_id, _, other), (direction, *_) in links.items():
        found.setdefault(sae_id, {})[other] = direction
    assert found == NEIGHBOURS


def test_activation_links_equal_brute_force(run, brute_acts):
    """coact: the linked feature's mean activation over this feature's top-example max positions; the links
    are the TOP_N features with the highest coact_rel = (coact - their mean over all tokens) / their max."""
    _, _, _, peaks, links, stats = run
    checked = 0
    for sae_id, near in NEIGHBOURS.items():
        for feature in range(40):
            where = peaks.get((sae_id, feature), [])
            for other in near:
                _, ids, coact, coact_rel, _ = links.get((sae_id, feature, other), (None, [], [], [], None))
                if not where:  # never fired: no co-activation links (weight links may remain)
                    assert all(c == 0 for c in coact)
                    continue
                expected = torch.stack([brute_acts[other][c, p] for c, p in where]).mean(0)  # [F_other]
                average, top = stats[other]
                rel = (expected - average) / top.clamp(min=1e-12)
                best = rel.topk(TOP_N)
                want = [int(j) for j, v in zip(best.indices, best.values) if v > 0]
                n_act = len(want)
                assert ids[:n_act] == want, (sae_id, feature, other)
                torch.testing.assert_close(torch.tensor(coact), expected[ids], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(torch.tensor(coact_rel), rel[ids], rtol=1e-4, atol=1e-5)
                # links found only by weights come after, and score no higher than the last one by activation
                assert all(r <= coact_rel[n_act - 1] + 1e-5 for r in coact_rel[n_act:]) if n_act == TOP_N else True
                checked += 1
    assert checked > 100


def test_weight_links_equal_the_cosines_of_the_weights(run, saes):
    links = run[4]
    weights = {name: load_sae(path) for name, path in saes.items()}
    unit = lambda w: w / w.norm(dim=1, keepdim=True)  # noqa: E731
    for (sae_id, feature, other), (direction, ids, _, _, cosine) in links.items():
        both_res = SITES[sae_id].endswith("res") and SITES[other].endswith("res")
        if not both_res:
            assert cosine is None
            continue
        mine, theirs = weights[sae_id], weights[other]
        if direction == "down":  # what the later SAE reads of this feature's decoder direction
            cos = unit(theirs.W_enc.T) @ unit(mine.W_dec[feature:feature + 1]).T
        else:  # what this feature reads of the earlier SAE's decoder directions
            cos = unit(theirs.W_dec) @ unit(mine.W_enc.T[feature:feature + 1]).T
        cos = cos[:, 0]
        torch.testing.assert_close(torch.tensor(cosine), cos[ids], rtol=1e-4, atol=1e-5)
        assert set(cos.topk(TOP_N).indices.tolist()) <= set(ids)


def test_a_narrow_peak_width_gives_lower_bounds(tiny_gemma2, tiny_gemma2_path, saes, run, brute_acts, tmp_path):
    """With fewer kept pairs than firing features per token, co-activations can only be underestimated."""
    peaks = run[3]
    path, _ = _run(tiny_gemma2, tiny_gemma2_path, saes, tmp_path, links_peak_width=3)
    con = duckdb.connect(str(path), read_only=True)
    rows = con.execute("SELECT sae_id, feature, other_sae_id, other_features, coact FROM links").fetchall()
    con.close()
    for sae_id, feature, other, ids, coact in rows:
        where = peaks.get((sae_id, feature), [])
        if where:
            exact = torch.stack([brute_acts[other][c, p] for c, p in where]).mean(0)[ids]
            assert (torch.tensor(coact) <= exact + 1e-5).all()


def test_links_time_is_reported(run):
    timings = run[1]
    assert 0 < timings["links"] < timings["total"]


def test_peak_tables_hold_each_linked_saes_strongest_pairs_at_every_top_example_peak():
    """Filled batch by batch in any grouping, a table row is the neighbour's top-width at that peak, masked."""
    sites = {name: parse_site(site) for name, site in {"a": "1-res", "b": "2-res"}.items()}
    plan = LinkPlan(sites, {"a": 7, "b": 9}, width=3)
    torch.manual_seed(0)
    B, T = 6, 8
    feature_acts = {"a": torch.relu(torch.randn(B, T, 7)), "b": torch.relu(torch.randn(B, T, 9))}
    masks = {"a": torch.ones(B, T, dtype=torch.bool), "b": torch.rand(B, T) > 0.3}
    ids = torch.arange(B) * 5 + 2
    finals = {}
    for name in ("a", "b"):
        stats = FeatureStats(feature_acts[name].shape[2], T, top_k=2)
        stats.update(feature_acts[name], ids, masks[name])
        finals[name] = stats.finalize()
    peaks = PeakTables(plan, finals, T)
    for rows in (slice(0, 4), slice(4, 6)):
        for name in ("b", "a"):
            peaks.add(name, ids[rows], feature_acts[name][rows], masks[name][rows])
    got_ids, got_acts = peaks.at("b", finals["a"]["top_ctx"], finals["a"]["top_pos"])  # b at a's peaks
    for f, r in zip(*torch.nonzero(finals["a"]["top_ctx"] >= 0, as_tuple=True)):
        b, t = int(finals["a"]["top_ctx"][f, r] - 2) // 5, int(finals["a"]["top_pos"][f, r])
        expected = feature_acts["b"][b, t].topk(3)
        order = got_acts[f, r].argsort(descending=True)
        assert set(got_ids[f, r].tolist()) == set(expected.indices.tolist())
        assert torch.equal(got_acts[f, r][order], expected.values * masks["b"][b, t])
    empty = finals["a"]["top_ctx"] < 0
    assert (got_acts[empty] == 0).all()
    assert len(peaks.keys) <= int((finals["a"]["top_ctx"] >= 0).sum() + (finals["b"]["top_ctx"] >= 0).sum())


def test_plan_names_the_neighbours_in_flow_order():
    sites = {name: parse_site(site) for name, site in SITES.items()}
    plan = LinkPlan(sites, {name: 40 for name in SITES}, width=16)
    assert [n.name for n in plan.neighbours["2-res-c"]] == ["1-res-a", "2-mlp-b", "3-res-d"]
    assert plan.linked() == set(SITES) and plan.widths["1-res-a"] == 16
