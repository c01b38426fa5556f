"""Contrastive search and detectors:

    /{model}/-/contrast                       the form (GET; .json: SAEs, pools and limits); POST starts a run
    /{model}/-/contrast/{run}                 a run's progress (htmx polls it), then its ranking; .json twin
    /{model}/-/contrast/{run}/cancel          POST: stop a run between micro-batches
    /{model}/-/contrast/{run}/detector        POST name, k: save the top k features as a detector
    /{model}/-/detectors/{name}?text=...      a detector, applied live to a prompt; .json twin

POSTs take a form (application/x-www-form-urlencoded: a, b, a_file + a_file_name, b_file + b_file_name, saes,
pool, label_a, label_b; name, k) or, at the .json path, the same fields as a JSON object (a and b as lists).
"""

from __future__ import annotations

import time
from typing import Annotated, Any
from urllib.parse import parse_qs

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response

from featurescope.app.contrast import POOLS
from featurescope.app.contrast_runs import DEFAULT_LABELS, ContrastRequest, ContrastRun, fit_run
from featurescope.app.deps import CatalogDep, ContrastRunsDep, DetectorsDep, RendererDep, SettingsDep, UrlsDep
from featurescope.app.detectors import DetectorError, check_name
from featurescope.app.errors import InvalidParameter, NotFound, nearest_names
from featurescope.app.live import EncodeJob
from featurescope.app.prompt_sets import PromptSetError, check_sets, parse_prompts
from featurescope.app.routes.live import _check_text_size, _server_timing, run_job
from featurescope.app.stored import token_texts
from featurescope.app.token_html import display_forms
from featurescope.app.twin_models import LIVE_ERROR_RESPONSES, ContrastFormView, ContrastRunView, DetectorView
from featurescope.app.twins import page, wants_json
from featurescope.app.urls import APP_PREFIX
from featurescope.app.views.contrast import DEFAULT_TOP, MAX_TOP, contrast_form_view, contrast_run_view
from featurescope.app.views.detector import applied_view, detector_view

router = APIRouter(tags=["contrast"])

MAX_DETECTOR_FEATURES = 32
DEFAULT_DETECTOR_FEATURES = 5
MAX_LABEL_CHARS = 40


async def _fields(request: Request) -> tuple[dict[str, list[str]], bool]:
    """The POST's fields as lists of strings, and whether it asked for JSON (the .json path or a JSON body)."""
    body = await request.body()
    as_json = request.url.path.endswith(".json")
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            data = orjson.loads(body or b"{}")
        except orjson.JSONDecodeError as exc:
            raise InvalidParameter("body", f"The request body is not JSON: {exc}.") from None
        if not isinstance(data, dict):
            raise InvalidParameter("body", "The request body must be a JSON object.")
        fields: dict[str, list[str]] = {}
        for key, value in data.items():
            values = value if isinstance(value, list) else [value]
            fields[key] = [v if isinstance(v, str) else orjson.dumps(v).decode() for v in values]
        return fields, True
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True), as_json


def _one(fields: dict[str, list[str]], name: str, default: str = "") -> str:
    return (fields.get(name) or [default])[0]


def _prompt_set(fields: dict[str, list[str]], key: str, as_list: bool) -> list[str]:
    if as_list:  # JSON: one prompt per list item, newlines and all
        prompts = [p for p in fields.get(key, []) if p.strip()]
    else:
        prompts = parse_prompts("\n".join(fields.get(key, [])), None, key)
    upload = _one(fields, f"{key}_file")
    if upload.strip():
        prompts += parse_prompts(upload, _one(fields, f"{key}_file_name") or "upload.txt", key)
    return prompts


def _run(runs: Any, model_id: str, run_id: str) -> ContrastRun:
    run = runs.get(model_id, run_id)
    if run is None:
        raise NotFound("contrast_run", run_id, f"There is no contrast run {run_id!r} for {model_id} on this server: runs "
                                               "live in its memory (the newest few, until it restarts). Start a new one.",
                       model_id=model_id)
    return run


# ------------------------------------------------------------------------------------------ the form
@page(router, "/{model_id}" + APP_PREFIX + "/contrast", twin=ContrastFormView,
      summary="Contrast two sets of prompts: the form, its SAEs and limits")
def contrast_form(request: Request, model_id: str, catalog: CatalogDep, render: RendererDep, settings: SettingsDep,
                  detectors: DetectorsDep, urls: UrlsDep) -> Response:
    model = catalog.model(model_id)
    view = contrast_form_view(model, settings, _briefs(detectors, model.id, urls))
    return render.respond(request, "contrast.html", view, model=model.as_dict())


def _briefs(detectors: Any, model_id: str, urls: Any) -> list[dict[str, Any]]:
    return [dict(d, url=urls.detector(model_id, d["name"])) for d in detectors.names(model_id)]


@router.post("/{model_id}" + APP_PREFIX + "/contrast.json", include_in_schema=False)
@router.post("/{model_id}" + APP_PREFIX + "/contrast", include_in_schema=False)
async def start_contrast(request: Request, model_id: str, catalog: CatalogDep, runs: ContrastRunsDep,
                         settings: SettingsDep, urls: UrlsDep, render: RendererDep) -> Response:
    model = catalog.model(model_id)
    fields, as_json = await _fields(request)
    a, b = _prompt_set(fields, "a", as_json), _prompt_set(fields, "b", as_json)
    check_sets(a, b, settings.max_contrast_prompts)
    for key, prompts in (("a", a), ("b", b)):
        for number, prompt in enumerate(prompts, 1):
            try:
                _check_text_size(prompt, settings, key)
            except InvalidParameter as exc:
                raise InvalidParameter(key, f"Prompt {number} of set {key.upper()}: {exc.message}") from None
    wanted = [s for s in fields.get("saes", []) if s.strip()]
    unknown = [s for s in wanted if s not in model.saes]
    if unknown:
        near = nearest_names(unknown[0], list(model.saes))
        raise InvalidParameter("saes", f"Model {model.id} has no SAE {unknown[0]!r}" + (f" (did you mean {', '.join(near)}?)"
                                                                                      if near else "") + ".")
    saes = [model.saes[s] for s in dict.fromkeys(wanted)] or list(model.saes.values())
    pool = _one(fields, "pool", "max")
    if pool not in POOLS:
        raise InvalidParameter("pool", f"pool must be one of {', '.join(POOLS)} (got {pool!r}).")
    labels = tuple((_one(fields, f"label_{k}").strip() or d)[:MAX_LABEL_CHARS] for k, d in zip("ab", DEFAULT_LABELS))
    live = request.app.state.live.model(model)
    run = runs.start(live, model.id, ContrastRequest(saes, a, b, pool, labels), settings.max_batch)
    if as_json:
        return render.json({"run_id": run.id, "state": run.state, "total": run.total,
                            "url": urls.contrast_run(model.id, run.id, "json"), "page": urls.contrast_run(model.id, run.id)},
                           status=202)
    return RedirectResponse(urls.contrast_run(model.id, run.id), status_code=303)


# ------------------------------------------------------------------------------------------- a run
@page(router, "/{model_id}" + APP_PREFIX + "/contrast/{run_id}", twin=ContrastRunView,
      summary="A contrast run: its progress, then the features ranked by how well they separate the sets")
def contrast_run(request: Request, model_id: str, run_id: str, catalog: CatalogDep, runs: ContrastRunsDep,
                 render: RendererDep, urls: UrlsDep,
                 top: Annotated[int, Query(ge=1, le=MAX_TOP, description="Features shown across layers and per SAE.")] = DEFAULT_TOP,
                 ) -> Response:
    model = catalog.model(model_id)
    view = contrast_run_view(model, _run(runs, model.id, run_id), top, urls)
    return render.respond(request, "contrast_run.html", view, partials={"contrast-run": "_contrast_run.html"},
                          model=model.as_dict())


@router.post("/{model_id}" + APP_PREFIX + "/contrast/{run_id}/cancel", include_in_schema=False)
def cancel_contrast(request: Request, model_id: str, run_id: str, catalog: CatalogDep, runs: ContrastRunsDep,
                    render: RendererDep, urls: UrlsDep) -> Response:
    model = catalog.model(model_id)
    run = _run(runs, model.id, run_id)
    run.cancelled.set()
    if request.headers.get("HX-Request"):
        run.state = "cancelled" if run.state == "running" else run.state  # the task stops at its next check
        return render.html("_contrast_run.html", data=contrast_run_view(model, run, DEFAULT_TOP, urls), request=request,
                           model=model.as_dict())
    return RedirectResponse(urls.contrast_run(model.id, run.id), status_code=303)


@router.post("/{model_id}" + APP_PREFIX + "/contrast/{run_id}/detector.json", include_in_schema=False)
@router.post("/{model_id}" + APP_PREFIX + "/contrast/{run_id}/detector", include_in_schema=False)
async def save_detector(request: Request, model_id: str, run_id: str, catalog: CatalogDep, runs: ContrastRunsDep,
                        detectors: DetectorsDep, render: RendererDep, urls: UrlsDep) -> Response:
    model = catalog.model(model_id)
    run = _run(runs, model.id, run_id)
    fields, as_json = await _fields(request)
    name = check_name(_one(fields, "name").strip())
    try:
        k = int(_one(fields, "k", str(DEFAULT_DETECTOR_FEATURES)))
    except ValueError:
        raise DetectorError("k", f"k must be a whole number of features (got {_one(fields, 'k')!r}).") from None
    if not 1 <= k <= MAX_DETECTOR_FEATURES:
        raise DetectorError("k", f"k must be from 1 to {MAX_DETECTOR_FEATURES} (got {k}).")
    doc = fit_run(run, name, k)
    detectors.save(doc)
    if as_json:
        return render.json({"detector": doc, "url": urls.detector(model.id, name, "json"),
                            "page": urls.detector(model.id, name)}, status=201)
    return RedirectResponse(urls.detector(model.id, name), status_code=303)


# ---------------------------------------------------------------------------------------- detectors
@page(router, "/{model_id}" + APP_PREFIX + "/detectors/{name}", twin=DetectorView, responses=LIVE_ERROR_RESPONSES,
      summary="A saved detector; ?text= applies it live (per-token and per-prompt score)")
async def detector(request: Request, model_id: str, name: str, catalog: CatalogDep, detectors: DetectorsDep,
                   render: RendererDep, urls: UrlsDep, settings: SettingsDep,
                   text: Annotated[str, Query(description="A prompt to apply the detector to (live).")] = "") -> Response:
    started = time.perf_counter()
    model = catalog.model(model_id)
    doc = detectors.get(model.id, name)
    if doc is None:
        names = [d["name"] for d in detectors.names(model.id)]
        raise NotFound("detector", name, f"Model {model.id} has no detector {name!r}.", model_id=model.id,
                       choices=nearest_names(name, names))
    context = {"model": model.as_dict(), "forms": display_forms(token_texts(model), model.special_token_ids)}
    if not text.strip():
        return render.respond(request, "detector.html", detector_view(model, doc, urls), **context)
    _check_text_size(text, settings)
    features = doc["features"]
    saes = [catalog.sae(model.id, sae_id) for sae_id in doc["sae_ids"]]
    columns: dict[str, list[int]] = {}
    for f in features:
        columns.setdefault(f["sae_id"], []).append(int(f["index"]))
    job = EncodeJob(saes=saes, text=text, pool=doc["pool"], columns=columns)
    result = await run_job(request, request.app.state.live.model(model), job, settings.live_timeout_seconds)
    view = detector_view(model, doc, urls, applied_view(model, doc, text, result))
    response = render.respond(request, "detector.html", view, partials={"detector-applied": "_detector_applied.html"},
                              push_url=urls.detector(model.id, name, text=text), **context)
    return _server_timing(response, started, result)
