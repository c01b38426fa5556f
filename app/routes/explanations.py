"""/{model}/-/explanations?q=...: the features of every SAE of a model whose explanations match the query,
ranked (app/views/explanations.py), and its JSON twin."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from featurescope.app.deps import CatalogDep, RendererDep, UrlsDep
from featurescope.app.explanations import SEARCH_LIMIT
from featurescope.app.twin_models import ExplanationSearchView
from featurescope.app.twins import page
from featurescope.app.urls import APP_PREFIX
from featurescope.app.views.explanations import search_view

router = APIRouter(tags=["explanations"])


@page(router, "/{model_id}" + APP_PREFIX + "/explanations", twin=ExplanationSearchView,
      summary="Search the explanations of every SAE of a model, ranked")
def explanations(request: Request, model_id: str, catalog: CatalogDep, render: RendererDep, urls: UrlsDep,
                 q: Annotated[str, Query(max_length=200, description="Words of the explanation (a word also matches "
                                                                     "longer words it starts).")] = "",
                 limit: Annotated[int, Query(ge=1, le=500, description="Most results.")] = SEARCH_LIMIT) -> Response:
    return render.respond(request, "explanations.html", search_view(catalog, urls, model_id, q, limit))
