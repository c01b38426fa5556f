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
    stats = {name: FeatureStats(..., coact_width=plan.coact_width(name)) for name in encoder.saes}
    peaks = plan.peaks(feature_acts, masks)                                       # each batch, then per SAE:
    stats[name].update(feature_acts[name], context_ids, masks[name], coacts=plan.coacts(name, peaks))
    links = cross_layer_links(plan, finals, encoder.saes)   # at the end: {name: [NeighbourLinks, ...]}

No second pass over the corpus: while streaming, every position offers each SAE's `width` strongest
(feature, act) pairs, and FeatureStats keeps them only for the positions of its top-k slots
([d_sae, k, width x neighbours]). The co-activation is exact for every feature among a neighbour's
`width` strongest at those tokens (all of them when the neighbour's L0 there is <= width), a lower bound
otherwise. No F x F matrix is held: both scores are computed through blocks of features.
"""

from __future__ import annotations

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
    start: int  # its segment [start, stop) of the SAE's coacts
    stop: int


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
    """Which SAEs are neighbours, and the layout of each SAE's coacts (one segment per neighbour)."""

    def __init__(self, sites: dict[str, Site], d_saes: dict[str, int], width: int = PEAK_WIDTH):
        self.sites = sites
        self.widths = {name: min(width, d) for name, d in d_saes.items()}
        layers = sorted({s.layer for s in sites.values()})
        order = sorted(sites, key=lambda n: (flow_key(sites[n].layer, sites[n].kind), n))
        self.neighbours: dict[str, list[Neighbour]] = {}
        for name, site in sites.items():
            near = neighbour_layers(layers, site.layer)
            found, start = [], 0
            for other in order:
                if other != name and sites[other].layer in near:
                    found.append(Neighbour(other, direction((site.layer, site.kind), (sites[other].layer, sites[other].kind)),
                                           start, start + self.widths[other]))
                    start += self.widths[other]
            self.neighbours[name] = found

    def coact_width(self, name: str) -> int:
        return sum(n.stop - n.start for n in self.neighbours[name])

    def peaks(self, feature_acts: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, tuple]:
        """Each SAE's `width` strongest (feature id, act) pairs per position, 0 where its mask says the
        position does not count: {name: (ids [B, T, w] int32, acts [B, T, w] float32)}."""
        out = {}
        for name, acts in feature_acts.items():
            top = acts.topk(self.widths[name], dim=-1, sorted=False)  # ~5 ms for [2048 tokens, 2048] on a CPU
            out[name] = (top.indices.int(), top.values * masks[name].to(top.values.dtype)[..., None])
        return out

    def coacts(self, name: str, peaks: dict[str, tuple]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What SAE `name`'s FeatureStats.update takes: its neighbours' peaks side by side, [B, T, P] each."""
        near = self.neighbours[name]
        if not near:
            return None
        return (torch.cat([peaks[n.name][0] for n in near], -1), torch.cat([peaks[n.name][1] for n in near], -1))


def weight_links_apply(mine: Site, other: Site) -> bool:
    """Decoder/encoder cosines mean "what one reads of the other" only in a shared basis: the residual stream."""
    return mine.kind == "res" and other.kind == "res" and mine != other


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)  # zero rows get cosine 0 with everything


@torch.no_grad()
def cross_layer_links(plan: LinkPlan, finals: dict[str, dict], saes: dict[str, JumpReLUSAE], top_n: int = TOP_N,
                      block: int | None = None, device: str | torch.device | None = None) -> dict[str, list[NeighbourLinks]]:
    """Links of every SAE to each of its neighbours, from the finalized statistics (which hold the peak
    co-activations: FeatureStats(coact_width=plan.coact_width(name))) and the weights. CPU tensors out."""
    out: dict[str, list[NeighbourLinks]] = {}
    for name, near in plan.neighbours.items():
        out[name] = [_neighbour_links(plan, name, n, finals, saes, top_n, block, device) for n in near]
    return out


def _neighbour_links(plan: LinkPlan, name: str, near: Neighbour, finals: dict[str, dict], saes: dict[str, JumpReLUSAE],
                     top_n: int, block: int | None, device) -> NeighbourLinks:
    final = finals[name]
    sae, other = saes[name], saes[near.name]
    device = torch.device(device) if device is not None else sae.W_dec.device
    F, F_o = sae.d_sae, other.d_sae
    n = min(top_n, F_o)
    ids = final["top_coact_ids"][:, :, near.start:near.stop].to(device).long().reshape(F, -1)  # [F, k * w]
    acts = final["top_coact_acts"][:, :, near.start:near.stop].to(device).reshape(F, -1)
    n_peaks = (final["top_ctx"] >= 0).sum(1).clamp(min=1).to(device, torch.float32)  # [F]
    theirs_final = finals[near.name]
    average = (theirs_final["density"] * theirs_final["mean_act"]).to(device, torch.float32)  # [F_o] over all tokens
    top_act = theirs_final["max_act"].to(device, torch.float32).clamp(min=1e-12)  # [F_o]
    mine, theirs = None, None
    if weight_links_apply(plan.sites[name], plan.sites[near.name]) and near.direction != SAME:
        # Downstream: my decoder rows against their encoder columns; upstream: my encoder against their decoder.
        mine = _unit_rows((sae.W_dec if near.direction == DOWN else sae.W_enc.T).to(device, torch.float32))
        theirs = _unit_rows((other.W_enc.T if near.direction == DOWN else other.W_dec).to(device, torch.float32))
    block = block or max(1, min(1024, (1 << 25) // F_o))  # a [block, F_o] tile stays <= 128 MB
    parts: dict[str, list[torch.Tensor]] = {"ids": [], "coact": [], "coact_rel": [], "cosine": []}
    for start in range(0, F, block):
        stop = min(start + block, F)
        coact = torch.zeros(stop - start, F_o, device=device).scatter_add_(1, ids[start:stop], acts[start:stop])
        coact /= n_peaks[start:stop, None]  # [b, F_o] mean activation over the feature's peaks
        rel = (coact - average) / top_act
        by_act = rel.topk(n, 1)
        linked = torch.where(by_act.values > 0, by_act.indices, -1)  # [b, n]
        cosine = mine[start:stop] @ theirs.T if mine is not None else None  # [b, F_o]
        if cosine is not None:
            by_weight = cosine.topk(n, 1).indices  # [b, n]
            repeat = (by_weight[:, :, None] == linked[:, None, :]).any(2)
            linked = torch.cat([linked, torch.where(repeat, -1, by_weight)], 1)
        else:
            linked = torch.cat([linked, torch.full_like(linked, -1)], 1)
        safe = linked.clamp(min=0)
        parts["ids"].append(linked.cpu())
        parts["coact"].append(torch.where(linked >= 0, coact.gather(1, safe), 0.0).cpu())
        parts["coact_rel"].append(torch.where(linked >= 0, rel.gather(1, safe), 0.0).cpu())
        if cosine is not None:
            parts["cosine"].append(torch.where(linked >= 0, cosine.gather(1, safe), 0.0).cpu())
    return NeighbourLinks(near.name, near.direction, torch.cat(parts["ids"]), torch.cat(parts["coact"]),
                          torch.cat(parts["coact_rel"]), torch.cat(parts["cosine"]) if parts["cosine"] else None)

