"""Write one precompute run into a DuckDB file, in bulk, through Arrow tables (no per-row inserts).

The file is created with the Alembic migrations (featurescope.db.upgrade), filled, closed, and only
then published by the job (an os.replace into the data folder), so a reader never sees it half-written.
Each SAE's statistics become three flat Arrow tables (features, examples, links), which
`insert_features` nests into one row per feature (featurescope/schema.py says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable, Iterable
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from featurescope import db
from featurescope.labels import LABEL_KIND_AUTO, auto_label
from featurescope.schema import SAE_NUMBER_SHIFT


@dataclass
class SAEResult:
    """Everything stored for one SAE: its `saes` row, the finalized streaming statistics
    (precompute.feature_stats.FeatureStats.finalize), the weights-only statistics, its examples with
    their per-token activations (precompute.examples.ExampleActs.result), and its cross-layer links
    (precompute.links.NeighbourLinks, one per neighbour SAE)."""
    row: dict
    stats: dict
    static: dict
    examples: dict
    links: list = field(default_factory=list)


def _np(x) -> np.ndarray:
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def list_column(values_2d: np.ndarray, type_=pa.float32()) -> pa.ListArray:
    """[rows, width] -> a list column with `width` items per row."""
    rows, width = values_2d.shape
    offsets = np.arange(rows + 1, dtype=np.int32) * width  # width 0: empty lists
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values_2d.reshape(-1), type=type_))


def ragged_list_column(values_2d: np.ndarray, lengths: np.ndarray, type_=pa.int32()) -> pa.ListArray:
    """[rows, width] -> a list column holding the first lengths[i] items of row i."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    keep = np.arange(values_2d.shape[1])[None, :] < np.asarray(lengths)[:, None]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values_2d[keep], type=type_))


def examples_table(model_id: str, sae_id: str, run_id: str, examples: dict) -> pa.Table:
    """Top examples (kind 'top', bin 0) and interval samples (kind 'interval', bin = interval index), one row
    per filled slot of precompute.examples.ExampleActs.result(), whose slot order is the stored order."""
    top_ctx, iv_ctx = _np(examples["top_ctx"]), _np(examples["interval_ctx"])
    (F, k), (n, s) = top_ctx.shape, iv_ctx.shape[1:]
    m = k + n * s
    ctx = np.concatenate([top_ctx, iv_ctx.reshape(F, -1)], 1).reshape(-1)
    act = np.concatenate([_np(examples["top_act"]), _np(examples["interval_act"]).reshape(F, -1)], 1).reshape(-1)
    pos = np.concatenate([_np(examples["top_pos"]), _np(examples["interval_pos"]).reshape(F, -1)], 1).reshape(-1)
    j = np.arange(m)
    bins = np.tile(np.where(j < k, 0, (j - k) // s).astype(np.int32), F)
    ranks = np.tile(np.where(j < k, j, (j - k) % s).astype(np.int32), F)
    kind_is_top = np.tile(j < k, F)
    keep = np.nonzero(ctx >= 0)[0]
    offsets = _np(examples["token_offsets"])
    if offsets[-1] >= 2**31:
        raise ValueError(f"{sae_id}: {offsets[-1]} stored activations are more than one Arrow list column holds.")
    # Empty slots hold no activations, so the filled slots' offsets (and the total) stay valid offsets.
    kept_offsets = pa.array(np.append(offsets[keep], offsets[-1]).astype(np.int32))
    rows = len(keep)
    return pa.table({
        "model_id": pa.array([model_id] * rows, pa.string()),
        "sae_id": pa.array([sae_id] * rows, pa.string()),
        "feature": pa.array((keep // m).astype(np.int32)),
        "kind": pa.array(np.where(kind_is_top[keep], "top", "interval"), pa.string()),
        "bin": pa.array(bins[keep]),
        "rank": pa.array(ranks[keep]),
        "run_id": pa.array([run_id] * rows, pa.string()),
        "context_id": pa.array(ctx[keep].astype(np.int32)),
        "max_act": pa.array(act[keep].astype(np.float32)),
        "max_pos": pa.array(pos[keep].astype(np.int32)),
        "positions": pa.ListArray.from_arrays(kept_offsets, pa.array(_np(examples["token_pos"]).astype(np.int32))),
        "acts": pa.ListArray.from_arrays(kept_offsets, pa.array(_np(examples["token_acts"]).astype(np.float32))),
    })


def feature_labels(stats: dict, static: dict, contexts: np.ndarray, vocab: list[str]) -> list[str]:
    """Automatic labels: most frequent peak tokens of the top examples, then top promoted tokens."""
    top_ctx, top_pos = _np(stats["top_ctx"]), _np(stats["top_pos"])
    found = top_ctx >= 0
    peak_ids = np.where(found, contexts[np.where(found, top_ctx, 0), np.where(found, top_pos, 0)], -1)
    promoted = _np(static["logit_pos_ids"])
    labels = []
    for f in range(top_ctx.shape[0]):
        peaks = [vocab[t] for t in peak_ids[f] if t >= 0]
        labels.append(auto_label(peaks, [vocab[t] for t in promoted[f][:5]]))
    return labels


def features_table(model_id: str, sae_id: str, stats: dict, static: dict, labels: list[str]) -> pa.Table:
    F = _np(stats["max_act"]).shape[0]
    f32 = lambda key, src=stats: pa.array(_np(src[key]).astype(np.float32))  # noqa: E731
    return pa.table({
        "model_id": pa.array([model_id] * F, pa.string()),
        "sae_id": pa.array([sae_id] * F, pa.string()),
        "feature": pa.array(np.arange(F, dtype=np.int32)),
        "n_firing": pa.array(_np(stats["n_firing"]).astype(np.int64)),
        "density": f32("density"),
        "max_act": f32("max_act"),
        "mean_act": f32("mean_act"),
        "hist_bin_width": f32("hist_bin_width"),
        "hist_counts": ragged_list_column(_np(stats["hist_counts"]).astype(np.int32), _np(stats["hist_n_bins"])),
        "interval_lo": list_column(_np(stats["interval_lo"]).astype(np.float32)),
        "interval_hi": list_column(_np(stats["interval_hi"]).astype(np.float32)),
        "interval_share": list_column(_np(stats["interval_share"]).astype(np.float32)),
        "logit_pos_ids": list_column(_np(static["logit_pos_ids"]).astype(np.int32), pa.int32()),
        "logit_pos_values": list_column(_np(static["logit_pos_values"]).astype(np.float32)),
        "logit_neg_ids": list_column(_np(static["logit_neg_ids"]).astype(np.int32), pa.int32()),
        "logit_neg_values": list_column(_np(static["logit_neg_values"]).astype(np.float32)),
        "logit_hist_lo": f32("logit_hist_lo", static),
        "logit_hist_hi": f32("logit_hist_hi", static),
        "logit_hist_counts": list_column(_np(static["logit_hist_counts"]).astype(np.int32), pa.int32()),
        "neighbour_ids": list_column(_np(static["neighbour_ids"]).astype(np.int32), pa.int32()),
        "neighbour_cos": list_column(_np(static["neighbour_cos"]).astype(np.float32)),
        "label": pa.array(labels, pa.string()),
        "label_kind": pa.array([LABEL_KIND_AUTO] * F, pa.string()),
    })


def links_table(model_id: str, sae_id: str, links: list) -> pa.Table:
    """One row per (feature, neighbour SAE) with at least one link, sorted by (feature, neighbour id): the
    linked features (the ids >= 0 of a NeighbourLinks row) with their co-activations and cosine."""
    cols: dict[str, list] = {k: [] for k in ("feature", "other", "direction", "count", "ids", "coact", "coact_rel",
                                              "cosine", "no_cosine")}
    for link in sorted(links, key=lambda n: n.other):
        ids = _np(link.ids)  # [F, m], -1 = none
        rows = np.nonzero((ids >= 0).any(1))[0]
        valid = ids[rows] >= 0  # [r, m]
        cols["feature"].append(rows)
        cols["other"] += [link.other] * len(rows)
        cols["direction"] += [link.direction] * len(rows)
        cols["count"].append(valid.sum(1))
        cols["ids"].append(ids[rows][valid])  # row-major: grouped by feature, in stored order
        cols["coact"].append(_np(link.coact)[rows][valid])
        cols["coact_rel"].append(_np(link.coact_rel)[rows][valid])
        cols["cosine"].append(_np(link.cosine)[rows][valid] if link.cosine is not None else np.zeros(int(valid.sum())))
        cols["no_cosine"].append(np.full(len(rows), link.cosine is None))
    flat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items() if k not in ("other", "direction")}
    offsets = pa.array(np.concatenate([[0], np.cumsum(flat["count"])]).astype(np.int32))
    n = len(flat["feature"])
    table = pa.table({
        "model_id": pa.array([model_id] * n, pa.string()),
        "sae_id": pa.array([sae_id] * n, pa.string()),
        "feature": pa.array(flat["feature"].astype(np.int32)),
        "other_sae_id": pa.array(cols["other"], pa.string()),
        "direction": pa.array(cols["direction"], pa.string()),
        "other_features": pa.ListArray.from_arrays(offsets, pa.array(flat["ids"].astype(np.int32))),
        "coact": pa.ListArray.from_arrays(offsets, pa.array(flat["coact"].astype(np.float32))),
        "coact_rel": pa.ListArray.from_arrays(offsets, pa.array(flat["coact_rel"].astype(np.float32))),
        "cosine": pa.ListArray.from_arrays(offsets, pa.array(flat["cosine"].astype(np.float32)),
                                           mask=pa.array(flat["no_cosine"].astype(bool))),
    })
    return table.take(pa.array(np.lexsort((np.asarray(cols["other"], dtype=object).astype(str), flat["feature"]))))


def write_run_db(path: Path, *, model_row: dict, vocab: list[str], run_row: dict | Callable[[], dict],
                 contexts: np.ndarray, saes: Iterable[SAEResult], sae_ids: list[str] | None = None,
                 starts_document: np.ndarray | None = None) -> None:
    """Create `path` at the newest schema and fill it with one run. `path` must not be published yet.
    `saes` may be a generator: each result is written and dropped before the next is drawn, so memory holds
    one group's results at a time; then `sae_ids` (all of them) fixes each SAE's number up front, and
    `run_row` may be a function, called once every SAE is written (its run time includes theirs).
    `starts_document` [n_contexts] bool: which contexts start a document (None: unknown, stored as NULL)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    db.upgrade(path)
    if sae_ids is None:
        saes = list(saes)
        sae_ids = [result.row["id"] for result in saes]
    number_of = {sae_id: number for number, sae_id in enumerate(sorted(sae_ids))}
    con = duckdb.connect(str(path), config={"memory_limit": WRITE_MEMORY_LIMIT,
                                             "temp_directory": str(path.with_name(path.name + ".tmp"))})
    try:
        con.execute("BEGIN TRANSACTION")
        _insert(con, "models", pa.Table.from_pylist([model_row]))
        _insert(con, "vocab", pa.table({"model_id": [model_row["id"]] * len(vocab),
                                         "token_id": np.arange(len(vocab), dtype=np.int32), "text": vocab}))
        run = run_row() if callable(run_row) else run_row
        _insert(con, "contexts", pa.table({"run_id": [run["id"]] * len(contexts),
                                           "context_id": np.arange(len(contexts), dtype=np.int32),
                                           "token_ids": list_column(contexts.astype(np.int32), pa.int32()),
                                           "starts_document": pa.nulls(len(contexts), pa.bool_()) if starts_document is None
                                           else pa.array(starts_document.astype(bool))}))
        for result in saes:
            sae_id = result.row["id"]
            _insert(con, "saes", pa.Table.from_pylist([{**result.row, "number": number_of[sae_id]}]))
            labels = feature_labels(result.stats, result.static, contexts, vocab)
            insert_features(con, number_of[sae_id], features_table(model_row["id"], sae_id, result.stats, result.static, labels),
                            examples_table(model_row["id"], sae_id, run["id"], result.examples),
                            links_table(model_row["id"], sae_id, result.links))
        if callable(run_row):
            run = run_row()
        _insert(con, "runs", pa.Table.from_pylist([run]))
        con.execute("COMMIT")
        con.execute("CHECKPOINT")
    finally:
        con.close()


# DuckDB's default is 80% of the machine's memory; writing a whole release in one transaction would take it.
WRITE_MEMORY_LIMIT = "2GB"
NESTED_COLUMNS = ("feature_key", "examples", "links", "peak_token_ids")  # the features columns insert_features fills


def insert_features(con: duckdb.DuckDBPyConnection, sae_number: int, features: pa.Table, examples: pa.Table,
                    links: pa.Table) -> None:
    """Insert one SAE's `features` rows: the columns of `features` (one row per feature), plus each
    feature's rows of `examples` and `links` (the columns of the views of the same names, any order) as its
    nested lists, the tokens its top examples peak on (from the `contexts` table, filled before), and its
    feature_key. Rows go in sorted by feature."""
    staged = {"_features": features, "_examples": examples, "_links": links}
    for name, table in staged.items():
        con.register(name, table)
    names = [f'"{c}"' for c in features.column_names]  # from our own code, not users
    con.execute(f"""
        INSERT INTO features ({", ".join(names)}, feature_key, examples, peak_token_ids, links)
        SELECT {", ".join("f." + n for n in names)}, ?::BIGINT * {2 ** SAE_NUMBER_SHIFT} + f.feature,
               coalesce(ex.examples, []), coalesce(ex.peak_token_ids, []), coalesce(li.links, [])
        FROM _features f
        LEFT JOIN (SELECT e.feature,
                          list(struct_pack(kind := e.kind, bin := e.bin, rank := e.rank, context_id := e.context_id, max_act := e.max_act,
                                      max_pos := e.max_pos, positions := e.positions, acts := e.acts)
                               ORDER BY e.kind <> 'top', e.bin, e.rank) AS examples,
                          list(c.token_ids[e.max_pos + 1] ORDER BY e.rank) FILTER (WHERE e.kind = 'top') AS peak_token_ids  -- lists are 1-indexed
                   FROM _examples e JOIN contexts c ON c.run_id = e.run_id AND c.context_id = e.context_id
                   GROUP BY e.feature) ex ON ex.feature = f.feature
        LEFT JOIN (SELECT feature, list(struct_pack(other_sae_id, direction, other_features, coact, coact_rel, cosine)
                                        ORDER BY other_sae_id) AS links
                   FROM _links GROUP BY feature) li ON li.feature = f.feature
        ORDER BY f.feature""", [sae_number])
    for name in staged:
        con.unregister(name)


def _insert(con: duckdb.DuckDBPyConnection, table: str, data: pa.Table) -> None:
    """INSERT ... SELECT from a registered Arrow table, naming the columns (their order need not match)."""
    con.register("_incoming", data)
    columns = ", ".join(f'"{c}"' for c in data.column_names)  # names come from our own code, not users
    con.execute(f'INSERT INTO "{table}" ({columns}) SELECT {columns} FROM _incoming')
    con.unregister("_incoming")
