"""The home page (every model and its SAEs) and a model's page (the home page narrowed to one model, and
to a layer, site kind or width when the page's query asks). Both show a model's SAEs as a layer x site grid:
Gemma Scope has 26 layers x 3 sites per width, which no single table reads well."""

from __future__ import annotations

from dataclasses import asdict

from featurescope.app.catalog import Catalog
from featurescope.app.errors import InvalidParameter
from featurescope.app.twin_models import DetectorBrief, HomeView, ModelView, SAEGrid, SAEOut
from featurescope.flow import flow_key
from featurescope.sae_sources import width_label


def home(catalog: Catalog) -> HomeView:
    models = [m.as_dict() for m in catalog.models.values()]
    return {"models": [{**m, "grid": sae_grid(m["saes"])} for m in models], "databases": catalog.n_files,
            "problems": [asdict(p) for p in catalog.problems]}


def model_view(catalog: Catalog, model_id: str, detectors: list[DetectorBrief] | None = None, layer: str | None = None,
               site: str | None = None, width: str | None = None) -> ModelView:
    """A model and its SAEs; `layer` (a number), `site` (att, mlp, res) and `width` (e.g. 16k) narrow the grid.
    `detectors`: the model's saved detectors (app/detectors.py), listed below its SAEs."""
    model = catalog.model(model_id).as_dict()
    if layer is not None:
        if not layer.isdigit():
            raise InvalidParameter("layer", f"layer must be a layer number, like 12; got {layer!r}.")
        layer = int(layer)
    if site is not None and site not in {s["site_kind"] for s in model["saes"]}:
        raise InvalidParameter("site", f"Model {model_id!r} has no {site!r} SAEs; it has "
                               f"{', '.join(sorted({s['site_kind'] for s in model['saes']}))}.")
    shown = [s for s in model["saes"] if (layer is None or s["layer"] == layer) and (site is None or s["site_kind"] == site)
             and (width is None or width_label(s["d_sae"]) == width)]
    return {"model": {**model, "grid": sae_grid(model["saes"])}, "shown": sae_grid(shown),
            "filters": {"layer": layer, "site": site, "width": width}, "detectors": detectors or [],
            "choices": {"layers": sorted({s["layer"] for s in model["saes"]}),
                        "sites": sorted({s["site_kind"] for s in model["saes"]}, key=lambda k: flow_key(0, k)),
                        "widths": sorted({width_label(s["d_sae"]) for s in model["saes"]},
                                         key=lambda w: next(s["d_sae"] for s in model["saes"] if width_label(s["d_sae"]) == w))}}


def sae_grid(saes: list[SAEOut]) -> SAEGrid:
    """Rows by layer, one column per site kind present (in forward-pass order), each cell the SAEs of that
    layer and site (several widths or L0 variants), narrowest first."""
    kinds = sorted({s["site_kind"] for s in saes}, key=lambda k: flow_key(0, k))
    rows = []
    for layer in sorted({s["layer"] for s in saes}):
        cells = [sorted((s for s in saes if s["layer"] == layer and s["site_kind"] == kind), key=lambda s: (s["d_sae"], s["id"]))
                 for kind in kinds]
        rows.append({"layer": layer, "cells": cells})
    return {"kinds": kinds, "rows": rows, "n_saes": len(saes)}
