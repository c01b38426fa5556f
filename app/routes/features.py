"""The feature page (/{model}/{sae}/{index}): statistics, charts, highlighted examples, neighbours,
the test box and sharing; plus /-/random and /-/jump below the SAE, which redirect to a feature's stable
URL. `?context=full` shows whole contexts (htmx swaps #examples), `?embed=1` just the dashboard, `?run=` the
feature as another run (corpus) of the SAE computed it; every link of the page keeps it."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response

from featurescope.app import charts
from featurescope.app.catalog import SAEInfo, check_index
from featurescope.app.stored import token_texts
from featurescope.app.token_html import display_forms, show_examples
from featurescope.app.views.feature import feature_view
from featurescope.app.views.runs import chosen_run
from featurescope.app.views.sae import random_feature as random_alive_feature
from featurescope.app.deps import CatalogDep, RunParam, UrlsDep
from featurescope.app.errors import NotFound
from featurescope.app.security import embed_policy
from featurescope.app.twin_models import FeatureView
from featurescope.app.twins import page, wants_json
from featurescope.app.urls import APP_PREFIX

router = APIRouter(tags=["features"])
INDEX = re.compile(r"-?[0-9]{1,12}")


@router.get("/{model_id}/{sae_id}" + APP_PREFIX + "/random", include_in_schema=False)
def random_feature(model_id: str, sae_id: str, catalog: CatalogDep, urls: UrlsDep, run: RunParam = None) -> Response:
    """Redirect to a random feature that fired (in run `run`, kept in the URL)."""
    sae, run = chosen_run(catalog, model_id, sae_id, run)
    index = random_alive_feature(catalog, model_id, sae_id, run=sae.run_id)
    return RedirectResponse(urls.feature(model_id, sae_id, index, run=run), status_code=302)


@router.get("/{model_id}/{sae_id}" + APP_PREFIX + "/jump", include_in_schema=False)
def jump(model_id: str, sae_id: str, catalog: CatalogDep, urls: UrlsDep,
         index: Annotated[int, Query(description="Feature index.")], run: RunParam = None) -> Response:
    """Redirect to feature `index` (the jump-to box), in run `run`, kept in the URL."""
    sae, run = chosen_run(catalog, model_id, sae_id, run)
    check_index(sae, index)
    return RedirectResponse(urls.feature(model_id, sae_id, index, run=run), status_code=302)


def feature_index(sae: SAEInfo, index: str) -> int:
    """A feature index from the URL; anything but a number is a 404 naming the valid range."""
    if not INDEX.fullmatch(index):
        raise NotFound("feature", index, f"{index!r} is not a feature index: SAE {sae.id!r} has features 0 to {sae.d_sae - 1}.",
                       model_id=sae.model_id, sae_id=sae.id, choices=[0], valid_range=(0, sae.d_sae - 1))
    return int(index)


@page(router, "/{model_id}/{sae_id}/{index}", twin=FeatureView, summary="A feature's dashboard")
def feature(
    request: Request, model_id: str, sae_id: str, index: str,
    text: Annotated[str, Query(max_length=20000, description="Text typed into the test box, kept in the URL.")] = "",
    context: Annotated[Literal["snippet", "full"], Query(description="Examples as snippets around the maximum, or whole contexts.")] = "snippet",
    embed: Annotated[bool, Query(description="Only the dashboard, for an iframe.")] = False,
    run: RunParam = None,
) -> Response:
    # The busiest page reads app.state itself: solving four Depends (each plain `def` one a threadpool hop)
    # cost ~0.3 ms a request, about as much as drawing its two charts.
    state = request.app.state
    catalog, render, urls, settings = state.catalogs.current(model_id, sae_id, run), state.renderer, state.urls, state.settings
    sae = catalog.sae(model_id, sae_id, run)
    view = feature_view(catalog, model_id, sae_id, feature_index(sae, index), text, run)
    view = {**view, "test": {**view["test"], "live_encoding": settings.live}}
    if wants_json(request):
        return render.json(view)
    model = catalog.model(model_id)
    forms = display_forms(token_texts(model), model.special_token_ids)
    page_url = urls.feature(model_id, sae_id, view["index"], run=view["run"])
    share_params = {"run": view["run"], "text": text or None, "context": context if context != "snippet" else None}
    base = str(request.base_url).rstrip("/")
    response = render.respond(
        request, "embed.html" if embed else "feature.html", view, partials={"examples": "_examples.html"},
        examples=show_examples(view, context, forms), context=context, embed=embed,
        activation_chart=charts.activation_histogram(view["activation_histogram"]),
        logit_chart=charts.logit_histogram(view["logits"]["histogram"]),
        share_url=base + urls.feature(model_id, sae_id, view["index"], **share_params),
        embed_url=base + urls.feature(model_id, sae_id, view["index"], embed=1, **share_params),
        canonical_url=base + page_url,
    )
    if embed:
        response.headers["Content-Security-Policy"] = embed_policy(settings)  # made to be framed by any site
    return response
