"""Contrastive search (app/contrast.py, app/contrast_runs.py): the AUROC equals pairwise counting, and a run
through the live encoder of the tiny Gemma 2 ranks features exactly as a brute-force computation does
(each prompt encoded alone, pooled over its counted tokens in Python, every pair of prompts compared);
detectors are fitted on a training split and scored on the held-out one."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
import torch

from featurescope.app import Settings
from featurescope.app.catalog import CatalogSource
from featurescope.app.contrast import (DetectorFeature, auroc, best_threshold, detector_scores, rank, score_features,
                                       split, token_scores)
from featurescope.app.contrast_runs import ContrastRequest, ContrastRun, run_contrast
from featurescope.app.databases import DataDir
from featurescope.app.live_encoder import LiveModel
from featurescope.encoder import FeatureEncoder
from featurescope.sae_loading import load_sae

CODE = ["def add(a, b):", "return a + b", "def f(x): return x", "import os", "for i in range(3): print(i)",
        "class A: pass", "x = [1, 2, 3]", "if a == b: return"]
PROSE = ["The capital of France is Paris.", "The capital of Italy is Rome.", "Sparse autoencoders find features.",
         "It rained all day in the city.", "She read the letter twice.", "Features in the residual stream.",
         "We walked along the river.", "The weather is nice today."]


def _pairwise_auroc(a: list[float], b: list[float]) -> float:
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in itertools.product(a, b))
    return wins / (len(a) * len(b))


def test_auroc_equals_pairwise_counting_with_ties():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, size=(7, 30)).astype(np.float32)  # few distinct values: many ties
    b = rng.integers(0, 3, size=(5, 30)).astype(np.float32)
    expected = [_pairwise_auroc(list(a[:, f]), list(b[:, f])) for f in range(30)]
    np.testing.assert_array_equal(auroc(a, b), expected)


def test_rank_puts_a_perfect_separator_of_either_set_first_and_leaves_out_features_that_never_fire():
    a = np.array([[5.0, 0.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0], [6.0, 0.0, 1.0, 0.0]])
    b = np.array([[0.0, 3.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    rows = rank({"s": score_features(a, b)}, top=10)
    assert [(r.index, r.direction) for r in rows] == [(0, "a"), (1, "b"), (2, "a")]  # 0: |diff| 5 beats 1's 2.5
    assert rows[0].auroc == 1.0 and rows[1].auroc == 0.0 and (rows[0].fired_a, rows[0].fired_b) == (3, 0)
    assert rows[1].diff == pytest.approx(-2.5)


def test_split_is_seeded_disjoint_and_holds_out_at_least_one_prompt():
    train, held = split(10)
    assert (train, held) == split(10) and sorted(train + held) == list(range(10)) and len(held) == 2
    assert len(split(2)[1]) == 1
    with pytest.raises(ValueError, match="at least 2"):
        split(1)


def test_best_threshold_sits_between_the_sets_values():
    assert 1.0 < best_threshold(np.array([2.0, 3.0]), np.array([0.0, 1.0])) < 2.0


def test_detector_scores_sum_the_weights_of_features_above_their_threshold_per_prompt_and_per_token():
    features = [DetectorFeature("s", 0, 0.5, 0.8, 0.9), DetectorFeature("t", 2, 1.0, -0.6, 0.2)]
    pooled = {("s", 0): np.array([1.0, 0.0, 1.0]), ("t", 2): np.array([0.0, 2.0, 2.0])}
    np.testing.assert_allclose(detector_scores(features, pooled), [0.8, -0.6, 0.2])
    acts = {("s", 0): np.array([0.0, 1.0, 1.0]), ("t", 2): np.array([5.0, 0.0, 3.0])}
    counted = {"s": np.array([False, True, True]), "t": np.array([False, True, True])}
    np.testing.assert_allclose(token_scores(features, acts, counted), [0.0, 0.8, 0.2])  # BOS never counts


# ----------------------------------------------------------------------------------------- brute force
@pytest.fixture(scope="module")
def model_and_live(live_data_dir, tiny_gemma2):
    settings = Settings(data_dir=live_data_dir, device="cpu", max_batch=3)
    (model,) = CatalogSource(DataDir(settings.db_dir)).current().models.values()
    live = LiveModel(model, settings, loaded=tiny_gemma2)
    yield model, live
    live.close()


def _brute_force_pooled(lm, sae, prompts: list[str], how: str) -> np.ndarray:
    """Each prompt alone through the encoder; max or mean over its counted positions, in Python."""
    out = []
    for prompt in prompts:
        ids = lm.tokenize(prompt)
        acts, masks = FeatureEncoder(lm, {"s": sae}).encode_with_masks(torch.tensor([ids]))
        rows = [acts["s"][0, p].double().tolist() for p in range(len(ids)) if masks["s"][0, p]]
        columns = list(zip(*rows))
        out.append([max(c) if how == "max" else sum(c) / len(c) for c in columns])
    return np.array(out)


@pytest.mark.parametrize("how", ["max", "mean"])
def test_a_contrast_run_ranks_features_as_brute_force_does_on_a_tiny_gemma2(model_and_live, tiny_gemma2, how):
    model, live = model_and_live
    saes = list(model.saes.values())
    run = ContrastRun("t", model.id, ContrastRequest(saes, CODE, PROSE, pool=how))
    asyncio.run(run_contrast(live, run, max_batch=3))  # micro-batches of 3: padded batches of mixed lengths
    assert run.state == "done", run.error
    assert run.done == run.total == len(CODE) + len(PROSE)

    expected = []  # (-separation, -|diff|, sae order, index, auroc)
    for order, info in enumerate(saes):
        sae = load_sae(info.source)
        a, b = _brute_force_pooled(tiny_gemma2, sae, CODE, how), _brute_force_pooled(tiny_gemma2, sae, PROSE, how)
        np.testing.assert_allclose(run.pooled["a"][info.id], a, rtol=1e-4, atol=1e-5)  # batched with padding vs alone
        for f in range(sae.d_sae):
            if not (a[:, f] > 0).any() and not (b[:, f] > 0).any():
                continue
            area = _pairwise_auroc(list(a[:, f]), list(b[:, f]))
            diff = a[:, f].mean() - b[:, f].mean()
            expected.append((-max(area, 1 - area), -abs(float(diff)), order, f, area, info.id))
    expected.sort()
    ranked = rank(run.scores, top=25)
    assert [(r.sae_id, r.index) for r in ranked] == [(e[5], e[3]) for e in expected[:25]]
    np.testing.assert_allclose([r.auroc for r in ranked], [e[4] for e in expected[:25]], rtol=0, atol=1e-12)
    assert ranked[0].separation > 0.5  # code and prose do differ somewhere
