"""The lineage view (/{model}/{sae}/{index}/lineage, and .json): from one feature, its strongest
cross-layer links through every SAE of the model, drawn as a graph of columns (sites in model order).
`depth` (SAEs each way), `breadth` (features per SAE) and `by` (coact | cosine) are URL parameters."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BeforeValidator, Field

from featurescope.app import data, graph
from featurescope.app.deps import CatalogDep, RendererDep, UrlsDep
from featurescope.app.errors import NotFound

router = APIRouter(tags=["lineage"])
INDEX = re.compile(r"-?[0-9]{1,12}")


def _blank_is_none(value: object) -> object:
    """The form's empty depth field arrives as '': it means 'all SAEs'."""
    return None if isinstance(value, str) and value.strip() == "" else value


Depth = Annotated[Annotated[int, Field(ge=0, le=200)] | None, BeforeValidator(_blank_is_none)]


@router.get("/{model_id}/{sae_id}/{index}/lineage", summary="A feature's links through the layers (graph)")
@router.get("/{model_id}/{sae_id}/{index}/lineage.json", summary="A feature's links through the layers (JSON)")
def lineage(
    request: Request, model_id: str, sae_id: str, index: str, catalog: CatalogDep, render: RendererDep, urls: UrlsDep,
    depth: Annotated[Depth, Query(description="SAEs to follow each way, 0 to 200; default all.")] = None,
    breadth: Annotated[int, Query(ge=1, le=8, description="Features kept per SAE.")] = 3,
    by: Annotated[Literal["coact", "cosine"], Query(description="Score that picks the links: co-activation "
                                                                "or decoder/encoder cosine.")] = "coact",
) -> Response:
    sae = catalog.sae(model_id, sae_id)
    if not INDEX.fullmatch(index):
        raise NotFound("feature", index, f"{index!r} is not a feature index: SAE {sae_id!r} has features 0 to {sae.d_sae - 1}.",
                       model_id=model_id, sae_id=sae_id, choices=[0], valid_range=(0, sae.d_sae - 1))
    query = data.LineageQuery(depth, breadth, by)
    view = data.lineage_view(catalog, model_id, sae_id, int(index), query)
    fmt = "json" if request.url.path.endswith(".json") else None
    return render.respond(request, fmt, "lineage.html", view, query=query, layout=graph.lineage_layout(view))
