"""One rule for the positions that count (featurescope/positions.py): training, evaluation, the precompute
job and live encoding leave out the same positions of the same contexts, norm outliers included; the
precompute and live encoding also leave out the warm-up of a context that starts mid-document."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest
import torch

from featurescope import training
from featurescope.corpus import content_mask, pack_contexts
from featurescope.evaluation import evaluate_saes
from featurescope.positions import WARMUP_POSITIONS, counted_positions, norm_limit, sae_max_norm, warmup_positions
from featurescope.precompute.corpus_sources import CorpusSpec
from featurescope.precompute.job import PrecomputeConfig, run_precompute
from featurescope.sae_loading import load_sae
from featurescope.sites import parse_site
from featurescope.training import TrainConfig, train_saes

from conftest import TOKENIZER_TEXT

SITE = parse_site("1-res")


def test_max_norm_is_fixed_per_sae_so_a_position_counts_whatever_shares_its_batch(tiny_gemma2):
    ids = pack_contexts(tiny_gemma2, TOKENIZER_TEXT[:8], context_len=24)
    acts = torch.randn(*ids.shape, 8)
    limit = norm_limit(acts, content_mask(tiny_gemma2, ids), 1.0)
    together = counted_positions(tiny_gemma2, ids, acts, limit)
    alone = torch.cat([counted_positions(tiny_gemma2, ids[i:i + 1], acts[i:i + 1], limit) for i in range(len(ids))])
    assert torch.equal(together, alone)
    assert 0 < int(together.sum()) < int(content_mask(tiny_gemma2, ids).sum())
    assert norm_limit(acts, content_mask(tiny_gemma2, ids), 0) is None
    assert torch.equal(counted_positions(tiny_gemma2, ids, acts * 100, None), content_mask(tiny_gemma2, ids))


def test_a_context_cut_mid_document_does_not_count_its_warm_up_and_one_at_a_document_start_counts_from_position_1(tiny_gemma2):
    lm = tiny_gemma2
    ids = torch.randint(max(lm.special_token_ids) + 1, lm.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = lm.bos_token_id  # BOS + 23 ordinary tokens: only BOS and the warm-up can be left out
    acts = torch.ones(*ids.shape, 8)
    mask = counted_positions(lm, ids, acts, None, starts_document=torch.tensor([True, False]))
    assert mask[0].tolist() == [False] + [True] * 23  # only BOS left out
    assert mask[1].tolist() == [False] * (1 + WARMUP_POSITIONS) + [True] * (23 - WARMUP_POSITIONS)
    assert torch.equal(counted_positions(lm, ids, acts, None), content_mask(lm, ids))  # no flags: prompts, training
    assert torch.equal(mask, torch.cat([counted_positions(lm, ids[i:i + 1], acts[i:i + 1], None,
                                                          torch.tensor([i == 0])) for i in range(2)]))


@pytest.fixture(scope="module")
def trained(tiny_gemma2, tmp_path_factory):
    """An SAE trained at 1-res with a ratio low enough that ordinary tokens are norm outliers, and its stream."""
    cfg = TrainConfig(sites=("1-res",), d_sae=48, batch_size=256, train_tokens=256 * 8, buffer_tokens=4096,
                      context_len=32, model_batch=4, max_norm_ratio=1.1, lr_warmup_steps=2, sparsity_warmup_steps=2,
                      checkpoint_every=0, progress=False)
    stream = training.ActivationStream(tiny_gemma2, pack_contexts(tiny_gemma2, TOKENIZER_TEXT, context_len=32), cfg)
    folder = train_saes(tiny_gemma2, cfg, tmp_path_factory.mktemp("saes"), stream=stream)[SITE]
    return load_sae(str(folder)), stream


def test_training_evaluation_precompute_and_live_encoding_count_the_same_positions(tiny_gemma2, trained, tmp_path):
    from fastapi.testclient import TestClient

    from featurescope.app import Settings, create_app
    from featurescope.app.live import LiveService

    sae, stream = trained
    lm = tiny_gemma2
    assert sae_max_norm(sae) == stream.max_norm(SITE) is not None  # the card keeps training's limit
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TOKENIZER_TEXT[:24]))
    cfg = PrecomputeConfig(model=str(lm.source), saes=[sae.cfg.source], sae_ids=["1-res-t"], corpus=CorpusSpec(str(corpus)),
                           max_tokens=2000, context_len=32, batch_size=4, top_k=3, n_intervals=2, examples_per_interval=1,
                           links=False, device="cpu", data_dir=str(tmp_path / "data"), progress=False)
    con = duckdb.connect(str(run_precompute(cfg, lm=lm, log=lambda *_: None)), read_only=True)
    rows = con.execute("SELECT token_ids, starts_document FROM contexts ORDER BY context_id").fetchall()
    contexts, starts = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    stored_firing = np.array([r[0] for r in con.execute("SELECT n_firing FROM features ORDER BY feature").fetchall()])
    con.close()

    # training's positions of these contexts, with the limit the SAE was trained with
    captured = training.capture_contexts(lm, contexts, [SITE], model_batch=4)
    kept = training.trained_positions(lm, captured, {SITE: stream.max_norm(SITE)})[SITE]
    counted = torch.zeros(contexts.numel(), dtype=torch.bool)
    counted[kept] = True
    counted = counted.view(contexts.shape)  # [n, T]
    content = content_mask(lm, contexts)
    assert (content & ~counted).any() and counted.any(), "no ordinary token is an outlier: the test would prove nothing"

    # precompute: each feature's firing count is over exactly these positions, less the warm-up of the
    # contexts that start mid-document
    warm = warmup_positions(starts, contexts.shape[1])
    assert warm.any() and starts.any()
    precomputed = counted & ~warm
    x = captured.acts[SITE]  # [n, T, d_in]
    fires = sae.encode(x) > 0  # [n, T, d_sae]
    np.testing.assert_array_equal(stored_firing, fires[precomputed].sum(0).numpy())

    # evaluation: statistics over the same positions (their count and their reconstruction error)
    metrics = evaluate_saes(lm, {"t": sae}, contexts, batch_size=4)["t"]
    kept_x = x[counted].double()
    err = (kept_x - sae(x[counted]).double()).pow(2).sum(-1).mean()
    variance = kept_x.pow(2).sum(-1).mean() - kept_x.mean(0).pow(2).sum()
    assert metrics.n_tokens == int(counted.sum()) and metrics.max_norm == stream.max_norm(SITE)
    assert metrics.fvu == pytest.approx(float(err / variance), rel=1e-5)

    # live encoding: one context at a time, as the server's encoder batches a prompt; a stored context with
    # its document flag counts the precompute's positions, the same tokens as a prompt of their own count
    # from position 1
    settings = Settings(data_dir=tmp_path / "data", device="cpu")
    with TestClient(create_app(settings, LiveService(settings, preloaded={lm.name: lm}))) as client:
        for i in range(0, len(contexts), max(1, len(contexts) // 4)):
            params = {"ids": ",".join(map(str, contexts[i].tolist())), "saes": ["1-res-t"]}
            (stored,) = client.get(f"/{lm.name}/encode.json", params={**params, "mid_document": int(not starts[i])}).json()["layers"]
            (prompt,) = client.get(f"/{lm.name}/encode.json", params=params).json()["layers"]
            assert stored["counted"] == precomputed[i].tolist() and prompt["counted"] == counted[i].tolist()
