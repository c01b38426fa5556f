"""The explanations side file (featurescope/explanations.py): batches are published whole or not at all, the
same explainer again replaces its explanation, a newer schema is refused in one sentence, and the ranked search
orders by matched words, then rarity and exactness, then score."""

from __future__ import annotations

import hashlib

import duckdb
import pytest

from featurescope.explanations import (Explanation, ExplanationError, ExplanationStore, Score, balanced_accuracy,
                                       search_explanations, side_path, words)


def exp(feature: int, text: str, explainer: str = "e", sae: str = "s", scores=()) -> Explanation:
    return Explanation("m", sae, feature, "run", explainer, "max-act+logits", "v1", text, scores=tuple(scores))


def search(path, query, limit=50, model="m"):
    with duckdb.connect(":memory:") as conn:
        conn.execute("ATTACH ? AS x (READ_ONLY)", [str(path)])
        return [(h["sae_id"], h["feature"]) for h in search_explanations(conn, "x", model, query, limit)]


def test_side_file_sits_beside_the_run():
    assert side_path("data/db/run-1.duckdb").as_posix() == "data/db/run-1.explanations.duckdb"


def test_a_failed_batch_leaves_the_published_file_as_it_was(tmp_path):
    store = ExplanationStore(tmp_path / "r.explanations.duckdb")
    store.write_batch([exp(0, "first")])
    before = hashlib.sha256(store.path.read_bytes()).hexdigest()
    with pytest.raises(Exception):
        store.write_batch([exp(1, "fine"), exp("not a number", "breaks the insert")])  # type: ignore[arg-type]
    assert hashlib.sha256(store.path.read_bytes()).hexdigest() == before
    assert not list(tmp_path.glob(".*"))
    assert store.done("e", "max-act+logits", "v1", "s") == {0}


def test_the_same_explainer_again_replaces_its_explanation_and_terms(tmp_path):
    store = ExplanationStore(tmp_path / "r.explanations.duckdb")
    store.write_batch([exp(0, "old words", scores=[Score("e", "detection", 0.5, 2, 2, 1, 1)]), exp(0, "other", "e2")])
    store.write_batch([exp(0, "new words")])
    with duckdb.connect(str(store.path), read_only=True) as conn:
        assert sorted(conn.execute("SELECT explainer, text FROM explanations").fetchall()) == [("e", "new words"), ("e2", "other")]
        assert conn.execute("SELECT count(*) FROM scores").fetchone()[0] == 0
    assert search(store.path, "old") == [] and search(store.path, "new") == [("s", 0)]


def test_a_newer_schema_is_refused_in_one_sentence(tmp_path):
    store = ExplanationStore(tmp_path / "r.explanations.duckdb")
    store.write_batch([exp(0, "x")])
    with duckdb.connect(str(store.path)) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(ExplanationError, match="schema version 99; this featurescope writes 1"):
        store.write_batch([exp(1, "y")])


def test_search_ranks_matched_words_then_rare_and_exact_terms_then_score(tmp_path):
    store = ExplanationStore(tmp_path / "r.explanations.duckdb")
    store.write_batch([
        exp(0, "the start of a python function definition"),
        exp(1, "the word the"),
        exp(2, "python keywords", scores=[Score("e", "detection", 0.9, 2, 2, 2, 2)]),
        exp(3, "python keywords", scores=[Score("e", "detection", 0.6, 2, 2, 1, 1)]),
        exp(4, "functions and methods", sae="t"),
        exp(5, "Deceptive statements", sae="t"),
    ])
    assert search(store.path, "python function")[0] == ("s", 0)  # the only one with both words
    assert search(store.path, "python")[:3] == [("s", 2), ("s", 3), ("s", 0)]  # equal rank: better score first
    assert search(store.path, "function") == [("s", 0), ("t", 4)]  # exact word before a longer word it starts
    assert search(store.path, "decept") == [("t", 5)]
    assert search(store.path, "  ,;  ") == [] and search(store.path, "python", model="other") == []
    assert len(search(store.path, "the python", limit=2)) == 2


def test_words_and_balanced_accuracy():
    assert words("Python's <script>alert(1)</script> error_messages") == ["python", "s", "script", "alert", "1",
                                                                        "script", "error", "messages"]
    assert balanced_accuracy(3, 4, 1, 4) == 0.5 and balanced_accuracy(4, 4, 4, 4) == 1.0


def test_terms_stay_in_term_order_as_batches_grow_the_file(tmp_path):
    store = ExplanationStore(tmp_path / "r.explanations.duckdb")
    for batch in range(4):
        store.write_batch([exp(10 * batch + i, f"zeta{batch} alpha{i} mid") for i in range(10)])
    with duckdb.connect(str(store.path), read_only=True) as conn:
        terms = [r[0] for r in conn.execute("SELECT term FROM terms").fetchall()]
        sorted_rows = int(conn.execute("SELECT value FROM meta WHERE key = 'terms_sorted_rows'").fetchone()[0])
    assert sorted_rows == len(terms) == 120  # each batch grew the table by more than a tenth: sorted each time
    assert terms == sorted(terms)


def test_a_word_in_most_explanations_is_left_out_when_the_query_has_rarer_ones(tmp_path):
    store = ExplanationStore(tmp_path / "r.explanations.duckdb")
    store.write_batch([exp(i, f"the token number{i}") for i in range(8)] + [exp(8, "python code")])
    assert search(store.path, "the python") == [("s", 8)]
    assert len(search(store.path, "the")) == 8


def test_a_features_explanations_come_best_mean_score_first_then_unscored_and_nan_then_the_rest_of_the_sae(tmp_path):
    from featurescope.explanations import explanations_of

    store = ExplanationStore(tmp_path / "r.explanations.duckdb")
    store.write_batch([
        exp(4, "unscored", "e1"),
        exp(4, "nan score", "e2", scores=[Score("s", "detection", float("nan"), 0, 0, 0, 0)]),
        exp(4, "good", "e3", scores=[Score("s", "detection", 0.9, 4, 4, 4, 3), Score("s", "fuzz", 0.7, 4, 4, 3, 3)]),
        exp(4, "fair", "e4", scores=[Score("s", "fuzz", 0.6, 4, 4, 2, 3)]),
        exp(5, "other feature", "e1"),
        exp(4, "other SAE", "e1", sae="t"),
    ])
    with duckdb.connect(":memory:") as conn:
        conn.execute("ATTACH ? AS x (READ_ONLY)", [str(store.path)])
        found = explanations_of(conn, "x", "m", "s", [4])
        whole = explanations_of(conn, "x", "m", "s")
    assert list(found) == [4]
    assert [e["text"] for e in found[4][:2]] == ["good", "fair"] and {e["text"] for e in found[4][2:]} == {"unscored", "nan score"}
    assert found[4][0]["mean_score"] == pytest.approx(0.8)
    assert [s["kind"] for s in found[4][0]["scores"]] == ["detection", "fuzz"]
    texts = lambda by_feature: {f: [e["text"] for e in items] for f, items in by_feature.items()}  # noqa: E731
    assert texts(whole) == {**texts(found), 5: ["other feature"]}
