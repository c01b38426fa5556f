"""The home page (every model and its SAEs) and a model's page (the home page narrowed to one model)."""

from __future__ import annotations

from dataclasses import asdict

from featurescope.app.catalog import Catalog
from featurescope.app.twin_models import DetectorBrief, HomeView, ModelView


def home(catalog: Catalog) -> HomeView:
    return {"models": [m.as_dict() for m in catalog.models.values()], "databases": catalog.n_files,
            "problems": [asdict(p) for p in catalog.problems]}


def model_view(catalog: Catalog, model_id: str, detectors: list[DetectorBrief] | None = None) -> ModelView:
    """`detectors`: the model's saved detectors (app/detectors.py), listed below its SAEs."""
    return {"model": catalog.model(model_id).as_dict(), "detectors": detectors or []}

