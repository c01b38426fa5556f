"""Home: every model and its SAEs, with quality metrics and the corpus they were run on."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from featurescope.app import data
from featurescope.app.deps import CatalogDep, RendererDep

router = APIRouter(tags=["home"])


@router.get("/", summary="Models and their SAEs (HTML; /.json for JSON)")
def home(request: Request, catalog: CatalogDep, render: RendererDep) -> Response:
    return render.respond(request, None, "home.html", data.home(catalog))


@router.get("/.json", summary="Models and their SAEs")
def home_json(request: Request, catalog: CatalogDep, render: RendererDep) -> Response:
    return render.respond(request, "json", "home.html", data.home(catalog))
