"""Per-feature statistics that need only the weights: logit effect and decoder-cosine neighbours.

    W_U = unembedding(lm)                                   # [vocab, d_model], final norm gain folded in
    logits = logit_effect(sae.W_dec, site_unembedding(lm, site, W_U), device="cuda")   # per feature: top/bottom
                                                            # tokens and a histogram (att sites through o_proj)
    near = decoder_neighbours(sae.W_dec, device="cuda")     # 10 nearest features by decoder cosine

Both work through blocks of features, so neither [d_sae, vocab] nor [d_sae, d_sae] is ever held at once
(a 1M-wide SAE works). Math is float32 on `device`; results come back as CPU tensors.
"""

from __future__ import annotations

import torch

from featurescope.models import LoadedModel
from featurescope.sites import Site

GEMMA_NORM_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")  # RMSNorm scales by (1 + weight)


def unembedding(lm: LoadedModel, fold_final_norm: bool = True) -> torch.Tensor:
    """W_U [vocab, d_model] float32. With fold_final_norm, the final RMSNorm's gain is folded in (as
    TransformerLens' fold_ln does, and hence Neuronpedia's W_dec @ W_U): logits = W_U @ (x / rms(x))."""
    W_U = lm.model.get_output_embeddings().weight.detach().float()
    norm = getattr(lm.model.model, "norm", None)
    if not fold_final_norm or norm is None or getattr(norm, "weight", None) is None:
        return W_U
    gain = norm.weight.detach().float()
    if lm.config.model_type in GEMMA_NORM_MODEL_TYPES:
        gain = 1.0 + gain
    return W_U * gain  # [vocab, d_model]


def site_unembedding(lm: LoadedModel, site: Site, W_U: torch.Tensor) -> torch.Tensor:
    """W_U as seen from an SAE's site, [vocab, d_in]: an att SAE reads the heads' outputs before o_proj
    (Gemma Scope's hook_z, n_heads * head_dim wide), so its decoder directions reach the residual stream
    through o_proj, and in Gemma 2 through the post-attention norm's gain; res and mlp sites are d_model."""
    if site.kind != "att":
        return W_U
    layer = lm.layers[site.layer]
    W_O = layer.self_attn.o_proj.weight.detach().float().to(W_U.device)  # [d_model, n_heads * head_dim]
    post_norm = getattr(layer, "post_attention_layernorm", None)
    if post_norm is not None and hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 2: norms the attention output
        gain = post_norm.weight.detach().float().to(W_U.device)
        W_U = W_U * (1.0 + gain if lm.config.model_type in GEMMA_NORM_MODEL_TYPES else gain)
    return W_U @ W_O  # logits of direction d: (d @ W_O.T) @ W_U.T


def _blocks(n: int, block: int):
    for start in range(0, n, block):
        yield start, min(start + block, n)


def uniform_histogram(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise histogram of x [n, m] over each row's [min, max] with `bins` equal-width bins, binned exactly
    like numpy.histogram(row, bins, range=(min, max)) on float32 data (edges are float32, value v is in bin
    i when edge_i <= v < edge_i+1, the last bin closed). Returns counts [n, bins] int64, lo [n], hi [n]."""
    lo, hi = x.amin(1).double(), x.amax(1).double()
    flat = lo == hi  # numpy widens an empty range by 0.5 on each side
    lo, hi = torch.where(flat, lo - 0.5, lo), torch.where(flat, hi + 0.5, hi)
    steps = torch.arange(bins + 1, dtype=torch.float64, device=x.device)
    edges = steps[None, :] * ((hi - lo) / bins)[:, None] + lo[:, None]  # numpy.linspace's arithmetic
    edges[:, -1] = hi
    inner = edges[:, 1:-1].to(x.dtype).contiguous()  # [n, bins - 1]
    index = torch.searchsorted(inner, x.contiguous(), right=True)  # [n, m] in [0, bins)
    counts = torch.zeros(x.shape[0], bins, dtype=torch.int64, device=x.device)
    counts.scatter_add_(1, index, torch.ones_like(index))
    return counts, lo.to(x.dtype), hi.to(x.dtype)


@torch.no_grad()
def logit_effect(W_dec: torch.Tensor, W_U: torch.Tensor, top_n: int = 10, bins: int = 50, block: int = 256,
                 device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """For each feature f, the vector W_dec[f] @ W_U.T over the vocabulary: its top_n largest values
    ("promoted", descending) and smallest ("suppressed", ascending), and a `bins`-bin histogram over its
    [min, max]. W_dec [F, d_model], W_U [vocab, d_model]. Returns CPU tensors:
    pos_ids/pos_values [F, top_n], neg_ids/neg_values [F, top_n], hist_counts [F, bins], hist_lo/hist_hi [F]."""
    device = torch.device(device) if device is not None else W_dec.device
    F, V = W_dec.shape[0], W_U.shape[0]
    top_n = min(top_n, V)
    W_U = W_U.to(device, torch.float32)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("pos_ids", "pos_values", "neg_ids", "neg_values",
                                                           "hist_counts", "hist_lo", "hist_hi")}
    for start, end in _blocks(F, block):
        logits = W_dec[start:end].to(device, torch.float32) @ W_U.T  # [b, vocab]
        pos = logits.topk(top_n, 1)
        neg = logits.topk(top_n, 1, largest=False)
        counts, lo, hi = uniform_histogram(logits, bins)
        for name, value in zip(parts, (pos.indices, pos.values, neg.indices, neg.values, counts, lo, hi)):
            parts[name].append(value.cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


@torch.no_grad()
def neighbour_tile(d_sae: int) -> int:
    """Rows of decoder_neighbours' similarity tiles: a [tile, d_sae] float32 tile stays <= 128 MB."""
    return max(1, min(1024, (1 << 25) // d_sae))


def decoder_neighbours(W_dec: torch.Tensor, k: int = 10, block: int | None = None,
                       device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The k features whose decoder directions have the highest cosine similarity with each feature's own
    (itself excluded). W_dec [F, d_model]. Returns CPU tensors ids [F, k] int64 and cos [F, k] float32."""
    device = torch.device(device) if device is not None else W_dec.device
    F = W_dec.shape[0]
    k = min(k, F - 1)
    if k <= 0:  # none asked for (precompute --neighbours 0), or an SAE of one feature
        return {"ids": torch.zeros(F, 0, dtype=torch.int64), "cos": torch.zeros(F, 0)}
    block = block or neighbour_tile(F)
    W = W_dec.to(device, torch.float32)
    W = W / W.norm(dim=1, keepdim=True).clamp(min=1e-12)  # zero rows get cosine 0 with everything
    ids, cos = [], []
    for start, end in _blocks(F, block):
        sims = W[start:end] @ W.T  # [b, F]
        rows = torch.arange(end - start, device=device)
        sims[rows, rows + start] = -float("inf")
        top = sims.topk(k, 1)
        ids.append(top.indices.cpu())
        cos.append(top.values.cpu())
    return {"ids": torch.cat(ids), "cos": torch.cat(cos)}
