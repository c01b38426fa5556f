"""How long the demo's first run will take on this machine: its work timed on small samples, scaled up.

    parts = demo_estimate(lm, DEMO_CONFIG, train=True, eval_tokens=4096, precompute_tokens=100_000, reuse_pass=True)
    # {"model pass": 61.0, "training": 48.2, "evaluation": 31.5, "precompute": 40.1}   (seconds)

The samples (~2 s in all): a forward pass of a few contexts stopped at the deepest site and one through
the whole model, one optimiser step of one SAE, one SAE encoding a batch. The precompute's statistics
and its fixed costs (logit effects, neighbours, the DuckDB write) are scaled from the SAE encoding by
ratios measured on the demo (README, "Demo").
"""

from __future__ import annotations

import time

import torch

from featurescope.models import LoadedModel
from featurescope.sites import capture_sites, parse_site, site_width

SAMPLE_CONTEXTS = 4
# Measured on the demo (2-core CPU, fp32): the precompute's streaming statistics cost this many times
# the SAE encoding of the same batch, and its fixed costs this many SAE-encoded batches of 16 contexts.
STATS_PER_ENCODE = 2.0
FIXED_BATCHES = 60.0
PRECOMPUTE_BATCH = 16


def demo_estimate(lm: LoadedModel, cfg, train: bool, eval_tokens: int, precompute_tokens: int,
                  reuse_pass: bool) -> dict[str, float]:
    """Seconds per remaining step of the demo (cfg: its TrainConfig): only the steps that will run."""
    from featurescope.training import new_site_state, train_step

    sites = [parse_site(s) for s in cfg.sites]
    T = cfg.context_len
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.vocab_size, (SAMPLE_CONTEXTS, T), generator=gen)
    ids[:, 0] = lm.bos_token_id
    capture_sites(lm, ids[:1], sites)  # warm-up: the first call pays for allocations
    pass_s = _timed(lambda: capture_sites(lm, ids, sites)) / SAMPLE_CONTEXTS  # per context
    with torch.no_grad():
        full_s = _timed(lambda: lm.model(input_ids=ids.to(lm.device), use_cache=False)) / SAMPLE_CONTEXTS

    d_in = site_width(lm, sites[0])
    x = torch.randn(cfg.batch_size, d_in, generator=gen) / d_in ** 0.5
    state = new_site_state(sites[0], d_in, 1.0, 0, cfg)
    train_step(state, x, 0, cfg)  # warm-up: Adam's state is created on the first step
    step_s = _timed(lambda: train_step(state, x, 1, cfg)) * len(sites)
    sae = state.sae.to_inference(1.0, _sae_config(d_in, cfg))
    rows = x.repeat(PRECOMPUTE_BATCH * T // x.shape[0] + 1, 1)[: PRECOMPUTE_BATCH * T]  # one batch's tokens
    with torch.no_grad():
        encode_s = _timed(lambda: sae.encode(rows)) * len(sites)  # one precompute batch, every SAE

    parts: dict[str, float] = {}
    n_train = (cfg.corpus_tokens or 0) // (T - 1)
    if train:
        parts["model pass"] = n_train * pass_s
        parts["training"] = cfg.n_steps * step_s
    if eval_tokens:
        # one clean pass, then one spliced pass per SAE that replays the layers before the SAE's
        passes = 1 + sum((lm.n_layers - s.layer) / lm.n_layers for s in sites)
        parts["evaluation"] = passes * (eval_tokens / (T - 1)) * full_s
    n_pre = precompute_tokens // (T - 1)
    batches = n_pre / PRECOMPUTE_BATCH
    parts["precompute"] = ((0 if reuse_pass else n_pre * pass_s)
                           + batches * encode_s * (1 + STATS_PER_ENCODE) + FIXED_BATCHES * encode_s)
    return parts


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _sae_config(d_in: int, cfg):
    from featurescope.sae import SAEConfig

    return SAEConfig(d_in=d_in, d_sae=cfg.d_sae, hook_name="blocks.0.hook_resid_post")
