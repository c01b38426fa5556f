"""Measure SAE quality the way the Gemma Scope report does: L0, FVU, delta LM loss, dead and dense shares.

Special tokens (BOS, EOS, pad) are excluded everywhere: from L0/FVU/firing statistics, from the
cross-entropy targets, and from splicing (the SAE replaces the activation at non-special positions
only; BOS keeps its true activation, as the SAEs never trained on it). Norm outliers (attention-sink
tokens above an SAE's max_norm) are treated like BOS: the rule of featurescope/positions.py.

    metrics = evaluate_saes(lm, {"6-res": load_sae("saes/6-res")}, contexts, max_tokens=20_000)
    print(format_table(metrics))
    store_metrics("saes/6-res", metrics["6-res"])     # into featurescope.json beside params.npz

Or from the shell: `featurescope eval saes/6-res saes/12-res --tokens 20000`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from featurescope.corpus import content_mask
from featurescope.encoder import check_sae_fits
from featurescope.models import LoadedModel
from featurescope.positions import counted_positions, norm_limit, sae_max_norm
from featurescope.sae import JumpReLUSAE
from featurescope.sae_loading import CARD_FILE
from featurescope.schema import DENSE_THRESHOLD
from featurescope.sites import Site, record_layer_outputs, replay_layers, site_hooks


@dataclass
class SAEMetrics:
    l0: float  # mean number of active latents per (non-special) token
    fvu: float  # reconstruction MSE / variance of x around its mean over the eval tokens
    clean_loss: float  # next-token cross-entropy of the unchanged model (nats per token)
    spliced_loss: float  # the same with the SAE reconstruction spliced in at its site
    delta_loss: float  # spliced_loss - clean_loss
    dead_share: float  # latents that never fire on the eval tokens
    dense_share: float  # latents that fire on more than DENSE_THRESHOLD of the eval tokens
    n_tokens: int  # non-special tokens the statistics are over
    excluded_share: float  # non-special tokens left out as norm outliers (above max_norm)
    n_contexts: int
    context_len: int
    max_norm: float | None = None  # the activation norm above which tokens were left out (None: no limit)

    def to_dict(self) -> dict:
        return asdict(self)


class _Accumulator:
    """Running sums for one SAE over the eval tokens (float64 where sums get large)."""

    def __init__(self, sae: JumpReLUSAE):
        self.sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
        self.sum_sq_norm = 0.0  # sum of ||x||^2
        self.sum_sq_err = 0.0  # sum of ||x - x_hat||^2
        self.sum_l0 = 0.0
        self.fires = torch.zeros(sae.d_sae, dtype=torch.long)
        self.n = 0
        self.spliced_nll = 0.0
        self.excluded = 0  # non-special tokens left out as norm outliers

    def add(self, x: torch.Tensor, acts: torch.Tensor, x_hat: torch.Tensor) -> None:
        """x, x_hat (n, d_in) and acts (n, d_sae) at non-special positions."""
        x = x.double()
        self.sum_x += x.sum(0)
        self.sum_sq_norm += float(x.pow(2).sum())
        self.sum_sq_err += float((x - x_hat.double()).pow(2).sum())
        active = acts > 0
        self.sum_l0 += float(active.sum())
        self.fires += active.sum(0).cpu()
        self.n += x.shape[0]

    def result(self, clean_nll: float, n_targets: int, n_contexts: int, context_len: int,
               max_norm: float | None) -> SAEMetrics:
        mean = self.sum_x / self.n
        variance = self.sum_sq_norm / self.n - float(mean.pow(2).sum())  # E||x - mean||^2
        clean, spliced = clean_nll / n_targets, self.spliced_nll / n_targets
        return SAEMetrics(
            l0=self.sum_l0 / self.n, fvu=(self.sum_sq_err / self.n) / variance,
            clean_loss=clean, spliced_loss=spliced, delta_loss=spliced - clean,
            dead_share=float((self.fires == 0).float().mean()),
            dense_share=float((self.fires > DENSE_THRESHOLD * self.n).float().mean()),
            n_tokens=self.n, excluded_share=self.excluded / (self.n + self.excluded), n_contexts=n_contexts, context_len=context_len,
            max_norm=max_norm,
        )


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over targets that are not special tokens, and their count."""
    targets = mask[:, 1:]  # (B, T-1) positions 1.. as targets
    logp = logits[:, :-1][targets].float()  # (n_targets, vocab)
    return float(F.cross_entropy(logp, ids[:, 1:][targets], reduction="sum")), int(targets.sum())


def limit_contexts(lm: LoadedModel, contexts: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """The first contexts whose non-special tokens reach max_tokens (whole contexts only)."""
    if max_tokens is None:
        return contexts
    counts = content_mask(lm, contexts).sum(1).cumsum(0)
    n = int((counts < max_tokens).sum()) + 1
    return contexts[:n]


@torch.no_grad()
def evaluate_saes(lm: LoadedModel, saes: dict[str, JumpReLUSAE], contexts: torch.Tensor,
                  max_tokens: int | None = None, batch_size: int = 8, max_norm_ratio: float | None = None,
                  progress: bool = False) -> dict[str, SAEMetrics]:
    """Metrics per SAE on `contexts` [n, T] (each row starting with BOS): one clean pass, one spliced pass per SAE.
    A spliced pass replays the clean pass's outputs of the layers before the SAE's instead of running them.

    Tokens whose activation norm at the SAE's site is above the SAE's max_norm (attention sinks, see
    featurescope/positions.py) are left out of the statistics and not spliced, like BOS. max_norm_ratio
    replaces each SAE's own limit by that multiple of the median norm over the first batch (0: no limit).
    """
    if not saes:
        raise ValueError("evaluate_saes needs at least one SAE.")
    sites = {name: check_sae_fits(lm, sae, name) for name, sae in saes.items()}
    saes = {name: sae.to(lm.device) for name, sae in saes.items()}
    contexts = limit_contexts(lm, contexts, max_tokens)
    accs = {name: _Accumulator(sae) for name, sae in saes.items()}
    limits = {name: sae_max_norm(sae) for name, sae in saes.items()}
    clean_nll, n_targets = 0.0, 0
    from tqdm.auto import tqdm

    for i, ids in enumerate(tqdm(contexts.split(batch_size), desc="eval", disable=not progress)):  # ids (B, T)
        ids = ids.to(lm.device)
        mask = content_mask(lm, ids)  # (B, T)
        captured: dict[Site, torch.Tensor] = {}

        def keep(site: Site):
            return lambda act: captured.__setitem__(site, act.float())  # (B, T, d_in)

        with site_hooks(lm, {s: keep(s) for s in set(sites.values())}), \
                record_layer_outputs(lm, range(max(s.layer for s in sites.values()))) as clean_outputs:
            nll, n = next_token_nll(lm.model(input_ids=ids, use_cache=False).logits, ids, mask)
        clean_nll, n_targets = clean_nll + nll, n_targets + n
        for name, sae in saes.items():
            if i == 0 and max_norm_ratio is not None:
                limits[name] = norm_limit(captured[sites[name]], mask, max_norm_ratio)
            site_mask = counted_positions(lm, ids, captured[sites[name]], limits[name])
            accs[name].excluded += int(mask.sum() - site_mask.sum())
            x = captured[sites[name]][site_mask]  # (n, d_in)
            acts = sae.encode(x)
            accs[name].add(x, acts, sae.decode(acts))
            unchanged = {i: out for i, out in clean_outputs.items() if i < sites[name].layer}
            with replay_layers(lm, unchanged), site_hooks(lm, {sites[name]: _splicer(sae, site_mask)}):
                accs[name].spliced_nll += next_token_nll(lm.model(input_ids=ids, use_cache=False).logits, ids, mask)[0]
    return {name: acc.result(clean_nll, n_targets, contexts.shape[0], contexts.shape[1], limits[name])
            for name, acc in accs.items()}


def _splicer(sae: JumpReLUSAE, mask: torch.Tensor):
    """Hook fn: the SAE reconstruction at non-special positions, the true activation elsewhere."""
    def fn(act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        out[mask] = sae(act[mask]).to(act.dtype)
        return out
    return fn


def store_metrics(folder: str | Path, metrics: SAEMetrics, info: dict | None = None, hook_name: str | None = None) -> Path:
    """Merge metrics (and what they were measured on) into the folder's featurescope.json card."""
    path = Path(folder) / CARD_FILE
    card = json.loads(path.read_text()) if path.is_file() else {}
    if hook_name and "hook_name" not in card:
        card["hook_name"] = hook_name  # lets load_sae read a bare params.npz folder later
    card["eval"] = {**metrics.to_dict(), **(info or {})}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def format_table(metrics: dict[str, SAEMetrics]) -> str:
    """A plain-text table, one row per SAE."""
    header = (f"{'SAE':<32} {'L0':>7} {'FVU':>7} {'dLoss':>7} {'clean':>7} {'dead':>7} {'dense':>7} {'tokens':>8} "
              f"{'outliers':>8}")
    rows = [header, "-" * len(header)]
    for name, m in metrics.items():
        rows.append(f"{name[-32:]:<32} {m.l0:7.1f} {m.fvu:7.3f} {m.delta_loss:7.3f} {m.clean_loss:7.3f} "
                    f"{m.dead_share:7.1%} {m.dense_share:7.1%} {m.n_tokens:8d} {m.excluded_share:8.2%}")
    return "\n".join(rows)
