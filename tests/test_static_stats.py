"""precompute.static_stats against dense references: the full [F, vocab] logit matrix and [F, F] cosine
matrix computed at once, numpy.histogram for the logit histograms, and the model's own final norm + head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featurescope.precompute.static_stats import (decoder_neighbours, logit_effect, site_unembedding, unembedding,
                                                   uniform_histogram)
from featurescope.sites import Site


def test_logit_tables_equal_the_dense_reference_across_blocks():
    g = torch.Generator().manual_seed(0)
    W_dec, W_U = torch.randn(70, 24, generator=g), torch.randn(500, 24, generator=g)
    res = logit_effect(W_dec, W_U, top_n=10, block=16)  # 5 blocks, the last one partial
    dense = (W_dec.double() @ W_U.double().T).numpy()  # [F, vocab]
    order = np.argsort(-dense, axis=1, kind="stable")
    np.testing.assert_array_equal(res["pos_ids"].numpy(), order[:, :10])
    np.testing.assert_array_equal(res["neg_ids"].numpy(), order[:, ::-1][:, :10])
    np.testing.assert_allclose(res["pos_values"].numpy(), np.take_along_axis(dense, order[:, :10], 1), atol=1e-5)
    np.testing.assert_allclose(res["neg_values"].numpy(), np.take_along_axis(dense, order[:, ::-1][:, :10], 1),
                               atol=1e-5)
    np.testing.assert_allclose(res["hist_lo"].numpy(), dense.min(1), atol=1e-5)
    np.testing.assert_allclose(res["hist_hi"].numpy(), dense.max(1), atol=1e-5)
    assert res["hist_counts"].shape == (70, 50) and (res["hist_counts"].sum(1) == 500).all()


def test_logit_histograms_equal_numpy_histogram_exactly_even_on_bin_edges():
    # Small integer weights give exact float32 logits with many values exactly on bin edges.
    g = torch.Generator().manual_seed(1)
    W_dec = torch.randint(-3, 4, (40, 12), generator=g).float()
    W_dec[7] = 0.0  # a constant logit vector: numpy widens the range by 0.5 on each side
    W_U = torch.randint(-3, 4, (300, 12), generator=g).float()
    res = logit_effect(W_dec, W_U, bins=50, block=8)
    dense = (W_dec @ W_U.T).numpy()  # exact: sums of small integers
    for f in range(40):
        counts, edges = np.histogram(dense[f], bins=50, range=(float(dense[f].min()), float(dense[f].max())))
        np.testing.assert_array_equal(res["hist_counts"][f].numpy(), counts)
        assert res["hist_lo"][f].item() == edges[0] and res["hist_hi"][f].item() == edges[-1]
        np.testing.assert_array_equal(res["pos_values"][f].numpy(), -np.sort(-dense[f])[:10])
        np.testing.assert_array_equal(res["neg_values"][f].numpy(), np.sort(dense[f])[:10])
        np.testing.assert_array_equal(dense[f][res["pos_ids"][f].numpy()], res["pos_values"][f].numpy())
        assert len(set(res["pos_ids"][f].tolist())) == 10
    assert res["hist_lo"][7].item() == -0.5 and res["hist_counts"][7, 25].item() == 300


def test_uniform_histogram_bins_are_half_open_except_the_last():
    counts, lo, hi = uniform_histogram(torch.tensor([[0.0, 1.0, 2.0, 10.0], [5.0, 5.0, 5.0, 6.0]]), bins=5)
    assert counts.tolist() == [[2, 1, 0, 0, 1], [3, 0, 0, 0, 1]]  # 2.0 opens bin 1; the max closes bin 4
    assert lo.tolist() == [0.0, 5.0] and hi.tolist() == [10.0, 6.0]


def test_neighbours_equal_the_dense_cosine_reference_blockwise_and_exclude_self():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(300, 16, generator=g)
    W[5] = 2.5 * W[7]  # the same direction, another norm: cosine 1
    W[11] = 0.0  # a dead decoder row must not poison the others
    res = decoder_neighbours(W, k=10, block=64)
    Wd = W.double()
    Wn = Wd / Wd.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cos = (Wn @ Wn.T).numpy()
    np.fill_diagonal(cos, -np.inf)
    order = np.argsort(-cos, axis=1, kind="stable")[:, :10]
    live = [f for f in range(300) if f != 11]
    same = lambda ids: np.where(ids == 5, 7, ids)  # 5 and 7 tie as neighbours of everyone else
    np.testing.assert_array_equal(same(res["ids"].numpy()[live]), same(order[live]))
    np.testing.assert_allclose(res["cos"].numpy(), np.take_along_axis(cos, order, 1), atol=1e-5)
    assert res["ids"][5, 0] == 7 and res["ids"][7, 0] == 5 and res["cos"][5, 0] == pytest.approx(1.0, abs=1e-6)
    assert not (res["ids"] == torch.arange(300)[:, None]).any()
    assert (res["cos"][11] == 0).all()


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma2"])
def test_unembedding_folds_the_final_norm_so_normalised_residuals_give_the_model_logits(model, request):
    lm = request.getfixturevalue(model)
    h = torch.randn(5, lm.d_model, generator=torch.Generator().manual_seed(3))
    norm = lm.model.model.norm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    with torch.no_grad():
        logits = lm.model.get_output_embeddings()(norm(h))
    unit = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    torch.testing.assert_close(unit @ unembedding(lm).T, logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(unembedding(lm, fold_final_norm=False), lm.model.get_output_embeddings().weight.float())


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_gemma2"])
def test_an_attention_sae_direction_reaches_the_logits_through_o_proj_and_gemma_2s_post_attention_norm(model, request):
    """hook_z directions are n_heads * head_dim wide: o_proj maps them into the residual stream; Gemma 2 then
    scales the attention output by its post-attention norm's gain (Llama's norm of that name is the MLP's input)."""
    lm = request.getfixturevalue(model)
    layer = lm.layers[1]
    gain = layer.post_attention_layernorm.weight
    saved = gain.detach().clone()
    z = torch.randn(4, layer.self_attn.o_proj.in_features, generator=torch.Generator().manual_seed(5))
    try:
        with torch.no_grad():
            gain.copy_(torch.rand(gain.shape, generator=torch.Generator().manual_seed(6)))  # not the identity
            written = layer.self_attn.o_proj(z)  # [4, d_model]
            if model == "tiny_gemma2":
                written = written * (1.0 + gain)
        W_U = unembedding(lm)
        torch.testing.assert_close(z @ site_unembedding(lm, Site(1, "att"), W_U).T, written @ W_U.T, rtol=1e-4, atol=1e-4)
        assert site_unembedding(lm, Site(1, "res"), W_U) is W_U and site_unembedding(lm, Site(1, "mlp"), W_U) is W_U
    finally:
        with torch.no_grad():
            gain.copy_(saved)
