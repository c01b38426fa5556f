"""Live encoding inside the server: each model and its SAEs loaded once, concurrent requests micro-batched.

The worker (LiveModel) lives in app/live_encoder.py, the only server module that imports torch; it is
imported when live encoding is on, so `featurescope serve --no-live` never loads torch.

One LiveModel per model owns a worker thread and a bounded queue. The worker takes the oldest job and,
when it is an encode job, every other encode job already waiting (up to `max_batch`); pads them into
one batch; runs the one FeatureEncoder (featurescope/encoder.py, the precompute job's code) stopped at
the deepest layer any of them needs; and reduces each SAE's activations on the device to what pages
show (per-token top features and counts, the prompt's top features, requested feature columns). It
never waits for a batch to fill: alone, a request runs at once; under load, the requests that arrived
during one forward pass share the next.

Admission control: a request is admitted only when the work already queued ahead of it is expected to
take at most `max_wait_seconds` (AdmissionControl: the queue of each kind times that kind's measured
service time); otherwise it gets 503 with Retry-After at once, rather than a long wait that no client
sees coming. Steering jobs, which hold the model longest, have their own cap (`max_steer_jobs`).

    service = LiveService(settings)
    future = service.model(model_info).submit(EncodeJob(text="The capital of France is", saes=[sae_info]))
    result = future.result()            # EncodeResult: per SAE, SAEEncoding
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurescope.app.catalog import ModelInfo, SAEInfo
from featurescope.app.sae_cache import SAECache, default_saes

if TYPE_CHECKING:  # the worker and its torch load only when live encoding is on
    from featurescope.app.live_encoder import LiveModel
    from featurescope.app.steering import Continuation
    from featurescope.models import LoadedModel

TOKEN_TOP_K = 32  # features kept per token and SAE (pages show the first 10; search filters the rest)
PROMPT_TOP_K = 64  # features kept per SAE for the whole prompt (max over its tokens)


class LiveUnavailable(Exception):
    """Live encoding is off, or the model or an SAE could not be loaded: 503 with the reason."""


class ServiceBusy(Exception):
    """Too much work is queued ahead of a request: 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


class PromptRejected(Exception):
    """Empty or too long a prompt: 422 naming the limit. `param` is the query parameter at fault."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param, self.message = param, message


# ------------------------------------------------------------------------------------------------- jobs
@dataclass
class EncodeJob:
    saes: list[SAEInfo]
    text: str = ""
    token_ids: list[int] | None = None  # instead of text, e.g. a stored context (BOS included)
    columns: dict[str, list[int]] = field(default_factory=dict)  # sae id -> features whose every activation is wanted
    include_special: bool = False  # let BOS and norm outliers into the prompt's top features
    starts_document: bool = True  # False: the tokens continue a document (a stored context cut mid-document),
    # so its first positions after BOS are warm-up and do not count (featurescope/positions.py)
    pool: str | None = None  # "max" or "mean": every feature pooled over the counted tokens (contrast, detectors)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    submitted: float = 0.0


@dataclass
class SteerJob:
    text: str
    features: list[tuple[SAEInfo, int, float]]  # (SAE, feature index, strength)
    n_tokens: int
    temperature: float
    seed: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = 0.0


@dataclass
class SAEEncoding:
    counted: list[bool]  # positions that count (not BOS/EOS/pad or a norm outlier), as in precompute
    l0: list[int]  # active features per token
    total: list[float]  # sum of activations per token
    token_top: list[list[tuple[int, float]]]  # per token: (feature, activation), strongest first, act > 0
    prompt_top: list[tuple[int, float, int]]  # (feature, max activation over counted tokens, its position)
    columns: dict[int, list[float]]  # requested feature -> activation at every position
    pooled: Any = None  # EncodeJob.pool: float32 numpy [d_sae], each feature pooled over the counted tokens


@dataclass
class EncodeResult:
    token_ids: list[int]
    saes: dict[str, SAEEncoding]
    batch_size: int  # how many requests shared the forward pass
    queue_ms: float
    model_ms: float
    warmup: list[bool] = field(default_factory=list)  # per position: warm-up of a prompt that continues a document


@dataclass
class SteerResult:
    prompt_ids: list[int]
    default: Continuation
    steered: Continuation
    model_ms: float


# ------------------------------------------------------------------------------------------- admission
class AdmissionControl:
    """What is waiting for one model's worker, and how long each kind of job takes to serve.

    The expected wait of a new job is the remaining time of the job in service plus, for every job
    queued ahead of it, its kind's service time: an encode request costs its share of a batch (batch
    seconds / requests in the batch, measured), a steering job its whole run. A job is admitted when
    that wait plus its own service time fits the bound, so the bound is on the answer, not only on the
    start (an encode request also waits for the rest of its batch). Until a kind has been measured, its
    first estimate stands in. Thread-safe: request threads admit, the worker reports."""

    EWMA = 0.2  # weight of the newest measurement

    def __init__(self, max_wait_seconds: float, max_steer_jobs: int, encode_seconds: float = 0.25,
                 steer_seconds: float = 3.0) -> None:
        self.max_wait_seconds, self.max_steer_jobs = max_wait_seconds, max_steer_jobs
        self.service_seconds = {"encode": encode_seconds, "steer": steer_seconds}
        self.waiting = {"encode": 0, "steer": 0}
        self._in_service: tuple[str, float, int] | None = None  # (kind, started, jobs)
        self._lock = threading.Lock()

    def expected_wait(self) -> float:
        with self._lock:
            return self._expected_wait(time.perf_counter())

    def _expected_wait(self, now: float) -> float:
        wait = sum(n * self.service_seconds[kind] for kind, n in self.waiting.items())
        if self._in_service is not None:
            kind, started, jobs = self._in_service
            wait += max(0.0, jobs * self.service_seconds[kind] - (now - started))
        return wait

    def admit(self, kind: str, model_id: str) -> None:
        """Count a new job in, or raise ServiceBusy saying how long the queue is and when to come back."""
        with self._lock:
            wait = self._expected_wait(time.perf_counter())
            if kind == "steer" and self.waiting["steer"] >= self.max_steer_jobs:
                raise ServiceBusy(f"The live encoder of {model_id} already has {self.waiting['steer']} steering jobs "
                                  f"waiting (its limit is {self.max_steer_jobs}: featurescope serve --max-steer-jobs); "
                                  "try again shortly.", max(1, math.ceil(self.service_seconds["steer"])))
            expected = wait + self.service_seconds[kind]
            if expected > self.max_wait_seconds:
                raise ServiceBusy(f"The live encoder of {model_id} is busy: the requests ahead of this one need about "
                                  f"{wait:.0f} s, and this server admits a request only when its answer should be "
                                  f"ready within {self.max_wait_seconds:g} s (featurescope serve --max-wait); "
                                  "try again shortly.", max(1, math.ceil(expected - self.max_wait_seconds)))
            self.waiting[kind] += 1

    def withdraw(self, kind: str) -> None:
        """A job that will not be served after all (the queue was full)."""
        with self._lock:
            self.waiting[kind] -= 1

    def started(self, kind: str, jobs: int) -> None:
        with self._lock:
            self.waiting[kind] -= jobs
            self._in_service = (kind, time.perf_counter(), jobs)

    def finished(self, kind: str, seconds: float, jobs: int) -> None:
        """A batch of `jobs` encode requests (or one steering job) took `seconds`; jobs=0 measures nothing."""
        with self._lock:
            self._in_service = None
            if jobs > 0:
                per_job = seconds / jobs
                self.service_seconds[kind] += self.EWMA * (per_job - self.service_seconds[kind])


def resolve_source(source: str, data_dir: Path) -> str:
    """A model or SAE source as the precompute job recorded it. Relative local paths were relative to the
    job's working directory, usually the data dir's parent: look there, in the data dir, then here."""
    path = Path(source).expanduser()
    if path.is_absolute() or path.exists():
        return source
    for base in (Path(data_dir).parent, Path(data_dir)):
        if (base / path).exists():
            return str(base / path)
    return source


# --------------------------------------------------------------------------------------------- service
class LiveService:
    """The LiveModels of a server, created on first use (or at start-up: `start`), and the one SAE cache they
    share (app/sae_cache.py: every model's SAEs under settings.sae_memory_budget)."""

    def __init__(self, settings: Any, preloaded: dict[str, LoadedModel] | None = None) -> None:
        self.settings = settings
        self.preloaded = dict(preloaded or {})
        self.models: dict[str, LiveModel] = {}
        self.saes = SAECache(settings.sae_memory_budget, settings.device)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.settings.live)

    def model(self, info: ModelInfo) -> LiveModel:
        if not self.enabled:
            raise LiveUnavailable("Live encoding is switched off on this server (featurescope serve --no-live).")
        with self._lock:
            live = self.models.get(info.id)
            if live is None or live.info.source != info.source:
                from featurescope.app.live_encoder import LiveModel

                live = LiveModel(info, self.settings, self.preloaded.get(info.id), self.saes)
                self.models[info.id] = live
            elif live.info is not info:
                live.info = info  # a newer publication of the same model: same weights, newer SAE list
        return live

    def default_saes(self, info: ModelInfo) -> list[SAEInfo]:
        """The SAEs a model's encode page uses when its URL names none (app/sae_cache.py: default_saes)."""
        return default_saes(list(info.saes.values()), self.saes.budget_bytes if self.enabled else None)

    def start(self, models: list[ModelInfo]) -> None:
        """Load every model and its default SAEs now, in the background (featurescope serve --load startup)."""
        for info in models:
            live = self.model(info)
            live.start(preload=default_saes(list(info.saes.values()), self.settings.sae_memory_budget))

    def close(self) -> None:
        for live in self.models.values():
            live.close()
