"""Shared FastAPI dependencies as named Annotated aliases. Everything comes from app.state, which
create_app fills; nothing is created at import time.

FastAPI runs a plain `def` dependency in its threadpool, a thread hop per dependency per request: the ones
that only read app.state are `async def` so they run inline. get_catalog stays `def`, since
CatalogSource.current() reads a newly published file's catalog from disk."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from featurescope.app.catalog import Catalog
from featurescope.app.contrast_runs import ContrastRuns
from featurescope.app.detectors import DetectorStore
from featurescope.app.responses import Renderer
from featurescope.app.settings import Settings
from featurescope.app.urls import Urls


def get_catalog(request: Request) -> Catalog:
    """The catalog, re-listed first when it lacks the model, SAE or run the URL names (a file just published)."""
    params = request.path_params
    return request.app.state.catalogs.current(params.get("model_id"), params.get("sae_id"), request.query_params.get("run"))


async def get_renderer(request: Request) -> Renderer:
    return request.app.state.renderer


async def get_urls(request: Request) -> Urls:
    return request.app.state.urls


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_detectors(request: Request) -> DetectorStore:
    return request.app.state.detectors


async def get_contrast_runs(request: Request) -> ContrastRuns:
    return request.app.state.contrast_runs


CatalogDep = Annotated[Catalog, Depends(get_catalog)]
RunParam = Annotated[str | None, Query(max_length=64, description="Run id (or an unambiguous prefix of one) of the SAE's "
                                       "precompute over one corpus; default: its newest run.")]
RendererDep = Annotated[Renderer, Depends(get_renderer)]
UrlsDep = Annotated[Urls, Depends(get_urls)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

DetectorsDep = Annotated[DetectorStore, Depends(get_detectors)]
ContrastRunsDep = Annotated[ContrastRuns, Depends(get_contrast_runs)]
