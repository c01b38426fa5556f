"""The app's own pages, under /-/ so they never collide with model ids: health and the local htmx copy.
(/-/static and /-/docs are mounted by app/main.py.)"""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from featurescope.app.deps import CatalogDep, RendererDep, SettingsDep
from featurescope.app.twin_models import Health
from featurescope.app.urls import APP_PREFIX, LOCAL_HTMX_PATH

router = APIRouter(prefix=APP_PREFIX, tags=["app"])


@router.get("/health", summary="Readiness and what the server is serving", response_model=Health,
            responses={503: {"model": Health, "description": "A worker process is still reading its data dir"}})
def health(request: Request, catalog: CatalogDep, render: RendererDep) -> Response:
    """200 once every worker process has read the data dir; 503 with Retry-After while any is starting."""
    ready, workers = request.app.state.readiness()
    body = {"status": "ok" if ready == workers else "starting", "pid": os.getpid(), "workers": workers,
            "workers_ready": ready, "databases": catalog.n_files, "models": len(catalog.models),
            "saes": sum(len(m.saes) for m in catalog.models.values()),
            "problems": [{"database": p.name, "error": p.error} for p in catalog.problems]}
    if ready < workers:
        response = render.json(body, status=503)
        response.headers["Retry-After"] = "1"
        return response
    return render.json(body)


@router.get(LOCAL_HTMX_PATH.removeprefix(APP_PREFIX), include_in_schema=False)
def local_htmx(settings: SettingsDep) -> Response:
    if settings.local_htmx is None:
        return Response("htmx is loaded from its CDN on this server.", status_code=404, media_type="text/plain")
    return FileResponse(settings.local_htmx, media_type="text/javascript", headers={"Cache-Control": "public, max-age=3600"})
