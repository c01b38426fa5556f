"""Contrast runs: two sets of prompts encoded by a model's live encoder with every selected SAE, in
micro-batches, while the page polls their progress; and the detectors fitted from them.

Prompts go to the live encoder (app/live_encoder.py) as ordinary encode jobs with `pool` set, at most
`max_batch` in flight at once, each admitted by its AdmissionControl like any other request: a long run
shares the encoder with people encoding prompts instead of shutting them out (a job the admission refuses
is retried once the ones in flight are done). A run lives in this server's memory (the last
`ContrastRuns.KEEP`) and can be cancelled between micro-batches; the CLI runs the same coroutine.

    run = runs.start(live, ContrastRequest(saes, a_prompts, b_prompts, pool="max"), max_batch=16)
    run.state, run.done, run.total       # "running", 48, 200
    doc = fit_run(run, "python-code", k=5)   # a detector document (app/detectors.py)
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from featurescope.app.catalog import SAEInfo
from featurescope.app.contrast import (FeatureScores, auroc, detector_scores, fit_detector, score_features, split)
from featurescope.app.detectors import DetectorError, detector_document, detector_features
from featurescope.app.live import EncodeJob, EncodeResult, PromptRejected, ServiceBusy

if TYPE_CHECKING:
    from featurescope.app.live_encoder import LiveModel

DEFAULT_LABELS = ("A", "B")


class RunCancelled(Exception):
    """The run was cancelled between micro-batches."""


class RunFailed(Exception):
    """A prompt the encoder refused (too long) or an encoder failure, with the prompt it concerns."""


@dataclass
class ContrastRequest:
    saes: list[SAEInfo]
    a: list[str]
    b: list[str]
    pool: str = "max"
    labels: tuple[str, str] = DEFAULT_LABELS


@dataclass
class ContrastRun:
    id: str
    model_id: str
    request: ContrastRequest
    state: str = "running"  # running, done, failed, cancelled
    done: int = 0
    error: str | None = None
    started: float = field(default_factory=time.time)
    seconds: float | None = None
    pooled: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # "a"/"b" -> sae id -> [n, d_sae]
    scores: dict[str, FeatureScores] = field(default_factory=dict)
    cancelled: threading.Event = field(default_factory=threading.Event)
    task: Any = None

    @property
    def total(self) -> int:
        return len(self.request.a) + len(self.request.b)


async def encode_prompts(live: LiveModel, saes: list[SAEInfo], prompts: Sequence[str], pool: str, max_batch: int,
                         on_done: Callable[[int], None] = lambda n: None, cancelled: threading.Event | None = None,
                         columns: dict[str, list[int]] | None = None, what: str = "") -> list[EncodeResult]:
    """Every prompt through the live encoder, at most `max_batch` in flight, results in the prompts' order."""
    results: list[EncodeResult | None] = [None] * len(prompts)
    pending: dict[asyncio.Future, int] = {}
    nxt = 0
    try:
        while nxt < len(prompts) or pending:
            if cancelled is not None and cancelled.is_set():
                raise RunCancelled
            while nxt < len(prompts) and len(pending) < max_batch:
                job = EncodeJob(saes=saes, text=prompts[nxt], pool=pool, columns=dict(columns or {}))
                try:
                    future = live.submit(job)
                except ServiceBusy as exc:
                    if not pending:  # nothing of ours ahead: others fill the queue; come back when it drains
                        await asyncio.sleep(min(2.0, exc.retry_after))
                    break
                pending[asyncio.wrap_future(future)] = nxt
                nxt += 1
            if not pending:
                continue
            finished, _ = await asyncio.wait(pending, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
            for future in finished:
                index = pending.pop(future)
                try:
                    results[index] = future.result()
                except PromptRejected as exc:
                    raise RunFailed(f"Prompt {index + 1}{what}: {exc.message}") from None
            on_done(len(finished))
    finally:
        for future in pending:
            future.cancel()
    return results  # type: ignore[return-value]


def stack_pooled(results: Sequence[EncodeResult], sae_ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Per SAE, the prompts' pooled activations as one float32 [n_prompts, d_sae] matrix."""
    return {sae_id: np.stack([r.saes[sae_id].pooled for r in results]).astype(np.float32) for sae_id in sae_ids}


async def run_contrast(live: LiveModel, run: ContrastRun, max_batch: int) -> ContrastRun:
    """Encode both sets and score every feature; the run's state says how it ended."""
    started = time.perf_counter()
    request = run.request
    sae_ids = [s.id for s in request.saes]

    def progress(n: int) -> None:
        run.done += n

    try:
        for key, prompts, label in (("a", request.a, request.labels[0]), ("b", request.b, request.labels[1])):
            results = await encode_prompts(live, request.saes, prompts, request.pool, max_batch, progress,
                                           run.cancelled, what=f" of set {label}")
            run.pooled[key] = stack_pooled(results, sae_ids)
        run.scores = {sae_id: score_features(run.pooled["a"][sae_id], run.pooled["b"][sae_id]) for sae_id in sae_ids}
        run.state = "done"
    except RunCancelled:
        run.state, run.pooled = "cancelled", {}
    except Exception as exc:  # noqa: BLE001 - a failed run says why on its page
        run.state, run.pooled = "failed", {}
        run.error = str(exc.message if hasattr(exc, "message") else exc)
    run.seconds = time.perf_counter() - started
    return run


class ContrastRuns:
    """This server's contrast runs by id: the newest KEEP (older ones are forgotten, their memory freed)."""

    KEEP = 8

    def __init__(self) -> None:
        self._runs: OrderedDict[str, ContrastRun] = OrderedDict()

    def start(self, live: LiveModel, model_id: str, request: ContrastRequest, max_batch: int) -> ContrastRun:
        run = ContrastRun(secrets.token_urlsafe(8), model_id, request)
        run.task = asyncio.get_running_loop().create_task(run_contrast(live, run, max_batch))
        self._runs[run.id] = run
        while len(self._runs) > self.KEEP:
            _, old = self._runs.popitem(last=False)
            old.cancelled.set()
        return run

    def get(self, model_id: str, run_id: str) -> ContrastRun | None:
        run = self._runs.get(run_id)
        return run if run is not None and run.model_id == model_id else None


def pooled_columns(pooled: dict[str, np.ndarray], rows: Sequence[int] | slice,
                   features: Sequence[Any]) -> dict[tuple[str, int], np.ndarray]:
    """{(sae id, index): the pooled activations of those prompts} for a detector's features."""
    return {(f.sae_id, f.index): pooled[f.sae_id][rows, f.index] for f in features}


def fit_run(run: ContrastRun, name: str, k: int) -> dict[str, Any]:
    """A detector from a finished run: the top k features of its training split, scored on the held-out split."""
    if run.state != "done":
        raise DetectorError("run", f"The contrast run is {run.state}: a detector needs a finished run.")
    a, b = run.pooled["a"], run.pooled["b"]
    n_a, n_b = len(run.request.a), len(run.request.b)
    try:
        (train_a, held_a), (train_b, held_b) = split(n_a), split(n_b)
    except ValueError as exc:
        raise DetectorError("k", str(exc)) from None
    features = fit_detector({s: m[train_a] for s, m in a.items()}, {s: m[train_b] for s, m in b.items()}, k)
    if not features:
        raise DetectorError("k", "No feature fired on the training prompts of either set: nothing to detect with.")

    def measured(rows_a: list[int], rows_b: list[int]) -> float:
        score_a = detector_scores(features, pooled_columns(a, rows_a, features))
        score_b = detector_scores(features, pooled_columns(b, rows_b, features))
        return float(auroc(score_a[:, None], score_b[:, None])[0])

    labels = run.request.labels
    sets = {"a": {"label": labels[0], "size": n_a, "train": len(train_a), "held_out": len(held_a)},
            "b": {"label": labels[1], "size": n_b, "train": len(train_b), "held_out": len(held_b)}}
    return detector_document(name, run.model_id, run.request.pool, features, sets, {"a": held_a, "b": held_b},
                             measured(held_a, held_b), measured(train_a, train_b))


async def score_prompts(live: LiveModel, doc: dict[str, Any], saes: list[SAEInfo], prompts: Sequence[str],
                        max_batch: int) -> np.ndarray:
    """A detector's per-prompt scores on prompts (the CLI's `featurescope detect`, and its tests)."""
    features = detector_features(doc)
    results = await encode_prompts(live, saes, prompts, doc["pool"], max_batch)
    pooled = stack_pooled(results, [s.id for s in saes])
    return detector_scores(features, pooled_columns(pooled, slice(None), features))
