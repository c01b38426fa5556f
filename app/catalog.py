"""The catalog: every model and SAE of the published files (app/databases.py), and the lookups that name
them. A file's own part is read once (DataFile.cached); the catalog is rebuilt only when the set of files
changes. An SAE precomputed over several corpora has one run per corpus (one file each): every run stays
reachable by its run id, and the newest is the default, what a URL without `?run=` shows.

    catalogs = CatalogSource(DataDir(settings.db_dir))
    catalog = catalogs.current("gemma-2-2b", "20-res-16k")   # re-lists the folder first if it lacks them
    sae = catalog.sae("gemma-2-2b", "20-res-16k")              # the newest run, or NotFound naming the nearest ids
    sae = catalog.sae("gemma-2-2b", "20-res-16k", run="3f2a")  # one run: its id or an unambiguous prefix of it
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields, replace
from typing import Any

import sqlalchemy as sa

from featurescope.app.databases import DataDir, DataFile, FileProblem
from featurescope.app.errors import NotFound, nearest_names
from featurescope.db import head_revision
from featurescope.schema import SAE, Model, Run


@dataclass(frozen=True)
class SAEInfo:
    model_id: str
    id: str
    site: str
    hook_name: str
    layer: int
    site_kind: str
    d_in: int
    d_sae: int
    source: str
    architecture: str
    l0: float | None
    fvu: float | None
    delta_loss: float | None
    dead_share: float | None
    dense_share: float | None
    run_id: str
    corpus: str | None
    n_tokens: int | None
    n_contexts: int | None
    context_len: int | None
    database: str
    number: int = field(repr=False)  # in its file: feature_key(number, index) finds a feature's row
    file: DataFile = field(repr=False, compare=False)

    PRIVATE = ("file", "number")  # not shown: pages and twins see the rest (app/twin_models.py: SAEOut)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.PRIVATE}


@dataclass(frozen=True)
class ModelInfo:
    id: str
    source: str
    n_layers: int
    d_model: int
    vocab_size: int
    bos_token_id: int
    special_token_ids: tuple[int, ...]
    file: DataFile = field(repr=False, compare=False)
    saes: dict[str, SAEInfo] = field(default_factory=dict, compare=False)  # the newest run of each SAE id
    runs: dict[str, tuple[SAEInfo, ...]] = field(default_factory=dict, compare=False)  # every run of each, newest first

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "n_layers": self.n_layers, "d_model": self.d_model,
                "vocab_size": self.vocab_size, "saes": [s.as_dict() for s in self.saes.values()]}


@dataclass
class Catalog:
    """The models and SAEs of every published file. Where several runs (files) hold the same SAE, the newest
    is the default and the others are found by run id (`sae(..., run=...)`, `runs_of`).
    `memo` keeps what views compute from this catalog (a feature's links depend on which SAEs are served):
    any change to the files builds a new Catalog."""
    models: dict[str, ModelInfo]
    problems: list[FileProblem]
    n_files: int
    memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def model(self, model_id: str) -> ModelInfo:
        found = self.models.get(model_id)
        if found is None:
            raise NotFound("model", model_id, f"There is no model {model_id!r}.",
                           choices=nearest_names(model_id, list(self.models)))
        return found

    def sae(self, model_id: str, sae_id: str, run: str | None = None) -> SAEInfo:
        """An SAE as one run computed it: `run` is a run id or an unambiguous prefix of one; None (or "") is
        the newest run."""
        model = self.model(model_id)
        found = model.saes.get(sae_id)
        if found is None:
            raise NotFound("sae", sae_id, f"Model {model_id!r} has no SAE {sae_id!r}.", model_id=model_id,
                           choices=nearest_names(sae_id, list(model.saes)))
        if not run:
            return found
        runs = model.runs[sae_id]
        matches = [s for s in runs if s.run_id == run] or [s for s in runs if s.run_id.startswith(run)]
        if len(matches) != 1:
            problem = "matches several of its runs" if matches else "is not one of its runs"
            raise NotFound("run", run, f"Run {run!r} {problem}: SAE {sae_id!r} has the runs "
                           f"{', '.join(s.run_id for s in runs)} (newest first).", model_id=model_id, sae_id=sae_id,
                           choices=[s.run_id for s in matches or runs])
        return matches[0]

    def runs_of(self, sae: SAEInfo) -> tuple[SAEInfo, ...]:
        """Every run of an SAE id, newest (the default) first."""
        return self.model(sae.model_id).runs[sae.id]

    def in_run(self, model_id: str, sae_id: str, run_id: str) -> SAEInfo | None:
        """SAE `sae_id` as run `run_id` (an exact id) computed it, or None when that run has no such SAE."""
        model = self.models.get(model_id)
        return next((s for s in model.runs.get(sae_id, ()) if s.run_id == run_id), None) if model else None

    def run_param(self, sae: SAEInfo) -> str | None:
        """What a URL needs to show this run of the SAE: None for the default (newest) run, else its run id."""
        return None if self.model(sae.model_id).saes[sae.id].run_id == sae.run_id else sae.run_id

    def has_model(self, model_id: str) -> bool:
        return model_id in self.models

    def has_sae(self, model_id: str, sae_id: str, run: str | None = None) -> bool:
        """Whether sae() would find it (for `run`: the run id or a prefix of one of its runs)."""
        if model_id not in self.models or sae_id not in self.models[model_id].saes:
            return False
        return not run or any(s.run_id.startswith(run) for s in self.models[model_id].runs[sae_id])


class CatalogSource:
    """The current Catalog of a DataDir, rebuilt only when its set of files changes."""

    def __init__(self, data_dir: DataDir) -> None:
        self.data_dir = data_dir
        self._key: tuple[int, ...] | None = None
        self._catalog = Catalog({}, [], 0)
        self._head = head_revision()
        self._lock = threading.Lock()

    def current(self, model_id: str | None = None, sae_id: str | None = None, run: str | None = None) -> Catalog:
        """The catalog. When it lacks the model (or SAE, or run of it) a request names, the folder is re-listed
        first, so a file published since the last scan, or being attached right now, is found rather than
        answered 404."""
        catalog = self._catalog_of(self.data_dir.files())
        known = catalog.has_model(model_id) if sae_id is None else catalog.has_sae(model_id, sae_id, run)
        if model_id is not None and not known:
            catalog = self._catalog_of(self.data_dir.refresh())
        return catalog

    def _catalog_of(self, listing: tuple[tuple[DataFile, ...], tuple[FileProblem, ...]]) -> Catalog:
        files, problems = listing
        key = tuple(id(f) for f in files) + tuple(id(p) for p in problems)
        if key != self._key:
            with self._lock:  # one request builds it; the others arriving meanwhile wait for that one
                if key != self._key:
                    catalog = _build_catalog(files, list(problems), self._head)
                    self._catalog, self._key = catalog, key
        return self._catalog


def _build_catalog(files: tuple[DataFile, ...], problems: list[FileProblem], head: str) -> Catalog:
    models: dict[str, ModelInfo] = {}
    for data_file in files:  # newest first
        read = data_file.cached("catalog", lambda: _read_file_catalog(data_file, head))
        if isinstance(read, FileProblem):
            problems.append(read)
            continue
        for model in read:
            known = models.setdefault(model.id, replace(model, saes={}, runs={}))
            for sae_id, sae in model.saes.items():
                known.saes.setdefault(sae_id, sae)
                runs = known.runs.setdefault(sae_id, [])  # type: ignore[arg-type]
                if all(r.run_id != sae.run_id for r in runs):  # the same run published twice: the newer file
                    runs.append(sae)
    for model in models.values():
        ordered = sorted(model.saes.items(), key=lambda kv: (kv[1].layer, kv[1].site_kind, kv[0]))
        model.saes.clear()
        model.saes.update(ordered)
        model.runs.update({sae_id: tuple(runs) for sae_id, runs in model.runs.items()})
    problems = [replace(p, error=p.error + ". Every SAE in it is served from a newer file, so it can also be deleted")
                if p.saes and all(_serves(models, m, s, p.runs) for m, s in p.saes) else p for p in problems]
    return Catalog(dict(sorted(models.items())), problems, len(files))


def _serves(models: dict[str, ModelInfo], model_id: str, sae_id: str, run_ids: tuple[str, ...]) -> bool:
    """Whether another file serves this SAE in one of these runs (a file of another corpus is no copy)."""
    model = models.get(model_id)
    return model is not None and any(s.run_id in run_ids for s in model.runs.get(sae_id, ()))


def _read_file_catalog(data_file: DataFile, head: str) -> list[ModelInfo] | FileProblem:
    try:
        return _read_models(data_file, head)
    except sa.exc.DBAPIError as exc:
        return FileProblem(data_file.path.name, f"is not a FeatureScope database: {exc.orig}")


def _read_models(data_file: DataFile, head: str) -> list[ModelInfo] | FileProblem:
    version = sa.table("alembic_version", sa.column("version_num"))
    with data_file.connect() as conn:
        revision = conn.execute(sa.select(version.c.version_num)).scalar()
        if revision != head:
            rows = conn.execute(sa.select(SAE.model_id, SAE.id, SAE.run_id)).all()  # the same in every revision
            saes, runs = tuple((m, s) for m, s, _ in rows), tuple(sorted({r for _, _, r in rows}))
            return FileProblem(data_file.path.name, f"has schema revision {revision}; this server reads {head}: upgrade it "
                               f"with `featurescope db upgrade {data_file.path}` while no server has it open, "
                               "or publish it again with this version of featurescope", saes, runs)
        model_rows = conn.execute(sa.select(Model.__table__).order_by(Model.id)).mappings().all()
        sae_rows = conn.execute(
            sa.select(SAE.__table__, Run.corpus, Run.n_tokens, Run.n_contexts, Run.context_len)
            .join(Run, Run.id == SAE.run_id, isouter=True).order_by(SAE.model_id, SAE.layer, SAE.id)).mappings().all()
    models = {r["id"]: ModelInfo(r["id"], r["source"], r["n_layers"], r["d_model"], r["vocab_size"], r["bos_token_id"],
                                 tuple(r["special_token_ids"] or ()), data_file) for r in model_rows}
    for r in sae_rows:
        if r["model_id"] not in models:
            continue
        models[r["model_id"]].saes[r["id"]] = SAEInfo(
            model_id=r["model_id"], id=r["id"], site=f"{r['layer']}-{r['site_kind']}", hook_name=r["hook_name"],
            layer=r["layer"], site_kind=r["site_kind"], d_in=r["d_in"], d_sae=r["d_sae"], source=r["source"],
            architecture=r["architecture"], l0=r["l0"], fvu=r["fvu"], delta_loss=r["delta_loss"],
            dead_share=r["dead_share"], dense_share=r["dense_share"], run_id=r["run_id"], corpus=r["corpus"],
            n_tokens=r["n_tokens"], n_contexts=r["n_contexts"], context_len=r["context_len"], database=data_file.name,
            number=r["number"], file=data_file)
    return list(models.values())



def check_index(sae: SAEInfo, index: int) -> None:
    if not 0 <= index < sae.d_sae:
        nearest = min(max(index, 0), sae.d_sae - 1)
        raise NotFound("feature", str(index), f"SAE {sae.id!r} has features 0 to {sae.d_sae - 1}; there is no feature {index}.",
                       model_id=sae.model_id, sae_id=sae.id, choices=[nearest], valid_range=(0, sae.d_sae - 1))
