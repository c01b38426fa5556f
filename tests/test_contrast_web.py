"""The contrast page, detectors and direction downloads over a real precompute run of the tiny Gemma 2 with
its live encoder: a run started by POST is polled to its ranking, a detector saved from it round-trips (its
held-out AUROC recomputed through the live apply path equals the stored one), bad input gets a clear 422,
and a feature's weights download as the SAE holds them."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

from conftest import live_app
from featurescope.app import Settings
from featurescope.app.contrast import auroc
from factories import parse_html
from featurescope.sae_loading import load_sae
from test_contrast import CODE, PROSE


@pytest.fixture(scope="module")
def client(live_data_dir, tiny_gemma2):
    from fastapi.testclient import TestClient

    settings = Settings(data_dir=live_data_dir, device="cpu", max_prompt_tokens=40, max_contrast_prompts=12, max_batch=4)
    with TestClient(live_app(settings, tiny_gemma2)) as client:
        yield client


@pytest.fixture(scope="module")
def model_id(tiny_gemma2) -> str:
    return tiny_gemma2.name


def _wait(client, url: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(url).json()
        if body["state"] != "running" or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


@pytest.fixture(scope="module")
def finished(client, model_id) -> dict:
    started = client.post(f"/{model_id}/-/contrast.json", json={"a": CODE, "b": PROSE, "labels": None,
                                                                "label_a": "code", "label_b": "prose"})
    assert started.status_code == 202, started.text
    body = _wait(client, started.json()["url"])
    assert body["state"] == "done", body["error"]
    return body


def test_a_run_started_by_post_is_polled_to_its_ranking_per_sae_and_across_layers(client, finished):
    assert finished["done"] == finished["total"] == len(CODE) + len(PROSE)
    assert finished["labels"] == ["code", "prose"] and finished["sizes"] == [len(CODE), len(PROSE)]
    across = finished["across"]
    assert across and [r["separation"] for r in across] == sorted((r["separation"] for r in across), reverse=True)
    assert {g["sae_id"] for g in finished["per_sae"]} == {"1-res-a", "2-mlp-b", "3-res-c"}
    best_of_each = max(g["rows"][0]["separation"] for g in finished["per_sae"] if g["rows"])
    assert across[0]["separation"] == best_of_each  # across layers merges the per-SAE rankings
    row = across[0]
    assert len(row["strip_a"]) == len(CODE) and len(row["strip_b"]) == len(PROSE)
    assert row["fired_a"] == sum(v > 0 for v in row["strip_a"])
    assert row["mean_a"] == pytest.approx(np.mean(row["strip_a"]), rel=1e-5)
    assert row["auroc"] == pytest.approx(auroc(np.array(row["strip_a"])[:, None], np.array(row["strip_b"])[:, None])[0])
    assert client.get(row["url"]).status_code == 200  # each row links to the feature's page


def test_the_run_page_shows_the_ranking_with_strips_and_the_detector_form(client, model_id, finished):
    page = client.get(f"/{model_id}/-/contrast/{finished['run_id']}")
    doc = parse_html(page.text)
    assert page.status_code == 200 and doc.find("form", id="detector-form")
    assert len(doc.find_all("svg", cls="strip")) >= len(finished["across"])
    assert doc.find("table", cls="contrast-rows").find_all("a")[0].attrs["href"] == finished["across"][0]["url"]


def test_the_form_page_and_its_twin_list_the_saes_pools_and_limits(client, model_id):
    body = client.get(f"/{model_id}/-/contrast.json").json()
    assert [s["id"] for s in body["saes"]] == ["1-res-a", "2-mlp-b", "3-res-c"]
    assert body["pools"] == ["max", "mean"] and body["limits"]["max_prompts"] == 12
    page = parse_html(client.get(f"/{model_id}/-/contrast").text)
    assert page.find("form", id="contrast-form").attrs["method"] == "post"
    assert "At most 12 prompts per set" in page.find("form", id="contrast-form").text()


def test_a_form_post_with_an_uploaded_jsonl_file_redirects_to_the_run_page(client, model_id):
    upload = '{"text": "def g(y):\\n    return y"}\n"import sys"\n'
    response = client.post(f"/{model_id}/-/contrast", data={"a": "x = 1", "a_file": upload, "a_file_name": "code.jsonl",
                                                             "b": "Hello there.\nGood morning.", "saes": ["3-res-c"]},
                           follow_redirects=False)
    assert response.status_code == 303
    body = _wait(client, response.headers["location"].replace("/contrast/", "/contrast/", 1) + ".json")
    assert body["sizes"] == [3, 2] and body["saes"] == ["3-res-c"] and body["state"] == "done"


@pytest.mark.parametrize("payload,param,words", [
    ({"a": [], "b": PROSE}, "a", "Set A is empty"),
    ({"a": CODE}, "b", "only one set was given"),
    ({"a": ["x"] * 13, "b": PROSE}, "a", "at most 12 prompts per set"),
    ({"a": CODE, "b": PROSE, "saes": ["3-res-c", "no-such-sae"]}, "saes", "has no SAE 'no-such-sae'"),
    ({"a": CODE, "b": PROSE, "pool": "median"}, "pool", "pool must be one of max, mean"),
    ({"a": CODE, "b": ["word " * 400]}, "b", "Prompt 1 of set B"),
])
def test_bad_input_gets_a_clear_422(client, model_id, payload, param, words):
    response = client.post(f"/{model_id}/-/contrast.json", json=payload)
    assert response.status_code == 422, response.text
    assert words in response.json()["message"]
    form = {k: "\n".join(v) if isinstance(v, list) and k != "saes" else v for k, v in payload.items()}
    page = client.post(f"/{model_id}/-/contrast", data=form)
    assert page.status_code == 422 and words in parse_html(page.text).text()


def test_a_prompt_over_the_token_limit_fails_the_run_naming_the_prompt(client, model_id):
    started = client.post(f"/{model_id}/-/contrast.json", json={"a": CODE[:2], "b": ["Paris " * 60]}).json()
    body = _wait(client, started["url"])
    assert body["state"] == "failed" and "Prompt 1 of set B" in body["error"] and "at most 40 tokens" in body["error"]


def test_a_run_can_be_cancelled_while_it_encodes(client, model_id):
    started = client.post(f"/{model_id}/-/contrast.json", json={"a": CODE + CODE[:4], "b": PROSE + PROSE[:4]}).json()
    cancelled = client.post(f"/{model_id}/-/contrast/{started['run_id']}/cancel", follow_redirects=False)
    assert cancelled.status_code == 303
    body = _wait(client, started["url"])
    assert body["state"] == "cancelled" and body["done"] < body["total"] and body["across"] == []


def test_an_unknown_run_or_detector_is_a_404(client, model_id):
    assert client.get(f"/{model_id}/-/contrast/nope.json").json()["kind"] == "contrast_run"
    assert client.get(f"/{model_id}/-/detectors/nope.json").status_code == 404


# ------------------------------------------------------------------------------------------ detectors
def test_a_detector_round_trips_save_load_apply_and_its_held_out_auroc_recomputes(client, model_id, finished):
    saved = client.post(f"/{model_id}/-/contrast/{finished['run_id']}/detector.json", json={"name": "code-vs-prose", "k": 4})
    assert saved.status_code == 201, saved.text
    doc = saved.json()["detector"]
    assert doc["model_id"] == model_id and len(doc["features"]) == 4 and doc["pool"] == "max"
    assert doc["sets"]["a"] == {"label": "code", "size": 8, "train": 6, "held_out": 2}
    loaded = client.get(saved.json()["url"]).json()
    assert loaded["detector"] == doc and loaded["applied"] is None

    def score(text: str) -> float:
        applied = client.get(saved.json()["url"], params={"text": text}).json()["applied"]
        return applied["score"]

    held_a = [score(CODE[i]) for i in doc["held_out"]["a"]]
    held_b = [score(PROSE[i]) for i in doc["held_out"]["b"]]
    recomputed = auroc(np.array(held_a)[:, None], np.array(held_b)[:, None])[0]
    assert recomputed == pytest.approx(doc["held_out_auroc"], abs=1e-12)

    model_page = client.get(f"/{model_id}.json").json()
    assert "code-vs-prose" in [d["name"] for d in model_page["detectors"]]
    html = parse_html(client.get(f"/{model_id}").text)
    assert html.find("section", id="detectors").find_all("a")[0].attrs["href"] == f"/{model_id}/-/detectors/code-vs-prose"


def test_applying_a_detector_gives_per_token_and_per_prompt_scores_and_the_features_that_fired(client, model_id, finished):
    doc = client.post(f"/{model_id}/-/contrast/{finished['run_id']}/detector.json", json={"name": "apply-check", "k": 3}).json()
    applied = client.get(doc["url"], params={"text": CODE[0]}).json()["applied"]
    fired = [f for f in applied["features"] if f["fired"]]
    assert applied["score"] == pytest.approx(sum(f["weight"] for f in fired))
    assert applied["tokens"][0]["counted"] is False and applied["tokens"][0]["score"] == 0.0  # BOS never counts
    for f in applied["features"]:  # with max pooling a feature fired on the prompt iff it fired on some token
        key = f"{f['sae_id']}:{f['index']}"
        assert f["fired"] == any(key in t["fired"] for t in applied["tokens"])
    weights = {f"{f['sae_id']}:{f['index']}": f["weight"] for f in applied["features"]}
    for t in applied["tokens"]:
        assert t["score"] == pytest.approx(sum(weights[k] for k in t["fired"]))


def test_the_detector_page_escapes_the_prompt_and_labels(client, model_id):
    started = client.post(f"/{model_id}/-/contrast.json", json={"a": CODE[:3], "b": PROSE[:3], "label_a": "<b>bold</b>"}).json()
    run = _wait(client, started["url"])
    client.post(f"/{model_id}/-/contrast/{run['run_id']}/detector.json", json={"name": "escaped", "k": 2})
    hostile = "<script>alert(1)</script>"
    page = client.get(f"/{model_id}/-/detectors/escaped", params={"text": hostile})
    assert page.status_code == 200 and hostile not in page.text and "<b>bold</b>" not in page.text
    assert parse_html(page.text).find("textarea", id="detector-text").text() == hostile


def test_bad_detector_names_and_a_taken_name_get_422(client, model_id, finished):
    url = f"/{model_id}/-/contrast/{finished['run_id']}/detector.json"
    assert "lowercase" in client.post(url, json={"name": "Bad Name"}).json()["message"]
    assert client.post(url, json={"name": "taken"}).status_code == 201
    again = client.post(url, json={"name": "taken"})
    assert again.status_code == 422 and "already has a detector named 'taken'" in again.json()["message"]
    assert client.post(url, json={"name": "ok-name", "k": 0}).status_code == 422


def test_the_detector_store_is_beside_the_published_files_never_in_one(client, live_data_dir, finished):
    assert (live_data_dir / "detectors.sqlite").is_file()
    import duckdb

    for path in (live_data_dir / "db").glob("*.duckdb"):
        con = duckdb.connect(str(path), read_only=True)
        tables = {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        con.close()
        assert not any("detector" in t for t in tables)


# ---------------------------------------------------------------------------------------- directions
def test_a_features_decoder_row_encoder_column_and_threshold_download_as_npy_and_json(client, model_id, live_data_dir):
    from featurescope.app.catalog import CatalogSource
    from featurescope.app.databases import DataDir

    (model,) = CatalogSource(DataDir(live_data_dir / "db")).current().models.values()
    sae = load_sae(model.saes["3-res-c"].source)
    base = f"/{model_id}/3-res-c/5/-"
    decoder = np.load(io.BytesIO(client.get(f"{base}/decoder.npy").content))
    encoder = np.load(io.BytesIO(client.get(f"{base}/encoder.npy").content))
    threshold = np.load(io.BytesIO(client.get(f"{base}/threshold.npy").content))
    np.testing.assert_array_equal(decoder, sae.W_dec[5].numpy())
    np.testing.assert_array_equal(encoder, sae.W_enc[:, 5].numpy())
    assert float(threshold) == float(sae.threshold[5])
    body = client.get(f"{base}/vectors.json").json()
    assert body["d_in"] == 64 and np.allclose(body["decoder"], decoder) and body["threshold"] == pytest.approx(float(threshold))
    assert client.get(f"/{model_id}/3-res-c/48/-/decoder.npy").status_code == 404
    page = parse_html(client.get(f"/{model_id}/3-res-c/5").text)
    assert f"{base}/decoder.npy" in [a.attrs.get("href") for a in page.find_all("a")]
