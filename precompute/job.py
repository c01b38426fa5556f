"""The precompute job: one pass of a model over a corpus, any number of SAEs encoding the same batch,
streaming per-feature statistics, then one DuckDB file published atomically.

    from featurescope.precompute.job import PrecomputeConfig, run_precompute
    run_precompute(PrecomputeConfig(model="smollm2-135m", saes=["data/saes/6-res"], max_tokens=100_000))

or `featurescope precompute --sae data/saes/6-res --sae data/saes/12-res`. Killed? Run the same
command again: it resumes from the last checkpoint and gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from featurescope.corpus import PackedContexts, content_mask, pack_documents, spread_rows
from featurescope.encoder import FeatureEncoder, check_sae_fits
from featurescope.errors import FeatureScopeError
from featurescope.memory import return_free_memory
from featurescope.models import LoadedModel, load_model
from featurescope.positions import WARMUP_POSITIONS
from featurescope.sae import JumpReLUSAE
from featurescope.sae_loading import load_sae
from featurescope.sae_sources import SAELoadError, expand_sae_sources, is_pattern, width_label
from featurescope.schema import DENSE_THRESHOLD
from featurescope.sites import SiteActivations, parse_site
from featurescope.precompute.config import SAMPLES, PrecomputeConfig
from featurescope.precompute.corpus_sources import CorpusError, iter_texts
from featurescope.precompute.examples import ExampleActs
from featurescope.precompute.feature_stats import FeatureStats, expected_memory_bytes
from featurescope.precompute.links import LinkPlan, PeakTables, cross_layer_links
from featurescope.precompute.plan import PlanError, SAESpec, default_memory_budget, describe_plan, plan_groups
from featurescope.precompute.static_stats import decoder_neighbours, logit_effect, site_unembedding, unembedding
from featurescope.precompute.writer import SAEResult, write_run_db

PLAN_FILE = "plan.json"  # the run's SAE groups, fixed at its first start
MEASURED_BATCHES = 3  # batches timed for the first estimate of the run time
# Features whose examples one re-encoding pass collects: ~100 bytes each on a small corpus (~1 KB of slots
# and activations on a large one), so a 78 x 16k release takes 5 passes over the examples' contexts.
EXAMPLE_PASS_FEATURES = 1 << 18


class PrecomputeError(FeatureScopeError, ValueError):
    """Bad input to the job; nothing was written."""


def default_sae_ids(saes: list[JumpReLUSAE]) -> list[str]:
    """'{layer}-{kind}-{width}', e.g. '20-res-16k'; a repeated id gets its L0 variant or a counter appended."""
    ids = []
    for sae in saes:
        site = parse_site(sae.cfg.hook_name)
        base = f"{site.short_name}-{width_label(sae.d_sae)}"
        candidate, n = base, 1
        if base in ids and "average_l0_" in sae.cfg.source:
            candidate = f"{base}-l0-{sae.cfg.source.rsplit('average_l0_', 1)[1]}"
        while candidate in ids:
            n += 1
            candidate = f"{base}-{n}"
        ids.append(candidate)
    return ids


def with_expanded_sources(cfg: PrecomputeConfig) -> PrecomputeConfig:
    """cfg with its release patterns and --sae-list expanded into concrete SAE sources
    (featurescope/sae_sources.py): the run id names the SAEs, not the way they were written."""
    if cfg.sae_list is None and not any(is_pattern(source) for source in cfg.saes):
        return cfg
    try:
        sources = expand_sae_sources(cfg.saes, cfg.sae_list)
    except SAELoadError as exc:
        raise PrecomputeError(str(exc)) from exc
    return dataclasses.replace(cfg, saes=sources, sae_list=None)


def published_path(cfg: PrecomputeConfig, model_id: str) -> Path:
    return Path(cfg.data_dir) / "db" / f"{model_id}--{cfg.run_id()}.duckdb"


def run_precompute(cfg: PrecomputeConfig, lm: LoadedModel | None = None, log=print, timings: dict | None = None,
                   site_acts: SiteActivations | None = None) -> Path:
    """Run (or resume) the job and publish its DuckDB file; returns the published path.
    The SAEs run in groups whose state fits the memory budget (precompute/plan.py), one model pass per
    group; each finished group's state is saved, so a killed job resumes inside the group it was in.
    `site_acts`, captured for exactly this run's contexts (the demo's training pass), stand in for the
    model's forward pass; they must cover every SAE's site, and other contexts are refused.
    With cfg.shard = (i, n) it processes only the i-th of n slices of the contexts and saves that
    shard's statistics instead (returns the folder holding them); with cfg.merge_shards it merges all n
    saved shards and publishes: exactly the result of one run over the whole corpus.
    `timings`, if given, receives seconds per phase: stream, finish, write, total, links (the cross-layer
    links' own share of finish), and passes: [(SAE names, streaming seconds)] per group streamed now."""
    started = time.time()
    cfg = with_expanded_sources(cfg)
    if cfg.ray is not None:
        from featurescope.precompute.distributed import run_on_ray  # Ray is an optional extra

        if site_acts is not None:
            raise PrecomputeError("--ray runs the model on its workers: activations given here cannot be used with it.")
        return run_on_ray(cfg, lm, log, timings)
    run = open_run(cfg, lm, log, site_acts)
    if isinstance(run, Path):
        return run
    groups = _plan_groups(cfg, run.lm, run.saes, run.work_dir, log)
    if cfg.merge_shards:
        finals, previous_seconds = _merge_shard_files(cfg, run.work_dir, run.saes, groups, run.lm.device)
        stream_seconds, passes = 0.0, []
    else:
        finals, stream_seconds, previous_seconds, passes = {}, 0.0, 0.0, []
        for g, names in enumerate(groups):
            group_finals, streamed, previous = _stream_group(cfg, run.encode, run.saes, groups, g, run.work_dir, log)
            finals.update(group_finals)
            stream_seconds, previous_seconds = stream_seconds + streamed, previous_seconds + previous
            passes.append((names, streamed))
        if cfg.shard:
            log(f"Saved shard {cfg.shard[0]}/{cfg.shard[1]} in {run.work_dir}; when all {cfg.shard[1]} are done, run "
                f"the same command with --merge-shards {cfg.shard[1]}.")
            return run.work_dir
    published = publish(cfg, run, groups, finals, started, previous_seconds, log, timings)
    if timings is not None:
        timings.update(stream=stream_seconds, passes=passes)
    return published


@dataclasses.dataclass
class Run:
    """A run ready to stream: its model, SAEs by id, contexts, work folder and the file it publishes."""
    lm: LoadedModel
    saes: dict[str, JumpReLUSAE]
    contexts: torch.Tensor  # [n_contexts, context_len] token ids
    starts_document: torch.Tensor  # [n_contexts] bool: the context begins a document (no warm-up, positions.py)
    encode: Encode
    work_dir: Path
    target: Path


def open_run(cfg: PrecomputeConfig, lm: LoadedModel | None, log, site_acts: SiteActivations | None = None) -> Run | Path:
    """Check the input (SAEs, model, corpus) and read the contexts; the published path if the run is complete."""
    lm, saes, target = _prepare(cfg, lm)
    if target.exists() and not cfg.force:
        log(f"Already complete: {target} (run {cfg.run_id()}). Pass --force to recompute.")
        return target
    contexts, starts_document = _contexts(cfg, lm)
    if site_acts is not None and not torch.equal(site_acts.contexts, contexts):
        raise PrecomputeError(f"The activations given are for {len(site_acts.contexts)} other contexts, "
                              f"not this run's {len(contexts)}: run it without them.")
    work_dir = Path(cfg.data_dir) / "runs" / cfg.run_id()
    work_dir.mkdir(parents=True, exist_ok=True)
    return Run(lm, saes, contexts, starts_document, Encode(lm, contexts, starts_document, site_acts), work_dir, target)


def publish(cfg: PrecomputeConfig, run: Run, groups: list[list[str]], finals: dict[str, dict], started: float,
            previous_seconds: float, log, timings: dict | None = None) -> Path:
    """The finish step (examples, logit effects, neighbours, links), then the DuckDB file, published atomically."""
    log("Finishing: the examples' per-token activations, logit effects, neighbours ...")
    phases = {"finish": 0.0, "links": 0.0}
    write_started = time.time()
    staging = run.work_dir / "staging.duckdb"
    run_seconds = lambda: previous_seconds + (time.time() - started)  # noqa: E731  (read once the SAEs are written)
    lm, contexts = run.lm, run.contexts
    write_run_db(staging, model_row=_model_row(lm), vocab=lm.token_strings(range(lm.vocab_size)), contexts=contexts.numpy(),
                 starts_document=run.starts_document.numpy(), run_row=lambda: _run_row(cfg, lm, contexts, run_seconds()),
                 sae_ids=list(run.saes), saes=_finish(cfg, lm, run.encode, run.saes, groups, finals, phases))
    write_seconds = time.time() - write_started - phases["finish"]
    run.target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, run.target)  # atomic publish: readers see the old file or the complete new one
    for leftover in [*run.work_dir.glob("*.pt"), run.work_dir / PLAN_FILE]:
        leftover.unlink(missing_ok=True)
    _summary(log, run.target, contexts, finals, time.time() - started, write_seconds)
    if timings is not None:
        timings.update(finish=phases["finish"], write=write_seconds, total=time.time() - started, links=phases["links"])
    return run.target


def _prepare(cfg: PrecomputeConfig, lm: LoadedModel | None) -> tuple[LoadedModel, dict[str, JumpReLUSAE], Path]:
    if not cfg.saes:
        raise PrecomputeError("No SAEs given: pass at least one --sae.")
    if cfg.shard and not (0 <= cfg.shard[0] < cfg.shard[1]):
        raise PrecomputeError(f"Shard {cfg.shard[0]}/{cfg.shard[1]} does not exist: use i/n with 0 <= i < n.")
    saes = [load_sae(src, site=cfg.site) for src in cfg.saes]
    sae_ids = cfg.sae_ids or default_sae_ids(saes)
    if len(sae_ids) != len(saes) or len(set(sae_ids)) != len(sae_ids):
        raise PrecomputeError(f"Need one distinct id per SAE; got {sae_ids} for {len(saes)} SAEs.")
    lm = lm or load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    for name, sae in zip(sae_ids, saes):
        check_sae_fits(lm, sae, name)  # every SAE's width against its site, before any work
    return lm, dict(zip(sae_ids, saes)), published_path(cfg, lm.name)


def _plan_groups(cfg: PrecomputeConfig, lm: LoadedModel, saes: dict[str, JumpReLUSAE], work_dir: Path, log) -> list[list[str]]:
    """The SAE groups of this run (precompute/plan.py): planned at its first start and kept in the work
    folder, so a resumed job, every shard and the merge use the same groups whatever memory they have."""
    path = work_dir / PLAN_FILE
    if path.exists():
        groups = json.loads(path.read_text())["groups"]
        if sorted(n for g in groups for n in g) == sorted(saes):
            log(f"Using the plan of this run's first start: {len(groups)} model pass{'es' * (len(groups) > 1)} ({path}).")
            return groups
    specs = [SAESpec(name, parse_site(sae.cfg.hook_name), sae.d_in, sae.d_sae) for name, sae in saes.items()]
    budget = cfg.memory_budget or default_memory_budget(lm.device)
    state = lambda spec: spec.weight_bytes + expected_memory_bytes(spec.d_sae, cfg.top_k, cfg.examples_per_interval)  # noqa: E731
    try:
        plan = plan_groups(specs, state, budget, pass_bytes(lm, cfg.batch_size, cfg.context_len, max(s.d_sae for s in specs)))
    except PlanError as exc:
        raise PrecomputeError(str(exc)) from exc
    log(describe_plan(plan))
    groups = [group.names for group in plan.groups]
    path.write_text(json.dumps({"groups": groups}))
    return groups


def pass_bytes(lm: LoadedModel, batch_size: int, context_len: int, max_d_sae: int) -> int:
    """Memory of one batch beside the SAEs' state: the truncated forward (hidden states and eager
    attention scores) and one SAE's activations with FeatureStats.update's temporaries (~4x the acts)."""
    tokens = batch_size * context_len
    heads = getattr(lm.model.config, "num_attention_heads", 1)
    forward = 4 * (8 * tokens * lm.d_model + 2 * batch_size * heads * context_len ** 2)
    return forward + 4 * 4 * tokens * max_d_sae


def _part_name(cfg: PrecomputeConfig, group: int, n_groups: int) -> str:
    """Files of one group's statistics: 'group-0-of-3', or 'shard-1-of-4-group-0-of-3' in a shard."""
    prefix = f"shard-{cfg.shard[0]}-of-{cfg.shard[1]}-" if cfg.shard else ""
    return f"{prefix}group-{group}-of-{n_groups}"


def _shard_range(cfg: PrecomputeConfig, n_contexts: int) -> tuple[int, int]:
    """Contexts [first, last) of this shard: n contiguous, near-equal slices."""
    if not cfg.shard:
        return 0, n_contexts
    i, n = cfg.shard
    return i * n_contexts // n, (i + 1) * n_contexts // n


def _stream_group(cfg, encode: Encode, saes: dict, groups: list[list[str]], g: int, work_dir: Path,
                  log) -> tuple[dict[str, dict], float, float]:
    """Stream group g over this run's (or shard's) contexts, or load its saved statistics if it is done.
    Returns its SAEs' finalized statistics, the seconds streamed now and those of earlier attempts."""
    done = group_path(cfg, work_dir, g, len(groups))
    checkpoint = work_dir / f"checkpoint-{done.name}"
    if done.exists() and not cfg.force:
        log(f"Group {g + 1}/{len(groups)} was done before ({done.name}).")
        finals, previous = load_group(done)
        return finals, 0.0, previous
    encoder = FeatureEncoder(encode.lm, {name: saes[name] for name in groups[g]})
    first, last = _shard_range(cfg, len(encode.contexts))
    stats, next_context, previous = _start_or_resume(cfg, checkpoint, encoder, first, log)
    desc = f"precompute {len(stats)} SAE{'s' * (len(stats) > 1)}" + (f", group {g + 1}/{len(groups)}" if len(groups) > 1 else "")
    batches = -(-(last - next_context) // cfg.batch_size)

    def estimate(per_batch: float) -> None:  # the later groups scaled by their features: the SAEs dominate at scale
        features = [sum(saes[n].d_sae for n in names) for names in groups[g:]]
        rest = per_batch * batches * sum(features) / features[0]
        log(f"First batches: {per_batch:.2f} s per batch -> ~{_duration(per_batch * batches)} for this pass"
            + (f", ~{_duration(rest)} for the {len(features)} passes left (scaled by their features)." if len(features) > 1 else "."))
    seconds = stream(cfg, encode, encoder, stats, next_context, last, checkpoint, desc, estimate)
    finals = save_group(stats, previous + seconds, done)
    checkpoint.unlink(missing_ok=True)
    _release(encoder)
    del stats
    return_free_memory()  # the streaming state and its temporaries, before the next group or the finish
    return finals, seconds, previous


def group_path(cfg: PrecomputeConfig, work_dir: Path, group: int, n_groups: int) -> Path:
    """Where a finished group's statistics are kept until the run is published."""
    return work_dir / f"{_part_name(cfg, group, n_groups)}.pt"


def save_group(stats: dict[str, FeatureStats], seconds: float, path: Path) -> dict[str, dict]:
    """Save a finished group's statistics (a resumed run skips the group); returns them finalized."""
    _atomic_save({"seconds": seconds, "stats": {name: s.state_dict(copy=False) for name, s in stats.items()}}, path)
    return {name: s.finalize() for name, s in stats.items()}


def load_group(path: Path) -> tuple[dict[str, dict], float]:
    """A finished group's finalized statistics and the seconds its streaming took."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {name: FeatureStats.from_state_dict(s).finalize() for name, s in state["stats"].items()}, state["seconds"]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _release(encoder: FeatureEncoder) -> None:
    """Move a finished group's SAEs off the accelerator (FeatureEncoder moved them there in place)."""
    if encoder.lm.device.type != "cpu":
        for sae in encoder.saes.values():
            sae.to("cpu")
    if encoder.lm.device.type == "cuda":
        torch.cuda.empty_cache()


def _merge_shard_files(cfg, work_dir: Path, saes: dict, groups: list[list[str]], device) -> tuple[dict, float]:
    n = cfg.merge_shards
    paths = {(i, g): work_dir / f"shard-{i}-of-{n}-group-{g}-of-{len(groups)}.pt" for i in range(n) for g in range(len(groups))}
    missing = [p.name for p in paths.values() if not p.exists()]
    if missing:
        raise PrecomputeError(f"Cannot merge: {', '.join(missing)} not found in {work_dir} (run those shards first).")
    finals, seconds = {}, 0.0
    for g, names in enumerate(groups):
        stats = {name: FeatureStats(saes[name].d_sae, cfg.context_len, top_k=cfg.top_k, n_intervals=cfg.n_intervals,
                                    examples_per_interval=cfg.examples_per_interval, device=device) for name in names}
        for i in range(n):
            state = torch.load(paths[i, g], map_location=device, weights_only=False)
            seconds += state["seconds"]
            for name, s in stats.items():
                s.merge(FeatureStats.from_state_dict(state["stats"][name], device=device))
        finals.update({name: s.finalize() for name, s in stats.items()})
    return finals, seconds


def _contexts(cfg: PrecomputeConfig, lm: LoadedModel) -> PackedContexts:
    if cfg.context_len > lm.max_context:
        raise PrecomputeError(f"Context length {cfg.context_len} is over model {lm.name!r}'s limit of {lm.max_context} tokens.")
    if cfg.sample not in SAMPLES:
        raise PrecomputeError(f"sample must be {' or '.join(SAMPLES)}; got {cfg.sample!r}.")
    if cfg.sample == "spread" and cfg.corpus.source.startswith("hf:"):
        raise PrecomputeError("--sample spread reads the whole corpus: use it with python-docs or local files, "
                              "not with a streamed hf: dataset.")
    try:
        if cfg.sample == "spread":
            packed = pack_documents(lm, iter_texts(cfg.corpus), cfg.context_len)
            n = min(len(packed.ids), cfg.max_tokens // (cfg.context_len - 1))
            rows = spread_rows(len(packed.ids), n) if n > 0 else torch.zeros(0, dtype=torch.long)
            packed = PackedContexts(packed.ids[rows], packed.starts_document[rows])  # corpus.pick_spread's rows
        else:
            packed = pack_documents(lm, iter_texts(cfg.corpus), cfg.context_len, cfg.max_tokens)
    except CorpusError as exc:
        raise PrecomputeError(str(exc)) from exc
    if len(packed.ids) == 0:
        raise PrecomputeError(f"Corpus {cfg.corpus.describe()!r} gave no complete context of {cfg.context_len} tokens: it is empty or too short.")
    return packed


def new_stats(cfg: PrecomputeConfig, encoder: FeatureEncoder) -> dict[str, FeatureStats]:
    return {name: FeatureStats(sae.d_sae, cfg.context_len, top_k=cfg.top_k, n_intervals=cfg.n_intervals,
                               examples_per_interval=cfg.examples_per_interval, device=encoder.lm.device)
            for name, sae in encoder.saes.items()}


def _link_plan(cfg: PrecomputeConfig, saes: dict[str, JumpReLUSAE]) -> LinkPlan | None:
    """Which SAEs link to which, or None: links are off, or there is only one SAE."""
    if not cfg.links or len(saes) < 2:
        return None
    sites = {name: parse_site(sae.cfg.hook_name) for name, sae in saes.items()}
    return LinkPlan(sites, {name: sae.d_sae for name, sae in saes.items()}, cfg.links_peak_width)


def _start_or_resume(cfg, checkpoint: Path, encoder: FeatureEncoder, first: int, log) -> tuple[dict, int, float]:
    stats = new_stats(cfg, encoder)
    if not checkpoint.exists() or cfg.force:
        return stats, first, 0.0
    state = torch.load(checkpoint, map_location=encoder.lm.device, weights_only=False)
    for name, s in stats.items():
        s.load_state_dict(state["stats"][name])
    log(f"Resuming run {cfg.run_id()} from context {state['next_context']} (checkpoint {checkpoint}).")
    return stats, state["next_context"], state["elapsed"]


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-save leaves the previous file intact


class Encode:
    """Feature activations and counted positions of some of the run's contexts, one SAE after the other:
    the encoder's forward pass, or the site activations a caller captured for these contexts (the same SAE
    code either way)."""

    def __init__(self, lm: LoadedModel, contexts: torch.Tensor, starts_document: torch.Tensor,
                 site_acts: SiteActivations | None, first_id: int = 0):
        self.lm, self.contexts, self.starts_document, self.site_acts = lm, contexts, starts_document, site_acts
        self.first_id = first_id  # context id of row 0: a Ray task holds only its slice of the run's contexts

    def __call__(self, encoder: FeatureEncoder, index: slice | torch.Tensor) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        given = None if self.site_acts is None else self.site_acts.rows(index, encoder.sites.values())
        return encoder.encode_each(self.contexts[index], site_acts=given, starts_document=self.starts_document[index])


def stream(cfg, encode: Encode, encoder: FeatureEncoder, stats: dict, start: int, stop: int, checkpoint: Path,
            desc: str, on_measured=None) -> float:
    """The main loop over contexts [start, stop): one forward per batch, every SAE's statistics updated from it.
    Returns the seconds it took. on_measured(seconds per batch), if given, is called once after the first
    MEASURED_BATCHES batches (the first one, which warms up, left out)."""
    contexts = encode.contexts
    T = contexts.shape[1]
    first_of_range = _shard_range(cfg, len(contexts))[0]
    bar = tqdm(total=(stop - first_of_range) * T, initial=(start - first_of_range) * T, unit="tok", unit_scale=True,
               disable=not cfg.progress, dynamic_ncols=True,
               desc=desc + (f" shard {cfg.shard[0]}/{cfg.shard[1]}" if cfg.shard else ""))
    started = time.time()
    for batch_no, first in enumerate(range(start, stop, cfg.batch_size), start=1):
        rows = slice(first, min(first + cfg.batch_size, stop))
        context_ids = torch.arange(rows.start, rows.stop, device=encoder.lm.device) + encode.first_id
        # Per SAE: [B, T, d_sae] acts and the positions that count (never BOS/EOS/pad or norm outliers)
        for name, acts, mask in encode(encoder, rows):
            stats[name].update(acts, context_ids, mask)
        bar.update((rows.stop - rows.start) * T)
        if batch_no == 1:
            warm = time.time()
        elif batch_no == MEASURED_BATCHES + 1 and on_measured is not None:
            on_measured((time.time() - warm) / MEASURED_BATCHES)
        if cfg.checkpoint_every and batch_no % cfg.checkpoint_every == 0 and rows.stop < stop:
            _atomic_save({"next_context": rows.stop, "elapsed": time.time() - started,
                          "stats": {name: s.state_dict(copy=False) for name, s in stats.items()}}, checkpoint)
    bar.close()
    return time.time() - started


@torch.no_grad()
def _finish(cfg, lm: LoadedModel, encode: Encode, saes: dict[str, JumpReLUSAE], groups: list[list[str]],
            finals: dict[str, dict], phases: dict) -> Iterator[SAEResult]:
    """Each SAE's complete result, one at a time: the writer stores and drops each before the next is drawn, and
    a chunk's examples and links are gone before the next chunk's example pass. A written SAE's finals keep only
    what later chunks' links and the summary read (FINALS_KEPT). phases["finish"] and phases["links"] accumulate
    the seconds spent here."""
    plan = _link_plan(cfg, saes)
    W_U = unembedding(lm)  # [vocab, d_model], final norm gain folded in
    for names in (chunk for group in groups for chunk in _example_chunks(group, saes)):
        started = time.time()
        examples, links = _example_pass(cfg, encode, saes, names, finals, plan, phases)
        phases["finish"] += time.time() - started
        for name in names:
            started = time.time()
            sae = saes[name]
            W_dec = sae.W_dec.to(lm.device)
            logits = logit_effect(W_dec, site_unembedding(lm, parse_site(sae.cfg.hook_name), W_U))
            near = decoder_neighbours(W_dec, k=cfg.neighbours)
            static = {f"logit_{k}": v for k, v in logits.items()}
            static.update(neighbour_ids=near["ids"], neighbour_cos=near["cos"])
            result = SAEResult(row=_sae_row(lm, name, sae, finals[name], cfg), stats=finals[name], static=static,
                               examples=examples.pop(name), links=links.pop(name, []))
            phases["finish"] += time.time() - started
            yield result
            del result  # else held through the next SAE's work, and after a chunk's last through the next pass
            finals[name] = {key: finals[name][key] for key in FINALS_KEPT}
        return_free_memory()  # this chunk's example pass, before the next one


# What a written SAE's finalized statistics keep: its top examples' peaks and its means for the links of the
# chunks after it (precompute/links.py), its counts for the job's summary.
FINALS_KEPT = ("top_ctx", "top_pos", "max_act", "mean_act", "density", "n_firing", "n_tokens")


def _example_chunks(names: list[str], saes: dict[str, JumpReLUSAE]) -> Iterator[list[str]]:
    """Consecutive SAEs of a group with at most EXAMPLE_PASS_FEATURES features together (at least one SAE):
    an example pass holds every example's activations of its SAEs at once."""
    chunk, features = [], 0
    for name in names:
        if chunk and features + saes[name].d_sae > EXAMPLE_PASS_FEATURES:
            yield chunk
            chunk, features = [], 0
        chunk.append(name)
        features += saes[name].d_sae
    yield chunk


def _example_pass(cfg, encode: Encode, saes: dict[str, JumpReLUSAE], names: list[str], finals: dict,
                  plan: LinkPlan | None, phases: dict) -> tuple[dict[str, dict], dict[str, list]]:
    """Re-encode the contexts some example of SAEs `names` names, with the same encoder (the values the live
    encoder gives): every example's per-token acts (precompute/examples.py), and the peaks of the SAEs they
    link to, for their cross-layer links (computed here too)."""
    collectors = {name: ExampleActs(finals[name]) for name in names}
    peaks = PeakTables(plan, finals, cfg.context_len, linkers=names) if plan else None
    encoder = FeatureEncoder(encode.lm, {n: saes[n] for n in sorted(set(names) | set(peaks.tables if peaks else ()))})
    wanted = torch.unique(torch.cat([c.context_ids() for c in collectors.values()]))
    T = encode.contexts.shape[1]
    with tqdm(total=len(wanted) * T, unit="tok", unit_scale=True, disable=not cfg.progress, dynamic_ncols=True,
              desc=f"examples of {len(collectors)} SAE{'s' * (len(collectors) > 1)}") as bar:
        for first in range(0, len(wanted), cfg.batch_size):
            context_ids = wanted[first: first + cfg.batch_size]
            for name, acts, mask in encode(encoder, context_ids):
                if name in collectors:
                    collectors[name].add(context_ids, acts, mask)
                if peaks is not None:
                    link_started = time.time()
                    peaks.add(name, context_ids, acts, mask)
                    phases["links"] += time.time() - link_started
            bar.update(len(context_ids) * T)
    link_started = time.time()
    links = cross_layer_links(plan, finals, peaks, encoder.saes, top_n=cfg.links_per_neighbour, names=names) if plan else {}
    phases["links"] += time.time() - link_started
    _release(encoder)
    return {name: c.result() for name, c in collectors.items()}, links


def _sae_row(lm, name: str, sae: JumpReLUSAE, final: dict, cfg) -> dict:
    site = parse_site(sae.cfg.hook_name)
    metrics = (sae.cfg.metadata or {}).get("eval", {})  # written by `featurescope eval` into the SAE's card
    density = final["density"]
    return dict(model_id=lm.name, id=name, run_id=cfg.run_id(), hook_name=site.hook_name, layer=site.layer,
                site_kind=site.kind, d_in=sae.d_in, d_sae=sae.d_sae, source=sae.cfg.source,
                architecture=sae.cfg.architecture, l0=metrics.get("l0"), fvu=metrics.get("fvu"),
                delta_loss=metrics.get("delta_loss"), dead_share=float((final["n_firing"] == 0).float().mean()),
                dense_share=float((density > DENSE_THRESHOLD).float().mean()), card=json.dumps(sae.cfg.metadata or {}))


def _model_row(lm: LoadedModel) -> dict:
    return dict(id=lm.name, source=lm.source, n_layers=lm.n_layers, d_model=lm.d_model, vocab_size=lm.vocab_size,
                bos_token_id=lm.bos_token_id, special_token_ids=sorted(lm.special_token_ids))


def _run_row(cfg, lm, contexts: torch.Tensor, seconds: float) -> dict:
    n_tokens = int(content_mask(lm, contexts).sum())  # each SAE's density counts its own positions (features.n_firing)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    return dict(id=cfg.run_id(), model_id=lm.name, corpus=cfg.corpus.describe(), n_contexts=len(contexts),
                context_len=cfg.context_len, n_tokens=n_tokens, status="complete",
                # the warm-up of contexts that start mid-document (featurescope/positions.py), which pages grey out
                config=json.dumps({**cfg.result_config(), "warmup_positions": WARMUP_POSITIONS}),
                started_at=now - dt.timedelta(seconds=seconds), finished_at=now, seconds=seconds)


def _summary(log, target: Path, contexts: torch.Tensor, finals: dict, seconds: float, write_seconds: float) -> None:
    log(f"Published {target} ({target.stat().st_size / 1e6:.1f} MB) in {seconds:.1f} s "
        f"({write_seconds:.1f} s writing DuckDB): {len(contexts)} contexts of {contexts.shape[1]} tokens.")
    for name, final in finals.items():
        n_firing = final["n_firing"]
        log(f"  {name:<16} {final['n_tokens']} tokens counted   mean density {float(final['density'].mean()):.4f}"
            f"   dead {float((n_firing == 0).float().mean()):.1%}")
