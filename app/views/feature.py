"""The feature page: statistics, histograms, logit effect, top examples and interval samples, nearest
features by decoder cosine, and cross-layer links. What the feature's own file holds is one indexed
lookup of its features row, read once and kept in a small per-file LRU (a published file never changes);
its links are kept with the catalog (they depend on which SAEs are served).

    feature_view(catalog, "gemma-2-2b", "20-res-16k", 12345, text="")
    feature_view(catalog, "gemma-2-2b", "20-res-16k", 12345, run="3f2a")   # as another run (corpus) computed it
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from featurescope.app.catalog import Catalog, SAEInfo, check_index
from featurescope.app.errors import NotFound
from featurescope.app.explanations import feature_explanations
from featurescope.app.stored import (ContextStore, TokenStrings, TokenTexts, context_store, feature_labels, label_or_auto,
                                     peak_tokens, token_texts)
from featurescope.app.twin_models import Example, FeatureLinks, FeatureView, Interval, LogitToken, Neighbour
from featurescope.app.views.links import group_links
from featurescope.app.views.runs import chosen_run, run_choices
from featurescope.labels import LABEL_KIND_AUTO
from featurescope.schema import Feature, feature_key

FEATURES_CACHED = 128  # per file; a feature's stored data is tens of KB of Python objects


# Built once: constructing a statement costs more than SQLAlchemy's cached compile of it.
_FEATURE_ROW = sa.select(Feature.__table__).where(Feature.feature_key == sa.bindparam("key"))


def feature_view(catalog: Catalog, model_id: str, sae_id: str, index: int, text: str = "",
                 run: str | None = None) -> FeatureView:
    """The feature page, as run `run` (a run id or prefix; None: the newest) computed it. What the feature's
    own file holds is read once and kept in a small per-file LRU (a published file never changes), its links
    with the catalog: the values of the returned dict are shared between requests, never modify them."""
    sae, run = chosen_run(catalog, model_id, sae_id, run)
    check_index(sae, index)
    stored = _stored_feature(sae, token_texts(catalog.model(model_id)), index)
    return {
        **stored.page,
        "run": run,
        "runs": run_choices(catalog, sae),
        "links": feature_links(catalog, model_id, sae_id, index, run),
        "prev": index - 1 if index > 0 else None,
        "next": index + 1 if index + 1 < sae.d_sae else None,
        "test": {"text": text, "live_encoding": False},
    }


def feature_links(catalog: Catalog, model_id: str, sae_id: str, index: int, run: str | None = None) -> FeatureLinks:
    """A feature's cross-layer links (app/views/links.py: group_links) in run `run` (None: the newest), kept
    for the last FEATURES_CACHED features asked for: any change to the files builds a new Catalog, and with
    it a new memo."""
    links = catalog.memo.get("links")
    if links is None:
        links = catalog.memo.setdefault("links", functools.lru_cache(FEATURES_CACHED)(functools.partial(_links, catalog)))
    return links(model_id, sae_id, index, run)


def _links(catalog: Catalog, model_id: str, sae_id: str, index: int, run: str | None) -> FeatureLinks:
    sae = catalog.sae(model_id, sae_id, run)
    check_index(sae, index)
    stored = _stored_feature(sae, token_texts(catalog.model(model_id)), index)
    return group_links(catalog, model_id, sae, stored.link_rows, pin=run is not None)



@dataclass(frozen=True)
class StoredFeature:
    page: dict[str, Any]  # what feature_view shows from the feature's own row
    link_rows: list[dict[str, Any]]  # its features.links elements, for feature_links


def _stored_feature(sae: SAEInfo, vocab: TokenTexts, index: int) -> StoredFeature:
    read = sae.file.cached("features", lambda: functools.lru_cache(FEATURES_CACHED)(_read_feature))
    return read(sae, vocab, index)


def _read_feature(sae: SAEInfo, vocab: TokenTexts, index: int) -> StoredFeature:
    with sae.file.connect() as conn:
        row = conn.execute(_FEATURE_ROW, {"key": feature_key(sae.number, index)}).mappings().first()
        if row is None:
            raise NotFound("feature", str(index), f"Feature {index} of {sae.id!r} is not in the published data.",
                           model_id=sae.model_id, sae_id=sae.id, choices=[], valid_range=(0, sae.d_sae - 1))
        neighbours = _neighbours(conn, sae, list(row["neighbour_ids"] or []), list(row["neighbour_cos"] or []), vocab)
    contexts, stored = context_store(sae), row["examples"] or []  # top examples by rank, then intervals by bin
    examples = [_example(e, contexts, vocab) for e in stored]
    top = [e for e, s in zip(examples, stored) if s["kind"] == "top"]
    label, label_kind = label_or_auto(row["label"], row["label_kind"], row["peak_token_ids"] or [], row["logit_pos_ids"], vocab)
    page = {
        "model_id": sae.model_id, "sae": sae.as_dict(), "index": index, "label": label, "label_kind": label_kind,
        "explanations": feature_explanations(sae, index),
        "n_firing": row["n_firing"], "density": row["density"], "max_act": row["max_act"], "mean_act": row["mean_act"],
        "activation_histogram": {"bin_width": row["hist_bin_width"], "counts": list(row["hist_counts"] or [])},
        "logits": {
            "promoted": _logit_tokens(row["logit_pos_ids"], row["logit_pos_values"], vocab),
            "suppressed": _logit_tokens(row["logit_neg_ids"], row["logit_neg_values"], vocab),
            "histogram": {"lo": row["logit_hist_lo"], "hi": row["logit_hist_hi"],
                          "counts": list(row["logit_hist_counts"] or [])},
        },
        "top_examples": top,
        "intervals": _intervals(row, examples, stored),
        "neighbours": neighbours,
    }
    return StoredFeature(page, list(row["links"] or ()))


def _example(e: dict[str, Any], contexts: ContextStore, vocab: TokenTexts) -> Example:
    token_ids = contexts.tokens(e["context_id"])
    return {"context_id": e["context_id"], "max_act": e["max_act"], "max_pos": e["max_pos"], "token_ids": token_ids,
            "tokens": TokenStrings(vocab, token_ids), "positions": e["positions"], "acts": e["acts"],
            "warmup": contexts.warmup(e["context_id"])}


def _intervals(row: sa.RowMapping, examples: list[Example], stored: list[dict[str, Any]]) -> list[Interval]:
    los, his, shares = row["interval_lo"] or [], row["interval_hi"] or [], row["interval_share"] or []
    by_bin: dict[int, list[dict[str, Any]]] = {}
    for e, s in zip(examples, stored):
        if s["kind"] == "interval":
            by_bin.setdefault(s["bin"], []).append(e)
    return [{"bin": b, "lo": lo, "hi": hi, "share": share, "examples": by_bin.get(b, [])}
            for b, (lo, hi, share) in enumerate(zip(los, his, shares))]


def _logit_tokens(ids: list[int] | None, values: list[float] | None, vocab: TokenTexts) -> list[LogitToken]:
    return [{"token_id": t, "text": vocab[t], "value": v} for t, v in zip(ids or [], values or [])]


def _neighbours(conn: sa.Connection, sae: SAEInfo, ids: list[int], cosines: list[float],
                vocab: TokenTexts) -> list[Neighbour]:
    if not ids:  # a run without neighbours (precompute --neighbours 0): no need for the SAE's labels (1M rows: ~4 s)
        return []
    labels = feature_labels(sae)
    missing = [i for i in ids if i in labels and labels[i][0] is None]
    fallback: dict[int, str] = {}
    if missing:  # rows written without labels: build the automatic ones from peaks and promoted tokens
        peaks = peak_tokens(conn, sae, missing)
        promoted = dict(conn.execute(sa.select(Feature.feature, Feature.logit_pos_ids).where(
            Feature.model_id == sae.model_id, Feature.sae_id == sae.id, Feature.feature.in_(missing))).all())
        fallback = {i: label_or_auto(None, None, peaks.get(i, []), promoted.get(i), vocab)[0] for i in missing}
    out = []
    for index, cosine in zip(ids, cosines):
        label, kind, density = labels.get(index, ("", None, None))
        if index in fallback:
            label, kind = fallback[index], LABEL_KIND_AUTO
        out.append({"index": index, "cosine": cosine, "label": label or "", "label_kind": kind, "density": density})
    return out


