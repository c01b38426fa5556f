"""The lineage view (/{model}/{sae}/{index}/-/lineage, and .json): from one feature, its strongest
cross-layer links through every SAE of the model, drawn as a graph of columns (sites in model order).
`depth` (SAEs each way), `breadth` (features per SAE) and `by` (coact | cosine) are URL parameters."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BeforeValidator, Field

from featurescope.app import graph
from featurescope.app.views.lineage import LineageQuery, lineage_view
from featurescope.app.deps import CatalogDep, RendererDep, RunParam
from featurescope.app.routes.features import feature_index
from featurescope.app.twin_models import LineageView
from featurescope.app.twins import page
from featurescope.app.urls import APP_PREFIX

router = APIRouter(tags=["lineage"])


def _blank_is_none(value: object) -> object:
    """The form's empty depth field arrives as '': it means 'all SAEs'."""
    return None if isinstance(value, str) and value.strip() == "" else value


Depth = Annotated[Annotated[int, Field(ge=0, le=200)] | None, BeforeValidator(_blank_is_none)]


@page(router, "/{model_id}/{sae_id}/{index}" + APP_PREFIX + "/lineage", twin=LineageView,
      summary="A feature's links through the layers, as a graph")
def lineage(
    request: Request, model_id: str, sae_id: str, index: str, catalog: CatalogDep, render: RendererDep,
    depth: Annotated[Depth, Query(description="SAEs to follow each way, 0 to 200; default all.")] = None,
    breadth: Annotated[int, Query(ge=1, le=8, description="Features kept per SAE.")] = 3,
    by: Annotated[Literal["coact", "cosine"], Query(description="Score that picks the links: co-activation "
                                                                "or decoder/encoder cosine.")] = "coact",
    run: RunParam = None,
) -> Response:
    sae = catalog.sae(model_id, sae_id, run)
    query = LineageQuery(depth, breadth, by)
    view = lineage_view(catalog, model_id, sae_id, feature_index(sae, index), query, run)
    return render.respond(request, "lineage.html", view, query=query, layout=graph.lineage_layout(view))
