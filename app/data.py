"""Every query the explorer makes, one data function per view. Each returns plain data (dicts, lists,
numbers, strings) that feeds the HTML page, its `.json` twin and its htmx fragments alike.

    catalog = CatalogSource(DataDir(settings.db_dir)).current()
    home(catalog); sae_view(catalog, "gemma-2-2b", "20-res-16k", FeatureQuery())
    feature_view(catalog, "gemma-2-2b", "20-res-16k", 12345, text="")

Queries are SQLAlchemy Core on featurescope.schema with bound parameters. A feature page is one
indexed point lookup of its features row, which holds its examples and links (contexts and neighbours'
labels come from per-file caches). Per-file results that never change (catalog, vocab, contexts, density
histogram) are cached on the DataFile; the last FEATURES_CACHED features read from a file are kept too.
"""

from __future__ import annotations

import functools
import json
import math
import random
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import sqlalchemy as sa

from featurescope.app.databases import DataDir, DataFile, FileProblem
from featurescope.app.errors import InvalidParameter, NotFound, nearest_names
from featurescope.app.twin_models import (DensityHistogram, FeatureLinks, FeatureView, HomeView, LineageView, ModelView,
                                          SAEView)
from featurescope.db import head_revision
from featurescope.labels import LABEL_KIND_AUTO, auto_label
from featurescope.flow import flow_key
from featurescope.schema import DENSE_THRESHOLD, SAE, Context, Feature, IntList, Model, Run, Vocab, feature_key

DENSITY_BINS_PER_DECADE = 4
PEAK_TOKENS_SHOWN = 3
FEATURES_CACHED = 128  # per file; a feature's stored data is tens of KB of Python objects

SortKey = Literal["index", "label", "density", "max_act"]
Show = Literal["all", "alive", "dead", "dense"]
SORT_COLUMNS = {"index": Feature.feature, "label": Feature.label, "density": Feature.density, "max_act": Feature.max_act}


# ----------------------------------------------------------------------------------------------- catalog
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

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("file", "number")}


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
    saes: dict[str, SAEInfo] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "n_layers": self.n_layers, "d_model": self.d_model,
                "vocab_size": self.vocab_size, "saes": [s.as_dict() for s in self.saes.values()]}


@dataclass
class Catalog:
    """The models and SAEs of every published file. Where two files hold the same SAE, the newer wins."""
    models: dict[str, ModelInfo]
    problems: list[FileProblem]
    n_files: int
    links: Callable[[str, str, int], dict[str, Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A feature's links depend on files and on which SAEs are served, and any change to the files
        # builds a new Catalog: so the catalog can keep the links of the last features asked for.
        self.links = functools.lru_cache(FEATURES_CACHED)(functools.partial(feature_links, self))

    def model(self, model_id: str) -> ModelInfo:
        found = self.models.get(model_id)
        if found is None:
            raise NotFound("model", model_id, f"There is no model {model_id!r}.",
                           choices=nearest_names(model_id, list(self.models)))
        return found

    def sae(self, model_id: str, sae_id: str) -> SAEInfo:
        model = self.model(model_id)
        found = model.saes.get(sae_id)
        if found is None:
            raise NotFound("sae", sae_id, f"Model {model_id!r} has no SAE {sae_id!r}.", model_id=model_id,
                           choices=nearest_names(sae_id, list(model.saes)))
        return found

    def has_model(self, model_id: str) -> bool:
        return model_id in self.models

    def has_sae(self, model_id: str, sae_id: str) -> bool:
        return model_id in self.models and sae_id in self.models[model_id].saes


class CatalogSource:
    """The current Catalog of a DataDir, rebuilt only when its set of files changes."""

    def __init__(self, data_dir: DataDir) -> None:
        self.data_dir = data_dir
        self._key: tuple[int, ...] | None = None
        self._catalog = Catalog({}, [], 0)
        self._head = head_revision()
        self._lock = threading.Lock()

    def current(self, model_id: str | None = None, sae_id: str | None = None) -> Catalog:
        """The catalog. When it lacks the model (or SAE) a request names, the folder is re-listed first, so
        a file published since the last scan, or being attached right now, is found rather than answered
        404."""
        catalog = self._catalog_of(self.data_dir.files())
        known = catalog.has_model(model_id) if sae_id is None else catalog.has_sae(model_id, sae_id)
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
        if "catalog" not in data_file.cache:
            try:
                data_file.cache["catalog"] = _read_file_catalog(data_file, head)
            except sa.exc.DBAPIError as exc:
                data_file.cache["catalog"] = FileProblem(data_file.path.name, f"is not a FeatureScope database: {exc.orig}")
        read = data_file.cache["catalog"]
        if isinstance(read, FileProblem):
            problems.append(read)
            continue
        for model in read:
            known = models.setdefault(model.id, replace(model, saes={}))
            for sae_id, sae in model.saes.items():
                known.saes.setdefault(sae_id, sae)
    for model in models.values():
        ordered = sorted(model.saes.items(), key=lambda kv: (kv[1].layer, kv[1].site_kind, kv[0]))
        model.saes.clear()
        model.saes.update(ordered)
    problems = [replace(p, error=p.error + ". Every SAE in it is served from a newer file, so it can also be deleted")
                if p.saes and all(m in models and s in models[m].saes for m, s in p.saes) else p for p in problems]
    return Catalog(dict(sorted(models.items())), problems, len(files))


def _read_file_catalog(data_file: DataFile, head: str) -> list[ModelInfo] | FileProblem:
    version = sa.table("alembic_version", sa.column("version_num"))
    with data_file.connect() as conn:
        revision = conn.execute(sa.select(version.c.version_num)).scalar()
        if revision != head:
            saes = tuple((m, s) for m, s in conn.execute(sa.select(SAE.model_id, SAE.id)))  # the same in every revision
            return FileProblem(data_file.path.name, f"has schema revision {revision}; this server reads {head}: upgrade it "
                               f"with `featurescope db upgrade {data_file.path}` while no server has it open, "
                               "or publish it again with this version of featurescope", saes)
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


# ------------------------------------------------------------------------------------------------- vocab
class TokenTexts:
    """Display text of every token of a model, loaded once per file. `derived` lets other layers memoise
    what they compute from it (e.g. the HTML presenter's whitespace-visible forms)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.derived: dict[str, Any] = {}
        self._by_stripped: dict[str, list[int]] | None = None
        self._by_text: dict[str, list[int]] | None = None

    def __getitem__(self, token_id: int) -> str:
        return self.texts[token_id] if 0 <= token_id < len(self.texts) else f"<unk {token_id}>"

    def many(self, token_ids: list[int]) -> list[str]:
        texts = self.texts
        try:
            return [texts[t] for t in token_ids] if min(token_ids, default=0) >= 0 else [self[t] for t in token_ids]
        except IndexError:
            return [self[t] for t in token_ids]

    def ids_for(self, text: str) -> list[int]:
        """Tokens whose text is `text`; a query without surrounding whitespace (" Paris" typed as "Paris")
        also matches tokens that differ from it only in surrounding whitespace."""
        if self._by_text is None:
            by_text: dict[str, list[int]] = {}
            by_stripped: dict[str, list[int]] = {}
            for i, t in enumerate(self.texts):
                by_text.setdefault(t, []).append(i)
                by_stripped.setdefault(t.strip(), []).append(i)
            self._by_text, self._by_stripped = by_text, by_stripped
        if text != text.strip() or not text.strip():
            return list(self._by_text.get(text, []))
        return sorted(set(self._by_text.get(text, [])) | set(self._by_stripped.get(text, [])))


def _cached_per_file(file, key: tuple, build):
    """build() once per published file (files never change once published), safe across threads."""
    cached = file.cache.get(key)
    if cached is not None:
        return cached
    with file.cache_lock:
        if key not in file.cache:
            file.cache[key] = build()
    return file.cache[key]


def token_texts(model: ModelInfo) -> TokenTexts:
    def build() -> TokenTexts:
        with model.file.connect() as conn:
            rows = conn.execute(sa.select(Vocab.token_id, Vocab.text).where(Vocab.model_id == model.id)).all()
        texts = [""] * max(model.vocab_size, max((r[0] for r in rows), default=-1) + 1)
        for token_id, text in rows:
            texts[token_id] = text
        return TokenTexts(texts)

    return _cached_per_file(model.file, ("vocab", model.id), build)


class TokenStrings(Sequence[str]):
    """The texts of a token id sequence, looked up when read: a feature page holds thousands of example
    tokens, which the HTML page renders from their ids and only the JSON twin writes out as text
    (app/render.py serialises this as a list)."""
    __slots__ = ("_vocab", "_ids")

    def __init__(self, vocab: TokenTexts, token_ids: list[int]) -> None:
        self._vocab, self._ids = vocab, token_ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i):  # type: ignore[override]
        return self._vocab.many(self._ids[i]) if isinstance(i, slice) else self._vocab[self._ids[i]]

    def as_list(self) -> list[str]:
        return self._vocab.many(self._ids)


# ---------------------------------------------------------------------------------------------- contexts
class ContextStore:
    """Token ids of every stored context of a run, held in memory (4 bytes a token) once per file: a
    context lookup is then an array slice instead of a DuckDB scan of the contexts table."""

    def __init__(self, context_ids: np.ndarray, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat, self.offsets = flat, offsets
        self.row_of = {int(c): i for i, c in enumerate(context_ids)}

    def tokens(self, context_id: int) -> list[int]:
        row = self.row_of.get(context_id)
        if row is None:
            return []
        return self.flat[self.offsets[row]:self.offsets[row + 1]].tolist()


def context_store(sae: SAEInfo) -> ContextStore:
    def build() -> ContextStore:
        with sae.file.connect() as conn:
            result = conn.execute(sa.select(Context.context_id, Context.token_ids).where(Context.run_id == sae.run_id))
            with warnings.catch_warnings():  # "Arrow output on a DB-API result makes an extra copy": once per file
                warnings.simplefilter("ignore")
                table = result.cursor.to_arrow_table()
        lists = table.column(1).combine_chunks()
        return ContextStore(table.column(0).to_numpy(), lists.values.to_numpy(zero_copy_only=False).astype(np.int32),
                            lists.offsets.to_numpy())

    return _cached_per_file(sae.file, ("contexts", sae.run_id), build)


def feature_labels(sae: SAEInfo) -> dict[int, tuple[str | None, str | None, float]]:
    """(label, label_kind, density) of every feature of an SAE, loaded once per file; neighbour lists and
    links read it instead of querying."""
    def build() -> dict[int, tuple[str | None, str | None, float]]:
        with sae.file.connect() as conn:
            rows = conn.execute(sa.select(Feature.feature, Feature.label, Feature.label_kind, Feature.density)
                                .where(Feature.model_id == sae.model_id, Feature.sae_id == sae.id)).all()
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    return _cached_per_file(sae.file, ("labels", sae.model_id, sae.id), build)


# -------------------------------------------------------------------------------------------------- home
def home(catalog: Catalog) -> HomeView:
    return {"models": [m.as_dict() for m in catalog.models.values()], "databases": catalog.n_files,
            "problems": [asdict(p) for p in catalog.problems]}


def model_view(catalog: Catalog, model_id: str) -> ModelView:
    return {"model": catalog.model(model_id).as_dict()}


# -------------------------------------------------------------------------------------------- SAE page
@dataclass(frozen=True)
class FeatureQuery:
    """What the SAE page's feature table shows; every field is a query parameter of the page's URL."""
    sort: SortKey = "index"
    desc: bool = False
    page: int = 1
    size: int = 50
    show: Show = "all"
    min_density: float | None = None
    max_density: float | None = None
    q: str = ""  # label text
    token: str = ""  # peak token of top examples

    def params(self, **changes: Any) -> dict[str, Any]:
        """Non-default fields (after changes) as URL query parameters."""
        changed, default = replace(self, **changes), FeatureQuery()
        out = {}
        for name, value in asdict(changed).items():
            if value != getattr(default, name) and value is not None:
                out[name] = int(value) if isinstance(value, bool) else value
        return out

    def check(self) -> None:
        if self.min_density is not None and self.max_density is not None and self.min_density > self.max_density:
            raise InvalidParameter("min_density", f"min_density ({self.min_density:g}) is above max_density ({self.max_density:g}).")


def sae_view(catalog: Catalog, model_id: str, sae_id: str, query: FeatureQuery) -> SAEView:
    query.check()
    sae = catalog.sae(model_id, sae_id)
    vocab = token_texts(catalog.model(model_id))
    where = _table_conditions(sae, query, vocab)
    order = SORT_COLUMNS[query.sort]
    order = order.desc().nulls_last() if query.desc else order.asc().nulls_last()
    with sae.file.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(Feature).where(*where)).scalar() or 0
        pages = max(1, math.ceil(total / query.size))
        rows = conn.execute(
            sa.select(Feature.feature, Feature.label, Feature.label_kind, Feature.density, Feature.max_act,
                      Feature.n_firing, Feature.logit_pos_ids, Feature.peak_token_ids)
            .where(*where).order_by(order, Feature.feature).limit(query.size).offset((query.page - 1) * query.size)).all()
    features = []
    for r in rows:
        peak_ids = list(r.peak_token_ids or [])
        label, kind = _label(r.label, r.label_kind, peak_ids, r.logit_pos_ids, vocab)
        top = Counter(peak_ids).most_common(PEAK_TOKENS_SHOWN)
        features.append({"index": r.feature, "label": label, "label_kind": kind, "density": r.density,
                         "max_act": r.max_act, "dead": r.n_firing == 0,
                         "top_tokens": [{"token_id": t, "text": vocab[t], "count": n} for t, n in top]})
    return {"sae": sae.as_dict(), "query": asdict(query), "total": total, "page": query.page, "pages": pages,
            "features": features, "matched_token_ids": vocab.ids_for(query.token) if query.token else None,
            "density_histogram": density_histogram(sae)}


def _table_conditions(sae: SAEInfo, query: FeatureQuery, vocab: TokenTexts) -> list[sa.ColumnElement[bool]]:
    where = [Feature.model_id == sae.model_id, Feature.sae_id == sae.id]
    if query.show == "alive":
        where.append(Feature.n_firing > 0)
    elif query.show == "dead":
        where.append(Feature.n_firing == 0)
    elif query.show == "dense":
        where.append(Feature.density > DENSE_THRESHOLD)
    if query.min_density is not None:
        where.append(Feature.density >= query.min_density)
    if query.max_density is not None:
        where.append(Feature.density <= query.max_density)
    if query.q:
        where.append(Feature.label.icontains(query.q, autoescape=True))
    if query.token:
        token_ids = vocab.ids_for(query.token)
        where.append(sa.func.list_has_any(Feature.peak_token_ids, sa.bindparam("token_ids", token_ids, IntList)))
    return where


def _peak_tokens(conn: sa.Connection, sae: SAEInfo, features: list[int]) -> dict[int, list[int]]:
    """Token id at the maximum of each top example, strongest example first, for each feature."""
    if not features:
        return {}
    rows = conn.execute(sa.select(Feature.feature, Feature.peak_token_ids).where(_rows_of(sae, features))).all()
    return {feature: list(peaks) for feature, peaks in rows if peaks}


def _rows_of(sae: SAEInfo, features: list[int]) -> sa.ColumnElement[bool]:
    """Some features' rows of an SAE, found through the feature_key index."""
    return Feature.feature_key.in_([feature_key(sae.number, f) for f in features])


def _label(stored: str | None, kind: str | None, peak_ids: list[int], promoted_ids: list[int] | None,
           vocab: TokenTexts) -> tuple[str, str]:
    """The stored label, or for rows written without one the automatic label the writer would have stored."""
    if stored is not None:
        return stored, kind or LABEL_KIND_AUTO
    return auto_label([vocab[t] for t in peak_ids], [vocab[t] for t in (promoted_ids or [])]), LABEL_KIND_AUTO


def density_histogram(sae: SAEInfo) -> DensityHistogram:
    """Features per log10-density bin (DENSITY_BINS_PER_DECADE per decade), plus the dead count."""
    cache_key = ("density_histogram", sae.model_id, sae.id)
    cached = sae.file.cache.get(cache_key)
    if cached is not None:
        return cached
    bin_ = sa.func.floor(sa.func.log10(Feature.density) * DENSITY_BINS_PER_DECADE).label("bin")
    mine = [Feature.model_id == sae.model_id, Feature.sae_id == sae.id]
    with sae.file.connect() as conn:
        rows = conn.execute(sa.select(bin_, sa.func.count()).where(*mine, Feature.density > 0).group_by(bin_)).all()
        dead = conn.execute(sa.select(sa.func.count()).select_from(Feature).where(*mine, Feature.n_firing == 0)).scalar()
    counts = {int(b): n for b, n in rows}
    lo, hi = (min(counts), max(counts) + 1) if counts else (-6 * DENSITY_BINS_PER_DECADE, 0)
    result = {"log10_lo": lo / DENSITY_BINS_PER_DECADE, "bin_width_log10": 1 / DENSITY_BINS_PER_DECADE,
              "counts": [counts.get(b, 0) for b in range(lo, hi)], "dead": dead or 0}
    sae.file.cache[cache_key] = result
    return result


def random_feature(catalog: Catalog, model_id: str, sae_id: str, rng: random.Random | None = None) -> int:
    """A random feature that fired at least once (any feature when all are dead)."""
    sae = catalog.sae(model_id, sae_id)
    cache_key = ("alive", model_id, sae_id)
    alive = sae.file.cache.get(cache_key)
    if alive is None:
        with sae.file.connect() as conn:
            alive = conn.execute(sa.select(Feature.feature).where(
                Feature.model_id == model_id, Feature.sae_id == sae_id, Feature.n_firing > 0)).scalars().all()
        sae.file.cache[cache_key] = alive
    rng = rng or random.Random()
    return rng.choice(alive) if alive else rng.randrange(sae.d_sae)


# ---------------------------------------------------------------------------------------- feature page
def check_index(sae: SAEInfo, index: int) -> None:
    if not 0 <= index < sae.d_sae:
        nearest = min(max(index, 0), sae.d_sae - 1)
        raise NotFound("feature", str(index), f"SAE {sae.id!r} has features 0 to {sae.d_sae - 1}; there is no feature {index}.",
                       model_id=sae.model_id, sae_id=sae.id, choices=[nearest], valid_range=(0, sae.d_sae - 1))


# Built once: constructing a statement costs more than SQLAlchemy's cached compile of it.
_FEATURE_ROW = sa.select(Feature.__table__).where(Feature.feature_key == sa.bindparam("key"))


def feature_view(catalog: Catalog, model_id: str, sae_id: str, index: int, text: str = "") -> FeatureView:
    """The feature page. What the feature's own file holds is read once and kept in a small per-file LRU
    (a published file never changes), its links with the catalog: the values of the returned dict are
    shared between requests, never modify them."""
    sae = catalog.sae(model_id, sae_id)
    check_index(sae, index)
    stored = _stored_feature(sae, token_texts(catalog.model(model_id)), index)
    return {
        **stored.page,
        "links": catalog.links(model_id, sae_id, index),
        "prev": index - 1 if index > 0 else None,
        "next": index + 1 if index + 1 < sae.d_sae else None,
        "test": {"text": text, "live_encoding": False},
    }


@dataclass(frozen=True)
class StoredFeature:
    page: dict[str, Any]  # what feature_view shows from the feature's own row
    link_rows: list[dict[str, Any]]  # its features.links elements, for feature_links


def _stored_feature(sae: SAEInfo, vocab: TokenTexts, index: int) -> StoredFeature:
    read = _cached_per_file(sae.file, ("features",), lambda: functools.lru_cache(FEATURES_CACHED)(_read_feature))
    return read(sae, vocab, index)


def _read_feature(sae: SAEInfo, vocab: TokenTexts, index: int) -> StoredFeature:
    with sae.file.connect() as conn:
        row = conn.execute(_FEATURE_ROW, {"key": feature_key(sae.number, index)}).mappings().first()
        if row is None:
            raise NotFound("feature", str(index), f"Feature {index} of {sae.id!r} is not in the published data.",
                           model_id=sae.model_id, sae_id=sae.id, choices=[], valid_range=(0, sae.d_sae - 1))
        neighbours = _neighbours(conn, sae, list(row["neighbour_ids"] or []), list(row["neighbour_cos"] or []), vocab)
    contexts, stored = context_store(sae), row["examples"] or []  # top examples by rank, then intervals by bin
    examples = [_example(e, contexts, vocab) for e in stored]
    top = [e for e, s in zip(examples, stored) if s["kind"] == "top"]
    label, label_kind = _label(row["label"], row["label_kind"], row["peak_token_ids"] or [], row["logit_pos_ids"], vocab)
    page = {
        "model_id": sae.model_id, "sae": sae.as_dict(), "index": index, "label": label, "label_kind": label_kind,
        "n_firing": row["n_firing"], "density": row["density"], "max_act": row["max_act"], "mean_act": row["mean_act"],
        "activation_histogram": {"bin_width": row["hist_bin_width"], "counts": list(row["hist_counts"] or [])},
        "logits": {
            "promoted": _logit_tokens(row["logit_pos_ids"], row["logit_pos_values"], vocab),
            "suppressed": _logit_tokens(row["logit_neg_ids"], row["logit_neg_values"], vocab),
            "histogram": {"lo": row["logit_hist_lo"], "hi": row["logit_hist_hi"],
                          "counts": list(row["logit_hist_counts"] or [])},
        },
        "top_examples": top,
        "intervals": _intervals(row, examples, stored),
        "neighbours": neighbours,
    }
    return StoredFeature(page, list(row["links"] or ()))


def _example(e: dict[str, Any], contexts: ContextStore, vocab: TokenTexts) -> dict[str, Any]:
    token_ids = contexts.tokens(e["context_id"])
    return {"context_id": e["context_id"], "max_act": e["max_act"], "max_pos": e["max_pos"], "token_ids": token_ids,
            "tokens": TokenStrings(vocab, token_ids), "positions": e["positions"], "acts": e["acts"]}


def _intervals(row: sa.RowMapping, examples: list[dict[str, Any]], stored: list[dict[str, Any]]) -> list[dict[str, Any]]:
    los, his, shares = row["interval_lo"] or [], row["interval_hi"] or [], row["interval_share"] or []
    by_bin: dict[int, list[dict[str, Any]]] = {}
    for e, s in zip(examples, stored):
        if s["kind"] == "interval":
            by_bin.setdefault(s["bin"], []).append(e)
    return [{"bin": b, "lo": lo, "hi": hi, "share": share, "examples": by_bin.get(b, [])}
            for b, (lo, hi, share) in enumerate(zip(los, his, shares))]


def _logit_tokens(ids: list[int] | None, values: list[float] | None, vocab: TokenTexts) -> list[dict[str, Any]]:
    return [{"token_id": t, "text": vocab[t], "value": v} for t, v in zip(ids or [], values or [])]


def _neighbours(conn: sa.Connection, sae: SAEInfo, ids: list[int], cosines: list[float],
                vocab: TokenTexts) -> list[dict[str, Any]]:
    labels = feature_labels(sae)
    missing = [i for i in ids if i in labels and labels[i][0] is None]
    fallback: dict[int, str] = {}
    if missing:  # rows written without labels: build the automatic ones from peaks and promoted tokens
        peaks = _peak_tokens(conn, sae, missing)
        promoted = dict(conn.execute(sa.select(Feature.feature, Feature.logit_pos_ids).where(
            Feature.model_id == sae.model_id, Feature.sae_id == sae.id, Feature.feature.in_(missing))).all())
        fallback = {i: _label(None, None, peaks.get(i, []), promoted.get(i), vocab)[0] for i in missing}
    out = []
    for index, cosine in zip(ids, cosines):
        label, kind, density = labels.get(index, ("", None, None))
        if index in fallback:
            label, kind = fallback[index], LABEL_KIND_AUTO
        out.append({"index": index, "cosine": cosine, "label": label or "", "label_kind": kind, "density": density})
    return out


# ------------------------------------------------------------------------------------------ live pages
def run_config(sae: SAEInfo) -> dict[str, Any]:
    """The precompute config of the run that computed an SAE's features (the live encoder uses its dtype)."""
    def build() -> dict[str, Any]:
        with sae.file.connect() as conn:
            config = conn.execute(sa.select(Run.config).where(Run.id == sae.run_id)).scalar()
        return json.loads(config) if isinstance(config, str) else dict(config or {})

    return _cached_per_file(sae.file, ("run_config", sae.run_id), build)


@dataclass(frozen=True)
class FeatureBrief:
    """Label, density and maximum activation of every feature of an SAE, as arrays indexed by feature."""
    labels: list[str | None]
    label_kinds: list[str | None]
    density: np.ndarray
    max_act: np.ndarray


def feature_briefs(sae: SAEInfo) -> FeatureBrief:
    """What a live page shows beside each feature it lists, loaded once per file."""
    def build() -> FeatureBrief:
        with sae.file.connect() as conn:
            rows = conn.execute(sa.select(Feature.feature, Feature.label, Feature.label_kind, Feature.density,
                                          Feature.max_act)
                                .where(Feature.model_id == sae.model_id, Feature.sae_id == sae.id)).all()
        labels: list[str | None] = [None] * sae.d_sae
        kinds: list[str | None] = [None] * sae.d_sae
        density, max_act = np.zeros(sae.d_sae), np.zeros(sae.d_sae)
        for f, label, kind, d, m in rows:
            if 0 <= f < sae.d_sae:
                labels[f], kinds[f], density[f], max_act[f] = label, kind, d or 0.0, m or 0.0
        return FeatureBrief(labels, kinds, density, max_act)

    return _cached_per_file(sae.file, ("briefs", sae.model_id, sae.id), build)


# ------------------------------------------------------------------------------------ cross-layer links
LINK_GROUPS = {"up": "upstream", "down": "downstream", "same": "alongside"}  # stored direction -> list name


def links_computed(sae: SAEInfo) -> bool:
    """Whether the run that published an SAE computed cross-layer links (`featurescope precompute --no-links`
    does not)."""
    return bool(run_config(sae).get("links", True))


def _link_rows(sae: SAEInfo, features: list[int]) -> dict[int, list[dict[str, Any]]]:
    """Stored links (features.links elements) of some features of an SAE, per feature, neighbour SAEs in id order."""
    if not features:
        return {}
    with sae.file.connect() as conn:
        rows = conn.execute(sa.select(Feature.feature, Feature.links).where(_rows_of(sae, features))).all()
    return {feature: list(links or ()) for feature, links in rows}


def _linked(catalog: Catalog, model_id: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    """The features one features.links element names, with labels; [] when the other SAE is not being served."""
    if not catalog.has_sae(model_id, row["other_sae_id"]):
        return []
    other = catalog.sae(model_id, row["other_sae_id"])
    labels = feature_labels(other)
    cosines = row["cosine"] if row["cosine"] is not None else [None] * len(row["other_features"])
    out = []
    for feature, coact, coact_rel, cosine in zip(row["other_features"], row["coact"], row["coact_rel"], cosines):
        label, kind, density = labels.get(feature, (None, None, None))
        out.append({"sae_id": other.id, "layer": other.layer, "site": other.site, "feature": feature,
                    "label": label or "", "label_kind": kind, "density": density, "coact": coact,
                    "coact_rel": coact_rel, "cosine": cosine})
    return out


def feature_links(catalog: Catalog, model_id: str, sae_id: str, index: int) -> FeatureLinks:
    """A feature's cross-layer links: {"computed": whether its run computed links at all, "upstream",
    "downstream", "alongside": [{sae_id, layer, site, feature, label, label_kind, density, coact, coact_rel,
    cosine}]}. coact is the linked feature's mean activation where this one peaks, coact_rel that minus its
    mean over all tokens, over its max (what ranks them); cosine is None unless both SAEs are residual.
    Lists go through the neighbour SAEs in model order; within one, co-activation links come first
    (highest coact_rel first), then links found only by weights."""
    sae = catalog.sae(model_id, sae_id)
    check_index(sae, index)
    out: dict[str, Any] = {"computed": links_computed(sae), **{name: [] for name in LINK_GROUPS.values()}}
    order = {sid: i for i, sid in enumerate(catalog.model(model_id).saes)}
    stored = _stored_feature(sae, token_texts(catalog.model(model_id)), index)
    rows = sorted(stored.link_rows, key=lambda r: order.get(r["other_sae_id"], -1))
    for row in rows:
        out[LINK_GROUPS.get(row["direction"], "alongside")] += _linked(catalog, model_id, row)
    return out


@dataclass(frozen=True)
class LineageQuery:
    """The lineage view's URL parameters."""
    depth: int | None = None  # SAEs to follow each way from the start; None = all of the model's
    breadth: int = 3  # features kept per SAE (the strongest links of the previous one's)
    by: Literal["coact", "cosine"] = "coact"  # which score picks them: coact_rel or cosine

    def params(self, **changes: Any) -> dict[str, Any]:
        changed, default = replace(self, **changes), LineageQuery()
        return {k: v for k, v in asdict(changed).items() if v != getattr(default, k) and v is not None}


def lineage_view(catalog: Catalog, model_id: str, sae_id: str, index: int, query: LineageQuery) -> LineageView:
    """From one feature, its strongest links through every SAE of the model, one site at a time, each way:
    a graph of nodes (features with label and top tokens) in columns (sites in model order) and edges
    (from the upstream to the downstream node, with both scores; `via` says whose links found it). Each
    step goes to the nearest site the current features link to (the next one, unless it has no links)."""
    sae = catalog.sae(model_id, sae_id)
    check_index(sae, index)
    model = catalog.model(model_id)
    keys = sorted({flow_key(s.layer, s.site_kind) for s in model.saes.values()})
    column = {s.id: keys.index(flow_key(s.layer, s.site_kind)) for s in model.saes.values()}
    start = (sae_id, index)
    scores: dict[tuple[str, int], float | None] = {start: None}
    edges: list[dict[str, Any]] = []
    depth = len(keys) if query.depth is None else query.depth
    for step, via in ((1, "down"), (-1, "up")):
        frontier, at = [start], column[sae_id]
        for _ in range(depth):
            if not frontier:
                break
            frontier, at = _lineage_step(catalog, model_id, frontier, via, step, at, column, query, scores, edges)
    nodes = _lineage_nodes(catalog, model, scores, column, start)
    used = sorted({n["column"] for n in nodes})
    return {"model_id": model_id, "sae": sae.as_dict(), "index": index, "query": asdict(query),
            "links_computed": links_computed(sae),
            "columns": [{"column": c, "sae_ids": [s for s, col in column.items() if col == c]} for c in used],
            "nodes": nodes, "edges": edges}


def _lineage_step(catalog, model_id, frontier, via, step, at, column, query, scores, edges) -> tuple[list, int]:
    """Links of the frontier's features (in column `at`) into the nearest column beyond it (step +1: downstream,
    -1: upstream) that they link to; keeps the `breadth` best-scored features there. Returns them and the column."""
    found: dict[tuple[str, int], float] = {}
    candidates = []
    by_sae: dict[str, list[int]] = {}
    for sid, feature in frontier:
        by_sae.setdefault(sid, []).append(feature)
    for sid, features in by_sae.items():
        for feature, rows in _link_rows(catalog.sae(model_id, sid), features).items():
            for row in rows:
                if row["direction"] != via or (column.get(row["other_sae_id"], at) - at) * step <= 0:
                    continue
                for link in _linked(catalog, model_id, row):
                    score = link["coact_rel" if query.by == "coact" else "cosine"]
                    if score is None or not score > 0:
                        continue
                    node = (link["sae_id"], link["feature"])
                    found[node] = max(found.get(node, score), score)
                    candidates.append(((sid, feature), node, link))
    if not found:
        return [], at
    target = min({column[sid] for sid, _ in found}, key=lambda c: (c - at) * step)
    chosen = sorted((n for n in found if column[n[0]] == target), key=lambda n: (-found[n], n))[:query.breadth]
    for node in chosen:
        scores.setdefault(node, found[node])
    keep = set(chosen)
    for source, node, link in candidates:
        if node in keep:
            upper, lower = (source, node) if via == "down" else (node, source)
            edges.append({"from": _node_id(*upper), "to": _node_id(*lower), "via": via, "coact": link["coact"],
                          "coact_rel": link["coact_rel"], "cosine": link["cosine"]})
    return chosen, target


def _node_id(sae_id: str, feature: int) -> str:
    return f"{sae_id}/{feature}"


def _lineage_nodes(catalog, model: ModelInfo, scores, column, start) -> list[dict[str, Any]]:
    vocab = token_texts(model)
    by_sae: dict[str, list[int]] = {}
    for sid, feature in scores:
        by_sae.setdefault(sid, []).append(feature)
    nodes = []
    for sid, features in by_sae.items():
        sae = catalog.sae(model.id, sid)
        labels = feature_labels(sae)
        with sae.file.connect() as conn:
            peaks = _peak_tokens(conn, sae, features)
        for feature in features:
            label, kind, density = labels.get(feature, (None, None, None))
            top = Counter(peaks.get(feature, [])).most_common(PEAK_TOKENS_SHOWN)
            nodes.append({"id": _node_id(sid, feature), "sae_id": sid, "feature": feature, "column": column[sid],
                          "layer": sae.layer, "site": sae.site, "label": label or "", "label_kind": kind,
                          "density": density, "top_tokens": [{"token_id": t, "text": vocab[t], "count": n} for t, n in top],
                          "start": (sid, feature) == start, "score": scores[(sid, feature)]})
    nodes.sort(key=lambda n: (n["column"], not n["start"], -(n["score"] or 0.0), n["sae_id"], n["feature"]))
    return nodes
