"""The one way to say `.json`: every page is registered by `page(...)` at its path and at the same path plus
`.json`, its JSON twin, with one handler. The route that matched says which one was asked for
(`wants_json`), never the catalog or the URL's text, so an id never changes what a suffix means.

    @page(router, "/{model_id}", twin=ModelView, summary="One model and its SAEs")
    def model(request: Request, model_id: str, ...) -> Response:
        return render.respond(request, "model.html", view)      # JSON for the twin, HTML (or a fragment) otherwise

Only twins are in /-/openapi.json, each with its `response_model` and the error bodies it may answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

from featurescope.app.twin_models import ERROR_RESPONSES

JSON_SUFFIX = ".json"


def twin_path(path: str) -> str:
    return path.rstrip("/") + "/.json" if path.endswith("/") else path + JSON_SUFFIX


def wants_json(request: Request) -> bool:
    """Whether a request is for a JSON twin: the route it matched is one; for a path no route matched (a
    404), whether the path ends in .json."""
    route = request.scope.get("route")
    path = getattr(route, "path", None) or request.url.path
    return path.endswith(JSON_SUFFIX)


def page(router: APIRouter, path: str, *, twin: Any, summary: str, responses: dict[int, Any] | None = None,
         description: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a GET handler as the page at `path` and as its JSON twin at `path.json` (documented with
    `twin` as its response model). The twin is registered first: `/x.json` is x's twin, never a page of an
    id `x.json`."""
    def register(handler: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(twin_path(path), handler, methods=["GET"], response_model=twin, summary=summary,
                             description=description, responses=responses or ERROR_RESPONSES,
                             name=f"{handler.__name__}_json")
        router.add_api_route(path, handler, methods=["GET"], include_in_schema=False, name=handler.__name__)
        return handler
    return register

