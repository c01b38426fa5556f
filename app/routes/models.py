"""A model's page: its SAEs (the home page narrowed to one model)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from featurescope.app.views.home import model_view
from featurescope.app.deps import CatalogDep, DetectorsDep, RendererDep, UrlsDep
from featurescope.app.twin_models import ModelView
from featurescope.app.twins import page

router = APIRouter(tags=["models"])


@page(router, "/{model_id}", twin=ModelView, summary="One model and its SAEs, as a layer x site grid",
      description="`layer`, `site` (att, mlp, res) and `width` (e.g. 16k) narrow the SAEs shown.")
def model(request: Request, model_id: str, catalog: CatalogDep, render: RendererDep, detectors: DetectorsDep,
          urls: UrlsDep, layer: str | None = None, site: str | None = None, width: str | None = None) -> Response:
    model_id = catalog.model(model_id).id
    saved = [dict(d, url=urls.detector(model_id, d["name"])) for d in detectors.names(model_id)]
    # "" is the jump form's "any"
    return render.respond(request, "model.html", model_view(catalog, model_id, saved, layer or None, site or None, width or None))
