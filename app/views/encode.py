"""The encode page: every selected SAE's features on every token of a prompt, the prompt's top features,
the token x layer view, one highlighted feature with its cross-layer links, and search via inference;
built from the live encoder's result (app/live.py) and each feature's stored label, density and maximum.

    encode_view(model, saes, result, EncodeQuery(text="The capital of France is", token=3), max_prompt_tokens)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from featurescope.app.catalog import Catalog, ModelInfo, SAEInfo
from featurescope.app.errors import InvalidParameter, NotFound
from featurescope.app.explanations import best_explanations
from featurescope.app.live import EncodeResult
from featurescope.app.sae_cache import sae_bytes
from featurescope.app.stored import feature_briefs, token_texts
from featurescope.app.twin_models import EncodeView, LiveFeature
from featurescope.schema import DENSE_THRESHOLD

SearchScope = Literal["text", "token"]
SearchSort = Literal["activation", "relative", "density", "layer"]
Metric = Literal["count", "strength"]
SEARCH_ROWS = 50


@dataclass(frozen=True)
class EncodeQuery:
    """Everything the encode page shows is chosen by its URL; these are its parameters."""
    text: str = ""
    ids: str = ""  # comma-separated token ids instead of text (BOS included), e.g. a stored context
    mid_document: bool = False  # the prompt continues a document: its warm-up positions do not count
    saes: tuple[str, ...] = ()  # empty: the model's default SAEs (app/sae_cache.py: default_saes)
    token: int | None = None  # selected position; None: the last token
    top: int = 10  # features shown per SAE for the selected token
    metric: Metric = "count"  # token x layer view: number of active features, or their summed activation
    include_special: bool = False  # BOS (and norm outliers) in the prompt's top features and the layer view
    feature: str = ""  # "sae_id:index" to highlight across the prompt (and its linked features)
    scope: SearchScope = "text"
    sort: SearchSort = "activation"
    max_density: float | None = DENSE_THRESHOLD  # None or 1: no cap

    def __post_init__(self) -> None:
        if self.max_density is None:
            object.__setattr__(self, "max_density", 1.0)

    def params(self, **changes: Any) -> dict[str, Any]:
        """Non-default fields (after changes) as URL query parameters."""
        merged = {**asdict(self), **changes}
        default = asdict(EncodeQuery())
        out: dict[str, Any] = {}
        for name, value in merged.items():
            if value == default[name]:
                continue
            if name == "saes":
                out[name] = list(value)
            elif isinstance(value, bool):
                out[name] = int(value)
            else:
                out[name] = value
        return out

    def token_ids(self) -> list[int] | None:
        if not self.ids.strip():
            return None
        try:
            return [int(part) for part in self.ids.replace(" ", "").split(",") if part]
        except ValueError:
            raise InvalidParameter("ids", f"ids must be comma-separated token ids, e.g. 1,504,2130 (got {self.ids[:40]!r}).")

    def highlighted(self, model: ModelInfo) -> tuple[SAEInfo, int] | None:
        if not self.feature:
            return None
        sae_id, _, index = self.feature.rpartition(":")
        if not sae_id or not index.lstrip("-").isdigit():
            raise InvalidParameter("feature", f"feature must look like SAE:INDEX, e.g. {next(iter(model.saes), '12-res')}:123 "
                                              f"(got {self.feature!r}).")
        sae = model.saes.get(sae_id)
        if sae is None:
            raise NotFound("sae", sae_id, f"Model {model.id!r} has no SAE {sae_id!r}.", model_id=model.id,
                           choices=list(model.saes)[:5])
        if not 0 <= int(index) < sae.d_sae:
            raise InvalidParameter("feature", f"SAE {sae_id!r} has features 0 to {sae.d_sae - 1}; there is no feature {index}.")
        return sae, int(index)


def selected_saes(catalog: Catalog, model_id: str, wanted: tuple[str, ...], default: list[SAEInfo]) -> list[SAEInfo]:
    """The SAEs the URL names (in its order, each once), or `default` when it names none."""
    if not wanted:
        return list(default)
    return [catalog.sae(model_id, sae_id) for sae_id in dict.fromkeys(wanted)]


def sae_picker(saes: list[SAEInfo], chosen: set[str], budget_bytes: int | None, loaded: set[str]) -> dict[str, Any]:
    """The encode form's choice of SAEs from the whole release: a layer x site grid (att, mlp, res), each cell the
    SAEs of that site with their weight size and whether they are loaded now, and the chosen ones' total beside
    the server's SAE memory budget (None: no budget, live encoding off)."""
    kinds = [k for k in ("att", "mlp", "res") if any(s.site_kind == k for s in saes)]
    rows: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for sae in sorted(saes, key=lambda s: (s.layer, s.d_sae, s.id)):
        cell = rows.setdefault(sae.layer, {k: [] for k in kinds})[sae.site_kind]
        cell.append({"id": sae.id, "d_sae": sae.d_sae, "bytes": sae_bytes(sae), "chosen": sae.id in chosen,
                     "loaded": sae.id in loaded})
    chosen_bytes = sum(sae_bytes(s) for s in saes if s.id in chosen)
    return {"kinds": kinds, "rows": [{"layer": layer, "cells": cells} for layer, cells in sorted(rows.items())],
            "budget_bytes": budget_bytes, "chosen_bytes": chosen_bytes,
            "over_budget": budget_bytes is not None and chosen_bytes > budget_bytes}


def live_feature(sae: SAEInfo, index: int, activation: float) -> LiveFeature:
    """A feature as the live pages list it: its activation here beside its largest in the corpus."""
    brief = feature_briefs(sae)
    peak = float(brief.max_act[index])
    out: LiveFeature = {"sae_id": sae.id, "layer": sae.layer, "index": index, "activation": activation,
                        "relative": activation / peak if peak > 0 else None, "max_act": peak,
                        "density": float(brief.density[index]), "label": brief.labels[index] or "",
                        "label_kind": brief.label_kinds[index]}
    explanation = best_explanations(sae).get(index)
    if explanation is not None:
        out["explanation"] = explanation
    return out


def encode_view(model: ModelInfo, saes: list[SAEInfo], result: EncodeResult, query: EncodeQuery,
                max_prompt_tokens: int, links: dict[str, list[dict[str, Any]]] | None = None) -> EncodeView:
    """`links`: the highlighted feature's stored cross-layer links (app/views/feature.py: feature_links), shown with their
    live activations on this prompt."""
    vocab = token_texts(model)
    special = set(model.special_token_ids)
    ids = result.token_ids
    n = len(ids)
    selected = n - 1 if query.token is None else query.token
    if not 0 <= selected < n:
        raise InvalidParameter("token", f"token must be a position from 0 to {n - 1} of this {n}-token prompt (got {selected}).")
    warmup = result.warmup or [False] * n
    tokens = [{"pos": i, "token_id": t, "text": vocab[t], "special": t in special, "warmup": w}
              for i, (t, w) in enumerate(zip(ids, warmup))]

    layers, token_features, prompt_features = [], [], []
    for sae in saes:
        enc = result.saes[sae.id]
        shown = [query.include_special or c for c in enc.counted]
        l0 = [v if s else 0 for v, s in zip(enc.l0, shown)]
        total = [v if s else 0.0 for v, s in zip(enc.total, shown)]
        cells = l0 if query.metric == "count" else total
        top = max(max(cells, default=0), 1e-9)
        layers.append({"sae_id": sae.id, "layer": sae.layer, "site": sae.site, "counted": enc.counted,
                       "l0": l0, "total": total, "shade": [v / top for v in cells]})
        token_features.append({"sae_id": sae.id, "layer": sae.layer, "site": sae.site, "counted": enc.counted[selected],
                               "l0": enc.l0[selected],
                               "features": [live_feature(sae, f, a) for f, a in enc.token_top[selected][: query.top]]})
        prompt_features.append({"sae_id": sae.id, "layer": sae.layer, "site": sae.site,
                                "features": [dict(live_feature(sae, f, a), pos=p, token=vocab[ids[p]])
                                             for f, a, p in enc.prompt_top[: query.top]]})

    highlight = None
    wanted = query.highlighted(model)
    if wanted is not None and wanted[0].id in result.saes:
        sae, index = wanted
        acts = result.saes[sae.id].columns.get(index, [])
        counted = result.saes[sae.id].counted
        highlight = dict(live_feature(sae, index, max((a for a, c in zip(acts, counted) if c), default=0.0)), acts=acts,
                         counted=counted, links=_live_links(links or {}, result, selected))

    return {
        "model_id": model.id, "text": query.text, "ids": ids if query.ids else None,
        "tokens": tokens, "selected_token": selected,
        "saes": [{"id": s.id, "site": s.site, "layer": s.layer, "d_sae": s.d_sae} for s in saes],
        "layers": layers, "token_features": token_features, "prompt_features": prompt_features,
        "search": search_results(saes, result, query, selected),
        "highlight": highlight,
        "query": asdict(query),
        "timing": {"queue_ms": result.queue_ms, "model_ms": result.model_ms, "batch_size": result.batch_size},
        "limits": {"max_prompt_tokens": max_prompt_tokens},
    }


def _live_links(links: dict[str, list[dict[str, Any]]], result: EncodeResult, selected: int) -> dict[str, list[dict[str, Any]]]:
    """Each linked feature with its activation on this prompt: the largest over counted tokens and at the
    selected token (None when its SAE was not encoded)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for group, rows in links.items():
        out[group] = []
        for link in rows:
            enc = result.saes.get(link["sae_id"])
            acts = enc.columns.get(link["feature"]) if enc is not None else None
            live = {"live_max": None, "live_at_token": None}
            if acts is not None:
                live = {"live_max": max((a for a, c in zip(acts, enc.counted) if c), default=0.0),
                        "live_at_token": acts[selected]}
            out[group].append({**link, **live})
    return out


def search_results(saes: list[SAEInfo], result: EncodeResult, query: EncodeQuery, selected: int) -> dict[str, Any]:
    """Features of every selected SAE that fire most on the whole text (or the selected token), with
    always-on features hidden by a density cap."""
    rows = []
    for sae in saes:
        enc = result.saes[sae.id]
        if query.scope == "token":
            found = [dict(live_feature(sae, f, a), pos=selected) for f, a in enc.token_top[selected]]
        else:
            found = [dict(live_feature(sae, f, a), pos=p) for f, a, p in enc.prompt_top]
        rows.extend(r for r in found if query.max_density is None or r["density"] <= query.max_density)
    keys = {
        "activation": lambda r: -r["activation"],
        "relative": lambda r: -(r["relative"] if r["relative"] is not None else float("inf")),
        "density": lambda r: r["density"],
        "layer": lambda r: (r["layer"], -r["activation"]),
    }
    rows.sort(key=keys[query.sort])
    return {"scope": query.scope, "sort": query.sort, "max_density": query.max_density, "token": selected,
            "total": len(rows), "results": rows[:SEARCH_ROWS]}



def linked_keys(view: EncodeView) -> set[str]:
    """The "SAE:INDEX" of every feature linked to the highlighted one: the page marks them in its lists."""
    links = view["highlight"]["links"] if view["highlight"] else {}
    return {f"{link['sae_id']}:{link['feature']}" for group in links.values() for link in group}
