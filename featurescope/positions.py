"""Which positions of a batch count: the one rule that training, evaluation, the precompute job and live
encoding share.

A position counts for an SAE when its token is not special (BOS, EOS, pad) and its activation norm at
the SAE's site is at most the SAE's `max_norm`. Besides BOS, SmolLM2 puts a few attention-sink tokens at
~100x the typical residual norm; one of them weighs as much as ~10^4 ordinary tokens in the squared error
and in the E||x||^2 scale, so they are treated like BOS: never trained on, never counted in a statistic.

`max_norm` is a fixed number per SAE, not a multiple of each batch's median: with a batch-relative limit
a token's fate would depend on which other contexts shared its batch (and, live, on the padding of the
prompts batched with it), and live encoding could not reproduce the precomputed activations exactly.
Training fixes it once per site, as `max_norm_ratio` x the median norm over its first chunk, and keeps it
in the SAE's card.

    limit = sae_max_norm(sae)                                  # from the SAE's card; None: no limit
    mask = counted_positions(lm, input_ids, site_acts, limit)  # bool [batch, seq]
"""

from __future__ import annotations

import torch

from featurescope.corpus import content_mask
from featurescope.models import LoadedModel
from featurescope.sae import JumpReLUSAE


def norm_limit(site_acts: torch.Tensor, mask: torch.Tensor, max_norm_ratio: float | None) -> float | None:
    """max_norm_ratio x the median activation norm over the masked positions (None: no limit).

    site_acts [..., d_in], mask [...] (the content positions). How training sets an SAE's max_norm from
    its first chunk, and how `featurescope eval --max-norm-ratio` sets one from its first batch."""
    if not max_norm_ratio:
        return None
    return float(max_norm_ratio * site_acts.float().norm(dim=-1)[mask.to(site_acts.device)].median())


def sae_max_norm(sae: JumpReLUSAE) -> float | None:
    """The activation norm above which a position is out of this SAE's training distribution, or None.

    Cards of SAEs trained here keep it as `max_norm`; older ones keep the ratio and the input scale
    (typical norm = 1 / input_scale) instead. SAEs from elsewhere have no limit."""
    card = sae.cfg.metadata or {}
    if "max_norm" in card:
        return card["max_norm"]
    ratio = (card.get("train_config") or {}).get("max_norm_ratio")
    scale = card.get("input_scale")
    return ratio / scale if ratio and scale else None


def counted_positions(lm: LoadedModel, input_ids: torch.Tensor, site_acts: torch.Tensor,
                      max_norm: float | None) -> torch.Tensor:
    """Bool [batch, seq]: positions that count (not BOS/EOS/pad, and an activation norm of at most max_norm).

    input_ids [batch, seq]; site_acts [batch, seq, d_in], the activations at the SAE's site. max_norm is the
    SAE's fixed limit (sae_max_norm), never one derived from this batch: a position's fate then depends on
    that position alone, which is what lets live encoding reproduce the precomputed activations exactly."""
    mask = content_mask(lm, input_ids)
    if max_norm is not None:
        mask &= site_acts.float().norm(dim=-1).to(mask.device) <= max_norm
    return mask
