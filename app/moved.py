"""The app's pages below a model, SAE or feature used to sit beside the ids (/{model}/encode, where an SAE
called "encode" hid the page, or the page hid it); they live under /-/ now (/{model}/-/encode). This
middleware answers the old addresses with 308 to the new ones, query string kept, so links shared before
the move keep working; an old model-level address that names an SAE of that model is that SAE's page.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.responses import RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from featurescope.app.urls import APP_PREFIX

MODEL_PAGE = re.compile(r"^/(?P<model>[^/]+)/(?P<page>encode|steer)(?:\.json)?$")
SAE_PAGE = re.compile(r"^/[^/]+/[^/]+/(?:random|jump)$")
FEATURE_PAGE = re.compile(r"^/[^/]+/[^/]+/[^/]+/(?:test|lineage)(?:\.json)?$")


def new_address(path: str) -> str:
    """/{...}/page -> /{...}/-/page: the app page under the same model, SAE or feature."""
    head, _, last = path.rpartition("/")
    return f"{head}{APP_PREFIX}/{last}"


class MovedPages:
    def __init__(self, app: ASGIApp, catalogs: Any) -> None:
        self.app, self.catalogs = app, catalogs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(APP_PREFIX + "/") and await self._moved(scope["path"]):
            query = scope.get("query_string", b"").decode("latin-1")
            raw = scope.get("raw_path")
            target = new_address(raw.decode("latin-1") if raw else scope["path"]) + (f"?{query}" if query else "")
            await RedirectResponse(target, status_code=308)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _moved(self, path: str) -> bool:
        if SAE_PAGE.match(path) or FEATURE_PAGE.match(path):
            return True  # a feature index is a number: nothing can live at these addresses now
        found = MODEL_PAGE.match(path)
        if found is None:
            return False
        model_id, page = found["model"], found["page"]  # ASGI paths arrive percent-decoded
        catalog = await run_in_threadpool(self.catalogs.current, model_id, page)
        return not catalog.has_sae(model_id, page)
