"""Explanations and their scores, in a side file next to a published run: `<run>.explanations.duckdb`.

A published run file never changes (its readers rely on that), so `featurescope explain` writes here. The
side file has its own small schema (SCHEMA_VERSION below, kept in its `meta` table; a newer version adds a
step to MIGRATIONS) and is published like a run: each batch is written into a hidden copy that replaces the
side file with os.replace, so a reader (the server, which attaches it read-only) sees every batch whole or
not at all, and a killed or interrupted `explain` leaves the last published batch intact.

    store = ExplanationStore.for_run("data/db/run.duckdb")
    store.write_batch([Explanation(...)], [Score(...)])
    search_explanations(conn, "python code")          # ranked: conn has the side file attached (see SEARCH_SQL)
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb

SUFFIX = ".explanations.duckdb"
SCHEMA_VERSION = 1
METHODS = ("detection", "fuzz")  # scorers

# Version 1. Explanations are keyed by (model, SAE, feature, explainer model, method, prompt version): a
# re-run with the same explainer and prompt skips what is there, another explainer adds its own row.
SCHEMA_V1 = """
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE explanations (
    id INTEGER PRIMARY KEY, model_id VARCHAR, sae_id VARCHAR, feature INTEGER, run_id VARCHAR,
    explainer VARCHAR, method VARCHAR, prompt_version VARCHAR, text VARCHAR,
    prompt_tokens INTEGER, completion_tokens INTEGER, created_at TIMESTAMP,
    UNIQUE (model_id, sae_id, feature, explainer, method, prompt_version));
CREATE TABLE scores (
    explanation_id INTEGER, scorer VARCHAR, kind VARCHAR, score DOUBLE, n_pos INTEGER, n_neg INTEGER,
    correct_pos INTEGER, correct_neg INTEGER, created_at TIMESTAMP, PRIMARY KEY (explanation_id, scorer, kind));
-- The search index: each distinct word of an explanation once (search_explanations ranks by them).
CREATE TABLE terms (term VARCHAR, explanation_id INTEGER);
"""
MIGRATIONS = {1: SCHEMA_V1}  # version -> the DDL that brings the previous version to it


class ExplanationError(Exception):
    """A side file that cannot be used; the message says why."""


@dataclass(frozen=True)
class Explanation:
    model_id: str
    sae_id: str
    feature: int
    run_id: str
    explainer: str  # the explainer model's name, as the endpoint was asked for it
    method: str  # how the prompt was built, e.g. "max-act+logits"
    prompt_version: str
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    scores: tuple["Score", ...] = field(default=())


@dataclass(frozen=True)
class Score:
    scorer: str  # the scorer model's name
    kind: str  # one of METHODS
    score: float  # balanced accuracy in [0, 1]
    n_pos: int
    n_neg: int
    correct_pos: int
    correct_neg: int


def side_path(run_path: str | Path) -> Path:
    """data/db/run.duckdb -> data/db/run.explanations.duckdb"""
    run_path = Path(run_path)
    return run_path.with_name(run_path.name.removesuffix(".duckdb") + SUFFIX)


def is_side_file(name: str) -> bool:
    return name.endswith(SUFFIX)


# ------------------------------------------------------------------------------------------------ writing
class ExplanationStore:
    """The writer of one side file. Not for concurrent writers: `explain` is the one writer of a run."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")

    @classmethod
    def for_run(cls, run_path: str | Path) -> "ExplanationStore":
        return cls(side_path(run_path))

    def done(self, explainer: str, method: str, prompt_version: str, sae_id: str) -> set[int]:
        """Features of an SAE already explained by this explainer, method and prompt version."""
        if not self.path.exists():
            return set()
        with self._read() as conn:
            rows = conn.execute("SELECT feature FROM explanations WHERE explainer = ? AND method = ? AND "
                                "prompt_version = ? AND sae_id = ?", [explainer, method, prompt_version, sae_id]).fetchall()
        return {r[0] for r in rows}

    def write_batch(self, explanations: Sequence[Explanation]) -> None:
        """Add explanations (with their scores) and publish the file atomically."""
        if not explanations:
            return
        if self.path.exists():
            shutil.copyfile(self.path, self._tmp)
        else:
            self._tmp.unlink(missing_ok=True)
        try:
            conn = duckdb.connect(str(self._tmp))
            try:
                _migrate(conn)
                conn.execute("BEGIN")
                _insert(conn, explanations)
                _keep_terms_sorted(conn)
                conn.execute("COMMIT")
                conn.execute("CHECKPOINT")
            finally:
                conn.close()
            os.replace(self._tmp, self.path)
        finally:
            self._tmp.unlink(missing_ok=True)

    def _read(self) -> duckdb.DuckDBPyConnection:
        conn = duckdb.connect(":memory:")
        conn.execute("ATTACH ? AS x (READ_ONLY)", [str(self.path)])
        conn.execute("USE x")
        return conn


def _migrate(conn: duckdb.DuckDBPyConnection) -> None:
    has_meta = conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'").fetchone()[0]
    version = int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]) if has_meta else 0
    if version > SCHEMA_VERSION:
        raise ExplanationError(f"The explanations file has schema version {version}; this featurescope writes "
                               f"{SCHEMA_VERSION}: upgrade featurescope.")
    for step in range(version + 1, SCHEMA_VERSION + 1):
        conn.execute(MIGRATIONS[step])
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(step)])


def _insert(conn: duckdb.DuckDBPyConnection, explanations: Sequence[Explanation]) -> None:
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    next_id = conn.execute("SELECT coalesce(max(id), -1) + 1 FROM explanations").fetchone()[0]
    for e in explanations:
        key = [e.model_id, e.sae_id, e.feature, e.explainer, e.method, e.prompt_version]
        old = conn.execute("SELECT id FROM explanations WHERE model_id = ? AND sae_id = ? AND feature = ? AND "
                           "explainer = ? AND method = ? AND prompt_version = ?", key).fetchone()
        if old is not None:  # the same explainer again (--force): replace it
            for table, column in (("scores", "explanation_id"), ("terms", "explanation_id"), ("explanations", "id")):
                conn.execute(f"DELETE FROM {table} WHERE {column} = ?", [old[0]])
        conn.execute("INSERT INTO explanations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     [next_id, e.model_id, e.sae_id, e.feature, e.run_id, e.explainer, e.method, e.prompt_version,
                      e.text, e.prompt_tokens, e.completion_tokens, now])
        terms = sorted(set(words(e.text)))
        if terms:
            conn.executemany("INSERT INTO terms VALUES (?, ?)", [[t, next_id] for t in terms])
        for s in e.scores:
            conn.execute("INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         [next_id, s.scorer, s.kind, s.score, s.n_pos, s.n_neg, s.correct_pos, s.correct_neg, now])
        next_id += 1


RESORT_SHARE = 0.1  # terms appended since the last sort, as a share of all, that trigger a new sort


def _keep_terms_sorted(conn: duckdb.DuckDBPyConnection) -> None:
    """Keep the terms table in term order, so each row group's min/max lets a search's range filter skip all
    the row groups that cannot hold its word. Batches append unsorted rows; once they are more than
    RESORT_SHARE of the table, it is rewritten sorted (amortised: a few sorts as the file grows tenfold)."""
    total = conn.execute("SELECT count(*) FROM terms").fetchone()[0]
    row = conn.execute("SELECT value FROM meta WHERE key = 'terms_sorted_rows'").fetchone()
    if total - (int(row[0]) if row else 0) <= RESORT_SHARE * total:
        return
    conn.execute("CREATE TABLE terms_sorted AS SELECT * FROM terms ORDER BY term, explanation_id")
    conn.execute("DROP TABLE terms")
    conn.execute("ALTER TABLE terms_sorted RENAME TO terms")
    conn.execute("INSERT OR REPLACE INTO meta VALUES ('terms_sorted_rows', ?)", [str(total)])


_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def words(text: str) -> list[str]:
    """The search terms of a text: lower-cased runs of letters and digits."""
    return _WORD.findall(text.lower())


# ------------------------------------------------------------------------------------------------ reading
# Two plain reads instead of one join: a join with GROUP BY scans the whole scores table for each feature page
# (4-9 ms at 1M explanations), a filtered read of each table skips its row groups by zone maps (~1.5 ms).
_EXPLANATION_ROWS = ("SELECT id, model_id, sae_id, feature, explainer, method, prompt_version, text, created_at "
                     "FROM {db}.explanations WHERE {where}")
_EPOCH = dt.datetime(1970, 1, 1)
_SCORE_ROWS = "SELECT explanation_id, scorer, kind, score, n_pos, n_neg FROM {db}.scores WHERE {where} ORDER BY kind"


def explanations_of(conn: duckdb.DuckDBPyConnection, db: str, model_id: str, sae_id: str,
                    features: Iterable[int] | None = None) -> dict[int, list[dict]]:
    """Every explanation of these features (None: all of the SAE), by feature, best first: the highest mean
    score, then unscored ones (or NaN), then the newest. Each carries its scores (by kind) and mean_score."""
    where, params = "model_id = ? AND sae_id = ?", [model_id, sae_id]
    if features is not None:
        features = sorted(set(features))
        if not features:
            return {}
        where += f" AND feature IN ({', '.join('?' * len(features))})"
        params += features
    cursor = conn.execute(_EXPLANATION_ROWS.format(db=db, where=where), params)
    names = [d[0] for d in cursor.description]
    items = {row[0]: {**dict(zip(names, row)), "scores": []} for row in cursor.fetchall()}
    if not items:
        return {}
    if features is None:  # the whole SAE, read once per file: a semi-join
        score_where = f"explanation_id IN (SELECT id FROM {db}.explanations WHERE {where})"
        score_params = params
    else:
        score_where, score_params = f"explanation_id IN ({', '.join('?' * len(items))})", list(items)
    for explanation_id, scorer, kind, score, n_pos, n_neg in conn.execute(
            _SCORE_ROWS.format(db=db, where=score_where), score_params).fetchall():
        items[explanation_id]["scores"].append({"scorer": scorer, "kind": kind, "score": score, "n_pos": n_pos,
                                                "n_neg": n_neg})
    for item in items.values():
        values = [s["score"] for s in item["scores"] if s["score"] is not None]
        item["mean_score"] = sum(values) / len(values) if values else None
    ranked = sorted(items.values(), key=lambda i: (i["created_at"] or _EPOCH, i["id"]), reverse=True)  # newest first
    ranked.sort(key=lambda i: -i["mean_score"] if i["mean_score"] is not None and i["mean_score"] == i["mean_score"]
                else math.inf)  # stable: the best mean first, unscored and NaN last
    out: dict[int, list[dict]] = {}
    for item in ranked:
        out.setdefault(item["feature"], []).append(item)
    return out


# Ranked search: a query word matches a term equal to it (weight 1) or starting with it (weight 0.5), each
# weighted by the term's inverse document frequency; an explanation's rank is the sum over the query's words,
# after the number of query words it matches, then its mean score. Each word is one range filter on the terms
# table (term >= word AND term < word + U+10FFFF: what a prefix is for UTF-8 byte order), a scan of a few
# million short strings at 1M explanations that DuckDB vectorises (bench/explain_search.py); no extension
# needed (DuckDB's fts extension cannot be installed offline).
_WORD_HITS = ("SELECT explanation_id, term, {pos} AS pos, CASE WHEN term = ? THEN 1.0 ELSE 0.5 END AS w "
              "FROM {db}.terms WHERE term >= ? AND term < ?")
SEARCH_SQL = """
WITH m AS ({hits}),
     n AS (SELECT count(*)::DOUBLE AS docs FROM {db}.explanations),
     df AS (SELECT term, count(*) AS df FROM m GROUP BY term),
     best AS (SELECT m.explanation_id, m.pos, max(m.w * ln(1 + (n.docs - df.df + 0.5) / (df.df + 0.5))) AS s
              FROM m JOIN df USING (term) CROSS JOIN n GROUP BY m.explanation_id, m.pos)
{ranked}
ORDER BY matched DESC, rank DESC, explanation_id LIMIT ?
"""
_RANKED_ONE_WORD = "SELECT explanation_id, s AS rank, 1 AS matched FROM best"
_RANKED = "SELECT explanation_id, sum(s) AS rank, count(*) AS matched FROM best GROUP BY explanation_id"
# The page's rows, fetched by id once the ranking has chosen them (never the text of every match). A side file
# holds one run, so one model: the model is checked here rather than joined into the ranking (a semi-join over
# every explanation id cost as much as the ranking itself).
_HIT_ROWS = """
SELECT e.id, e.model_id, e.sae_id, e.feature, e.explainer, e.method, e.text,
       (SELECT avg(score) FROM {db}.scores s WHERE s.explanation_id = e.id) AS mean_score
FROM {db}.explanations e WHERE e.id IN ({ids}) AND e.model_id = ?
"""
_PREFIX_END = "\U0010ffff"


def search_explanations(conn: duckdb.DuckDBPyConnection, db: str, model_id: str, query: str,
                        limit: int = 50) -> list[dict]:
    """Explanations of a model whose words match the query's, best match first (see SEARCH_SQL); ties in
    matched words and rank go to the better scored explanation."""
    terms = _informative(conn, db, list(dict.fromkeys(words(query)))[:16])
    if not terms:
        return []
    hits = " UNION ALL ".join(_WORD_HITS.format(pos=i, db=db) for i in range(len(terms)))
    params = [p for t in terms for p in (t, t, t + _PREFIX_END)]
    sql = SEARCH_SQL.format(db=db, hits=hits, ranked=_RANKED_ONE_WORD if len(terms) == 1 else _RANKED)
    ranked = conn.execute(sql, [*params, limit]).fetchall()
    if not ranked:
        return []
    cursor = conn.execute(_HIT_ROWS.format(db=db, ids=", ".join(str(int(r[0])) for r in ranked)), [model_id])
    names = [d[0] for d in cursor.description]
    rows = {r[0]: dict(zip(names, r)) for r in cursor.fetchall()}
    out = [{**rows[i], "rank": rank, "matched": matched} for i, rank, matched in ranked if i in rows]
    out.sort(key=lambda h: (-h["matched"], -h["rank"], -(h["mean_score"] if h["mean_score"] is not None else -1)))
    return out


STOPWORD_SHARE = 0.25  # a query word in more than this share of explanations is left out, unless it is the only one


def _informative(conn: duckdb.DuckDBPyConnection, db: str, terms: list[str]) -> list[str]:
    """The query's words, less those (like "the") found in more than STOPWORD_SHARE of the explanations when
    the query has rarer ones: they barely change the ranking and would cost a pass over most of the index."""
    if len(terms) < 2:
        return terms
    docs = conn.execute(f"SELECT count(*) FROM {db}.explanations").fetchone()[0]
    counts = [conn.execute(f"SELECT count(*) FROM {db}.terms WHERE term = ?", [t]).fetchone()[0] for t in terms]
    kept = [t for t, c in zip(terms, counts) if c <= STOPWORD_SHARE * docs]
    return kept or [min(zip(counts, terms))[1]]


def balanced_accuracy(correct_pos: int, n_pos: int, correct_neg: int, n_neg: int) -> float:
    """The mean of the true positive and true negative rates (0.5 is chance)."""
    if n_pos == 0 or n_neg == 0:
        return math.nan
    return 0.5 * (correct_pos / n_pos + correct_neg / n_neg)


def as_row(e: Explanation) -> dict:
    return {k: v for k, v in asdict(e).items() if k != "scores"}
