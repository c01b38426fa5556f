"""Ranked explanation search (featurescope/explanations.py: SEARCH_SQL) at scale: a side file with --n synthetic
explanations (6-12 words each, drawn Zipf-like from the Python docs' vocabulary, spread over 78 SAEs), attached
read-only as the server does; each query's median time against the baseline in the same process and file: an
unranked `ILIKE '%word%'` scan of the explanation texts (what a LIKE search without an index costs; with LIMIT 50
it stops at the 50th match, so a common word is nearly free for it).

    python bench/explain_search.py --n 1000000
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa


def vocabulary() -> list[str]:
    from pydoc_data.topics import topics

    counts: dict[str, int] = {}
    for text in topics.values():
        for word in re.findall(r"[a-z]{3,}", text.lower()):
            counts[word] = counts.get(word, 0) + 1
    return [w for w, _ in sorted(counts.items(), key=lambda kv: -kv[1])]


def build(path: Path, n: int, seed: int = 0) -> None:
    from featurescope.explanations import _migrate

    words = np.array(vocabulary())
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, len(words) + 1)
    p = 1 / ranks ** 1.05
    p /= p.sum()
    lengths = rng.integers(6, 13, size=n)
    drawn = words[rng.choice(len(words), size=int(lengths.sum()), p=p)]
    cuts = np.cumsum(lengths)[:-1]
    texts = [" ".join(chunk) for chunk in np.split(drawn, cuts)]
    ids = np.arange(n, dtype=np.int32)
    names = [f"{i % 26}-{('res', 'mlp', 'att')[i % 3]}-16k" for i in range(78)]  # 78 distinct SAEs
    table = pa.table({"id": ids, "model_id": ["m"] * n, "sae_id": [names[i % 78] for i in range(n)],
                      "feature": (ids // 78).astype(np.int32), "text": texts})
    conn = duckdb.connect(str(path))
    _migrate(conn)
    conn.register("src", table)
    conn.execute("INSERT INTO explanations SELECT id, model_id, sae_id, feature, 'run', 'bench', 'max-act+logits', 'v1', "
                 "text, 0, 0, now() FROM src")
    conn.execute("INSERT INTO terms SELECT DISTINCT unnest(regexp_extract_all(lower(text), '[^\\W_]+')) AS term, id "
                 "FROM explanations ORDER BY term, id")  # as ExplanationStore keeps it (_keep_terms_sorted)
    conn.execute("INSERT INTO scores SELECT id, 'bench', 'detection', random(), 4, 4, 2, 2, now() FROM explanations "
                 "WHERE id % 2 = 0")
    conn.execute("CHECKPOINT")
    conn.close()


def timed(fn, repeat: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="DuckDB threads (the server's files use 1).")
    args = parser.parse_args()
    from featurescope.explanations import search_explanations

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.explanations.duckdb"
        start = time.perf_counter()
        build(path, args.n)
        print(f"built {args.n:,} explanations in {time.perf_counter() - start:.1f} s, {path.stat().st_size / 2**20:.0f} MiB")
        conn = duckdb.connect(":memory:", config={"threads": args.threads})
        conn.execute("ATTACH ? AS expl (READ_ONLY)", [str(path)])
        n_terms = conn.execute("SELECT count(*) FROM expl.terms").fetchone()[0]
        print(f"terms rows: {n_terms:,} ({n_terms / args.n:.1f} per explanation); DuckDB threads {args.threads}")
        words = vocabulary()
        queries = [words[0], words[40], words[2000], f"{words[30]} {words[300]}", words[500][:4], "deception"]
        print(f"{'query':<28} {'ranked p50':>11} {'hits':>5} {'ILIKE p50':>10} {'hits':>5} {'ratio':>6}")
        for q in queries:
            ranked, hits = timed(lambda: search_explanations(conn, "expl", "m", q, 50), args.repeat)
            first = q.split()[0]
            like, rows = timed(lambda: conn.execute("SELECT sae_id, feature, text FROM expl.explanations WHERE model_id = 'm' "
                                                    "AND text ILIKE ? LIMIT 50", [f"%{first}%"]).fetchall(), args.repeat)
            print(f"{q!r:<28} {ranked * 1000:>9.1f}ms {len(hits):>5} {like * 1000:>8.1f}ms {len(rows):>5} {ranked / like:>6.2f}")
        conn.close()


if __name__ == "__main__":
    main()
