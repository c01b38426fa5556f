"""The live encoder's worker: one LiveModel per model holds the model, and a thread that micro-batches encode
jobs and runs steering jobs (app/live.py explains the scheme); the SAEs they use are leased from the server's
SAE cache (app/sae_cache.py), under its memory budget.

This is the only server module that imports torch: app/live.py's LiveService imports it when live encoding
is on, so `featurescope serve --no-live` never loads torch.
"""

from __future__ import annotations

import concurrent.futures
import math
import queue
import threading
import time
from typing import Any

import torch

from featurescope.app.catalog import ModelInfo, SAEInfo
from featurescope.app.stored import run_config
from featurescope.app.sae_cache import SAECache, sae_bytes
from featurescope.app.live import (PROMPT_TOP_K, TOKEN_TOP_K, AdmissionControl, EncodeJob, EncodeResult, LiveUnavailable,
                                   PromptRejected, SAEEncoding, ServiceBusy, SteerJob, SteerResult, resolve_source)
from featurescope.app.steering import GenerationCancelled, SteeringVector, generate_pair
from featurescope.encoder import FeatureEncoder
from featurescope.models import LoadedModel, load_model
from featurescope.positions import warmup_positions
from featurescope.sae import JumpReLUSAE
from featurescope.sae_loading import load_sae
from featurescope.sites import parse_site


class LiveModel:
    """A model and the worker thread that runs requests on it with the SAEs they lease from `cache` (by
    default one of its own, under settings.sae_memory_budget)."""

    def __init__(self, info: ModelInfo, settings: Any, loaded: LoadedModel | None = None,
                 cache: SAECache | None = None) -> None:
        self.info, self.settings = info, settings
        self.lm: LoadedModel | None = loaded
        self.error: str | None = None
        self.cache = cache if cache is not None else SAECache(settings.sae_memory_budget, settings.device)
        self.queue: queue.Queue = queue.Queue(maxsize=settings.max_queue)
        self.ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.admission = AdmissionControl(settings.max_wait_seconds, settings.max_steer_jobs)
        self.served = 0

    # -- lifecycle
    def start(self, preload: list[SAEInfo] = ()) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(list(preload),), daemon=True,
                                                name=f"live-{self.info.id}")
                self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            try:
                self.queue.put_nowait(None)
            except queue.Full:
                pass

    def submit(self, job: EncodeJob | SteerJob) -> concurrent.futures.Future:
        self.start()
        if self.error is not None:
            raise LiveUnavailable(self.error)
        job.submitted = time.perf_counter()
        kind = _kind(job)
        self.admission.admit(kind, self.info.id)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.admission.withdraw(kind)
            raise ServiceBusy(f"The live encoder of {self.info.id} has {self.queue.qsize()} requests waiting "
                              f"(its limit is {self.settings.max_queue}: featurescope serve --max-queue); try again "
                              "shortly.", max(1, math.ceil(self.admission.expected_wait())))
        return job.future

    # -- the worker
    def _run(self, preload: list[SAEInfo]) -> None:
        try:
            self._load_model()
        except Exception as exc:  # noqa: BLE001 - a model that cannot load is the reason every request gets
            self.error = f"Live encoding is unavailable for model {self.info.id!r}: {exc}"
        if self.error is None:
            self.cache.budget_bytes  # a default budget is measured now that the model takes its memory
            for sae in preload:
                try:
                    self.cache.lease(self.info.id, [sae], self._load_sae).release()
                except LiveUnavailable:
                    pass  # only the requests for this SAE fail, each with the reason
        self.ready.set()
        while True:
            job = self.queue.get()
            if job is None:
                return
            if self.error is not None:
                self.admission.started(_kind(job), 1)
                self.admission.finished(_kind(job), 0.0, 0)
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(LiveUnavailable(self.error))
                continue
            if isinstance(job, SteerJob):
                self._steer(job)
                continue
            batch, later = [job], []
            while len(batch) < self.settings.max_batch:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                (batch if isinstance(more, EncodeJob) else later).append(more)
            self._encode(batch)
            for job in later:
                if job is None:
                    return
                self._steer(job)

    def _load_model(self) -> None:
        if self.lm is not None:
            return
        config = self._run_config()
        dtype = self.settings.dtype or config.get("dtype") or "float32"
        self.lm = load_model(resolve_source(self.info.source, self.settings.data_dir), device=self.settings.device,
                             dtype=dtype, name=self.info.id)

    def _run_config(self) -> dict[str, Any]:
        first = next(iter(self.info.saes.values()), None)
        return run_config(first) if first is not None else {}

    def feature_vectors(self, info: SAEInfo, index: int, timeout: float) -> dict[str, Any]:
        """One feature's decoder row and encoder column (float32 [d_in]), threshold and encoder bias, from the
        SAE this worker serves: the feature page's downloads. Blocks until the model is loaded."""
        self.start()
        if not self.ready.wait(timeout):
            raise LiveUnavailable(f"The live encoder of {self.info.id} is still loading; try again shortly.")
        if self.error is not None:
            raise LiveUnavailable(self.error)
        with self.cache.lease(self.info.id, [info], self._load_sae) as saes, torch.no_grad():
            sae = saes[info.id]
            return {"decoder": sae.W_dec[index].float().cpu().numpy(), "encoder": sae.W_enc[:, index].float().cpu().numpy(),
                    "threshold": float(sae.threshold[index]), "b_enc": float(sae.b_enc[index])}

    def _load_sae(self, info: SAEInfo) -> JumpReLUSAE:
        """The SAE on the model's device (the cache calls this on first use, and again after an eviction)."""
        try:
            sae = load_sae(resolve_source(info.source, self.settings.data_dir))
        except Exception as exc:  # noqa: BLE001 - missing file, no network, bad format: say which SAE and why
            raise LiveUnavailable(f"SAE {info.id!r} could not be loaded from {info.source!r} for live encoding: {exc}")
        if (sae.d_in, sae.d_sae) != (info.d_in, info.d_sae):
            raise LiveUnavailable(f"SAE {info.id!r}: {info.source} has shape {sae.d_in} x {sae.d_sae}, but the "
                                  f"published data was computed with {info.d_in} x {info.d_sae}.")
        return sae.to(self.lm.device)

    def _encode(self, jobs: list[EncodeJob]) -> None:
        started = time.perf_counter()
        self.admission.started("encode", len(jobs))
        answers: list[tuple[EncodeJob, EncodeResult]] = []
        try:
            answers = self._encode_jobs(jobs, started)
        finally:
            # Booked before anyone is answered: a client holding its answer finds the encoder idle again.
            self.admission.finished("encode", time.perf_counter() - started, len(answers))
        for job, result in answers:
            job.future.set_result(result)

    def _encode_jobs(self, jobs: list[EncodeJob], started: float) -> list[tuple[EncodeJob, EncodeResult]]:
        """Runs the batch, in as few forward passes as the SAE budget allows; returns each served request's result
        ([]: nothing worth timing), failures delivered."""
        live = []
        for job in jobs:
            if not job.future.set_running_or_notify_cancel():
                continue  # the client went away while it waited
            try:
                ids = self._prompt_ids(job.text, job.token_ids)
                self.cache.check(job.saes)
            except Exception as exc:  # noqa: BLE001 - delivered to the one request it concerns
                job.future.set_exception(exc)
                continue
            live.append((job, ids))
        return [answer for group in self._fitting_groups(live) for answer in self._encode_group(group, started)]

    def _fitting_groups(self, live: list[tuple[EncodeJob, list[int]]]) -> list[list[tuple[EncodeJob, list[int]]]]:
        """Consecutive jobs whose SAEs fit the budget together: each group is one forward pass."""
        budget = self.cache.budget_bytes
        groups: list[list[tuple[EncodeJob, list[int]]]] = []
        held: dict[str, SAEInfo] = {}
        for job, ids in live:
            wanted = {**held, **{s.id: s for s in job.saes}}
            if groups and sum(sae_bytes(s) for s in wanted.values()) <= budget:
                groups[-1].append((job, ids))
                held = wanted
            else:
                groups.append([(job, ids)])
                held = {s.id: s for s in job.saes}
        return groups

    def _encode_group(self, group: list[tuple[EncodeJob, list[int]]], started: float) -> list[tuple[EncodeJob, EncodeResult]]:
        union = list({s.id: s for job, _ in group for s in job.saes}.values())
        try:
            lease = self.cache.lease(self.info.id, union, self._load_sae)
        except Exception as exc:  # noqa: BLE001 - an SAE that cannot load fails only the requests that name it
            if len(group) > 1:
                return [answer for one in group for answer in self._encode_group([one], started)]
            group[0][0].future.set_exception(exc)
            return []
        with lease as saes:
            try:
                results = self._encode_batch([(job, ids, {s.id: saes[s.id] for s in job.saes}) for job, ids in group])
            except Exception as exc:  # noqa: BLE001
                for job, _ in group:
                    job.future.set_exception(exc)
                return []
        elapsed = time.perf_counter() - started
        for (job, _), result in zip(group, results):
            result.queue_ms = (started - job.submitted) * 1000
            result.model_ms = elapsed * 1000
            self.served += 1
        return [(job, result) for (job, _), result in zip(group, results)]

    @torch.no_grad()
    def _encode_batch(self, live: list[tuple[EncodeJob, list[int], dict[str, JumpReLUSAE]]]) -> list[EncodeResult]:
        lm = self.lm
        union: dict[str, JumpReLUSAE] = {}
        for _, _, saes in live:
            union.update(saes)
        lengths = [len(ids) for _, ids, _ in live]
        width = max(lengths)
        input_ids = torch.full((len(live), width), self._pad_id(), dtype=torch.long)
        for row, (_, ids, _) in enumerate(live):
            input_ids[row, : len(ids)] = torch.tensor(ids)
        # Right padding leaves every real token's position and causal context as if it ran alone.
        attention_mask = None
        if min(lengths) != width:
            attention_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        starts = torch.tensor([job.starts_document for job, _, _ in live])
        acts, masks = FeatureEncoder(lm, union).encode_with_masks(input_ids, attention_mask, starts_document=starts)
        warmup = warmup_positions(starts, width)  # [B, width], featurescope/positions.py
        results = []
        for row, (job, ids, saes) in enumerate(live):
            n = len(ids)
            per_sae = {name: (_pool if job.pool else _reduce)(acts[name][row, :n], masks[name][row, :n],
                                                               job.columns.get(name, []), job.include_special, job.pool)
                       for name in saes}
            results.append(EncodeResult(ids, per_sae, len(live), 0.0, 0.0, warmup[row, :n].tolist()))
        return results

    def _pad_id(self) -> int:
        pad = self.lm.tokenizer.pad_token_id
        return int(pad if pad is not None else self.lm.bos_token_id)

    def _prompt_ids(self, text: str, token_ids: list[int] | None) -> list[int]:
        limit = self.settings.max_prompt_tokens
        if token_ids is not None:
            ids = list(token_ids)
            bad = [t for t in ids if not 0 <= t < self.lm.vocab_size]
            if bad:
                raise PromptRejected("ids", f"Token id {bad[0]} is outside the vocabulary (0 to {self.lm.vocab_size - 1}).")
            param = "ids"
        else:
            ids, param = self.lm.tokenize(text), "text"
        if token_ids is None and not text.strip():
            raise PromptRejected(param, "The prompt is empty: type some text to encode.")
        if len(ids) > limit:
            raise PromptRejected(param, f"The prompt is {len(ids)} tokens long (BOS included); this server encodes at "
                                        f"most {limit} tokens per prompt (featurescope serve --max-prompt-tokens).")
        return ids

    def _steer(self, job: SteerJob) -> None:
        started = time.perf_counter()
        self.admission.started("steer", 1)
        result = None
        try:
            result = self._steer_job(job, started)
        finally:
            self.admission.finished("steer", time.perf_counter() - started, int(result is not None))
        if result is not None:
            job.future.set_result(result)

    def _steer_job(self, job: SteerJob, started: float) -> SteerResult | None:
        """Runs the generation; None when there is nothing to answer with (cancelled, or the failure delivered)."""
        if not job.future.set_running_or_notify_cancel():
            return None
        try:
            ids = self._prompt_ids(job.text, None)
            with self.cache.lease(self.info.id, [info for info, _, _ in job.features], self._load_sae) as saes:
                steering = [SteeringVector(parse_site(info.hook_name), strength * saes[info.id].W_dec[index])
                            for info, index, strength in job.features]  # copies: the SAEs are free once made
            default, steered = generate_pair(self.lm, ids, steering, job.n_tokens, job.temperature, job.seed,
                                             should_stop=job.cancelled.is_set)
        except GenerationCancelled:
            job.future.cancel()
            return None
        except Exception as exc:  # noqa: BLE001
            job.future.set_exception(exc)
            return None
        self.served += 1
        return SteerResult(ids, default, steered, (time.perf_counter() - started) * 1000)


def _kind(job: EncodeJob | SteerJob) -> str:
    return "steer" if isinstance(job, SteerJob) else "encode"


def _pool(acts: torch.Tensor, counted: torch.Tensor, columns: list[int], include_special: bool, how: str) -> SAEEncoding:
    """[seq, d_sae] activations of one prompt -> every feature's max or mean over the counted positions (0 when
    none counts; activations are >= 0, so zeroing the others keeps the max), and the requested columns."""
    kept = counted if not include_special else torch.ones_like(counted)
    masked = acts * kept[:, None].to(acts.dtype)
    if how == "max":
        pooled = masked.max(dim=0).values
    elif how == "mean":
        pooled = masked.sum(dim=0) / max(1, int(kept.sum()))
    else:
        raise ValueError(f"pool must be 'max' or 'mean', not {how!r}.")
    cols = {int(f): acts[:, f].cpu().tolist() for f in columns if 0 <= f < acts.shape[-1]}
    return SAEEncoding(counted.cpu().tolist(), [], [], [], [], cols, pooled.cpu().numpy())


def _reduce(acts: torch.Tensor, counted: torch.Tensor, columns: list[int], include_special: bool = False,
            _pool: str | None = None) -> SAEEncoding:
    """[seq, d_sae] activations of one prompt -> the small summary pages need, computed on the device."""
    k = min(TOKEN_TOP_K, acts.shape[-1])
    values, indices = acts.topk(k, dim=-1)
    active = acts > 0
    l0 = active.sum(-1)
    total = acts.sum(-1)
    masked = acts if include_special else acts * counted[:, None].to(acts.dtype)
    best, where = masked.max(dim=0)
    k_prompt = min(PROMPT_TOP_K, acts.shape[-1])
    prompt_values, prompt_indices = best.topk(k_prompt)
    values, indices = values.cpu().tolist(), indices.cpu().tolist()
    token_top = [[(i, v) for i, v in zip(idx_row, val_row) if v > 0] for idx_row, val_row in zip(indices, values)]
    where = where.cpu()
    prompt_top = [(int(i), float(v), int(where[i])) for i, v in zip(prompt_indices.cpu().tolist(),
                                                                       prompt_values.cpu().tolist()) if v > 0]
    cols = {int(f): acts[:, f].cpu().tolist() for f in columns if 0 <= f < acts.shape[-1]}
    return SAEEncoding(counted.cpu().tolist(), l0.cpu().tolist(), total.cpu().tolist(), token_top, prompt_top, cols)

