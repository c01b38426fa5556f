"""The explanation search page: every SAE of a model, searched by the words of its features' explanations.

    search_view(catalog, urls, "smollm2-135m", "error messages")
"""

from __future__ import annotations

from featurescope.app.catalog import Catalog
from featurescope.app.explanations import SEARCH_LIMIT, search
from featurescope.app.twin_models import ExplanationSearchView
from featurescope.app.urls import Urls


def search_view(catalog: Catalog, urls: Urls, model_id: str, q: str, limit: int = SEARCH_LIMIT) -> ExplanationSearchView:
    model = catalog.model(model_id)
    hits = search(catalog, model.id, q, limit) if q.strip() else []
    results = [{"sae_id": h["sae_id"], "feature": h["feature"], "run": h["run"], "text": h["text"],
                "explainer": h["explainer"], "method": h["method"], "rank": float(h["rank"]), "matched": int(h["matched"]),
                "mean_score": h["mean_score"] if h["mean_score"] == h["mean_score"] else None,
                "url": urls.feature(model.id, h["sae_id"], h["feature"], run=h["run"])} for h in hits]
    explained = sum(1 for runs in model.runs.values() if any(s.file.has_explanations for s in runs))
    return {"model_id": model.id, "q": q, "results": results, "limit": limit, "explained_saes": explained}
