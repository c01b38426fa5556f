"""Cross-layer links: for each feature, the features of the neighbouring SAEs that go with it.

Neighbours of an SAE are the SAEs at the previous and the next layer that has one, and the other SAEs of
its own layer. For each neighbour N, feature f gets up to `top_n` links of each of two kinds:
- by activation: the features j of N that fire most on the tokens where f peaks (its top-k max
  positions). Stored: coact = j's mean activation over those tokens, and the score that ranks them,
  coact_rel = (coact - j's mean activation over all tokens) / j's max activation. The raw mean favours
  features that fire on nearly every token with large values (on the demo, one such feature was the top
  downstream link of 42% of the previous layer's features); coact_rel discounts what j does everywhere and
  compares features of different scales;
- by weights (both SAEs on the residual stream): the highest cosines between f's decoder direction and
  N's encoder directions when N is downstream (what N reads of f), or between f's encoder direction and
  N's decoder directions when N is upstream (what f reads of N).
Each stored link carries both scores (cosine None where the sites are not both residual).

    plan = LinkPlan(encoder.sites, {name: sae.d_sae for name, sae in encoder.saes.items()})
    peaks = PeakTables(plan, finals, context_len)         # finals: {name: FeatureStats.finalize()}
    peaks.add(name, context_ids, acts, mask)              # each SAE of each batch of the job's example pass
    links = cross_layer_links(plan, finals, peaks, encoder.saes)   # {name: [NeighbourLinks, ...]}

The co-activations need no extra pass: the example pass re-encodes every top example's context anyway,
and PeakTables keeps, for each neighbour SAE, its `width` strongest (feature, act) pairs at each position
that is some top example's peak (one row per distinct position: [positions, width] per SAE, bounded by
the corpus, not by d_sae x k). The co-activation is exact for every feature among a neighbour's `width`
strongest at those tokens (all of them when the neighbour's L0 there is <= width), a lower bound
otherwise. No F x F matrix is held: both scores are computed through blocks of features.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from featurescope.flow import DOWN, SAME, direction, flow_key, neighbour_layers
from featurescope.precompute.config import PEAK_WIDTH, TOP_N
from featurescope.sae import JumpReLUSAE
from featurescope.sites import Site



@dataclass(frozen=True)
class Neighbour:
    name: str
    direction: str  # UP | DOWN | SAME, seen from the SAE whose neighbour this is


@dataclass
class NeighbourLinks:
    """Links of every feature of one SAE to one neighbour SAE; -1 pads `ids` where a feature has fewer."""
    other: str
    direction: str
    ids: torch.Tensor  # [F, 2 * top_n] int64: co-activation links first (by coact_rel), then weight-only ones
    coact: torch.Tensor  # [F, 2 * top_n] float32: mean activation of the linked feature at this feature's peaks
    coact_rel: torch.Tensor  # [F, 2 * top_n] float32: (coact - its mean over all tokens) / its max activation
    cosine: torch.Tensor | None  # [F, 2 * top_n] float32, None unless both SAEs read the residual stream


class LinkPlan:
    """Which SAEs are neighbours of which, and how many peak pairs of each are kept (`widths`)."""

    def __init__(self, sites: dict[str, Site], d_saes: dict[str, int], width: int = PEAK_WIDTH):
        self.sites = sites
        self.widths = {name: min(width, d) for name, d in d_saes.items()}
        layers = sorted({s.layer for s in sites.values()})
        order = sorted(sites, key=lambda n: (flow_key(sites[n].layer, sites[n].kind), n))
        self.neighbours: dict[str, list[Neighbour]] = {}
        for name, site in sites.items():
            near = neighbour_layers(layers, site.layer)
            self.neighbours[name] = [
                Neighbour(other, direction((site.layer, site.kind), (sites[other].layer, sites[other].kind)))
                for other in order if other != name and sites[other].layer in near]

    def linked(self, names: Iterable[str] | None = None) -> set[str]:
        """The SAEs that SAEs `names` (default all) link to: whose peaks PeakTables keeps for them."""
        return {n.name for name in (self.neighbours if names is None else names) for n in self.neighbours[name]}


class PeakTables:
    """The `width` strongest (feature id, act) pairs of SAEs at every position that is the peak of a top
    example of a linking SAE (`linkers`: default all), one table per SAE some linker links to; acts are 0
    where that SAE's mask says the position does not count."""

    def __init__(self, plan: LinkPlan, finals: dict[str, dict], context_len: int, linkers: Iterable[str] | None = None):
        self.plan, self.context_len = plan, context_len
        linkers = [name for name in (plan.neighbours if linkers is None else linkers) if plan.neighbours[name]]
        keys = [self._keys(finals[name]["top_ctx"], finals[name]["top_pos"]) for name in linkers]
        keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.int64)
        self.keys = torch.unique(keys[keys >= 0])  # sorted: context id * context_len + position
        self.tables = sorted(plan.linked(linkers))
        self.ids = {name: torch.zeros(len(self.keys), plan.widths[name], dtype=torch.int32) for name in self.tables}
        self.acts = {name: torch.zeros(len(self.keys), plan.widths[name]) for name in self.tables}

    def _keys(self, ctx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return torch.where(ctx >= 0, ctx * self.context_len + pos.long(), -1)

    @torch.no_grad()
    def add(self, name: str, context_ids: torch.Tensor, acts: torch.Tensor, mask: torch.Tensor) -> None:
        """Fill SAE `name`'s rows of the peak positions inside one re-encoded batch (acts [B, T, F], mask [B, T])."""
        if name not in self.ids:
            return
        first = context_ids.cpu().long() * self.context_len
        lo, hi = torch.searchsorted(self.keys, first), torch.searchsorted(self.keys, first + self.context_len)
        counts = hi - lo
        b = torch.repeat_interleave(torch.arange(len(first)), counts)
        rows = lo.index_select(0, b) + torch.arange(len(b)) - (counts.cumsum(0) - counts).index_select(0, b)
        pos = self.keys.index_select(0, rows) - first.index_select(0, b)
        b, pos = b.to(acts.device), pos.to(acts.device)
        top = acts[b, pos].topk(self.plan.widths[name], dim=-1, sorted=False)  # [q, width]
        self.ids[name][rows] = top.indices.int().cpu()
        self.acts[name][rows] = (top.values * mask.to(acts.device)[b, pos].to(top.values.dtype)[:, None]).float().cpu()

    def at(self, name: str, ctx: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAE `name`'s pairs at the peaks of top examples ctx, pos [f, k]: ids, acts [f, k, width]; 0 for empty slots."""
        key = self._keys(ctx, pos)
        row = torch.searchsorted(self.keys, key.clamp(min=0)).clamp(max=max(len(self.keys) - 1, 0))
        filled = (key >= 0)[..., None]
        ids = torch.where(filled, self.ids[name][row], 0)
        return ids, torch.where(filled, self.acts[name][row], 0.0)


class _SparseCoact:
    """Each feature's mean activation of the other SAE's features over its peaks, as sparse (feature, other
    feature) sums: a feature meets at most k x width others, so no [features, F_o] tile is filled."""

    def __init__(self, ids: torch.Tensor, acts: torch.Tensor, n_peaks: torch.Tensor, F_o: int):
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
        key, val = (rows * F_o + ids).flatten(), acts.flatten()
        keep = val != 0  # empty slots and uncounted positions add nothing
        self.keys, inverse = torch.unique(key[keep], return_inverse=True)  # sorted: by feature, then other feature
        sums = torch.zeros(len(self.keys), device=ids.device).scatter_add_(0, inverse, val[keep])
        self.row, self.col, self.F_o, self.b = self.keys // F_o, self.keys % F_o, F_o, ids.shape[0]
        self.mean = sums / n_peaks[self.row]

    def top(self, average: torch.Tensor, top_act: torch.Tensor, n: int) -> torch.Tensor:
        """[b, n] other features by (mean - their average) / their max, highest first, only those above 0;
        -1 pads. Each feature's few candidates go into a [b, most candidates] tile for one topk (no sort of
        all the pairs)."""
        rel = (self.mean - average[self.col]) / top_act[self.col]
        counts = torch.bincount(self.row, minlength=self.b)
        slot = torch.arange(len(self.row), device=rel.device) - (counts.cumsum(0) - counts)[self.row]
        width = max(int(counts.max()) if len(self.row) else 0, n)
        tile = torch.full((self.b, width), -torch.inf, device=rel.device)
        cols = torch.full((self.b, width), -1, dtype=torch.int64, device=rel.device)
        tile[self.row, slot], cols[self.row, slot] = rel, self.col
        best = tile.topk(n, 1)
        return torch.where(best.values > 0, cols.gather(1, best.indices), -1)

    def at(self, cols: torch.Tensor) -> torch.Tensor:
        """Mean activation of other features `cols` [b, m] over each feature's peaks (0 where they never met)."""
        key = torch.arange(self.b, device=cols.device)[:, None] * self.F_o + cols
        where = torch.searchsorted(self.keys, key).clamp(max=max(len(self.keys) - 1, 0))
        found = self.keys[where] == key if len(self.keys) else torch.zeros_like(key, dtype=torch.bool)
        return torch.where(found, self.mean[where] if len(self.keys) else 0.0, 0.0)


def weight_links_apply(mine: Site, other: Site) -> bool:
    """Decoder/encoder cosines mean "what one reads of the other" only in a shared basis: the residual stream."""
    return mine.kind == "res" and other.kind == "res" and mine != other


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)  # zero rows get cosine 0 with everything


@torch.no_grad()
def cross_layer_links(plan: LinkPlan, finals: dict[str, dict], peaks: PeakTables, saes: dict[str, JumpReLUSAE],
                      top_n: int = TOP_N, block: int | None = None, device: str | torch.device | None = None,
                      names: Iterable[str] | None = None) -> dict[str, list[NeighbourLinks]]:
    """Links of SAEs `names` (default all) to each of their neighbours, from the finalized statistics (top
    examples, density, mean and max), the neighbours' peaks and the weights. CPU tensors out."""
    out: dict[str, list[NeighbourLinks]] = {}
    for name in plan.neighbours if names is None else names:
        out[name] = [_neighbour_links(plan, name, n, finals, peaks, saes, top_n, block, device) for n in plan.neighbours[name]]
    return out


def _neighbour_links(plan: LinkPlan, name: str, near: Neighbour, finals: dict[str, dict], peaks: PeakTables,
                     saes: dict[str, JumpReLUSAE], top_n: int, block: int | None, device) -> NeighbourLinks:
    final = finals[name]
    sae, other = saes[name], saes[near.name]
    device = torch.device(device) if device is not None else sae.W_dec.device
    F, F_o = sae.d_sae, other.d_sae
    n = min(top_n, F_o)
    n_peaks = (final["top_ctx"] >= 0).sum(1).clamp(min=1).to(device, torch.float32)  # [F]
    theirs_final = finals[near.name]
    average = (theirs_final["density"] * theirs_final["mean_act"]).to(device, torch.float32)  # [F_o] over all tokens
    top_act = theirs_final["max_act"].to(device, torch.float32).clamp(min=1e-12)  # [F_o]
    mine, theirs = None, None
    if weight_links_apply(plan.sites[name], plan.sites[near.name]) and near.direction != SAME:
        # Downstream: my decoder rows against their encoder columns; upstream: my encoder against their decoder.
        mine = _unit_rows((sae.W_dec if near.direction == DOWN else sae.W_enc.T).to(device, torch.float32))
        theirs = _unit_rows((other.W_enc.T if near.direction == DOWN else other.W_dec).to(device, torch.float32))
    block = block or max(1, min(1024, (1 << 25) // F_o))  # a [block, F_o] cosine tile stays <= 128 MB
    parts: dict[str, list[torch.Tensor]] = {"ids": [], "coact": [], "coact_rel": [], "cosine": []}
    for start in range(0, F, block):
        stop = min(start + block, F)
        ids, acts = peaks.at(near.name, final["top_ctx"][start:stop], final["top_pos"][start:stop])  # [b, k, w]
        coact = _SparseCoact(ids.to(device).long().flatten(1), acts.to(device).flatten(1), n_peaks[start:stop], F_o)
        linked = coact.top(average, top_act, n)  # [b, n]: by co-activation above their own average
        cosine = mine[start:stop] @ theirs.T if mine is not None else None  # [b, F_o]
        if cosine is not None:
            by_weight = cosine.topk(n, 1).indices  # [b, n]
            repeat = (by_weight[:, :, None] == linked[:, None, :]).any(2)
            linked = torch.cat([linked, torch.where(repeat, -1, by_weight)], 1)
        else:
            linked = torch.cat([linked, torch.full_like(linked, -1)], 1)
        safe = linked.clamp(min=0)
        mean = coact.at(safe)
        parts["ids"].append(linked.cpu())
        parts["coact"].append(torch.where(linked >= 0, mean, 0.0).cpu())
        parts["coact_rel"].append(torch.where(linked >= 0, (mean - average[safe]) / top_act[safe], 0.0).cpu())
        if cosine is not None:
            parts["cosine"].append(torch.where(linked >= 0, cosine.gather(1, safe), 0.0).cpu())
    return NeighbourLinks(near.name, near.direction, torch.cat(parts["ids"]), torch.cat(parts["coact"]),
                          torch.cat(parts["coact_rel"]), torch.cat(parts["cosine"]) if parts["cosine"] else None)

