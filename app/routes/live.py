"""The live pages, answered by the server's live encoder (app/live.py):

    /{model}/-/encode?text=...           every selected SAE's features on every token; search via inference
    /{model}/-/steer?text=...&feature=SAE:INDEX&strength=...   default and steered continuations side by side
    /{model}/{sae}/{index}/-/test?text=... one feature on the feature page's test box text (an htmx fragment)

Each has a .json twin. Handlers are async: a request waits for the encoder without holding a thread,
and a client that disconnects cancels its job (a queued job is dropped, a generation stops).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from featurescope.app.catalog import SAEInfo, check_index
from featurescope.app.stored import feature_briefs, token_texts
from featurescope.app.token_html import display_form, display_forms
from featurescope.app.views.encode import (EncodeQuery, Metric, SearchScope, SearchSort, encode_view, linked_keys, sae_picker,
                                           selected_saes)
from featurescope.app.views.feature import feature_links
from featurescope.app.views.feature_test import feature_test_view
from featurescope.schema import DENSE_THRESHOLD
from featurescope.app.views.steer import steer_view
from featurescope.app.deps import CatalogDep, RendererDep, SettingsDep, UrlsDep
from featurescope.app.errors import InvalidParameter
from featurescope.app.live import TOKEN_TOP_K, EncodeJob, LiveUnavailable, PromptRejected, SteerJob
from featurescope.app.sae_cache import OverBudget
from featurescope.app.routes.saes import OptionalDensity
from featurescope.app.twin_models import LIVE_ERROR_RESPONSES, EncodeView, FeatureTestView, SteerView
from featurescope.app.twins import page, wants_json
from featurescope.app.urls import APP_PREFIX

if TYPE_CHECKING:
    from featurescope.app.live_encoder import LiveModel

router = APIRouter(tags=["live"])

STRENGTH_LIMIT = 1000.0  # |strength| a steering request may ask for, in activation units
DEFAULT_STRENGTH_MULTIPLE = 2.0  # a feature's default steering strength, times its largest activation seen
MAX_STEERED_FEATURES = 8
DEFAULT_NEW_TOKENS = 24


class ClientGone(Exception):
    """The client disconnected while its job waited or ran."""


async def run_job(request: Request, live: LiveModel, job: EncodeJob | SteerJob, timeout: float) -> Any:
    """Submit a job and wait for it without blocking the event loop, cancelling it if the client leaves."""
    future = live.submit(job)
    waiting = asyncio.wrap_future(future)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.25)
            if done:
                return waiting.result()
            if await request.is_disconnected():
                raise ClientGone
            if time.monotonic() > deadline:
                raise LiveUnavailable(f"The live encoder did not answer within {timeout:.0f} s; try again shortly.")
    except asyncio.CancelledError:
        raise ClientGone
    except PromptRejected as exc:
        raise InvalidParameter(exc.param, exc.message)
    except OverBudget as exc:
        raise InvalidParameter("feature" if isinstance(job, SteerJob) else "saes", exc.message)
    finally:
        if not future.done():
            future.cancel()
            if isinstance(job, SteerJob):
                job.cancelled.set()


def _server_timing(response: Response, started: float, result: Any) -> Response:
    parts = [f"queue;dur={getattr(result, 'queue_ms', 0.0):.1f}", f"model;dur={result.model_ms:.1f}",
             f"total;dur={(time.perf_counter() - started) * 1000:.1f}"]
    response.headers["Server-Timing"] = ", ".join(parts)
    return response


def _check_text_size(text: str, settings: Any, param: str = "text") -> None:
    # Cheap guard before tokenizing: no tokenizer makes tokens of fewer than ~1 character on average.
    if len(text) > settings.max_prompt_tokens * 32:
        raise InvalidParameter(param, f"The prompt has {len(text):,} characters; this server encodes at most "
                                      f"{settings.max_prompt_tokens} tokens per prompt (featurescope serve --max-prompt-tokens).")


# ----------------------------------------------------------------------------------------------- encode
@page(router, "/{model_id}" + APP_PREFIX + "/encode", twin=EncodeView, responses=LIVE_ERROR_RESPONSES,
      summary="Encode a prompt with every SAE of a model")
async def encode(
    request: Request, model_id: str, catalog: CatalogDep, render: RendererDep, urls: UrlsDep, settings: SettingsDep,
    text: Annotated[str | None, Query(description="The prompt. BOS is added in front.")] = None,
    ids: Annotated[str, Query(description="Comma-separated token ids instead of text (BOS first), e.g. a stored context.")] = "",
    mid_document: Annotated[bool, Query(description="The prompt continues a document (a stored context that starts "
                                                    "mid-document): its first positions after BOS are warm-up and do "
                                                    "not count, as in the precompute.")] = False,
    saes: Annotated[list[str], Query(description="SAEs to encode with (repeatable); default: all of a small run's, else "
                                                 "the residual SAEs of every 4th layer, as many as the SAE memory budget "
                                                 "holds.")] = [],  # noqa: B006
    token: Annotated[int | None, Query(ge=0, description="Position of the selected token; default: the last.")] = None,
    top: Annotated[int, Query(ge=1, le=TOKEN_TOP_K, description="Features shown per SAE.")] = 10,
    metric: Annotated[Metric, Query(description="Token x layer view: count of active features or summed activation.")] = "count",
    include_special: Annotated[bool, Query(description="Count BOS and norm-outlier tokens in the prompt's top features.")] = False,
    feature: Annotated[str, Query(max_length=300, description="SAE:INDEX of a feature to highlight on the prompt.")] = "",
    scope: Annotated[SearchScope, Query(description="Search: features of the whole text, or of the selected token.")] = "text",
    sort: Annotated[SearchSort, Query(description="Search: order of the results.")] = "activation",
    max_density: Annotated[OptionalDensity, Query(description="Search: hide features denser than this (blank: show all).")] = DENSE_THRESHOLD,
) -> Response:
    started = time.perf_counter()
    as_json = wants_json(request)
    model = catalog.model(model_id)
    query = EncodeQuery(text or "", ids, mid_document, tuple(saes), token, top, metric, include_special, feature, scope, sort,
                        max_density)
    service = request.app.state.live
    default = service.default_saes(model)
    chosen = selected_saes(catalog, model_id, query.saes, default)
    token_ids = query.token_ids()
    highlighted = query.highlighted(model)
    if set(query.saes) == {s.id for s in default}:
        query = replace(query, saes=())  # the default, kept out of the URL
    kept = query.params(scope="text", sort="activation", max_density=DENSE_THRESHOLD)
    budget = service.saes.budget_bytes if service.enabled else None
    loaded = {sae_id for m, sae_id, _ in service.saes.resident() if m == model_id}
    page = {"model": model.as_dict(), "query": query, "urls_for": _encode_urls(urls, model_id, query),
            "picker": sae_picker(list(model.saes.values()), {s.id for s in chosen}, budget, loaded),
            "forms": display_forms(token_texts(model), model.special_token_ids),
            "hidden_params": [(k, v) for k, vs in kept.items() for v in (vs if isinstance(vs, list) else [vs])]}
    if text is None and token_ids is None:
        if as_json:
            raise InvalidParameter("text", "Give a prompt to encode: ?text=... (or ?ids=... token ids).")
        return render.html("encode.html", data=None, request=request, **page)
    _check_text_size(query.text, settings)
    columns: dict[str, list[int]] = {}
    links: dict[str, list[dict[str, Any]]] = {}
    if highlighted is not None:
        if highlighted[0].id not in {s.id for s in chosen}:
            chosen.append(highlighted[0])
        columns = {highlighted[0].id: [highlighted[1]]}
        # Its cross-layer links (when the run computed them): their activations on this prompt come along.
        found = feature_links(catalog, model_id, highlighted[0].id, highlighted[1])
        links = {group: found[group] for group in ("upstream", "alongside", "downstream")}
        served = {s.id for s in chosen}
        for group in links.values():
            for link in group:
                if link["sae_id"] in served:
                    columns.setdefault(link["sae_id"], []).append(link["feature"])
    live = service.model(model)
    job = EncodeJob(saes=chosen, text=query.text, token_ids=token_ids, columns=columns, include_special=include_special,
                    starts_document=not mid_document)
    result = await run_job(request, live, job, settings.live_timeout_seconds)
    view = encode_view(model, chosen, result, query, settings.max_prompt_tokens, links)
    if as_json:
        return _server_timing(render.json(view), started, result)
    response = render.respond(request, "encode.html", view, partials={"encode-result": "_encode_result.html",
                                                                              "search": "_search.html"},
                              push_url=urls.encode(model_id, **query.params()), linked_keys=linked_keys(view), **page)
    return _server_timing(response, started, result)


def _encode_urls(urls: Any, model_id: str, query: EncodeQuery):
    """url(**changes): this encode page's URL with some parameters changed (templates link with it)."""
    def url(fmt: str | None = None, **changes: Any) -> str:
        return urls.encode(model_id, fmt, **query.params(**changes))
    return url


# ------------------------------------------------------------------------------------------ feature test
@page(router, "/{model_id}/{sae_id}/{index}" + APP_PREFIX + "/test", twin=FeatureTestView, responses=LIVE_ERROR_RESPONSES,
      summary="One feature's activations on a text")
async def feature_test(
    request: Request, model_id: str, sae_id: str, index: int, catalog: CatalogDep, render: RendererDep, urls: UrlsDep,
    settings: SettingsDep,
    text: Annotated[str, Query(description="Text to encode.")] = "",
) -> Response:
    started = time.perf_counter()
    as_json = wants_json(request)
    model, sae = catalog.model(model_id), catalog.sae(model_id, sae_id)
    check_index(sae, index)
    _check_text_size(text, settings)
    live = request.app.state.live.model(model)
    result = await run_job(request, live, EncodeJob(saes=[sae], text=text, columns={sae.id: [index]}),
                           settings.live_timeout_seconds)
    view = feature_test_view(model, sae, index, text, result)
    if as_json:
        return _server_timing(render.json(view), started, result)
    response = render.respond(request, "feature_test.html", view, partials={"test-result": "_feature_test.html"},
                              push_url=urls.feature(model_id, sae_id, index, text=text or None),
                              forms=display_forms(token_texts(model), model.special_token_ids))
    return _server_timing(response, started, result)


# ------------------------------------------------------------------------------------------------ steer
@page(router, "/{model_id}" + APP_PREFIX + "/steer", twin=SteerView, responses=LIVE_ERROR_RESPONSES,
      summary="Generate with features steered, beside the default")
async def steer(
    request: Request, model_id: str, catalog: CatalogDep, render: RendererDep, urls: UrlsDep, settings: SettingsDep,
    text: Annotated[str, Query(description="The prompt to continue.")] = "",
    feature: Annotated[list[str], Query(description="SAE:INDEX of a feature to steer (repeatable).")] = [],  # noqa: B006
    strength: Annotated[list[str], Query(description=f"Strength of each feature, in activation units (|s| <= {STRENGTH_LIMIT:g}); "
                                                      f"missing: {DEFAULT_STRENGTH_MULTIPLE:g} x the feature's largest activation.")] = [],  # noqa: B006
    n_tokens: Annotated[int | None, Query(ge=1, description=f"Tokens to generate (default {DEFAULT_NEW_TOKENS}, or the server's limit if lower).")] = None,
    temperature: Annotated[float, Query(ge=0, le=2, description="0 is greedy decoding.")] = 0.7,
    seed: Annotated[int, Query(ge=0, le=2**31 - 1, description="Sampling seed: the same seed gives the same text.")] = 1,
) -> Response:
    started = time.perf_counter()
    as_json = wants_json(request)
    model = catalog.model(model_id)
    n_tokens = n_tokens if n_tokens is not None else min(DEFAULT_NEW_TOKENS, settings.max_new_tokens)
    if n_tokens > settings.max_new_tokens:
        raise InvalidParameter("n_tokens", f"n_tokens is {n_tokens}; this server generates at most {settings.max_new_tokens} "
                                           "tokens per continuation (featurescope serve --max-new-tokens).")
    features = _steered_features(catalog, model_id, feature, strength)
    limits = {"max_new_tokens": settings.max_new_tokens, "strength_limit": STRENGTH_LIMIT,
              "max_features": MAX_STEERED_FEATURES}
    steer_params = {"text": text or None, "feature": [f"{s.id}:{i}" for s, i, _ in features],
                    "strength": [f"{v:g}" for _, _, v in features], "n_tokens": n_tokens, "temperature": temperature, "seed": seed}
    page = {"model": model.as_dict(), "all_saes": list(model.saes.values()), "token_form": display_form,
            "steer_params": steer_params}
    if not text.strip() or not features:
        if as_json:
            missing = "text" if not text.strip() else "feature"
            raise InvalidParameter(missing, "Give a prompt (?text=...) and at least one feature (?feature=SAE:INDEX) to steer."
                                   if missing == "text" else "Give at least one feature to steer: ?feature=SAE:INDEX.")
        view = steer_view(model, features, text, n_tokens, temperature, seed, None, limits)
        return render.html("steer.html", data=view, request=request, **page)
    _check_text_size(text, settings)
    job = SteerJob(text=text, features=features, n_tokens=n_tokens, temperature=temperature, seed=seed)
    result = await run_job(request, request.app.state.live.model(model), job, settings.live_timeout_seconds)
    view = steer_view(model, features, text, n_tokens, temperature, seed, result, limits)
    if as_json:
        return _server_timing(render.json(view), started, result)
    return _server_timing(render.html("steer.html", data=view, request=request, **page), started, result)


def _steered_features(catalog: Any, model_id: str, specs: list[str], strengths: list[str]) -> list[tuple[SAEInfo, int, float]]:
    """(SAE, index, strength) per non-blank feature field; strengths pair with features by position (the
    form's rows), and a blank or missing strength means the feature's default."""
    if len(strengths) > len(specs):
        raise InvalidParameter("strength", f"{len(strengths)} strengths for {len(specs)} features: give one strength per feature.")
    pairs = [(spec.strip(), strengths[i].strip() if i < len(strengths) else "") for i, spec in enumerate(specs)]
    pairs = [(spec, strength) for spec, strength in pairs if spec]
    if len(pairs) > MAX_STEERED_FEATURES:
        raise InvalidParameter("feature", f"{len(pairs)} features asked for; steer at most {MAX_STEERED_FEATURES} at once.")
    model = catalog.model(model_id)
    out = []
    for spec, strength in pairs:
        sae, index = EncodeQuery(feature=spec).highlighted(model)
        if strength:
            try:
                value = float(strength)
            except ValueError:
                raise InvalidParameter("strength", f"Strength {strength[:20]!r} is not a number.")
            if not abs(value) <= STRENGTH_LIMIT:
                raise InvalidParameter("strength", f"Strength {value:g} is out of range: use -{STRENGTH_LIMIT:g} to {STRENGTH_LIMIT:g}.")
        else:
            peak = float(feature_briefs(sae).max_act[index])
            value = round(DEFAULT_STRENGTH_MULTIPLE * peak, 1) if peak > 0 else 10.0
        out.append((sae, index, value))
    return out
