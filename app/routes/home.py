"""Home: every model and its SAEs, with quality metrics and the corpus they were run on."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from featurescope.app.views.home import home as home_view
from featurescope.app.deps import CatalogDep, RendererDep
from featurescope.app.twin_models import HomeView
from featurescope.app.twins import page

router = APIRouter(tags=["home"])


@page(router, "/", twin=HomeView, summary="Models and their SAEs")
def home(request: Request, catalog: CatalogDep, render: RendererDep) -> Response:
    return render.respond(request, "home.html", home_view(catalog))
