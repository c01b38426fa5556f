"""Explanations as the pages read them: from each published run's side file (`<run>.explanations.duckdb`,
featurescope/explanations.py), which app/databases.py attaches read-only beside the run (`DataFile.explanations_alias`).

    feature_explanations(sae, 12345)          # every explanation of a feature, best first
    best_explanations(sae)                    # {feature: best explanation text}, once per file
    search(catalog, "smollm2-135m", "error")  # ranked across every SAE of the model
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import duckdb

from featurescope.app.catalog import Catalog, SAEInfo
from featurescope.app.databases import DataFile
from featurescope.explanations import explanations_of, search_explanations

SEARCH_LIMIT = 50


@contextlib.contextmanager
def _cursor(file: DataFile) -> Iterator[duckdb.DuckDBPyConnection]:
    cursor = file.cursor()
    try:
        yield cursor
    finally:
        cursor.close()


def feature_explanations(sae: SAEInfo, index: int) -> list[dict]:
    """The explanations of one feature in the run that `sae` is, best (highest mean score) first."""
    if not sae.file.has_explanations:
        return []
    with _cursor(sae.file) as cursor:
        found = explanations_of(cursor, sae.file.explanations_alias, sae.model_id, sae.id, [index]).get(index, [])
    return [_out(e) for e in found]


def best_explanations(sae: SAEInfo) -> dict[int, str]:
    """Each explained feature's best explanation, read once per file (a new batch is a new DataFile)."""
    if not sae.file.has_explanations:
        return {}

    def build() -> dict[int, str]:
        with _cursor(sae.file) as cursor:
            found = explanations_of(cursor, sae.file.explanations_alias, sae.model_id, sae.id)
        return {feature: items[0]["text"] for feature, items in found.items()}

    return sae.file.cached(("best_explanations", sae.model_id, sae.id), build)


def search(catalog: Catalog, model_id: str, query: str, limit: int = SEARCH_LIMIT) -> list[dict]:
    """Explanations of every SAE of a model matching the query's words, ranked (featurescope/explanations.py:
    SEARCH_SQL). Each file is searched in the runs the catalog serves from it; hits of SAEs served from a
    newer file of the same run are left out."""
    model = catalog.model(model_id)
    files = {s.file.path: s.file for runs in model.runs.values() for s in runs if s.file.has_explanations}
    hits = []
    for file in files.values():
        with _cursor(file) as cursor:
            for hit in search_explanations(cursor, file.explanations_alias, model_id, query, limit):
                sae = next((s for s in model.runs.get(hit["sae_id"], ()) if s.file is file), None)
                if sae is not None and 0 <= hit["feature"] < sae.d_sae:
                    hits.append({**hit, "run": catalog.run_param(sae)})
    hits.sort(key=lambda h: (-h["matched"], -h["rank"], -(h["mean_score"] if h["mean_score"] is not None else -1),
                             h["sae_id"], h["feature"]))
    return hits[:limit]


def _out(e: dict) -> dict:
    return {"text": e["text"], "explainer": e["explainer"], "method": e["method"], "prompt_version": e["prompt_version"],
            "created_at": e["created_at"].isoformat(timespec="seconds") if e["created_at"] else "",
            "scores": [{"scorer": s["scorer"], "kind": s["kind"], "score": _finite(s["score"]), "n_pos": s["n_pos"],
                        "n_neg": s["n_neg"]} for s in e["scores"]],
            "mean_score": _finite(e["mean_score"])}


def _finite(value: float | None) -> float | None:
    return value if value is not None and value == value else None
