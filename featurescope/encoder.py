"""The one encoder: model activations at every SAE's site, encoded by every SAE, from one truncated pass.

The precompute job and the live server both call `FeatureEncoder`, so a prompt encoded live gives the
same numbers as the same context encoded during precompute.

    encoder = FeatureEncoder(lm, {"20-res-16k": sae})
    feature_acts = encoder(input_ids)          # {"20-res-16k": [batch, seq, d_sae] float32}
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from featurescope.errors import FeatureScopeError
from featurescope.models import LoadedModel
from featurescope.positions import counted_positions, sae_max_norm
from featurescope.sae import JumpReLUSAE
from featurescope.sites import Site, capture_sites, parse_site, site_width


class SAEShapeError(FeatureScopeError, ValueError):
    """An SAE whose d_in does not match the width of the site it reads."""


def check_sae_fits(lm: LoadedModel, sae: JumpReLUSAE, name: str = "") -> Site:
    site = parse_site(sae.cfg.hook_name)
    width = site_width(lm, site)
    if sae.d_in != width:
        raise SAEShapeError(
            f"SAE {name or sae.cfg.source!r} has d_in={sae.d_in}, but site {site.hook_name} of model {lm.name!r} "
            f"has width {width}: it was trained for another model or site."
        )
    return site


class FeatureEncoder:
    def __init__(self, lm: LoadedModel, saes: dict[str, JumpReLUSAE]):
        if not saes:
            raise ValueError("FeatureEncoder needs at least one SAE.")
        self.lm = lm
        self.saes = {name: sae.to(lm.device) for name, sae in saes.items()}
        self.sites = {name: check_sae_fits(lm, sae, name) for name, sae in self.saes.items()}
        self.max_norms = {name: sae_max_norm(sae) for name, sae in self.saes.items()}  # featurescope/positions.py

    @property
    def last_layer(self) -> int:
        return max(site.layer for site in self.sites.values())

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """[batch, seq] token ids -> {sae name: [batch, seq, d_sae] float32 feature activations}."""
        return self.encode_with_masks(input_ids, attention_mask)[0]

    @torch.no_grad()
    def encode_with_masks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          site_acts: dict[Site, torch.Tensor] | None = None, starts_document: torch.Tensor | None = None
                          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Feature activations as __call__, plus per SAE the bool [batch, seq] mask of positions that count.

        `site_acts` ({site: [batch, seq, d_in]}, captured earlier for these ids by capture_sites, see
        SiteActivations) replaces the model's forward pass; the SAEs and masks are the same code.
        `starts_document` (bool [batch]; None: every row does) decides the rows' warm-up positions."""
        acts, masks = {}, {}
        for name, sae_acts, mask in self.encode_each(input_ids, attention_mask, site_acts, starts_document):
            acts[name], masks[name] = sae_acts, mask
        return acts, masks

    @torch.no_grad()
    def encode_each(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    site_acts: dict[Site, torch.Tensor] | None = None, starts_document: torch.Tensor | None = None
                    ) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, [batch, seq, d_sae] acts, [batch, seq] mask) for one SAE after the other, from one model
        pass: a caller that drops each SAE's acts before the next holds one SAE's activations at a time."""
        if site_acts is None:
            site_acts = capture_sites(self.lm, input_ids, set(self.sites.values()), attention_mask)
        else:
            site_acts = {s: site_acts[s].to(self.lm.device) for s in set(self.sites.values())}
        ids = input_ids.to(self.lm.device)
        for name, sae in self.saes.items():
            site = site_acts[self.sites[name]]
            yield name, sae.encode(site), counted_positions(self.lm, ids, site, self.max_norms[name], starts_document)
