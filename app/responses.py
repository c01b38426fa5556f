"""Responses: Jinja2 pages (autoescaped, compiled once), their JSON twins and htmx fragments.

One view's data goes to `Renderer.respond`, which answers JSON for a JSON twin (app/twins.py), the named
partial when htmx asks for a fragment (its HX-Target header names the element to replace), and the page
otherwise.
"""

from __future__ import annotations

from typing import Any

import jinja2
import orjson
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from featurescope.app.filters import count, link_groups, number, percent
from featurescope.memory import format_bytes
from featurescope.app.stored import TokenStrings
from featurescope.app.settings import Settings
from featurescope.app.token_html import highlight_scale, live_token, token_html, visible
from featurescope.app.twins import wants_json
from featurescope.app.urls import Urls
from featurescope.assets import asset_dir


class TwinJSONResponse(JSONResponse):
    """Strict JSON, UTF-8 and compact: NaN and infinities, which DuckDB FLOAT columns can hold, become null
    (orjson's rule)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=_as_json, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


def _as_json(value: Any) -> Any:
    if isinstance(value, TokenStrings):
        return value.as_list()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_DICT_ATTRIBUTES = frozenset(dir(dict))


class Environment(jinja2.Environment):
    """Jinja's environment with a fast `{{ d.key }}` for a dict d, the views' usual shape: Jinja tries the
    attribute first and only finds the key after an AttributeError, ~0.4 µs a lookup, hundreds per page.
    Names of dict attributes (items, values...) still give the attribute, as in Jinja."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)


class Renderer:
    def __init__(self, settings: Settings, urls: Urls) -> None:
        self.env = Environment(loader=jinja2.FileSystemLoader(asset_dir("templates")), autoescape=True, auto_reload=False,
                               undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.globals.update(urls=urls, settings=settings, htmx_integrity=settings.htmx_integrity, token_html=token_html,
                                live_token=live_token, highlight_scale=highlight_scale)
        self.env.filters.update(percent=percent, number=number, count=count, visible=visible,
                                link_groups=link_groups, bytes=format_bytes)

    def html(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(self.env.get_template(template).render(**context), status_code=status,
                            headers={"Vary": "HX-Request, HX-Target"})

    def json(self, data: Any, status: int = 200) -> JSONResponse:
        return TwinJSONResponse(data, status_code=status)

    def respond(self, request: Request, template: str, data: dict[str, Any], partials: dict[str, str] | None = None,
                push_url: str | None = None, **context: Any) -> Response:
        if wants_json(request):
            return self.json(data)
        target = request.headers.get("HX-Target") if request.headers.get("HX-Request") else None
        if target and partials and target in partials:
            response = self.html(partials[target], data=data, request=request, **context)
            if push_url:
                response.headers["HX-Push-Url"] = push_url
            return response
        return self.html(template, data=data, request=request, **context)
