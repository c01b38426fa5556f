"""SAE quality metrics against brute-force computations on tiny models, storage, CLI.

Run: .venv/bin/pytest tests/test_evaluation.py
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from conftest import TOKENIZER_TEXT, random_sae_params
from typer.testing import CliRunner

from featurescope.cli import app
from featurescope.corpus import content_mask, pack_contexts
from featurescope.encoder import SAEShapeError
from featurescope.evaluation import evaluate_saes, format_table, store_metrics
from featurescope.sae import JumpReLUSAE, SAEConfig
from featurescope.sae_loading import load_sae, save_sae


def make_sae(d_in: int, d_sae: int, hook_name: str, seed: int = 0, threshold: float = 0.05) -> JumpReLUSAE:
    params = {k: torch.from_numpy(v) for k, v in random_sae_params(d_in, d_sae, seed, threshold).items()}
    return JumpReLUSAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook_name), params)


def identity_sae(d_in: int, hook_name: str) -> JumpReLUSAE:
    """x = relu(x) - relu(-x): a perfect reconstruction with 2 * d_in latents."""
    eye = torch.eye(d_in)
    params = {"W_enc": torch.cat([eye, -eye], 1), "W_dec": torch.cat([eye, -eye], 0), "b_enc": torch.zeros(2 * d_in),
              "b_dec": torch.zeros(d_in), "threshold": torch.zeros(2 * d_in)}
    return JumpReLUSAE(SAEConfig(d_in=d_in, d_sae=2 * d_in, hook_name=hook_name), params)


@pytest.fixture(scope="module")
def gemma_contexts(tiny_gemma2):
    return pack_contexts(tiny_gemma2, TOKENIZER_TEXT[:12], context_len=24)


def brute_force(lm, sae: JumpReLUSAE, layer: int, ids: torch.Tensor) -> dict:
    """Residual-stream metrics computed the long way: hidden_states, explicit loops, log-softmax by hand."""
    mask = content_mask(lm, ids)
    with torch.no_grad():
        out = lm.model(input_ids=ids, output_hidden_states=True)
        x = out.hidden_states[layer + 1][mask]  # output of decoder layer `layer`
        acts = sae.encode(x)
        fires = (acts > 0).sum(0)

        def replace(_m, _a, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            h[mask] = sae(h[mask])
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handle = lm.layers[layer].register_forward_hook(replace)
        try:
            spliced_logits = lm.model(input_ids=ids).logits
        finally:
            handle.remove()

    def ce(logits):
        total, n = 0.0, 0
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1] - 1):
                if mask[b, t + 1]:
                    total -= torch.log_softmax(logits[b, t].double(), -1)[ids[b, t + 1]].item()
                    n += 1
        return total / n

    clean, spliced = ce(out.logits), ce(spliced_logits)
    return {"l0": (acts > 0).float().sum(1).mean().item(),
            "fvu": ((sae(x) - x) ** 2).sum(1).mean().item() / ((x - x.mean(0)) ** 2).sum(1).mean().item(),
            "dead": (fires == 0).float().mean().item(), "dense": (fires > 0.1 * x.shape[0]).float().mean().item(),
            "clean": clean, "delta": spliced - clean}


def test_metrics_equal_brute_force_on_a_tiny_model(tiny_gemma2, gemma_contexts):
    sae = make_sae(64, 256, "blocks.1.hook_resid_post", threshold=1.5)
    got = evaluate_saes(tiny_gemma2, {"s": sae}, gemma_contexts, batch_size=3)["s"]
    want = brute_force(tiny_gemma2, sae, 1, gemma_contexts)
    assert 0 < want["dead"] < 1 and 0 < want["dense"] < 1  # the test exercises both shares
    assert got.l0 == pytest.approx(want["l0"], rel=1e-5)
    assert got.fvu == pytest.approx(want["fvu"], rel=1e-4)
    assert got.dead_share == pytest.approx(want["dead"]) and got.dense_share == pytest.approx(want["dense"])
    assert got.clean_loss == pytest.approx(want["clean"], rel=1e-4)
    assert got.delta_loss == pytest.approx(want["delta"], rel=1e-3, abs=1e-4)
    assert got.delta_loss > 0  # a random SAE hurts the model
    assert got.n_tokens == int(content_mask(tiny_gemma2, gemma_contexts).sum())


def test_perfect_sae_has_zero_fvu_and_zero_delta_loss(tiny_llama):
    contexts = pack_contexts(tiny_llama, TOKENIZER_TEXT[:8], context_len=24)
    sae = identity_sae(64, "blocks.2.hook_mlp_out")
    m = evaluate_saes(tiny_llama, {"id": sae}, contexts)["id"]
    assert m.fvu < 1e-10 and abs(m.delta_loss) < 1e-5
    assert m.l0 > 0 and m.dead_share < 1


def test_several_saes_share_the_clean_pass_and_match_single_runs(tiny_gemma2, gemma_contexts):
    a, b = make_sae(64, 128, "blocks.0.hook_resid_post", 1), make_sae(96, 128, "blocks.2.attn.hook_z", 2, 0.02)
    both = evaluate_saes(tiny_gemma2, {"a": a, "b": b}, gemma_contexts)
    alone = evaluate_saes(tiny_gemma2, {"b": b}, gemma_contexts)
    assert both["b"].to_dict() == pytest.approx(alone["b"].to_dict())
    assert both["a"].clean_loss == both["b"].clean_loss


def test_spliced_passes_that_replay_the_clean_layers_equal_full_passes(tiny_gemma2, gemma_contexts, monkeypatch):
    saes = {"res": make_sae(64, 128, "blocks.1.hook_resid_post", 1), "mlp": make_sae(64, 128, "blocks.2.hook_mlp_out", 3),
            "att": make_sae(96, 128, "blocks.3.attn.hook_z", 2, 0.02)}
    replayed = evaluate_saes(tiny_gemma2, saes, gemma_contexts, batch_size=4)
    monkeypatch.setattr("featurescope.evaluation.replay_layers", lambda _lm, _outputs: contextlib.nullcontext())
    full = evaluate_saes(tiny_gemma2, saes, gemma_contexts, batch_size=4)
    assert {n: m.to_dict() for n, m in replayed.items()} == {n: m.to_dict() for n, m in full.items()}
    assert all(m.delta_loss != 0 for m in full.values())  # the splices change the loss, so replay could show


def test_token_budget_takes_whole_contexts(tiny_gemma2, gemma_contexts):
    m = evaluate_saes(tiny_gemma2, {"s": make_sae(64, 32, "blocks.0.hook_resid_post")}, gemma_contexts, max_tokens=30)["s"]
    assert m.n_contexts == 2 and 30 <= m.n_tokens


def test_width_mismatch_is_a_clear_error(tiny_gemma2, gemma_contexts):
    with pytest.raises(SAEShapeError, match="d_in=32"):
        evaluate_saes(tiny_gemma2, {"wrong": make_sae(32, 64, "blocks.1.hook_resid_post")}, gemma_contexts)


def test_store_metrics_keeps_the_card_and_the_sae_loadable(tiny_gemma2, gemma_contexts, tmp_path):
    sae = make_sae(64, 64, "blocks.1.hook_resid_post")
    save_sae(sae, tmp_path, {"width": 64})
    m = evaluate_saes(tiny_gemma2, {"s": sae}, gemma_contexts)["s"]
    store_metrics(tmp_path, m, {"corpus": "test"})
    card = json.loads((tmp_path / "featurescope.json").read_text())
    assert card["width"] == 64 and card["eval"]["fvu"] == m.fvu and card["eval"]["corpus"] == "test"
    assert torch.equal(load_sae(str(tmp_path)).W_enc, sae.W_enc)
    table = format_table({"s": m})
    assert "FVU" in table and f"{m.fvu:.3f}" in table


def test_cli_train_then_eval_stores_metrics(tiny_llama_path, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TOKENIZER_TEXT))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--model", str(tiny_llama_path), "--site", "1-res", "--out", str(tmp_path / "saes"),
                                 "--text", str(corpus), "--width", "64", "--batch-size", "128", "--train-tokens", "2560",
                                 "--context-len", "32", "--threshold-init", "0.05", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    folder = tmp_path / "saes" / "1-res"
    result = runner.invoke(app, ["eval", str(folder), "--model", str(tiny_llama_path), "--text", str(corpus),
                                 "--tokens", "500", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "1-res" in result.output and "FVU" in result.output
    card = json.loads((folder / "featurescope.json").read_text())
    assert card["eval"]["n_tokens"] >= 500 and np.isfinite(card["eval"]["delta_loss"])
    assert card["train_config"]["d_sae"] == 64


def test_norm_outliers_are_left_out_and_not_spliced(tiny_gemma2, gemma_contexts):
    sae = make_sae(64, 128, "blocks.1.hook_resid_post")
    full = evaluate_saes(tiny_gemma2, {"s": sae}, gemma_contexts)["s"]
    # a ratio of 1.0 drops every token above the batch median norm: roughly half of them
    cut = evaluate_saes(tiny_gemma2, {"s": sae}, gemma_contexts, max_norm_ratio=1.0)["s"]
    assert full.excluded_share == 0
    assert 0.3 < cut.excluded_share < 0.7
    assert cut.n_tokens + round(cut.excluded_share * (cut.n_tokens / (1 - cut.excluded_share))) == full.n_tokens
    assert cut.clean_loss == full.clean_loss and cut.spliced_loss != full.spliced_loss
