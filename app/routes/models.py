"""A model's page: its SAEs (the home page narrowed to one model)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from featurescope.app.views.home import model_view
from featurescope.app.deps import CatalogDep, RendererDep
from featurescope.app.twin_models import ModelView
from featurescope.app.twins import page

router = APIRouter(tags=["models"])


@page(router, "/{model_id}", twin=ModelView, summary="One model and its SAEs")
def model(request: Request, model_id: str, catalog: CatalogDep, render: RendererDep) -> Response:
    return render.respond(request, "model.html", model_view(catalog, model_id))
