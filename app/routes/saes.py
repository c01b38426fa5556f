"""The SAE page: its features as a sortable, filterable, paginated table, searchable by label and by
peak token, with the SAE's density histogram. htmx swaps just the table (#features) on sort, filter
and page changes, and pushes the URL, so every state is a shareable link."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BeforeValidator, Field

from featurescope.app import charts
from featurescope.app.views.sae import FeatureQuery, Show, SortKey, sae_view
from featurescope.schema import DENSE_THRESHOLD
from featurescope.app.deps import CatalogDep, RendererDep, RunParam, UrlsDep
from featurescope.app.twin_models import SAEView
from featurescope.app.twins import page

router = APIRouter(tags=["saes"])


def _blank_is_none(value: object) -> object:
    """An empty number field of the filter form arrives as '': it means 'no bound', not an error."""
    return None if isinstance(value, str) and value.strip() == "" else value


Density = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
OptionalDensity = Annotated[Density | None, BeforeValidator(_blank_is_none)]


@page(router, "/{model_id}/{sae_id}", twin=SAEView, summary="An SAE's features: sortable, filterable, paginated")
def sae(
    request: Request, model_id: str, sae_id: str, catalog: CatalogDep, render: RendererDep, urls: UrlsDep,
    sort: Annotated[SortKey, Query(description="Column to sort by.")] = "index",
    desc: Annotated[bool, Query(description="Sort descending.")] = False,
    page: Annotated[int, Query(ge=1, le=10_000_000, description="Page number, from 1.")] = 1,
    size: Annotated[int, Query(ge=1, le=500, description="Rows per page.")] = 50,
    show: Annotated[Show, Query(description="all, alive (fired at least once), dead (never fired), "
                                            f"dense (fires on more than {DENSE_THRESHOLD:.0%} of tokens).")] = "all",
    min_density: Annotated[OptionalDensity, Query(description="Lowest density (share of tokens), inclusive.")] = None,
    max_density: Annotated[OptionalDensity, Query(description="Highest density (0 to 1), inclusive.")] = None,
    q: Annotated[str, Query(max_length=200, description="Text the label contains (case-insensitive).")] = "",
    token: Annotated[str, Query(max_length=200, description="Token the top examples peak on, e.g. ' Paris'.")] = "",
    run: RunParam = None,
) -> Response:
    query = FeatureQuery(sort, desc, page, size, show, min_density, max_density, q, token)
    view = sae_view(catalog, model_id, sae_id, query, run)
    # htmx pushes this canonical URL (defaults and blank fields dropped) rather than the raw form query.
    canonical = urls.sae(model_id, sae_id, run=view["run"], **query.params())
    return render.respond(request, "sae.html", view, partials={"features": "_features.html"}, push_url=canonical,
                          query=query, density_chart=charts.density_histogram(view["density_histogram"]))
