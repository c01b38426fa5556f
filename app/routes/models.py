"""A model's page: its SAEs (the home page narrowed to one model)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from featurescope.app import data
from featurescope.app.deps import CatalogDep, RendererDep, split_format

router = APIRouter(tags=["models"])


@router.get("/{model_id}", summary="One model and its SAEs (append .json for JSON)")
def model(request: Request, model_id: str, catalog: CatalogDep, render: RendererDep) -> Response:
    model_id, fmt = split_format(model_id, catalog.has_model(model_id))
    return render.respond(request, fmt, "model.html", data.model_view(catalog, model_id))
