"""precompute.feature_stats (and precompute.examples, which gives the stored examples their per-token acts)
against a brute-force dense reference on the whole activation tensor, plus the streaming guarantees: batch
size, order, splits + merge and checkpoint round-trips never change a result, and the state stays small."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from featurescope.precompute.examples import ExampleActs
from featurescope.precompute.feature_stats import (FINE_BINS, UNITS, FeatureStats, expected_memory_bytes, positive_candidates,
                                                   priority_hash, state_bytes_per_feature)

N, T, F = 48, 16, 40  # contexts, positions, features
K, N_IV, S = 6, 5, 3  # top-k, intervals, samples per interval


def make_corpus(seed: int = 0, n: int = N, t: int = T, f: int = F, quantize: bool = False):
    """Sparse, heavy-tailed activations whose scale grows along the corpus (so R_f doubles mid-stream),
    unique non-contiguous context ids, and BOS/pad positions carrying large values that must be ignored."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.relu(torch.randn(n, t, f, generator=g) - 1.2) * torch.exp(torch.randn(1, 1, f, generator=g))
    acts *= torch.linspace(0.3, 3.0, n)[:, None, None]
    if quantize:  # many exact ties between contexts and between positions
        acts = torch.round(acts * 2) / 2
    ids = torch.randperm(10 * n, generator=g)[:n] * 7 + 3
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[:, 0] = False  # BOS
    pad = torch.randint(t // 2, t, (n,), generator=g)
    mask[torch.arange(t)[None, :] >= pad[:, None]] = False
    acts[~mask] = 50.0  # would dominate every statistic if counted
    return acts, ids, mask


def run(acts, ids, mask, batch: int, order=None, **kw) -> FeatureStats:
    stats = FeatureStats(acts.shape[2], acts.shape[1], top_k=K, n_intervals=N_IV, examples_per_interval=S, **kw)
    order = torch.arange(len(ids)) if order is None else order
    for i in range(0, len(ids), batch):
        sel = order[i:i + batch]
        stats.update(acts[sel], ids[sel], mask[sel])
    return stats


def reference(acts, ids, mask):
    """Dense numpy statistics straight from the definitions."""
    a = (acts * mask[..., None]).double().numpy()  # special positions zeroed
    cmax = a.max(1)  # [N, F]
    cpos = a.argmax(1)  # first position of the max
    vals = [a[..., f][a[..., f] > 0] for f in range(a.shape[2])]
    maxes = np.array([v.max() if v.size else 0.0 for v in vals])
    exps = np.array([np.frexp(m)[1] if m > 0 else 0 for m in maxes])
    return dict(a=a, cmax=cmax, cpos=cpos, vals=vals, max=maxes, R=np.ldexp(1.0, exps), ids=ids.numpy(),
                n_tokens=int(mask.sum()))


def assert_same_result(r1: dict, r2: dict):
    assert r1.keys() == r2.keys()
    for key in r1:
        if isinstance(r1[key], torch.Tensor):
            assert r1[key].dtype == r2[key].dtype and torch.equal(r1[key], r2[key]), key
        else:
            assert r1[key] == r2[key], key


@pytest.fixture(scope="module")
def corpus():
    acts, ids, mask = make_corpus()
    return acts, ids, mask, reference(acts, ids, mask), run(acts, ids, mask, batch=8).finalize()


def test_density_max_mean_and_counts_equal_the_dense_reference(corpus):
    _, _, _, ref, res = corpus
    counts = np.array([v.size for v in ref["vals"]])
    assert res["n_tokens"] == ref["n_tokens"] and res["n_contexts"] == N
    np.testing.assert_array_equal(res["n_firing"].numpy(), counts)
    np.testing.assert_array_equal(res["density"].numpy(), counts / ref["n_tokens"])
    np.testing.assert_array_equal(res["max_act"].numpy(), ref["max"].astype(np.float32))
    means = np.array([v.mean() if v.size else 0.0 for v in ref["vals"]])
    np.testing.assert_allclose(res["mean_act"].numpy(), means, rtol=0, atol=1e-6)
    assert (counts > 0).sum() >= F - 2 and (ref["max"] < 50).all()


def test_special_positions_never_count(corpus):
    acts, ids, mask, _, res = corpus
    cleaned = run(acts * mask[..., None], ids, mask, batch=8).finalize()
    assert_same_result(res, cleaned)
    assert float(res["max_act"].max()) < 50


def examples_of(res: dict, acts, ids, mask, batch: int = 5, order=None) -> dict:
    """ExampleActs fed the contexts the examples name, re-encoded (here: looked up) in batches."""
    examples = ExampleActs(res)
    rows = torch.nonzero(torch.isin(ids, examples.context_ids())).squeeze(1)
    rows = rows if order is None else rows[order(len(rows))]
    for i in range(0, len(rows), batch):
        sel = rows[i:i + batch]
        examples.add(ids[sel], acts[sel], mask[sel])
    return examples.result()


def token_rows(ex: dict, F: int, T: int) -> np.ndarray:
    """The sparse (positions, acts) of every slot back as dense [F, m, T] rows."""
    offsets = ex["token_offsets"].numpy()
    dense = np.zeros((len(offsets) - 1, T), np.float32)
    slot = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    dense[slot, ex["token_pos"].numpy()] = ex["token_acts"].numpy()
    return dense.reshape(F, -1, T)


def test_top_k_contexts_values_positions_and_token_acts_equal_the_dense_reference(corpus):
    acts, ids, mask, ref, res = corpus
    ex = examples_of(res, acts, ids, mask)
    rows = token_rows(ex, F, T)
    for f in range(F):
        firing = np.nonzero(ref["cmax"][:, f] > 0)[0]
        ranked = firing[np.lexsort((ref["ids"][firing], -ref["cmax"][firing, f]))][:K]
        n = len(ranked)
        np.testing.assert_array_equal(res["top_ctx"][f, :n].numpy(), ref["ids"][ranked])
        np.testing.assert_array_equal(res["top_act"][f, :n].numpy(), ref["cmax"][ranked, f].astype(np.float32))
        np.testing.assert_array_equal(res["top_pos"][f, :n].numpy(), ref["cpos"][ranked, f])
        np.testing.assert_array_equal(rows[f, :n], ref["a"][ranked, :, f].astype(np.float32))
        assert (res["top_ctx"][f, n:] == -1).all() and (rows[f, n:K] == 0).all()
    for key in ("top_ctx", "top_act", "top_pos"):
        assert torch.equal(ex[key], res[key])


def test_ties_break_by_lower_context_id_then_first_position():
    acts, ids, mask = make_corpus(seed=3, quantize=True)
    ref, res = reference(acts, ids, mask), run(acts, ids, mask, batch=5).finalize()
    tied = 0
    for f in range(F):
        firing = np.nonzero(ref["cmax"][:, f] > 0)[0]
        ranked = firing[np.lexsort((ref["ids"][firing], -ref["cmax"][firing, f]))][:K]
        tied += len(set(ref["cmax"][ranked, f])) < len(ranked)
        np.testing.assert_array_equal(res["top_ctx"][f, :len(ranked)].numpy(), ref["ids"][ranked])
        np.testing.assert_array_equal(res["top_pos"][f, :len(ranked)].numpy(), ref["cpos"][ranked, f])
    assert tied > F // 2  # the data really has ties


def test_histogram_counts_equal_brute_force_counts_in_each_bin(corpus):
    _, _, _, ref, res = corpus
    for f in range(F):
        if ref["max"][f] == 0:
            assert res["hist_counts"][f].sum() == 0 and res["hist_bin_width"][f] == 0
            continue
        # By definition: bins of width g sub-bins, g = ceil((sub-bin of the max + 1) / 50), as many as reach the max.
        top_sub = math.floor(ref["max"][f] * FINE_BINS / ref["R"][f])
        g = math.ceil((top_sub + 1) / 50)
        width = g * ref["R"][f] / FINE_BINS
        n_bins = int(res["hist_n_bins"][f])
        assert res["hist_bin_width"][f].item() == width and (n_bins - 1) * width <= ref["max"][f] < n_bins * width
        assert n_bins >= 33  # 128 sub-bins: the max's sub-bin is >= 64, so at least 33 bins of <= 2 sub-bins
        v = ref["vals"][f]
        expected = [((v >= i * width) & (v < (i + 1) * width)).sum() for i in range(50)]
        np.testing.assert_array_equal(res["hist_counts"][f].numpy(), expected)
        assert (res["hist_counts"][f, n_bins:] == 0).all()


def test_intervals_are_near_equal_width_over_zero_to_max_with_exact_shares(corpus):
    _, _, _, ref, res = corpus
    for f in np.nonzero(ref["max"] > 0)[0]:
        lo, hi = res["interval_lo"][f].double().numpy(), res["interval_hi"][f].double().numpy()
        unit = ref["R"][f] / UNITS
        assert lo[0] == 0 and (lo[1:] == hi[:-1]).all() and ref["max"][f] < hi[-1] <= ref["max"][f] + unit
        ideal = np.linspace(0, ref["max"][f], N_IV + 1)
        assert np.abs(lo - ideal[:-1]).max() <= unit / 2  # inner edges: the unit boundary nearest linspace
        v = ref["vals"][f]
        count = [((v >= a) & (v < b)).sum() for a, b in zip(lo, hi)]
        np.testing.assert_array_equal(res["interval_count"][f].numpy(), count)
        np.testing.assert_allclose(res["interval_share"][f].numpy(), np.array(count) / v.size, rtol=1e-15)


def test_interval_samples_are_the_lowest_priority_contexts_of_each_interval(corpus):
    acts, ids, mask, ref, res = corpus
    ex = examples_of(res, acts, ids, mask)
    rows = token_rows(ex, F, T)
    row_of = {int(c): r for r, c in enumerate(ids)}
    seen = 0
    for f in np.nonzero(ref["max"] > 0)[0]:
        prio = priority_hash(ids, torch.full_like(ids, int(f))).numpy()
        for i in range(N_IV):
            lo, hi = res["interval_lo"][f, i].item(), res["interval_hi"][f, i].item()
            firing_in = (ref["cmax"][:, f] > 0) & (ref["cmax"][:, f] >= lo) & (ref["cmax"][:, f] < hi)
            members = np.nonzero(firing_in)[0]
            chosen = members[np.lexsort((ref["ids"][members], prio[members]))][:S]
            n = len(chosen)
            np.testing.assert_array_equal(res["interval_ctx"][f, i, :n].numpy(), ref["ids"][chosen])  # priority order
            assert (res["interval_ctx"][f, i, n:] == -1).all()
            shown = chosen[np.lexsort((prio[chosen], -ref["cmax"][chosen, f]))]  # stored strongest first
            np.testing.assert_array_equal(ex["interval_ctx"][f, i, :n].numpy(), ref["ids"][shown])
            np.testing.assert_array_equal(ex["interval_act"][f, i, :n].numpy(), ref["cmax"][shown, f].astype(np.float32))
            np.testing.assert_array_equal(ex["interval_pos"][f, i, :n].numpy(), ref["cpos"][shown, f])
            for j, c in enumerate(ref["ids"][shown]):
                np.testing.assert_array_equal(rows[f, K + i * S + j], ref["a"][row_of[int(c)], :, f].astype(np.float32))
            assert (ex["interval_ctx"][f, i, n:] == -1).all() and (rows[f, K + i * S + n:K + (i + 1) * S] == 0).all()
            seen += n
    assert seen > F * N_IV  # most intervals hold samples


def test_example_acts_do_not_depend_on_how_the_contexts_are_batched(corpus):
    acts, ids, mask, _, res = corpus
    one = examples_of(res, acts, ids, mask, batch=48)
    for batch in (1, 7):
        assert_same_result(examples_of(res, acts, ids, mask, batch=batch, order=torch.randperm), one)


def test_priority_sample_is_uniform_over_the_members_of_an_interval():
    # 300 contexts all in the same interval of 400 features: each feature samples 5 of them. If the priority
    # is uniform and independent per feature, each context is picked ~Binomial(400, 5/300) times.
    n_ctx, n_feat, s = 300, 400, 5
    acts = torch.zeros(n_ctx, 2, n_feat)
    acts[:, 1] = 1.0
    stats = FeatureStats(n_feat, 2, top_k=1, n_intervals=1, examples_per_interval=s)
    ids = torch.arange(n_ctx) * 13 + 5
    for i in range(0, n_ctx, 64):
        stats.update(acts[i:i + 64], ids[i:i + 64], torch.ones(len(ids[i:i + 64]), 2, dtype=torch.bool))
    picked = stats.finalize()["interval_ctx"][:, 0]  # [features, s]
    assert (picked >= 0).all() and all(len(set(row.tolist())) == s for row in picked)
    hits = torch.bincount((picked.flatten() - 5) // 13, minlength=n_ctx).double()
    expected = n_feat * s / n_ctx
    chi2 = float(((hits - expected) ** 2 / expected).sum())
    assert chi2 < n_ctx - 1 + 6 * math.sqrt(2 * (n_ctx - 1))  # far inside the chi-square(299) bulk
    first_half = float(hits[: n_ctx // 2].sum()) / (n_feat * s)
    assert 0.45 < first_half < 0.55


@pytest.mark.parametrize("batch", [1, 3, 7, 48])
def test_batch_size_does_not_change_any_result(corpus, batch):
    acts, ids, mask, _, res = corpus
    assert_same_result(run(acts, ids, mask, batch=batch).finalize(), res)


def test_batch_order_does_not_change_any_result(corpus):
    acts, ids, mask, _, res = corpus
    assert_same_result(run(acts, ids, mask, batch=5, order=torch.randperm(N)).finalize(), res)


def test_halves_merged_equal_one_run_exactly(corpus):
    acts, ids, mask, _, res = corpus
    first, second = run(acts[:20], ids[:20], mask[:20], batch=6), run(acts[20:], ids[20:], mask[20:], batch=4)
    second_state = second.state_dict()
    first.merge(second)
    assert_same_result(first.finalize(), res)
    assert all(torch.equal(second_state[k], v) for k, v in second.state_dict().items() if k != "settings")


def test_merging_many_parts_in_any_order_equals_one_run(corpus):
    acts, ids, mask, _, res = corpus
    parts = [run(acts[i:i + 12], ids[i:i + 12], mask[i:i + 12], batch=5) for i in range(0, N, 12)]
    total = FeatureStats(F, T, top_k=K, n_intervals=N_IV, examples_per_interval=S)
    for part in reversed(parts):
        total.merge(part)
    assert_same_result(total.finalize(), res)


def test_checkpoint_round_trip_mid_run_resumes_bit_for_bit(corpus):
    acts, ids, mask, _, _ = corpus
    uninterrupted = run(acts, ids, mask, batch=8)
    partial = run(acts[:24], ids[:24], mask[:24], batch=8)
    buffer = io.BytesIO()
    torch.save(partial.state_dict(), buffer)
    del partial  # the process dies here
    buffer.seek(0)
    resumed = FeatureStats.from_state_dict(torch.load(buffer))
    for i in range(24, N, 8):
        resumed.update(acts[i:i + 8], ids[i:i + 8], mask[i:i + 8])
    mine = resumed.state_dict()
    for key, value in uninterrupted.state_dict().items():
        assert value == mine[key] if key == "settings" else torch.equal(value, mine[key])
    assert_same_result(resumed.finalize(), uninterrupted.finalize())


def test_checkpoint_with_other_settings_is_refused(corpus):
    state = run(*corpus[:3], batch=16).state_dict()
    with pytest.raises(ValueError, match="settings"):
        FeatureStats(F, T, top_k=K + 1, n_intervals=N_IV, examples_per_interval=S).load_state_dict(state)


def test_finalize_leaves_the_state_unchanged_and_memory_matches_the_estimate(corpus):
    acts, ids, mask, _, res = corpus
    stats = run(acts[:24], ids[:24], mask[:24], batch=8)
    before = stats.state_dict()
    stats.finalize()
    assert all(torch.equal(before[k], v) for k, v in stats.state_dict().items() if k != "settings")
    for i in range(24, N, 8):
        stats.update(acts[i:i + 8], ids[i:i + 8], mask[i:i + 8])
    assert_same_result(stats.finalize(), res)
    state_bytes = sum(v.nbytes for k, v in before.items() if k != "settings")
    assert state_bytes - 16 == expected_memory_bytes(F, top_k=K, examples_per_interval=S) == stats.nbytes() - 16


def test_the_default_state_is_at_most_2_kb_per_feature_and_does_not_grow_with_the_corpus():
    assert state_bytes_per_feature() == 2004  # top_k 20, 5 samples per interval: Gemma Scope's 30M features in 60 GB
    stats = FeatureStats(64, 32)
    before = stats.nbytes()
    for seed in range(3):
        acts, ids, mask = make_corpus(seed=seed, n=16, t=32, f=64)
        stats.update(acts, ids + 10_000 * seed, mask)
    assert stats.nbytes() == before == 64 * state_bytes_per_feature() + 16


@pytest.mark.parametrize("numel", [4096, 4099, 0])
def test_positive_candidates_cover_every_positive_entry_and_only_non_zeros(numel):
    g = torch.Generator().manual_seed(numel)
    x = torch.randn(numel, generator=g) * (torch.rand(numel, generator=g) < 0.03)  # sparse, half negative
    found = positive_candidates(x)
    assert set((x > 0).nonzero().squeeze(1).tolist()) <= set(found.tolist()) <= set(x.nonzero().squeeze(1).tolist())
    assert len(set(found.tolist())) == found.numel()


def test_update_reads_acts_without_changing_them(corpus):
    acts, ids, mask, _, _ = corpus
    before = acts.clone()
    run(acts, ids, mask, batch=16)
    assert torch.equal(acts, before)


def test_shorter_contexts_and_dead_features_give_empty_rows():
    acts = torch.zeros(4, 8, 6)
    acts[1, 3, 2] = 0.75
    stats = FeatureStats(6, 12, top_k=3, n_intervals=2, examples_per_interval=2)
    stats.update(acts, torch.tensor([9, 8, 7, 6]), torch.ones(4, 8, dtype=torch.bool))
    res = stats.finalize()
    assert res["top_ctx"][2].tolist() == [8, -1, -1] and res["top_pos"][2, 0] == 3
    examples = ExampleActs(res)
    examples.add(torch.tensor([9, 8, 7, 6]), acts, torch.ones(4, 8, dtype=torch.bool))
    ex = examples.result()
    assert ex["token_pos"].tolist() == [3, 3] and ex["token_acts"].tolist() == [0.75, 0.75]  # its top and its sample
    assert ex["interval_act"][2].tolist() == [[0, 0], [0.75, 0]] and ex["interval_pos"][2, 1, 0] == 3
    dead = [f for f in range(6) if f != 2]
    assert (res["n_firing"][dead] == 0).all() and (res["max_act"][dead] == 0).all()
    assert (res["interval_ctx"][dead] == -1).all() and (res["hist_counts"][dead] == 0).all()
    assert res["interval_ctx"][2].tolist() == [[-1, -1], [8, -1]]  # 0.75 lies in the upper half of [0, max]


def test_bad_shapes_and_ids_are_refused():
    stats = FeatureStats(4, 8)
    with pytest.raises(ValueError, match="shape"):
        stats.update(torch.zeros(2, 8, 5), torch.tensor([0, 1]), torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="context ids"):
        stats.update(torch.zeros(2, 8, 4), torch.tensor([0, -1]), torch.ones(2, 8, dtype=torch.bool))
    stats.n_tokens += 2**31 - 10  # the int32 histogram counts could wrap past this
    with pytest.raises(OverflowError, match="at most"):
        stats.update(torch.zeros(2, 8, 4), torch.tensor([0, 1]), torch.ones(2, 8, dtype=torch.bool))
