"""Test fixture factory: realistic FeatureScope DuckDB files, built through the real migrations
(featurescope.db.upgrade) and SQLAlchemy inserts, plus an app client over them (Datasette's
make_app_client habit: the real app on a real database in a temp folder).

    path = make_db(tmp_path / "db" / "run.duckdb")                 # one model, three SAEs
    with make_app_client(tmp_path) as client: client.get("/.json")

Rows go in as one INSERT ... SELECT per table from a registered Arrow table (SQLAlchemy Core), so a
bench database of thousands of features builds in seconds. The data is synthetic but shaped like a precompute run: shared contexts (BOS first), features whose top
examples peak on a favourite token (several on " Paris"), dead and dense features, equal-width
activation intervals with shares taken from the histogram, logit tables, decoder-cosine neighbours,
cross-layer links to the SAEs of the neighbouring layers (cosines where both sites are residual).
The vocabulary holds hostile strings (HTML, entities, quotes, newlines, template syntax) that pages
must render as text; feature 0 of every SAE fires on and promotes them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import sqlalchemy as sa

from featurescope import db as fsdb
from featurescope.flow import direction, neighbour_layers
from featurescope.labels import LABEL_KIND_AUTO, auto_label
from featurescope.schema import SAE, Context, Example, Feature, Link, Model, Run, Vocab
from featurescope.precompute.writer import NESTED_COLUMNS, insert_features

HOSTILE_TOKENS = [
    "<script>alert(1)</script>",
    "&amp;",
    '"',
    "'",
    "\n",
    "\n\n",
    "  leading",
    "<img src=x onerror=alert(2)>",
    "</textarea><b>",
    "{{ 7*7 }}",
    "\" onmouseover=\"alert(3)",
]
WORDS = [
    " the", " of", " and", " to", " in", " is", " a", " that", " for", " it", ".", ",", ":", "(", ")",
    " Paris", " Rome", " London", " Berlin", " France", " Italy", " England", " Germany", " capital",
    " city", " def", " return", " class", " import", " self", " None", " True", " False", " list",
    " dict", " string", " value", " function", " module", " file", " error", " raise", " if", " else",
    "    ", " =", " ==", " +", " -", "_", "0", "1", "2", " print", " lambda", " yield", " with", " as",
]
SPECIAL = ["<pad>", "<eos>", "<bos>"]
BOS_ID = 2
HIST_BINS = 50
PARIS = " Paris"


@dataclass(frozen=True)
class SAESpec:
    id: str
    layer: int
    site_kind: str = "res"
    d_sae: int = 64
    l0: float | None = None
    fvu: float | None = None
    delta_loss: float | None = None


DEFAULT_SAES = (
    SAESpec("2-res-64", 2, "res", 64, l0=41.5, fvu=0.182, delta_loss=0.071),
    SAESpec("4-mlp-48", 4, "mlp", 48, l0=23.0, fvu=0.304, delta_loss=None),
    SAESpec("6-att-32", 6, "att", 32),
)
HOOK_NAMES = {"res": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out", "att": "blocks.{}.attn.hook_z"}


def make_vocab(n_filler: int = 120) -> list[str]:
    """Special tokens, hostile strings, common words, then filler words up to the vocabulary size."""
    fillers = [f" word{i}" for i in range(n_filler)]
    # Contexts draw token ids Zipf-like (low ids common): hostile strings sit mid-vocabulary, so they
    # are present on most pages without crowding them.
    return SPECIAL + WORDS + fillers[:30] + HOSTILE_TOKENS + fillers[30:]


def make_db(path: str | Path, *, model_id: str = "tiny-gemma-2", saes: Sequence[SAESpec] = DEFAULT_SAES,
            n_contexts: int = 96, context_len: int = 48, n_top: int = 8, n_bins: int = 5, per_bin: int = 2,
            with_labels: bool = True, seed: int = 0, config: dict | None = None, corpus: str = "pydoc_data.topics",
            run_id: str | None = None) -> Path:
    """Write a complete FeatureScope database at path (migrated to head) and return the path. `config`
    adds to the run's precompute config (e.g. {"links": False}: a run without cross-layer links); `corpus`
    and `run_id` name the run (default id: from the model and seed)."""
    config = {"batch_size": 16, "seed": seed, **(config or {})}
    if HIST_BINS % n_bins:
        raise ValueError(f"n_bins must divide {HIST_BINS}: each activation interval is a whole number of histogram bins")
    path = Path(path)
    fsdb.upgrade(path)
    rng = np.random.default_rng(seed)
    vocab = make_vocab()
    run_id = run_id or f"run-{model_id}-{seed}"
    contexts = _make_contexts(rng, vocab, n_contexts, context_len)
    n_tokens = n_contexts * (context_len - 1)
    rows: dict[type, list[dict]] = {Model: [], Vocab: [], Run: [], SAE: [], Context: [], Feature: [], Example: [], Link: []}
    rows[Model].append(dict(id=model_id, source=f"tests/{model_id}", n_layers=8, d_model=64, vocab_size=len(vocab),
                            bos_token_id=BOS_ID, special_token_ids=[0, 1, BOS_ID]))
    rows[Vocab] += [dict(model_id=model_id, token_id=i, text=t) for i, t in enumerate(vocab)]
    started = dt.datetime(2026, 11, 26, 12, 0, 0)
    rows[Run].append(dict(id=run_id, model_id=model_id, corpus=corpus, n_contexts=n_contexts,
                          context_len=context_len, n_tokens=n_tokens, config=config,
                          status="complete", started_at=started, finished_at=started + dt.timedelta(seconds=95),
                          seconds=95.0))
    rows[Context] += [dict(run_id=run_id, context_id=c, token_ids=[int(t) for t in ids]) for c, ids in enumerate(contexts)]
    occurrences = _token_occurrences(contexts)
    for spec in saes:
        rows[SAE].append(dict(model_id=model_id, id=spec.id, run_id=run_id, hook_name=HOOK_NAMES[spec.site_kind].format(spec.layer),
                              layer=spec.layer, site_kind=spec.site_kind, d_in=64, d_sae=spec.d_sae,
                              source=f"tests/saes/{spec.id}", architecture="jumprelu", l0=spec.l0, fvu=spec.fvu,
                              delta_loss=spec.delta_loss, dead_share=None, dense_share=None,
                              card={"trained_by": "tests/factories.py"}))
        maker = _FeatureMaker(rng, vocab, contexts, occurrences, model_id, spec, run_id, n_tokens,
                              n_top, n_bins, per_bin, with_labels)
        features = [maker.feature(f) for f in range(spec.d_sae)]
        rows[Feature] += [f for f, _ in features]
        rows[Example] += [e for _, examples in features for e in examples]
        rows[SAE][-1]["dead_share"] = sum(f["n_firing"] == 0 for f, _ in features) / spec.d_sae
        rows[SAE][-1]["dense_share"] = sum(f["density"] > 0.1 for f, _ in features) / spec.d_sae
    rows[SAE] = [dict(row, number=number) for number, row in enumerate(sorted(rows[SAE], key=lambda r: r["id"]))]
    if config.get("links", True):  # own generator: other rows unchanged
        rows[Link] = _make_links(np.random.default_rng(seed + 1000), model_id, saes)
    engine = fsdb.engine_for(path)
    with engine.begin() as conn:
        for table in (Model, Vocab, Run, SAE, Context):
            _bulk_insert(conn, table.__table__, rows[table])
        flat_features = [c for c in Feature.__table__.columns if c.name not in NESTED_COLUMNS]
        for sae_row in rows[SAE]:
            mine = lambda table: [r for r in rows[table] if r["sae_id"] == sae_row["id"]]  # noqa: E731
            insert_features(conn.connection.driver_connection, sae_row["number"],
                            pa.Table.from_pylist(mine(Feature), schema=_arrow_schema(flat_features)),
                            pa.Table.from_pylist(mine(Example), schema=_arrow_schema(Example.__table__.columns)),
                            pa.Table.from_pylist(mine(Link), schema=_arrow_schema(Link.__table__.columns)))
    engine.dispose()
    return path


def _bulk_insert(conn: sa.Connection, table: sa.Table, rows: list[dict]) -> None:
    """INSERT ... SELECT from an Arrow table registered on the DuckDB connection: a multi-row VALUES
    statement of 100k rows costs SQLAlchemy tens of seconds to compile."""
    json_columns = [c.name for c in table.columns if isinstance(c.type, sa.JSON)]
    for row in rows:
        for name in json_columns:
            row[name] = json.dumps(row[name])
    staging = f"staging_{table.name}"
    names = [c.name for c in table.columns]
    conn.connection.driver_connection.register(staging, pa.Table.from_pylist(rows, schema=_arrow_schema(table.columns)))
    conn.execute(sa.insert(table).from_select(names, sa.select(*[sa.column(n) for n in names]).select_from(sa.table(staging))))
    conn.connection.driver_connection.unregister(staging)


def _arrow_schema(columns) -> pa.Schema:
    def arrow_type(type_: sa.types.TypeEngine) -> pa.DataType:
        if isinstance(type_, sa.ARRAY):
            return pa.list_(arrow_type(type_.item_type))
        if isinstance(type_, sa.BigInteger):
            return pa.int64()
        if isinstance(type_, sa.Integer):
            return pa.int32()
        if isinstance(type_, sa.Float):
            return pa.float32()
        if isinstance(type_, sa.DateTime):
            return pa.timestamp("us")
        return pa.string()

    return pa.schema([(c.name, arrow_type(c.type)) for c in columns])


def _make_contexts(rng: np.random.Generator, vocab: list[str], n_contexts: int, context_len: int) -> np.ndarray:
    content = np.arange(len(SPECIAL), len(vocab))
    weights = 1.0 / np.arange(1, len(content) + 1) ** 0.6  # Zipf-like: common words repeat
    ids = rng.choice(content, size=(n_contexts, context_len - 1), p=weights / weights.sum())
    return np.concatenate([np.full((n_contexts, 1), BOS_ID), ids], axis=1)


def _token_occurrences(contexts: np.ndarray) -> dict[int, list[tuple[int, int]]]:
    found: dict[int, list[tuple[int, int]]] = {}
    for c, row in enumerate(contexts):
        for pos in range(1, len(row)):
            found.setdefault(int(row[pos]), []).append((c, pos))
    return found


class _FeatureMaker:
    """Builds one feature row and its example rows at a time; all randomness comes from one generator."""

    def __init__(self, rng, vocab, contexts, occurrences, model_id, spec, run_id, n_tokens, n_top, n_bins, per_bin,
                 with_labels):
        self.rng, self.vocab, self.contexts, self.occurrences = rng, vocab, contexts, occurrences
        self.model_id, self.spec, self.run_id, self.n_tokens = model_id, spec, run_id, n_tokens
        self.n_top, self.n_bins, self.per_bin, self.with_labels = n_top, n_bins, per_bin, with_labels
        self.paris = vocab.index(PARIS)
        self.hostile = [vocab.index(t) for t in HOSTILE_TOKENS]

    def feature(self, f: int) -> tuple[dict, list[dict]]:
        rng, key = self.rng, dict(model_id=self.model_id, sae_id=self.spec.id, feature=f)
        dead = f % 11 == 10
        dense = f % 17 == 5
        density = 0.0 if dead else float(rng.uniform(0.12, 0.3) if dense else 10 ** rng.uniform(-4.5, -1.5))
        n_firing = int(round(density * self.n_tokens)) if not dead else 0
        if not dead and n_firing < 3 * self.n_top:  # enough firing tokens for the examples shown
            n_firing = 3 * self.n_top
            density = n_firing / self.n_tokens
        max_act = 0.0 if dead else float(rng.gamma(4.0, 2.5) + 0.5)
        hist = rng.multinomial(n_firing, _decaying(HIST_BINS)) if n_firing else np.zeros(HIST_BINS, dtype=int)
        favourite = self._favourite_token(f)
        promoted = self.hostile[:3] if f == 0 else [int(t) for t in rng.choice(np.arange(3, len(self.vocab)), 10, replace=False)]
        examples = [] if dead else self._top_examples(key, favourite, max_act) + self._interval_examples(key, max_act, hist)
        peaks = [self.vocab[self.contexts[e["context_id"]][e["max_pos"]]] for e in examples if e["kind"] == "top"]
        label = auto_label(peaks, [self.vocab[t] for t in promoted[:3]]) if self.with_labels else None
        edges = np.linspace(0.0, max_act, self.n_bins + 1)
        shares = [float(s) / max(n_firing, 1) for s in hist.reshape(self.n_bins, -1).sum(axis=1)]
        logit_values = np.sort(rng.normal(0, 0.4, len(self.vocab)))
        neighbours = [int(n) for n in rng.choice([i for i in range(self.spec.d_sae) if i != f], 5, replace=False)]
        row = dict(
            **key, n_firing=n_firing, density=density, max_act=max_act,
            mean_act=0.0 if dead else max_act * float(rng.uniform(0.2, 0.45)),
            hist_bin_width=max_act / HIST_BINS if max_act else 0.0, hist_counts=[int(c) for c in hist],
            interval_lo=[float(x) for x in edges[:-1]], interval_hi=[float(x) for x in edges[1:]], interval_share=shares,
            logit_pos_ids=promoted, logit_pos_values=[float(v) for v in sorted(rng.uniform(0.5, 1.5, 10), reverse=True)],
            logit_neg_ids=[int(t) for t in rng.choice(np.arange(3, len(self.vocab)), 10, replace=False)],
            logit_neg_values=[float(v) for v in sorted(rng.uniform(-1.5, -0.5, 10))],
            logit_hist_lo=float(logit_values[0]), logit_hist_hi=float(logit_values[-1]),
            logit_hist_counts=[int(c) for c in np.histogram(logit_values, HIST_BINS)[0]],
            neighbour_ids=neighbours, neighbour_cos=[float(c) for c in sorted(rng.uniform(0.1, 0.7, 5), reverse=True)],
            label=label, label_kind=LABEL_KIND_AUTO if self.with_labels else None,
        )
        return row, examples

    def _favourite_token(self, f: int) -> int:
        if f == 0:
            return self.hostile[0]
        if f % 7 == 3:
            return self.paris
        return int(self.rng.integers(len(SPECIAL), len(self.vocab)))

    def _top_examples(self, key: dict, favourite: int, max_act: float) -> list[dict]:
        places = self.occurrences.get(favourite, [])
        if len(places) < self.n_top:  # a rare token: the rest of the examples peak elsewhere
            places = places + [(int(self.rng.integers(len(self.contexts))), int(self.rng.integers(1, self.contexts.shape[1])))
                               for _ in range(self.n_top - len(places))]
        chosen = [places[i] for i in self.rng.choice(len(places), self.n_top, replace=False)]
        acts = np.sort(self.rng.uniform(0.55, 1.0, self.n_top))[::-1] * max_act
        acts[0] = max_act
        return [self._example(key, "top", 0, rank, c, pos, float(a)) for rank, ((c, pos), a) in enumerate(zip(chosen, acts))]

    def _interval_examples(self, key: dict, max_act: float, hist: np.ndarray) -> list[dict]:
        rows, width = [], max_act / self.n_bins
        for b in range(self.n_bins):
            acts = np.sort(self.rng.uniform(b * width, (b + 1) * width, self.per_bin))[::-1]
            for rank, act in enumerate(acts):
                c, pos = int(self.rng.integers(len(self.contexts))), int(self.rng.integers(1, self.contexts.shape[1]))
                rows.append(self._example(key, "interval", b, rank, c, pos, float(max(act, 1e-3))))
        return rows

    def _example(self, key: dict, kind: str, bin_: int, rank: int, context_id: int, max_pos: int, max_act: float) -> dict:
        length = self.contexts.shape[1]
        around = [p for p in range(max_pos - 4, max_pos + 3) if 1 <= p < length and p != max_pos]
        firing = sorted(self.rng.choice(around, min(3, len(around)), replace=False).tolist() + [max_pos])
        acts = [max_act if p == max_pos else max_act * float(self.rng.uniform(0.05, 0.6)) for p in firing]
        return dict(**key, kind=kind, bin=bin_, rank=rank, run_id=self.run_id, context_id=context_id, max_act=max_act,
                    max_pos=max_pos, positions=[int(p) for p in firing], acts=acts)


def _make_links(rng: np.random.Generator, model_id: str, saes: Sequence[SAESpec], per_kind: int = 3) -> list[dict]:
    """Links rows as precompute/links.py writes them: for every feature and neighbour SAE (previous and next
    layer with an SAE, and the same layer), `per_kind` co-activation links (strongest first), then for
    residual pairs `per_kind` links by weights, with both scores. Dead features (f % 11 == 10, as in
    _FeatureMaker) have no co-activation links and are no feature's."""
    layers = sorted({s.layer for s in saes})
    out = []
    for spec in saes:
        near = neighbour_layers(layers, spec.layer)
        for other in sorted((o for o in saes if o is not spec and o.layer in near), key=lambda o: o.id):
            way = direction((spec.layer, spec.site_kind), (other.layer, other.site_kind))
            weights = spec.site_kind == other.site_kind == "res" and way != "same"
            for f in range(spec.d_sae):
                alive = [j for j in range(other.d_sae) if j % 11 != 10]  # a dead feature co-activates with nothing
                by_act = [] if f % 11 == 10 else [int(j) for j in rng.choice(alive, per_kind, replace=False)]
                by_weight = [int(j) for j in rng.choice([j for j in range(other.d_sae) if j not in by_act], per_kind, replace=False)]
                ids = by_act + (by_weight if weights else [])
                if not ids:
                    continue
                rel = sorted(rng.uniform(0.2, 0.9, len(by_act)), reverse=True) + list(rng.uniform(-0.05, 0.15, len(ids) - len(by_act)))
                coact = [float(r * rng.uniform(4.0, 12.0)) for r in rel]  # times the linked feature's max, roughly
                cosine = [float(c) for c in rng.uniform(0.05, 0.6, len(ids))] if weights else None
                out.append(dict(model_id=model_id, sae_id=spec.id, feature=f, other_sae_id=other.id, direction=way,
                                other_features=ids, coact=coact, coact_rel=[float(r) for r in rel], cosine=cosine))
    return out


def _decaying(n: int) -> np.ndarray:
    p = np.exp(-np.arange(n) / (n / 6))
    return p / p.sum()


def make_data_dir(root: str | Path, **make_db_kwargs) -> Path:
    """A data dir as `featurescope serve --data-dir` reads it: root/db/<name>.duckdb. Two files: the
    factory's default model (three SAEs) and a second model with one SAE."""
    root = Path(root)
    make_db(root / "db" / "tiny.duckdb", **make_db_kwargs)
    make_db(root / "db" / "second.duckdb", model_id="second-model", saes=(SAESpec("3-res-24", 3, "res", 24, l0=12.0),),
            seed=1, n_contexts=32, context_len=24)
    return root


OLD_RUN, NEW_RUN = "a1b2c3d4e5f60718", "a1f0c0ffee001234"  # share the prefix "a1": ambiguous on purpose
OLD_CORPUS, NEW_CORPUS = "pydoc_data.topics", "hf:wikitext"


def make_corpora_data_dir(root: str | Path) -> Path:
    """A data dir with the factory's SAEs precomputed over two corpora, one file each: the older run
    (OLD_RUN over OLD_CORPUS) has all three SAEs, the newer (NEW_RUN over NEW_CORPUS, other data) all but
    6-att-32, whose only run is then the older one."""
    root = Path(root)
    old = make_db(root / "db" / "tiny--old.duckdb", corpus=OLD_CORPUS, run_id=OLD_RUN, seed=0)
    make_db(root / "db" / "tiny--new.duckdb", corpus=NEW_CORPUS, run_id=NEW_RUN, seed=3, n_contexts=64,
            saes=DEFAULT_SAES[:2])
    published = old.stat().st_mtime_ns
    os.utime(old, ns=(published - 60 * 10**9, published - 60 * 10**9))  # a minute older: the newest file wins
    return root


@contextlib.contextmanager
def make_app_client(data_dir: str | Path, **settings) -> Iterator["TestClient"]:  # noqa: F821
    """A FastAPI TestClient on create_app(Settings(data_dir=..., **settings))."""
    from fastapi.testclient import TestClient

    from featurescope.app import Settings, create_app

    with TestClient(create_app(Settings(data_dir=Path(data_dir), **settings))) as client:
        yield client


_SHARED: dict[str, Path] = {}


def shared_data_dir() -> Path:
    """One make_data_dir per test process, for tests that only read (built in ~2 s, removed at exit)."""
    if "root" not in _SHARED:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="featurescope-app-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _SHARED["root"] = make_data_dir(root)
    return _SHARED["root"]


# ------------------------------------------------------------------------------------ HTML for assertions
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str | None]
    children: list["Element | str"]

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def iter(self) -> Iterator["Element"]:
        yield self
        for c in self.children:
            if isinstance(c, Element):
                yield from c.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list["Element"]:
        return [e for e in self.iter() if (tag is None or e.tag == tag)
                and (cls is None or cls in (e.attrs.get("class") or "").split())
                and all(e.attrs.get(k) == v for k, v in attrs.items())]

    def find(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> "Element":
        found = self.find_all(tag, cls, **attrs)
        assert found, f"no <{tag or '*'}> with class={cls!r} {attrs}"
        return found[0]


def parse_html(markup: str) -> Element:
    """A DOM-ish tree from html.parser: attribute values and text come back unescaped, exactly as a
    browser would see them, so assertions check what renders, not what the source looks like."""
    from html.parser import HTMLParser

    root = Element("#document", {}, [])
    stack = [root]

    class Builder(HTMLParser):
        def handle_starttag(self, tag, attrs):
            element = Element(tag, dict(attrs), [])
            stack[-1].children.append(element)
            if tag not in VOID_TAGS:
                stack.append(element)

        def handle_startendtag(self, tag, attrs):
            stack[-1].children.append(Element(tag, dict(attrs), []))

        def handle_endtag(self, tag):
            for depth in range(len(stack) - 1, 0, -1):
                if stack[depth].tag == tag:
                    del stack[depth:]
                    return

        def handle_data(self, data):
            stack[-1].children.append(data)

    builder = Builder(convert_charrefs=True)
    builder.feed(markup)
    builder.close()
    return root
