"""Explanations in the explorer: the run's side file (<run>.explanations.duckdb) attached beside the published
run, the feature page's headline, the SAE table, the ranked search across every SAE of a model and its JSON
twin; hostile explanation text renders as text; a new batch is picked up without a restart; the published
run file is never written."""

from __future__ import annotations

import hashlib
import os

import duckdb

import pytest

from featurescope.explanations import Explanation, ExplanationStore, Score, side_path
from factories import make_app_client, make_data_dir, parse_html
from test_app_xss import assert_only_app_markup

MODEL = "tiny-gemma-2"
HOSTILE = "<script>window.__pwned = 1</script>\"'><img src=x onerror=alert(1)> error messages"


def explanation(sae_id: str, feature: int, text: str, explainer: str = "test-explainer", scores=()) -> Explanation:
    return Explanation(MODEL, sae_id, feature, f"run-{MODEL}-0", explainer, "max-act+logits", "v1", text,
                       scores=tuple(scores))


def score(kind: str, value: float) -> Score:
    return Score("test-scorer", kind, value, 4, 4, round(value * 4), round(value * 4))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = make_data_dir(tmp_path_factory.mktemp("explained"))
    run = root / "db" / "tiny.duckdb"
    before = hashlib.sha256(run.read_bytes()).hexdigest()
    store = ExplanationStore.for_run(run)
    store.write_batch([
        explanation("2-res-64", 3, HOSTILE, scores=[score("detection", 0.75), score("fuzz", 0.5)]),
        explanation("2-res-64", 3, "a weaker guess about messages", explainer="other", scores=[score("detection", 0.5)]),
        explanation("2-res-64", 5, "Python error tracebacks", scores=[score("detection", 1.0)]),
        explanation("4-mlp-48", 7, "errors in code", scores=[score("detection", 0.625)]),
        explanation("6-att-32", 1, "French place names"),
    ])
    assert hashlib.sha256(run.read_bytes()).hexdigest() == before
    return root


@pytest.fixture(scope="module")
def client(data_dir):
    with make_app_client(data_dir, rescan_seconds=0.0) as c:
        yield c


def test_side_file_is_not_listed_as_a_run(client, data_dir):
    assert side_path(data_dir / "db" / "tiny.duckdb").exists()
    home = client.get("/.json").json()
    assert home["problems"] == [] and sorted(m["id"] for m in home["models"]) == ["second-model", MODEL]


def test_feature_headline_is_the_best_explanation_with_its_score_and_escaped(client):
    data = client.get(f"/{MODEL}/2-res-64/3.json").json()
    assert [e["explainer"] for e in data["explanations"]] == ["test-explainer", "other"]  # mean 0.625 before 0.5
    best = data["explanations"][0]
    assert best["text"] == HOSTILE and best["mean_score"] == pytest.approx(0.625)
    assert {s["kind"]: s["score"] for s in best["scores"]} == {"detection": 0.75, "fuzz": 0.5}
    page = client.get(f"/{MODEL}/2-res-64/3")
    document = parse_html(page.text)
    assert_only_app_markup(document)
    assert document.find("p", cls="feature-explanation").text() == HOSTILE
    assert "detection 0.75" in document.find("p", cls="explanation-meta").text()
    assert data["label"] in document.find("p", cls="feature-label").text()  # the token label, as a second line


def test_feature_without_explanation_keeps_its_label_as_headline(client):
    data = client.get(f"/{MODEL}/2-res-64/4.json").json()
    assert data["explanations"] == []
    document = parse_html(client.get(f"/{MODEL}/2-res-64/4").text)
    assert not document.find_all("p", cls="feature-explanation")


def test_sae_table_shows_explanations(client):
    rows = {r["index"]: r for r in client.get(f"/{MODEL}/2-res-64.json?size=10").json()["features"]}
    assert rows[3]["explanation"] == HOSTILE and rows[5]["explanation"] == "Python error tracebacks"
    assert rows[0]["explanation"] is None
    document = parse_html(client.get(f"/{MODEL}/2-res-64?size=10").text)
    assert_only_app_markup(document)
    assert HOSTILE in [s.text() for s in document.find_all("span", cls="explanation")]


def test_search_ranks_across_saes_and_finds_a_feature_by_a_word(client):
    hits = client.get(f"/{MODEL}/-/explanations.json?q=error").json()["results"]
    found = [(h["sae_id"], h["feature"]) for h in hits]
    # "error" is a whole word of two explanations; "errors" only starts with it (half weight)
    assert found[:2] == [("2-res-64", 5), ("2-res-64", 3)] or found[:2] == [("2-res-64", 3), ("2-res-64", 5)]
    assert ("4-mlp-48", 7) in found and found.index(("4-mlp-48", 7)) == 2
    assert hits[0]["url"] == f"/{MODEL}/{hits[0]['sae_id']}/{hits[0]['feature']}"
    two_words = client.get(f"/{MODEL}/-/explanations.json?q=python+error").json()["results"]
    assert (two_words[0]["sae_id"], two_words[0]["feature"]) == ("2-res-64", 5)
    assert [h["feature"] for h in client.get(f"/{MODEL}/-/explanations.json?q=FRENCH").json()["results"]] == [1]
    assert client.get(f"/{MODEL}/-/explanations.json?q=deception").json()["results"] == []
    assert client.get("/second-model/-/explanations.json?q=error").json()["results"] == []


def test_search_page_renders_hostile_explanations_and_queries_as_text(client):
    q = "<script>alert(1)</script> messages"
    response = client.get(f"/{MODEL}/-/explanations", params={"q": q})
    assert response.status_code == 200
    document = parse_html(response.text)
    assert_only_app_markup(document)
    assert document.find("input", id="q").attrs["value"] == q
    assert HOSTILE in [td.text() for td in document.find_all("td", cls="explanation")]


def test_unknown_model_search_is_a_404_naming_it(client):
    response = client.get("/no-such-model/-/explanations.json?q=x")
    assert response.status_code == 404 and "no-such-model" in response.text


def test_a_new_batch_is_served_without_a_restart(client, data_dir):
    assert client.get(f"/{MODEL}/2-res-64/9.json").json()["explanations"] == []
    ExplanationStore.for_run(data_dir / "db" / "tiny.duckdb").write_batch([explanation("2-res-64", 9, "closing brackets")])
    os.utime(side_path(data_dir / "db" / "tiny.duckdb"))
    assert client.get(f"/{MODEL}/2-res-64/9.json").json()["explanations"][0]["text"] == "closing brackets"
    assert client.get(f"/{MODEL}/-/explanations.json?q=bracket").json()["results"][0]["feature"] == 9


@pytest.fixture(scope="module")
def live_explained(live_data_dir, tmp_path_factory, tiny_gemma2):
    """The live tests' real precompute run copied to its own data dir, every feature of 3-res-c explained."""
    import shutil

    from featurescope.app import Settings

    root = tmp_path_factory.mktemp("live-explained")
    (run,) = sorted((live_data_dir / "db").glob("*.duckdb"))
    (root / "db").mkdir()
    copied = root / "db" / run.name
    shutil.copyfile(run, copied)
    with duckdb.connect(str(copied), read_only=True) as conn:
        run_id, d_sae = conn.execute("SELECT run_id, d_sae FROM saes WHERE id = '3-res-c'").fetchone()
    ExplanationStore.for_run(copied).write_batch([
        Explanation(tiny_gemma2.name, "3-res-c", f, run_id, "test-explainer", "max-act+logits", "v1", f"{HOSTILE} #{f}")
        for f in range(d_sae)])
    return Settings(data_dir=root, device="cpu", max_prompt_tokens=40)


def test_encode_page_shows_explanations_beside_features(live_explained, tiny_gemma2):
    from fastapi.testclient import TestClient

    from conftest import live_app

    with TestClient(live_app(live_explained, tiny_gemma2)) as c:
        data = c.get(f"/{tiny_gemma2.name}/-/encode.json", params={"text": "The capital of France is Paris"}).json()
        by_sae = {}
        for f in _live_features(data):
            by_sae.setdefault(f["sae_id"], []).append(f)
        assert by_sae["3-res-c"] and all(f["explanation"] == f"{HOSTILE} #{f['index']}" for f in by_sae["3-res-c"])
        assert all("explanation" not in f for f in by_sae.get("1-res-a", []))
        page = c.get(f"/{tiny_gemma2.name}/-/encode", params={"text": "The capital of France is Paris"})
        document = parse_html(page.text)
        assert not document.find_all("img") and all(not s.text().strip() for s in document.find_all("script"))
        assert not [n for e in document.iter() for n in e.attrs if n.lower().startswith("on")]
        assert any(s.text().startswith(HOSTILE) for s in document.find_all("span", cls="explanation"))


def _live_features(data) -> list[dict]:
    """Every feature dict of an encode twin (the lists that carry sae_id, index and label)."""
    found = []

    def walk(value):
        if isinstance(value, dict):
            if {"sae_id", "index", "label"} <= value.keys():
                found.append(value)
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(data)
    return found
