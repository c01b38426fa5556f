"""The SAE page: its features as a sortable, filterable, paginated table, searchable by label and by the
token its top examples peak on, with the SAE's density histogram; and a random feature that fired.

    sae_view(catalog, "gemma-2-2b", "20-res-16k", FeatureQuery(sort="density", desc=True, show="alive"))
    sae_view(catalog, "gemma-2-2b", "20-res-16k", FeatureQuery(), run="3f2a")   # as another run (corpus) computed it
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import sqlalchemy as sa

from featurescope.app.catalog import Catalog, SAEInfo
from featurescope.app.errors import InvalidParameter
from featurescope.app.explanations import best_explanations
from featurescope.app.stored import TokenTexts, label_or_auto, token_texts, top_tokens
from featurescope.app.twin_models import DensityHistogram, FeatureRow, SAEView
from featurescope.app.views.runs import chosen_run, run_choices
from featurescope.schema import DENSE_THRESHOLD, Feature, IntList

DENSITY_BINS_PER_DECADE = 4

SortKey = Literal["index", "label", "density", "max_act"]
Show = Literal["all", "alive", "dead", "dense"]
SORT_COLUMNS = {"index": Feature.feature, "label": Feature.label, "density": Feature.density, "max_act": Feature.max_act}


@dataclass(frozen=True)
class FeatureQuery:
    """What the SAE page's feature table shows; every field is a query parameter of the page's URL."""
    sort: SortKey = "index"
    desc: bool = False
    page: int = 1
    size: int = 50
    show: Show = "all"
    min_density: float | None = None
    max_density: float | None = None
    q: str = ""  # label text
    token: str = ""  # peak token of top examples

    def params(self, **changes: Any) -> dict[str, Any]:
        """Non-default fields (after changes) as URL query parameters."""
        changed, default = replace(self, **changes), FeatureQuery()
        out = {}
        for name, value in asdict(changed).items():
            if value != getattr(default, name) and value is not None:
                out[name] = int(value) if isinstance(value, bool) else value
        return out

    def check(self) -> None:
        if self.min_density is not None and self.max_density is not None and self.min_density > self.max_density:
            raise InvalidParameter("min_density", f"min_density ({self.min_density:g}) is above max_density ({self.max_density:g}).")


def sae_view(catalog: Catalog, model_id: str, sae_id: str, query: FeatureQuery, run: str | None = None) -> SAEView:
    """The feature table of an SAE as run `run` (a run id or prefix; None: the newest) computed it."""
    query.check()
    sae, run = chosen_run(catalog, model_id, sae_id, run)
    vocab = token_texts(catalog.model(model_id))
    where = _table_conditions(sae, query, vocab)
    order = SORT_COLUMNS[query.sort]
    order = order.desc().nulls_last() if query.desc else order.asc().nulls_last()
    with sae.file.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(Feature).where(*where)).scalar() or 0
        pages = max(1, math.ceil(total / query.size))
        rows = conn.execute(
            sa.select(Feature.feature, Feature.label, Feature.label_kind, Feature.density, Feature.max_act,
                      Feature.n_firing, Feature.logit_pos_ids, Feature.peak_token_ids)
            .where(*where).order_by(order, Feature.feature).limit(query.size).offset((query.page - 1) * query.size)).all()
    features: list[FeatureRow] = []
    explained = best_explanations(sae)
    for r in rows:
        peak_ids = list(r.peak_token_ids or [])
        label, kind = label_or_auto(r.label, r.label_kind, peak_ids, r.logit_pos_ids, vocab)
        features.append({"index": r.feature, "label": label, "label_kind": kind,
                         "explanation": explained.get(r.feature), "density": r.density,
                         "max_act": r.max_act, "dead": r.n_firing == 0, "top_tokens": top_tokens(peak_ids, vocab)})
    return {"sae": sae.as_dict(), "run": run, "runs": run_choices(catalog, sae), "query": asdict(query), "total": total, "page": query.page, "pages": pages,
            "features": features, "matched_token_ids": vocab.ids_for(query.token) if query.token else None,
            "density_histogram": density_histogram(sae)}


def _table_conditions(sae: SAEInfo, query: FeatureQuery, vocab: TokenTexts) -> list[sa.ColumnElement[bool]]:
    where = [Feature.model_id == sae.model_id, Feature.sae_id == sae.id]
    if query.show == "alive":
        where.append(Feature.n_firing > 0)
    elif query.show == "dead":
        where.append(Feature.n_firing == 0)
    elif query.show == "dense":
        where.append(Feature.density > DENSE_THRESHOLD)
    if query.min_density is not None:
        where.append(Feature.density >= query.min_density)
    if query.max_density is not None:
        where.append(Feature.density <= query.max_density)
    if query.q:
        where.append(Feature.label.icontains(query.q, autoescape=True))
    if query.token:
        token_ids = vocab.ids_for(query.token)
        where.append(sa.func.list_has_any(Feature.peak_token_ids, sa.bindparam("token_ids", token_ids, IntList)))
    return where


def density_histogram(sae: SAEInfo) -> DensityHistogram:
    """Features per log10-density bin (DENSITY_BINS_PER_DECADE per decade), plus the dead count."""
    def build() -> DensityHistogram:
        bin_ = sa.func.floor(sa.func.log10(Feature.density) * DENSITY_BINS_PER_DECADE).label("bin")
        mine = [Feature.model_id == sae.model_id, Feature.sae_id == sae.id]
        with sae.file.connect() as conn:
            rows = conn.execute(sa.select(bin_, sa.func.count()).where(*mine, Feature.density > 0).group_by(bin_)).all()
            dead = conn.execute(sa.select(sa.func.count()).select_from(Feature).where(*mine, Feature.n_firing == 0)).scalar()
        counts = {int(b): n for b, n in rows}
        lo, hi = (min(counts), max(counts) + 1) if counts else (-6 * DENSITY_BINS_PER_DECADE, 0)
        return {"log10_lo": lo / DENSITY_BINS_PER_DECADE, "bin_width_log10": 1 / DENSITY_BINS_PER_DECADE,
                "counts": [counts.get(b, 0) for b in range(lo, hi)], "dead": dead or 0}

    return sae.file.cached(("density_histogram", sae.model_id, sae.id), build)


def random_feature(catalog: Catalog, model_id: str, sae_id: str, rng: random.Random | None = None,
                   run: str | None = None) -> int:
    """A random feature that fired at least once in run `run` (None: the newest; any feature when all are dead)."""
    sae = catalog.sae(model_id, sae_id, run)

    def build() -> list[int]:
        with sae.file.connect() as conn:
            return list(conn.execute(sa.select(Feature.feature).where(
                Feature.model_id == model_id, Feature.sae_id == sae_id, Feature.n_firing > 0)).scalars())

    alive = sae.file.cached(("alive", model_id, sae_id), build)
    rng = rng or random.Random()
    return rng.choice(alive) if alive else rng.randrange(sae.d_sae)
