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

A context cut from the middle of a document is a second case: the model has not seen its first tokens'
left context and treats the first one after BOS as an attention sink, so top examples piled up at
position 1 (3-5% of them on 0.8% of the positions, bench/position_share.py). Such a context's first
WARMUP_POSITIONS tokens after BOS are encoded (the model reads them) but never counted: the warm-up.
Measured, the excess sits at position 1 alone (position 2 holds its share), so the warm-up is 1.
A context that starts a document (and every live prompt, which is its own document) counts from
position 1. Which contexts start a document is known when the corpus is packed (corpus.pack_documents)
and stored with each context (contexts.starts_document), so live encoding of a stored context
(`?ids=...&mid_document=1`) leaves out the same positions as the precompute did.

    limit = sae_max_norm(sae)                                  # from the SAE's card; None: no limit
    mask = counted_positions(lm, input_ids, site_acts, limit, starts_document)  # bool [batch, seq]
"""

from __future__ import annotations

import torch

from featurescope.corpus import content_mask
from featurescope.models import LoadedModel
from featurescope.sae import JumpReLUSAE

WARMUP_POSITIONS = 1  # tokens after BOS not counted in a context that starts mid-document (bench/position_share.py)


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
                      max_norm: float | None, starts_document: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [batch, seq]: positions that count (not BOS/EOS/pad, not warm-up, and an activation norm of at
    most max_norm).

    input_ids [batch, seq]; site_acts [batch, seq, d_in], the activations at the SAE's site. max_norm is the
    SAE's fixed limit (sae_max_norm), never one derived from this batch: a position's fate then depends on
    that position alone, which is what lets live encoding reproduce the precomputed activations exactly.
    starts_document: bool [batch], False for a row cut from the middle of a document, whose warm-up
    positions then do not count; None: every row starts a document (prompts, training)."""
    mask = content_mask(lm, input_ids)
    if max_norm is not None:
        mask &= site_acts.float().norm(dim=-1).to(mask.device) <= max_norm
    if starts_document is not None:
        mask &= ~warmup_positions(starts_document.to(mask.device), input_ids.shape[1])
    return mask


def warmup_positions(starts_document: torch.Tensor, seq_len: int, n: int = WARMUP_POSITIONS) -> torch.Tensor:
    """Bool [batch, seq_len]: True at positions 1 to n of the rows that do not start a document (n other than
    WARMUP_POSITIONS only to measure the rule, bench/position_share.py)."""
    pos = torch.arange(seq_len, device=starts_document.device)
    first = (pos >= 1) & (pos <= n)  # [seq_len]
    return first[None, :] & ~starts_document.bool()[:, None]
