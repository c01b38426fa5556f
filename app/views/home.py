"""The home page (every model and its SAEs) and a model's page (the home page narrowed to one model)."""

from __future__ import annotations

from dataclasses import asdict

from featurescope.app.catalog import Catalog
from featurescope.app.twin_models import HomeView, ModelView


def home(catalog: Catalog) -> HomeView:
    return {"models": [m.as_dict() for m in catalog.models.values()], "databases": catalog.n_files,
            "problems": [asdict(p) for p in catalog.problems]}


def model_view(catalog: Catalog, model_id: str) -> ModelView:
    return {"model": catalog.model(model_id).as_dict()}

