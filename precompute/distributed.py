"""The precompute job on a Ray cluster: one run over many GPUs and machines, with exactly the result of one
process (`pip install featurescope[ray]`).

    featurescope precompute --sae ... --ray                  # a local Ray instance, one worker per CPU or GPU
    featurescope precompute --sae ... --ray auto             # the cluster of `ray start --head` / `--address`
    featurescope precompute --sae ... --ray ray://head:10001 # a remote cluster through Ray Client

This process is the driver. It checks the input and reads the corpus as a single run does (precompute/job.py),
starts one Ray actor per GPU (else per CPU), plans the SAE groups (precompute/plan.py) under the workers'
memory, and cuts each group's pass into tasks: a slice of contexts (a few batches, so a lost task costs
little) for one group. A worker loads the model once and a group's SAEs once from their sources (never
tensors from the driver), gets each task's token ids as a small array, streams them through
`FeatureStats` and returns the state through Ray's object store. The driver merges states as they arrive
(`FeatureStats.merge` is exact and independent of order), so the published file equals a single-process
run's bit for bit, then runs the same finish step and publishes the same DuckDB file on its data dir.

Faults: a worker that dies mid-task (SIGKILL, a lost node) is restarted by Ray and its task goes back to
the queue for the next free worker. The driver saves the merged state of each group in flight every
--checkpoint-every merged batches, with the group's task list and the tasks done, so a killed driver
resumes with the same command; a finished group is saved as a single run saves it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from featurescope.encoder import FeatureEncoder
from featurescope.models import load_model
from featurescope.precompute.config import PrecomputeConfig
from featurescope.precompute.feature_stats import FeatureStats
from featurescope.precompute.job import (Encode, PrecomputeError, Run, _atomic_save, _plan_groups, group_path,
                                         load_group, new_stats, open_run, publish, save_group, stream)
from featurescope.precompute.plan import default_memory_budget
from featurescope.sae_loading import load_sae

TASKS_PER_WORKER = 4  # per group pass: enough that a lost task costs a quarter of a worker's share or less
MAX_TASK_BATCHES = 64  # and never more than this many batches in one task
MAX_RESTARTS = 3  # per worker: Ray restarts a dead worker this often before the run gives up on it
LOCAL = "local"


@dataclasses.dataclass(frozen=True)
class Task:
    """Contexts [first, last) of the run through SAE group `group`."""
    group: int
    first: int
    last: int


def plan_tasks(n_contexts: int, group: int, batch_size: int, workers: int) -> list[Task]:
    """A group's pass cut into slices of whole batches (the single run's batches: the same forward passes)."""
    batches = -(-n_contexts // batch_size)
    per_task = min(MAX_TASK_BATCHES, max(1, -(-batches // (TASKS_PER_WORKER * workers)))) * batch_size
    return [Task(group, first, min(first + per_task, n_contexts)) for first in range(0, n_contexts, per_task)]


def run_on_ray(cfg: PrecomputeConfig, lm=None, log=print, timings: dict | None = None) -> Path:
    """Run (or resume) the job on Ray and publish its DuckDB file on this machine; returns its path."""
    started = time.time()
    if cfg.shard or cfg.merge_shards:
        raise PrecomputeError("--ray runs the whole corpus and merges as it goes: drop --shard and --merge-shards.")
    address = _check_address(cfg.ray)
    ray = _import_ray()
    run = open_run(cfg, lm, log)  # bad SAEs, model or corpus fail here, before Ray is asked anything
    if isinstance(run, Path):
        return run
    ours = _connect(ray, address)
    try:
        actors = _start_workers(ray, cfg, run)
        budget = cfg.memory_budget or min(ray.get([a.memory_budget.remote() for a in actors]))
        groups = _plan_groups(dataclasses.replace(cfg, memory_budget=budget), run.lm, run.saes, run.work_dir, log)
        driver = _Driver(ray, cfg, run, groups, actors, log)
        stream_started = time.time()
        finals, seconds = driver.run()
        stream_seconds = time.time() - stream_started
        for actor in actors:  # the finish step runs here: free the workers' devices for other work
            ray.kill(actor)
    finally:
        if ours:
            ray.shutdown()
    published = publish(cfg, run, groups, finals, started, seconds, log, timings)
    driver.summary()
    if timings is not None:
        timings.update(stream=stream_seconds, tasks=driver.n_tasks, task_seconds=driver.task_seconds,
                       merge_seconds=driver.merge_seconds, retried=driver.retried, workers=len(actors))
    return published


def _check_address(address: str | None) -> str:
    if address in (LOCAL, "auto") or (address or "").startswith("ray://"):
        return address
    host, _, port = (address or "").rpartition(":")
    if not host or not port.isdigit():
        raise PrecomputeError(f"--ray takes no value (a local Ray instance), 'auto', ray://HOST:PORT or HOST:PORT; "
                              f"got {address!r}.")
    return address


def _import_ray():
    try:
        import ray
    except ImportError:
        raise PrecomputeError("--ray needs Ray: pip install 'featurescope[ray]'.") from None
    return ray


def _connect(ray, address: str) -> bool:
    """Connect to (or start) the cluster; False if this process was connected already (then it stays so)."""
    if ray.is_initialized():
        return False
    _check_reachable(address)
    options = dict(log_to_driver=False, logging_level="warning")
    if address == LOCAL:
        options.update(include_dashboard=False)
    try:
        ray.init(address=None if address == LOCAL else address, **options)
    except Exception as exc:  # Ray raises ConnectionError, ValueError or its own errors, by address kind
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrecomputeError(f"Cannot reach a Ray cluster at {address!r} ({reason}): start one with "
                              "`ray start --head`, or pass --ray alone for a local one.") from None
    return True


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A quick TCP connect to HOST:PORT first: Ray itself retries an unreachable cluster for minutes."""
    if address in (LOCAL, "auto"):
        return  # ray.init answers these at once (it starts one, or finds none on this machine)
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise PrecomputeError(f"Cannot reach a Ray cluster at {address!r} ({reason.lower()}): start one with "
                              "`ray start --head`, or pass --ray alone for a local one.") from None


def _start_workers(ray, cfg: PrecomputeConfig, run: Run) -> list:
    """One actor per GPU of the cluster (num_gpus=1), else per CPU; each loads the model at once."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    n = cfg.ray_workers or gpus or int(resources.get("CPU", 1))
    kind = "GPU" if gpus else "CPU"
    if n > int(resources.get(kind, 0)):
        raise PrecomputeError(f"--ray-workers {n} asks for more than the cluster's {int(resources.get(kind, 0))} "
                              f"{kind}s (one per worker).")
    worker = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=0, **{f"num_{kind.lower()}s": 1})(PrecomputeWorker)
    sources = dict(zip(run.saes, cfg.saes))
    actors = [worker.remote(cfg, sources, torch.get_num_threads()) for _ in range(n)]
    try:
        ray.get([a.ready.remote() for a in actors])  # before any task
    except ray.exceptions.RayError as exc:
        cause = str(exc).strip().splitlines()[-1]
        raise PrecomputeError(f"A Ray worker could not load model {cfg.model!r} ({cause}): every machine needs "
                              "FeatureScope installed and the model and SAE sources under the same names.") from None
    return actors


class PrecomputeWorker:
    """A Ray actor on one device: the model once, the current group's SAEs once, any number of tasks."""

    def __init__(self, cfg: PrecomputeConfig, sources: dict[str, str], threads: int):
        self.cfg = dataclasses.replace(cfg, progress=False, checkpoint_every=0)
        self.sources = sources
        self.lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        if self.lm.device.type == "cpu":
            # The driver's thread count, not Ray's one per CPU: fp32 matmuls on the CPU round differently with
            # another thread count (SmolLM2's layer 12 did, in a batch of 2 contexts), and the result must be
            # the single run's on the driver's machine.
            torch.set_num_threads(threads)
        self.encoder: FeatureEncoder | None = None
        import ray

        self.name = f"{ray.util.get_node_ip_address()} pid {os.getpid()} ({self.lm.device})"

    def ready(self) -> str:
        return self.name

    def memory_budget(self) -> int:
        return default_memory_budget(self.lm.device)

    def run(self, names: list[str], first: int, tokens: np.ndarray, starts_document: np.ndarray) -> dict:
        """Stream contexts [first, first + len(tokens)) through SAEs `names`: their mergeable state (on the CPU).
        `starts_document` [len(tokens)] says which of them begin a document (featurescope/positions.py)."""
        if self.encoder is None or list(self.encoder.saes) != names:
            self.encoder = None  # drop the previous group's SAEs before loading the next
            saes = {name: load_sae(self.sources[name], site=self.cfg.site) for name in names}
            self.encoder = FeatureEncoder(self.lm, saes)
        stats = new_stats(self.cfg, self.encoder)
        contexts = torch.from_numpy(tokens)
        encode = Encode(self.lm, contexts, torch.from_numpy(starts_document), None, first_id=first)
        seconds = stream(self.cfg, encode, self.encoder, stats,
                         0, len(contexts), checkpoint=None, desc="")
        state = {name: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.state_dict(copy=False).items()}
                 for name, s in stats.items()}
        return {"stats": state, "seconds": seconds, "worker": self.name}


class _Driver:
    """Feeds tasks to idle workers, merges what comes back, checkpoints, and resubmits a dead worker's task."""

    def __init__(self, ray, cfg: PrecomputeConfig, run: Run, groups: list[list[str]], actors: list, log: Callable):
        self.ray, self.cfg, self.run_, self.groups, self.actors, self.log = ray, cfg, run, groups, actors, log
        self.retried, self.task_seconds, self.merge_seconds, self.n_tasks = 0, 0.0, 0.0, 0
        self.per_worker: dict[str, list[float]] = {}  # worker -> [tokens, seconds]
        self.failures = {id(a): 0 for a in actors}
        self.n_closed = 0  # tasks of the groups finished in this attempt

    def run(self) -> tuple[dict[str, dict], float]:
        """Every group streamed (or loaded, if it was done before): finalized statistics, and the seconds
        that earlier attempts of the run spent (summed over workers)."""
        finals, previous, pending, self.open = {}, 0.0, deque(), {}
        n_ctx, T = len(self.run_.contexts), self.run_.contexts.shape[1]
        for g in range(len(self.groups)):
            done = group_path(self.cfg, self.run_.work_dir, g, len(self.groups))
            if done.exists() and not self.cfg.force:
                self.log(f"Group {g + 1}/{len(self.groups)} was done before ({done.name}).")
                group_finals, seconds = load_group(done)
                finals.update(group_finals)
                previous += seconds
                continue
            state = _GroupState.resume_or_start(self, g, plan_tasks(n_ctx, g, self.cfg.batch_size, len(self.actors)))
            self.open[g] = state
            previous += state.seconds
            pending.extend(state.todo())
        self.n_tasks = sum(len(s.tasks) for s in self.open.values())
        total = sum((t.last - t.first) * T for s in self.open.values() for t in s.tasks)
        initial = sum((t.last - t.first) * T for s in self.open.values() for t in s.done)
        self.bar = tqdm(total=total, initial=initial, unit="tok", unit_scale=True, disable=not self.cfg.progress,
                        dynamic_ncols=True, desc=f"precompute on Ray, {len(self.actors)} workers")
        self._loop(pending, finals)
        self.bar.close()
        return finals, previous

    def _loop(self, pending: deque, finals: dict) -> None:
        ray, idle, running = self.ray, list(self.actors), {}
        while pending or running:
            while pending and idle:
                task, actor = pending.popleft(), idle.pop(0)
                tokens = self.run_.contexts[task.first: task.last].numpy()
                starts = self.run_.starts_document[task.first: task.last].numpy()
                running[actor.run.remote(self.groups[task.group], task.first, tokens, starts)] = (task, actor)
            self._postfix(len(running))
            (ref,), _ = ray.wait(list(running), num_returns=1)
            task, actor = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError:  # the worker died mid-task: Ray restarts it, the task goes back
                self.retried += 1
                self.failures[id(actor)] += 1
                pending.appendleft(task)
                if self.failures[id(actor)] <= MAX_RESTARTS:
                    idle.append(actor)  # at the back: another idle worker takes the task first
                elif not idle and not running:
                    raise PrecomputeError(f"Every Ray worker died more than {MAX_RESTARTS} times: run the same "
                                          "command again to resume from the last checkpoint.") from None
                continue
            idle.append(actor)
            self._merge(task, result, finals)

    def _merge(self, task: Task, result: dict, finals: dict) -> None:
        state = self.open[task.group]
        state.add(task, result)
        tokens = (task.last - task.first) * self.run_.contexts.shape[1]
        self.task_seconds += result["seconds"]
        worker = self.per_worker.setdefault(result["worker"], [0, 0.0])
        worker[0] += tokens
        worker[1] += result["seconds"]
        self.bar.update(tokens)
        if state.complete():
            finals.update(state.finish())
            self.n_closed += len(state.tasks)
            del self.open[task.group]

    def _postfix(self, running: int) -> None:
        done = sum(len(s.done) for s in self.open.values()) + self.n_closed
        self.bar.set_postfix_str(f"tasks {done}/{self.n_tasks} done, {running} running, {self.retried} retried")

    def summary(self) -> None:
        self.log(f"Ray: {self.n_tasks} tasks on {len(self.actors)} workers, {self.retried} retried after a worker died.")
        for name, (tokens, seconds) in sorted(self.per_worker.items()):
            self.log(f"  worker {name}: {tokens:,} tokens in {seconds:.1f} s, {tokens / max(seconds, 1e-9):,.0f} tok/s")


class _GroupState:
    """One group's merged statistics, its task list and the tasks merged so far; checkpointed as it grows."""

    def __init__(self, driver: _Driver, group: int, tasks: list[Task]):
        self.driver, self.group, self.tasks, self.done = driver, group, tasks, set()
        # Made from the first result: the driver holds only the state of the groups in flight (the memory plan's).
        self.stats: dict[str, FeatureStats] | None = None
        self.seconds, self.unsaved_batches = 0.0, 0
        done = group_path(driver.cfg, driver.run_.work_dir, group, len(driver.groups))
        self.done_path, self.checkpoint = done, done.with_name(f"ray-checkpoint-{done.name}")

    @classmethod
    def resume_or_start(cls, driver: _Driver, group: int, tasks: list[Task]) -> _GroupState:
        state = cls(driver, group, tasks)
        if not state.checkpoint.exists() or driver.cfg.force:
            return state
        saved = torch.load(state.checkpoint, map_location=driver.run_.lm.device, weights_only=False)
        state.tasks = [Task(group, a, b) for a, b in saved["tasks"]]  # the slicing of the first start
        state.done = {Task(group, a, b) for a, b in saved["done"]}
        state.seconds = saved["seconds"]
        state.stats = {name: FeatureStats.from_state_dict(s, device=driver.run_.lm.device) for name, s in saved["stats"].items()}
        driver.log(f"Resuming group {group + 1}/{len(driver.groups)} of run {driver.cfg.run_id()}: "
                   f"{len(state.done)}/{len(state.tasks)} tasks merged before ({state.checkpoint.name}).")
        return state

    def todo(self) -> list[Task]:
        return [t for t in self.tasks if t not in self.done]

    def complete(self) -> bool:
        return len(self.done) == len(self.tasks)

    def add(self, task: Task, result: dict) -> None:
        device, started = self.driver.run_.lm.device, time.time()
        theirs = {name: FeatureStats.from_state_dict(s, device=device) for name, s in result["stats"].items()}
        if self.stats is None:
            self.stats = theirs
        else:
            for name, s in self.stats.items():
                s.merge(theirs[name])
        self.driver.merge_seconds += time.time() - started
        self.done.add(task)
        self.seconds += result["seconds"]
        self.unsaved_batches += -(-(task.last - task.first) // self.driver.cfg.batch_size)
        every = self.driver.cfg.checkpoint_every
        if every and self.unsaved_batches >= every and not self.complete():
            _atomic_save({"tasks": [(t.first, t.last) for t in self.tasks], "done": [(t.first, t.last) for t in self.done],
                          "seconds": self.seconds, "stats": {n: s.state_dict(copy=False) for n, s in self.stats.items()}},
                         self.checkpoint)
            self.unsaved_batches = 0

    def finish(self) -> dict[str, dict]:
        finals = save_group(self.stats, self.seconds, self.done_path)
        self.checkpoint.unlink(missing_ok=True)
        return finals
