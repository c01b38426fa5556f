"""The lineage view: from one feature, its strongest links through every SAE of the model, one site at a
time, each way, as a graph (app/graph.py lays it out).

    lineage_view(catalog, "gemma-2-2b", "20-res-16k", 12345, LineageQuery(depth=2, breadth=3, by="coact"))
    lineage_view(catalog, "gemma-2-2b", "20-res-16k", 12345, LineageQuery(), run="3f2a")  # through another run's SAEs
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from featurescope.app.catalog import Catalog, ModelInfo, SAEInfo, check_index
from featurescope.app.stored import feature_labels, links_computed, peak_tokens, token_texts, top_tokens
from featurescope.app.twin_models import LineageView
from featurescope.app.views.links import link_rows, linked
from featurescope.app.views.runs import chosen_run
from featurescope.flow import flow_key


@dataclass(frozen=True)
class LineageQuery:
    """The lineage view's URL parameters."""
    depth: int | None = None  # SAEs to follow each way from the start; None = all of the model's
    breadth: int = 3  # features kept per SAE (the strongest links of the previous one's)
    by: Literal["coact", "cosine"] = "coact"  # which score picks them: coact_rel or cosine

    def params(self, **changes: Any) -> dict[str, Any]:
        changed, default = replace(self, **changes), LineageQuery()
        return {k: v for k, v in asdict(changed).items() if v != getattr(default, k) and v is not None}


def lineage_view(catalog: Catalog, model_id: str, sae_id: str, index: int, query: LineageQuery,
                 run: str | None = None) -> LineageView:
    """From one feature, its strongest links through every SAE of the model, one site at a time, each way:
    a graph of nodes (features with label and top tokens) in columns (sites in model order) and edges
    (from the upstream to the downstream node, with both scores; `via` says whose links found it). Each
    step goes to the nearest site the current features link to (the next one, unless it has no links).
    The graph stays in the start SAE's run (`run`: a run id or prefix; None: its newest), where links were
    computed."""
    sae, run = chosen_run(catalog, model_id, sae_id, run)
    check_index(sae, index)
    model = catalog.model(model_id)
    in_run = {sid: s for sid in model.saes if (s := catalog.in_run(model_id, sid, sae.run_id)) is not None}
    scope = _RunScope(catalog, in_run, sae.run_id, pin=run is not None)
    keys = sorted({flow_key(s.layer, s.site_kind) for s in in_run.values()})
    column = {s.id: keys.index(flow_key(s.layer, s.site_kind)) for s in in_run.values()}
    start = (sae_id, index)
    scores: dict[tuple[str, int], float | None] = {start: None}
    edges: list[dict[str, Any]] = []
    depth = len(keys) if query.depth is None else query.depth
    for step, via in ((1, "down"), (-1, "up")):
        frontier, at = [start], column[sae_id]
        for _ in range(depth):
            if not frontier:
                break
            frontier, at = _lineage_step(scope, model_id, frontier, via, step, at, column, query, scores, edges)
    nodes = _lineage_nodes(scope, model, scores, column, start)
    used = sorted({n["column"] for n in nodes})
    return {"model_id": model_id, "sae": sae.as_dict(), "run": run, "index": index, "query": asdict(query),
            "links_computed": links_computed(sae),
            "columns": [{"column": c, "sae_ids": [s for s, col in column.items() if col == c]} for c in used],
            "nodes": nodes, "edges": edges}


@dataclass(frozen=True)
class _RunScope:
    """The SAEs of the start feature's run, and what each node's URL needs (`run`, as links.linked says)."""
    catalog: Catalog
    saes: dict[str, SAEInfo]
    run_id: str
    pin: bool

    def url_run(self, sae: SAEInfo) -> str | None:
        return sae.run_id if self.pin else self.catalog.run_param(sae)


def _lineage_step(scope, model_id, frontier, via, step, at, column, query, scores, edges) -> tuple[list, int]:
    """Links of the frontier's features (in column `at`) into the nearest column beyond it (step +1: downstream,
    -1: upstream) that they link to; keeps the `breadth` best-scored features there. Returns them and the column."""
    found: dict[tuple[str, int], float] = {}
    candidates = []
    by_sae: dict[str, list[int]] = {}
    for sid, feature in frontier:
        by_sae.setdefault(sid, []).append(feature)
    for sid, features in by_sae.items():
        for feature, rows in link_rows(scope.saes[sid], features).items():
            for row in rows:
                if row["direction"] != via or (column.get(row["other_sae_id"], at) - at) * step <= 0:
                    continue
                for link in linked(scope.catalog, model_id, row, scope.run_id, scope.pin):
                    score = link["coact_rel" if query.by == "coact" else "cosine"]
                    if score is None or not score > 0:
                        continue
                    node = (link["sae_id"], link["feature"])
                    found[node] = max(found.get(node, score), score)
                    candidates.append(((sid, feature), node, link))
    if not found:
        return [], at
    target = min({column[sid] for sid, _ in found}, key=lambda c: (c - at) * step)
    chosen = sorted((n for n in found if column[n[0]] == target), key=lambda n: (-found[n], n))[:query.breadth]
    for node in chosen:
        scores.setdefault(node, found[node])
    keep = set(chosen)
    for source, node, link in candidates:
        if node in keep:
            upper, lower = (source, node) if via == "down" else (node, source)
            edges.append({"from": _node_id(*upper), "to": _node_id(*lower), "via": via, "coact": link["coact"],
                          "coact_rel": link["coact_rel"], "cosine": link["cosine"]})
    return chosen, target


def _node_id(sae_id: str, feature: int) -> str:
    return f"{sae_id}/{feature}"


def _lineage_nodes(scope, model: ModelInfo, scores, column, start) -> list[dict[str, Any]]:
    vocab = token_texts(model)
    by_sae: dict[str, list[int]] = {}
    for sid, feature in scores:
        by_sae.setdefault(sid, []).append(feature)
    nodes = []
    for sid, features in by_sae.items():
        sae = scope.saes[sid]
        labels = feature_labels(sae)
        with sae.file.connect() as conn:
            peaks = peak_tokens(conn, sae, features)
        for feature in features:
            label, kind, density = labels.get(feature, (None, None, None))
            nodes.append({"id": _node_id(sid, feature), "sae_id": sid, "run": scope.url_run(sae), "feature": feature,
                          "column": column[sid],
                          "layer": sae.layer, "site": sae.site, "label": label or "", "label_kind": kind,
                          "density": density, "top_tokens": top_tokens(peaks.get(feature, []), vocab),
                          "start": (sid, feature) == start, "score": scores[(sid, feature)]})
    nodes.sort(key=lambda n: (n["column"], not n["start"], -(n["score"] or 0.0), n["sae_id"], n["feature"]))
    return nodes
