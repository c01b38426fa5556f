"""SAE training: straight-through estimators, decoder constraints, scale folding, runs, resume, saving.

Run: .venv/bin/pytest tests/test_training.py
"""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch

from featurescope import training
from featurescope.corpus import content_mask, pack_contexts
from featurescope.evaluation import evaluate_saes
from featurescope.sae import SAEConfig
from featurescope.sae_loading import load_sae
from featurescope.sites import SiteError, capture_sites, parse_site
from featurescope.training import (
    CHECKPOINT_FILE, JumpReLUFn, TrainConfig, TrainingSAE, input_scale, new_site_state, train_saes, train_step,
)
from conftest import TOKENIZER_TEXT

EPS = 0.1


def tiny_contexts(lm, n_docs: int = 80) -> torch.Tensor:
    return pack_contexts(lm, TOKENIZER_TEXT[:n_docs] * 3, context_len=32)


def tiny_config(**overrides) -> TrainConfig:
    base = TrainConfig(sites=("1-res",), d_sae=96, batch_size=256, train_tokens=256 * 120, buffer_tokens=2048,
                       context_len=32, model_batch=8, lr=3e-3, lr_warmup_steps=10, sparsity_warmup_steps=20,
                       threshold_init=0.05, threshold_lr=2e-2, checkpoint_every=0, progress=False)
    return replace(base, **overrides)


def test_jumprelu_threshold_pseudo_gradient_matches_formula():
    z = torch.tensor([[0.48, 0.52, 0.56, 0.30], [0.50, 0.20, 0.64, 0.71]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.6, 0.7], requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    out, _ = JumpReLUFn.apply(z, theta, EPS)
    assert torch.equal(out, z.detach() * (z.detach() > theta.detach()))
    out.backward(upstream)
    # K((z - theta)/eps) = 1 where |z - theta| < eps/2 = 0.05: (0,0) (0,1) (0,2) (1,0) (1,2) (1,3)
    k = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    expected_theta = (upstream * -(theta.detach() / EPS) * k).sum(0)
    assert torch.allclose(theta.grad, expected_theta)
    assert torch.allclose(theta.grad, torch.tensor([-(0.5 / EPS) * 6, -(0.5 / EPS) * 2, -(0.6 / EPS) * 10, -(0.7 / EPS) * 8]))
    assert torch.equal(z.grad, upstream * (z.detach() > theta.detach()))  # masked upstream gradient only


def test_step_l0_pseudo_gradient_matches_formula_and_leaves_preacts_alone():
    z = torch.tensor([[0.48, 0.52, 0.56, 0.30], [0.50, 0.20, 0.64, 0.71]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.6, 0.7], requires_grad=True)
    _, l0 = JumpReLUFn.apply(z, theta, EPS)
    assert l0.tolist() == [1.0, 2.0]  # rows [0, 1, 0, 0] and [0, 0, 1, 1]
    l0.sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([-2.0, -1.0, -2.0, -1.0]) / EPS)
    assert not z.grad.any()


def test_jumprelu_gradients_of_activations_and_l0_add_up():
    z = torch.tensor([[0.48, 0.52, 0.56, 0.30], [0.50, 0.20, 0.64, 0.71]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.6, 0.7], requires_grad=True)
    out, l0 = JumpReLUFn.apply(z, theta, EPS)
    (out.sum() + 3.0 * l0.sum()).backward()
    k = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(theta.grad, (-(theta.detach() / EPS) * k - 3.0 / EPS * k).sum(0))


def test_training_sae_log_threshold_gets_chain_rule_gradient():
    sae = TrainingSAE(4, 3, "jumprelu", 0.5, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4)[:, :3])
    x = torch.tensor([[0.52, 0.1, 0.9, 0.0]])  # pre-acts 0.52 (in the kernel), 0.1, 0.9
    _, _, sparsity = sae(x, EPS)
    sparsity.sum().backward()
    # d/dlog(theta) = theta * d/dtheta = 0.5 * -(1/eps) for latent 0 only
    assert torch.allclose(sae.log_threshold.grad, torch.tensor([-0.5 / EPS, 0.0, 0.0]))


def test_decoder_rows_stay_unit_norm_and_parallel_gradient_is_removed():
    cfg = tiny_config(d_sae=32)
    st = new_site_state(parse_site("1-res"), 16, 1.0, 0, cfg)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        train_step(st, torch.randn(64, 16, generator=gen) / 4, step, cfg)
        assert torch.allclose(st.sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)
    sae = st.sae
    sae.W_dec.grad = torch.randn(32, 16, generator=gen)
    sae.project_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5


def test_init_is_tied_unit_norm_with_zero_biases():
    sae = TrainingSAE(16, 40, "jumprelu", 1e-3, torch.Generator().manual_seed(0))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(40), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert torch.allclose(sae.threshold, torch.full((40,), 1e-3))


@pytest.mark.parametrize("architecture", ["jumprelu", "relu"])
def test_saved_sae_encodes_raw_inputs_as_the_training_sae_encoded_scaled_ones(architecture):
    gen = torch.Generator().manual_seed(0)
    sae = TrainingSAE(16, 48, architecture, 0.05, gen)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.05, generator=gen)
        sae.b_dec.normal_(0, 0.05, generator=gen)
        sae.log_threshold.uniform_(math.log(0.01), math.log(0.1), generator=gen)
    raw = torch.randn(200, 16, generator=gen) * 37.0
    scale = 1 / 37.0 / 4
    inference = sae.to_inference(scale, SAEConfig(d_in=16, d_sae=48, hook_name="blocks.1.hook_resid_post"))
    x_hat_train, acts_train, _ = sae(raw * scale, 1e-3)
    acts_raw = inference.encode(raw)
    assert torch.equal(acts_raw > 0, acts_train > 0)  # the same latents fire
    assert torch.allclose(acts_raw * scale, acts_train, atol=1e-6)
    assert torch.allclose(inference(raw) * scale, x_hat_train, atol=1e-5)
    assert torch.allclose(inference.W_dec.norm(dim=1), torch.ones(48), atol=1e-5)
    if architecture == "relu":
        assert not inference.threshold.any()


def test_input_scale_gives_unit_mean_squared_norm():
    x = torch.randn(1000, 8) * 13 + 2
    assert (x * input_scale(x)).pow(2).sum(-1).mean().item() == pytest.approx(1.0, rel=1e-5)


def _site_acts(lm, contexts, site):
    acts = capture_sites(lm, contexts, [site])[parse_site(site)]
    return acts[content_mask(lm, contexts)]


def test_short_run_lowers_loss_and_reaches_requested_l0(tiny_llama, tmp_path):
    lm, contexts = tiny_llama, tiny_contexts(tiny_llama)
    cfg = tiny_config(target_l0=12, train_tokens=256 * 250)
    path = train_saes(lm, cfg, tmp_path, contexts=contexts)[parse_site("1-res")]
    trained = load_sae(str(path))
    st = new_site_state(parse_site("1-res"), 64, trained.cfg.metadata["input_scale"], 0, cfg)
    untrained = st.sae.to_inference(st.scale, SAEConfig(d_in=64, d_sae=96, hook_name="blocks.1.hook_resid_post"))
    metrics = evaluate_saes(lm, {"trained": trained, "untrained": untrained}, contexts)
    assert metrics["trained"].fvu < 0.5 * metrics["untrained"].fvu
    assert metrics["trained"].delta_loss < metrics["untrained"].delta_loss
    assert 6 <= metrics["trained"].l0 <= 24, metrics["trained"].l0
    assert trained.cfg.metadata["training_metrics"]["l0"] == pytest.approx(12, rel=0.5)


def test_autocast_training_reaches_the_float32_quality_and_saves_float32_weights(tiny_llama, tmp_path):
    lm, contexts = tiny_llama, tiny_contexts(tiny_llama)
    cfg = tiny_config(target_l0=12, train_tokens=256 * 250)
    runs = {autocast: load_sae(str(train_saes(lm, replace(cfg, autocast=autocast), tmp_path / str(autocast),
                                              contexts=contexts)[parse_site("1-res")]))
            for autocast in (False, True)}
    metrics = evaluate_saes(lm, {str(k): sae for k, sae in runs.items()}, contexts)
    assert metrics["True"].fvu == pytest.approx(metrics["False"].fvu, rel=0.1)
    assert metrics["True"].l0 == pytest.approx(metrics["False"].l0, rel=0.2)
    assert runs[True].W_enc.dtype == torch.float32
    assert not torch.equal(runs[True].W_enc, runs[False].W_enc)  # the matmuls really ran in bfloat16


def test_resume_after_interruption_equals_uninterrupted_run(tiny_llama, tmp_path):
    lm, contexts = tiny_llama, tiny_contexts(tiny_llama)
    # several chunks and epochs, resampling and the L0 controller: every piece of state must survive
    cfg = tiny_config(sites=("1-res", "2-mlp"), buffer_tokens=1024, train_tokens=256 * 40, target_l0=10,
                      resample_every=7, dead_window_tokens=512, checkpoint_every=5)
    full = train_saes(lm, cfg, tmp_path / "full", contexts=contexts)
    with pytest.raises(KeyboardInterrupt):
        train_saes(lm, cfg, tmp_path / "cut", contexts=contexts, stop_after=17)
    assert (tmp_path / "cut" / CHECKPOINT_FILE).is_file()
    assert not (tmp_path / "cut" / "1-res").exists()
    resumed = train_saes(lm, cfg, tmp_path / "cut", contexts=contexts, resume=True)
    assert not (tmp_path / "cut" / CHECKPOINT_FILE).exists()
    for site, folder in full.items():
        with np.load(folder / "params.npz") as a, np.load(resumed[site] / "params.npz") as b:
            for name in a.files:
                np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=f"{site} {name}")


def test_ctrl_c_finishes_the_step_and_writes_a_checkpoint(tiny_llama, tmp_path, monkeypatch):
    lm, contexts = tiny_llama, tiny_contexts(tiny_llama, 20)
    cfg = tiny_config(train_tokens=256 * 30)
    real_step = training.train_step

    def step_then_ctrl_c(st, x, step, cfg):
        real_step(st, x, step, cfg)
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(training, "train_step", step_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)  # not always the default: a background shell job inherits SIG_IGN
    with pytest.raises(KeyboardInterrupt, match="after step 4"):
        train_saes(lm, cfg, tmp_path, contexts=contexts)
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)["step"] == 4
    assert signal.getsignal(signal.SIGINT) is before


def test_resume_with_other_options_is_refused(tiny_llama, tmp_path):
    lm, contexts = tiny_llama, tiny_contexts(tiny_llama, 20)
    cfg = tiny_config(train_tokens=256 * 20)
    with pytest.raises(KeyboardInterrupt):
        train_saes(lm, cfg, tmp_path, contexts=contexts, stop_after=3)
    with pytest.raises(ValueError, match="another training configuration"):
        train_saes(lm, replace(cfg, d_sae=64), tmp_path, contexts=contexts, resume=True)


def test_trained_sae_reloads_through_params_npz_and_encodes_identically(tiny_gemma2, tmp_path):
    lm, contexts = tiny_gemma2, tiny_contexts(tiny_gemma2, 20)
    cfg = tiny_config(sites=("2-att",), train_tokens=256 * 10)
    st = new_site_state(parse_site("2-att"), 96, 0.25, 0, cfg)
    x = _site_acts(lm, contexts, "2-att")
    for step in range(10):
        train_step(st, x[:256] * st.scale, step, cfg)
    stream = training.ActivationStream(lm, contexts, cfg)
    folder = training.save_trained(lm, st, cfg, tmp_path / "2-att", 1.0, stream)
    in_memory = st.sae.to_inference(st.scale, SAEConfig(d_in=96, d_sae=96, hook_name="blocks.2.attn.hook_z"))
    reloaded = load_sae(str(folder / "params.npz"))
    assert reloaded.cfg.hook_name == "blocks.2.attn.hook_z"
    assert torch.equal(reloaded.encode(x), in_memory.encode(x))
    assert torch.equal(reloaded(x), in_memory(x))
    card = json.loads((folder / "featurescope.json").read_text())
    assert card["site"] == "2-att" and card["width"] == 96 and card["tokens_seen"] == 2560
    assert TrainConfig.from_dict(card["train_config"]) == cfg


def test_relu_run_is_saved_as_jumprelu_with_zero_threshold(tiny_llama, tmp_path):
    lm, contexts = tiny_llama, tiny_contexts(tiny_llama, 20)
    cfg = tiny_config(architecture="relu", sparsity_coeff=1e-2, train_tokens=256 * 20)
    sae = load_sae(str(train_saes(lm, cfg, tmp_path, contexts=contexts)[parse_site("1-res")]))
    assert sae.cfg.architecture == "jumprelu" and not sae.threshold.any()
    assert sae.cfg.metadata["trained_architecture"] == "relu"


def test_unknown_or_out_of_range_site_is_a_clear_error(tiny_llama, tmp_path):
    with pytest.raises(SiteError, match="Unknown site"):
        TrainConfig(sites=("layer7",))
    with pytest.raises(SiteError, match="out of range"):
        train_saes(tiny_llama, tiny_config(sites=("9-res",)), tmp_path, contexts=tiny_contexts(tiny_llama, 10))
    with pytest.raises(ValueError, match="architecture"):
        TrainConfig(architecture="topk")


def test_special_tokens_are_never_trained_on(tiny_llama):
    lm, contexts = tiny_llama, tiny_contexts(tiny_llama, 20)
    cfg = tiny_config()
    acts = training.chunk_activations(lm, contexts, [parse_site("1-res")], 8)[parse_site("1-res")]
    assert torch.equal(acts, _site_acts(lm, contexts, "1-res"))
    assert acts.shape[0] == int(content_mask(lm, contexts).sum()) < contexts.numel()
    schedule = training.chunk_schedule(content_mask(lm, contexts), cfg)
    assert sum(c.n_batches for c in schedule) == cfg.n_steps


def test_demo_saes_are_reused_when_cards_match_and_retrained_otherwise(tiny_llama, tmp_path, monkeypatch):
    lm = tiny_llama
    cfg = tiny_config(sites=("0-res", "2-res"), train_tokens=256 * 5, corpus_tokens=2000)
    monkeypatch.setattr(training, "python_docs_corpus", lambda: iter(TOKENIZER_TEXT))
    first = training.train_demo_saes(lm, tmp_path, cfg)
    assert set(first) == {parse_site("0-res"), parse_site("2-res")}
    calls = []
    monkeypatch.setattr(training, "train_saes", lambda *a, **k: calls.append(a[1]) or {})
    assert training.train_demo_saes(lm, tmp_path, replace(cfg, progress=True)) == first
    assert calls == []
    training.train_demo_saes(lm, tmp_path, replace(cfg, d_sae=64))
    assert len(calls) == 1


def test_resampled_dead_latents_fire_again_with_sane_adam_moments():
    cfg = tiny_config(d_sae=32, resample_every=1, dead_window_tokens=256, resample_fire_rate=0.05)
    st = new_site_state(parse_site("1-res"), 16, 1.0, 0, cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen) / 4
    train_step(st, x, 0, cfg)
    dead = torch.tensor([3, 7])
    st.steps_since_fired[dead] = 5
    with torch.no_grad():
        st.sae.b_enc[dead] = -100.0  # can never fire
    assert training.resample_dead(st, x, 1, cfg) == 2
    _, acts, _ = st.sae(x, cfg.bandwidth)
    rate = (acts[:, dead] > 0).float().mean(0)
    assert ((rate > 0.02) & (rate < 0.1)).all(), rate
    assert torch.allclose(st.sae.W_dec[dead].norm(dim=1), torch.ones(2))
    v = st.optimizer.state[st.sae.b_enc]["exp_avg_sq"]
    assert (v[dead] > 0).all() and st.steps_since_fired[dead].eq(0).all()
