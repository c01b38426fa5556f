"""A feature's cross-layer links, as stored in its features row (precompute/links.py computes them), with
the linked features' labels: the feature page's side column, the encode page's highlight and every step of
the lineage graph read them through here."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from featurescope.app.catalog import Catalog, SAEInfo
from featurescope.app.stored import feature_labels, links_computed, rows_of
from featurescope.app.twin_models import FeatureLinks, Link
from featurescope.schema import Feature

LINK_GROUPS = {"up": "upstream", "down": "downstream", "same": "alongside"}  # stored direction -> list name


def link_rows(sae: SAEInfo, features: list[int]) -> dict[int, list[dict[str, Any]]]:
    """Stored links (features.links elements) of some features of an SAE, per feature, neighbour SAEs in id order."""
    if not features:
        return {}
    with sae.file.connect() as conn:
        rows = conn.execute(sa.select(Feature.feature, Feature.links).where(rows_of(sae, features))).all()
    return {feature: list(links or ()) for feature, links in rows}


def linked(catalog: Catalog, model_id: str, row: dict[str, Any], run_id: str, pin: bool = False) -> list[Link]:
    """The features one features.links element of run `run_id` names, with labels, in that run's file of the
    other SAE (links were computed within one run); [] when it is not being served. Each link's `run` is what
    its page's URL needs: the run id when `pin` (the page named its run) or when the run is not the other
    SAE's newest, else None."""
    other = catalog.in_run(model_id, row["other_sae_id"], run_id)
    if other is None:
        return []
    run = other.run_id if pin else catalog.run_param(other)
    labels = feature_labels(other)
    cosines = row["cosine"] if row["cosine"] is not None else [None] * len(row["other_features"])
    out: list[Link] = []
    for feature, coact, coact_rel, cosine in zip(row["other_features"], row["coact"], row["coact_rel"], cosines):
        label, kind, density = labels.get(feature, (None, None, None))
        out.append({"sae_id": other.id, "layer": other.layer, "site": other.site, "feature": feature,
                    "label": label or "", "label_kind": kind, "density": density, "coact": coact,
                    "coact_rel": coact_rel, "cosine": cosine, "run": run})
    return out


def group_links(catalog: Catalog, model_id: str, sae: SAEInfo, rows: list[dict[str, Any]], pin: bool = False) -> FeatureLinks:
    """A feature's stored link rows as {"computed": whether its run computed links at all, "upstream",
    "downstream", "alongside": [Link]}. coact is the linked feature's mean activation where this one peaks,
    coact_rel that minus its mean over all tokens, over its max (what ranks them); cosine is None unless both
    SAEs are residual. Lists go through the neighbour SAEs in model order; within one, co-activation links
    come first (highest coact_rel first), then links found only by weights. `pin`: see linked()."""
    out: dict[str, Any] = {"computed": links_computed(sae), **{name: [] for name in LINK_GROUPS.values()}}
    order = {sid: i for i, sid in enumerate(catalog.model(model_id).saes)}
    for row in sorted(rows, key=lambda r: order.get(r["other_sae_id"], -1)):
        out[LINK_GROUPS.get(row["direction"], "alongside")] += linked(catalog, model_id, row, sae.run_id, pin)
    return out  # type: ignore[return-value]
