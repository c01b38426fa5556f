"""Live encoding in the server (app/live.py, app/routes/live.py) over a real precompute run of the tiny
Gemma 2: live values equal stored ones, requests are micro-batched, bad input and overload get clear
answers, disconnected clients are dropped, and steering is exact at strength 0 and moves the output
towards the feature's promoted tokens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import duckdb
import numpy as np
import pytest

from conftest import live_app
from featurescope.app import Settings, create_app
from featurescope.app.catalog import CatalogSource
from featurescope.app.databases import DataDir
from featurescope.app.live import EncodeJob, LiveService, ServiceBusy, resolve_source
from featurescope.app.live_encoder import LiveModel
from featurescope.app.routes.live import DEFAULT_STRENGTH_MULTIPLE, ClientGone, run_job
from factories import parse_html
from featurescope.sae_loading import load_sae
from featurescope.sites import parse_site
from featurescope.app.steering import GenerationCancelled, SteeringVector, generate_pair
from featurescope.positions import WARMUP_POSITIONS

SAE_IDS = ("1-res-a", "2-mlp-b", "3-res-c")


@pytest.fixture(scope="module")
def settings(live_data_dir) -> Settings:
    return Settings(data_dir=live_data_dir, device="cpu", max_prompt_tokens=40, max_new_tokens=12)


@pytest.fixture(scope="module")
def client(settings, tiny_gemma2):
    from fastapi.testclient import TestClient

    with TestClient(live_app(settings, tiny_gemma2)) as client:
        yield client


@pytest.fixture(scope="module")
def model_id(tiny_gemma2) -> str:
    return tiny_gemma2.name


def _published(data_dir: Path) -> Path:
    (path,) = sorted((data_dir / "db").glob("*.duckdb"))
    return path


def _stored_examples(data_dir: Path, sae_id: str, limit: int = 12) -> list[tuple]:
    con = duckdb.connect(str(_published(data_dir)), read_only=True)
    try:
        return con.execute(
            "SELECT e.feature, e.positions, e.acts, c.token_ids, c.starts_document FROM examples e JOIN contexts c USING (run_id, context_id) "
            "WHERE e.sae_id = ? AND e.kind = 'top' ORDER BY e.feature, e.rank LIMIT ?", [sae_id, limit]).fetchall()
    finally:
        con.close()


def _dense(positions, acts, n) -> np.ndarray:
    out = np.zeros(n, dtype=np.float64)
    out[list(positions)] = acts
    return out


# --------------------------------------------------------------------------------------- correctness
@pytest.mark.parametrize("sae_id", SAE_IDS)
def test_live_activations_of_a_stored_context_equal_the_precomputed_ones(client, live_data_dir, model_id, sae_id):
    rows = _stored_examples(live_data_dir, sae_id)
    assert rows and not all(r[4] for r in rows), "no example from a context that starts mid-document"
    for feature, positions, acts, token_ids, starts_document in rows:
        ids = ",".join(map(str, token_ids))
        body = client.get(f"/{model_id}/-/encode.json", params={"ids": ids, "feature": f"{sae_id}:{feature}",
                                                                "mid_document": int(not starts_document)}).json()
        assert body["ids"] == list(token_ids)
        counted = np.array(body["highlight"]["counted"])  # never BOS/EOS/pad, nor a mid-document context's warm-up
        assert [t["warmup"] for t in body["tokens"]] == [not starts_document and 1 <= i <= WARMUP_POSITIONS
                                                         for i in range(len(token_ids))]
        assert not any(c for c, t in zip(counted, body["tokens"]) if t["special"] or t["warmup"])
        live, stored = np.array(body["highlight"]["acts"]), _dense(positions, acts, len(token_ids))
        np.testing.assert_allclose(live[counted], stored[counted], rtol=1e-5, atol=1e-6)
        assert not stored[~counted].any()  # what did not count is not stored either


def test_concurrent_requests_share_one_forward_pass_and_keep_their_own_values(settings, live_data_dir, tiny_gemma2):
    catalog = CatalogSource(DataDir(settings.db_dir)).current()
    (model,) = catalog.models.values()
    sae = model.saes["3-res-c"]
    rows = _stored_examples(live_data_dir, "3-res-c", limit=8)
    live = LiveModel(model, settings, loaded=tiny_gemma2)
    jobs = []
    for i, (feature, positions, acts, token_ids, starts_document) in enumerate(rows):
        cut = len(token_ids) - 3 * i  # different lengths: the batch is padded, causal prefixes keep their values
        jobs.append((EncodeJob(saes=[sae], token_ids=list(token_ids[:cut]), columns={sae.id: [feature]},
                               starts_document=starts_document),
                     _dense(positions, acts, len(token_ids))[:cut], feature))
    for job, _, _ in jobs:
        live.queue.put_nowait(job)  # all queued before the worker starts: it takes them as one batch
    live.start()
    for job, expected, feature in jobs:
        result = job.future.result(timeout=60)
        assert result.batch_size == len(jobs)
        counted = result.saes[sae.id].counted
        live_acts = np.array(result.saes[sae.id].columns[feature])[counted]
        np.testing.assert_allclose(live_acts, expected[counted], rtol=1e-5, atol=1e-6)
    live.close()


def test_encode_page_json_lists_tokens_layers_and_top_features(client, model_id):
    body = client.get(f"/{model_id}/-/encode.json", params={"text": "The capital of France is Paris.", "token": 2}).json()
    assert body["tokens"][0]["special"] and not any(t["special"] for t in body["tokens"][1:])
    assert [layer["sae_id"] for layer in body["layers"]] == list(SAE_IDS)  # ordered by layer
    n = len(body["tokens"])
    for layer in body["layers"]:
        assert len(layer["l0"]) == n and layer["l0"][0] == 0  # BOS shown but excluded by default
    assert body["selected_token"] == 2
    for column in body["token_features"]:
        acts = [f["activation"] for f in column["features"]]
        assert acts == sorted(acts, reverse=True) and all(a > 0 for a in acts)
    for column in body["prompt_features"]:
        assert all(f["pos"] != 0 for f in column["features"])
    assert body["search"]["results"], "search via inference found nothing"
    densities = [r["density"] for r in body["search"]["results"]]
    assert max(densities) <= body["search"]["max_density"]


def test_search_sorts_and_filters_by_density(client, model_id):
    params = {"text": "def add(a, b): return a + b", "max_density": 1, "sort": "density"}
    results = client.get(f"/{model_id}/-/encode.json", params=params).json()["search"]["results"]
    assert [r["density"] for r in results] == sorted(r["density"] for r in results)
    capped = client.get(f"/{model_id}/-/encode.json", params={**params, "max_density": 0.02}).json()["search"]
    assert all(r["density"] <= 0.02 for r in capped["results"])
    assert capped["total"] < len(results) or len(results) == 50


def test_selecting_a_subset_of_saes_stops_the_forward_early_and_lists_only_them(client, model_id):
    body = client.get(f"/{model_id}/-/encode.json", params={"text": "Hello world", "saes": ["1-res-a"]}).json()
    assert [layer["sae_id"] for layer in body["layers"]] == ["1-res-a"]


def test_encode_page_html_escapes_the_prompt(client, model_id):
    hostile = "<script>alert(1)</script> &amp; <b>x</b>"
    response = client.get(f"/{model_id}/-/encode", params={"text": hostile})
    assert response.status_code == 200
    assert "<script>alert(1)</script>" not in response.text and "<b>x</b>" not in response.text
    doc = parse_html(response.text)
    assert doc.find("textarea", id="encode-text").text() == hostile
    assert doc.find_all("a", cls="selected")  # the selected token


def test_encode_page_without_text_shows_the_form(client, model_id):
    response = client.get(f"/{model_id}/-/encode")
    assert response.status_code == 200 and 'id="encode-form"' in response.text


# ------------------------------------------------------------------------------------------ bad input
def test_empty_prompt_and_prompt_over_the_limit_get_422_naming_the_limit(client, model_id):
    empty = client.get(f"/{model_id}/-/encode.json", params={"text": "   "})
    assert empty.status_code == 422 and "empty" in empty.json()["message"]
    long = client.get(f"/{model_id}/-/encode.json", params={"text": "word " * 200})
    assert long.status_code == 422 and "at most 40 tokens" in long.json()["message"]
    page = client.get(f"/{model_id}/-/encode", params={"text": "word " * 200})
    assert page.status_code == 422 and "at most 40 tokens" in page.text


def test_unknown_model_sae_or_feature_gives_404(client, model_id):
    assert client.get("/no-such-model/-/encode.json", params={"text": "x"}).status_code == 404
    missing = client.get(f"/{model_id}/-/encode.json", params={"text": "x", "saes": ["nope"]})
    assert missing.status_code == 404 and missing.json()["kind"] == "sae"
    assert client.get(f"/{model_id}/3-res-c/48/-/test.json", params={"text": "x"}).status_code == 404
    assert client.get(f"/{model_id}/-/steer.json", params={"text": "x", "feature": "nope:1"}).status_code == 404


def test_malformed_feature_and_token_position_get_422(client, model_id):
    assert client.get(f"/{model_id}/-/encode.json", params={"text": "x y", "feature": "3-res-c"}).status_code == 422
    assert client.get(f"/{model_id}/-/encode.json", params={"text": "x y", "token": 99}).status_code == 422
    assert client.get(f"/{model_id}/-/encode.json", params={"ids": "2,abc"}).status_code == 422


def test_a_full_queue_answers_503_with_retry_after(settings, live_data_dir):
    from fastapi.testclient import TestClient

    small = Settings(data_dir=live_data_dir, device="cpu", max_queue=1)
    service = LiveService(small)
    app = create_app(small, service)
    with TestClient(app) as client:
        (model,) = app.state.catalogs.current().models.values()
        live = service.model(model)
        live.start = lambda *args, **kwargs: None  # no worker: the queue stays full
        live.queue.put_nowait(EncodeJob(saes=[]))
        response = client.get(f"/{model.id}/-/encode.json", params={"text": "hello"})
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) >= 1 and "try again" in response.json()["message"]
        with pytest.raises(ServiceBusy):
            live.submit(EncodeJob(saes=[]))


def test_a_client_that_disconnects_is_dropped_before_it_uses_the_model(settings, tiny_gemma2):
    catalog = CatalogSource(DataDir(settings.db_dir)).current()
    (model,) = catalog.models.values()
    live = LiveModel(model, settings, loaded=tiny_gemma2)
    live.start = lambda *args, **kwargs: None  # hold the worker back while the client leaves

    class GoneRequest:
        async def is_disconnected(self) -> bool:
            return True

    job = EncodeJob(saes=[model.saes["1-res-a"]], text="hello")
    with pytest.raises(ClientGone):
        asyncio.run(run_job(GoneRequest(), live, job, timeout=10))
    assert job.future.cancelled()
    kept = EncodeJob(saes=[model.saes["1-res-a"]], text="hello again")
    live.queue.put_nowait(kept)
    LiveModel.start(live)
    kept.future.result(timeout=60)
    assert live.served == 1  # the abandoned job never ran
    live.close()


def test_live_encoding_switched_off_says_so(live_data_dir, model_id):
    from fastapi.testclient import TestClient

    with TestClient(create_app(Settings(data_dir=live_data_dir, live=False))) as client:
        response = client.get(f"/{model_id}/-/encode.json", params={"text": "hello"})
        assert response.status_code == 503 and "switched off" in response.json()["message"]
        page = client.get(f"/{model_id}/3-res-c/0", params={"text": "hello"})
        assert page.status_code == 200 and "switched off" in page.text


# --------------------------------------------------------------------------------------- loading
def test_server_loads_the_model_and_saes_itself_at_startup(live_data_dir, model_id):
    from fastapi.testclient import TestClient

    settings = Settings(data_dir=live_data_dir, device="cpu", load_models="startup")
    service = LiveService(settings)
    with TestClient(create_app(settings, service)) as client:
        live = service.models[model_id]
        assert live.ready.wait(60) and live.error is None
        assert {sae_id for _, sae_id, _ in service.saes.resident()} == set(SAE_IDS)
        assert client.get(f"/{model_id}/-/encode.json", params={"text": "hello"}).status_code == 200


def test_relative_sources_resolve_against_the_data_dir(tmp_path):
    (tmp_path / "data" / "saes" / "x").mkdir(parents=True)
    assert resolve_source("data/saes/x", tmp_path / "data") == str(tmp_path / "data" / "saes" / "x")
    assert resolve_source("saes/x", tmp_path / "data") == str(tmp_path / "data" / "saes" / "x")
    assert resolve_source("google/gemma-scope-2b-pt-res", tmp_path / "data") == "google/gemma-scope-2b-pt-res"


# ---------------------------------------------------------------------------------- feature test box
def test_feature_test_box_encodes_text_with_the_same_values_as_the_encode_page(client, model_id):
    text = "The capital of France is Paris."
    test = client.get(f"/{model_id}/3-res-c/5/-/test.json", params={"text": text}).json()
    enc = client.get(f"/{model_id}/-/encode.json", params={"text": text, "feature": "3-res-c:5"}).json()
    assert [t["activation"] for t in test["tokens"]] == enc["highlight"]["acts"]
    fragment = client.get(f"/{model_id}/3-res-c/5/-/test", params={"text": "<i>hi</i>"},
                          headers={"HX-Request": "true", "HX-Target": "test-result"})
    assert fragment.text.lstrip().startswith('<div id="test-result"') and "<i>hi</i>" not in fragment.text
    assert fragment.headers["HX-Push-Url"].endswith("/3-res-c/5?text=%3Ci%3Ehi%3C%2Fi%3E")
    page = client.get(f"/{model_id}/3-res-c/5", params={"text": text})
    assert "/3-res-c/5/-/test?text=" in page.text and "/-/steer?feature=3-res-c%3A5" in page.text



def test_the_test_box_and_the_encode_page_shade_each_token_by_one_rule(client, model_id):
    """A token's highlight is its activation over the feature's largest in the corpus, capped at 1, on the
    test box and on the encode page alike; tokens left out of statistics are never shaded."""
    text = "The capital of France is Paris."
    enc = client.get(f"/{model_id}/-/encode.json", params={"text": text, "feature": "3-res-c:5"}).json()
    h = enc["highlight"]
    expected = ["" if not counted or act <= 0 else f"--a:{min(act / h['max_act'], 1.0):.2f}"
                for act, counted in zip(h["acts"], h["counted"])]
    box = parse_html(client.get(f"/{model_id}/3-res-c/5/-/test", params={"text": text}).text)
    page = parse_html(client.get(f"/{model_id}/-/encode", params={"text": text, "feature": "3-res-c:5"}).text)
    box_tokens = box.find("div", id="test-result").find("div", cls="ctx").find_all(cls="t")
    page_tokens = page.find("div", cls="prompt-tokens").find_all("a", cls="t")
    assert [t.attrs.get("style", "") for t in box_tokens] == expected
    assert [t.attrs.get("style", "") for t in page_tokens] == expected
    assert "excluded" in page_tokens[0].attrs["class"].split() and "excluded" in box_tokens[0].attrs["class"].split()

def test_the_token_by_layer_grid_shades_each_cell_by_its_rows_largest_value_of_the_metric_shown(client, model_id):
    text = "The capital of France is Paris."
    for metric, key in (("count", "l0"), ("strength", "total")):
        params = {"text": text, "metric": metric}
        layers = client.get(f"/{model_id}/-/encode.json", params=params).json()["layers"]
        page = parse_html(client.get(f"/{model_id}/-/encode", params=params).text)
        rows = page.find("table", cls="layer-grid").find("tbody").find_all("tr")
        assert any(max(layer[key]) > 0 for layer in layers)
        for layer, row in zip(layers, rows, strict=True):
            top = max(layer[key])  # a row where nothing fires stays unshaded
            assert layer["shade"] == pytest.approx([v / top if top else 0.0 for v in layer[key]])
            assert [td.attrs["style"] for td in row.find_all("td")] == [f"--a:{a:.2f}" for a in layer["shade"]]


def test_errors_answered_to_htmx_replace_the_target_with_the_message(client, model_id):
    response = client.get(f"/{model_id}/3-res-c/5/-/test", params={"text": "word " * 200},
                          headers={"HX-Request": "true", "HX-Target": "test-result"})
    assert response.status_code == 422
    assert response.text.startswith('<div id="test-result"') and "at most 40 tokens" in response.text


# ---------------------------------------------------------------------------------------- steering
def test_steering_with_strength_zero_reproduces_the_default_exactly(client, model_id):
    params = {"text": "The capital of", "feature": "3-res-c:3", "strength": "0", "n_tokens": 10, "temperature": 0.9, "seed": 7}
    body = client.get(f"/{model_id}/-/steer.json", params=params).json()
    assert body["default"]["tokens"] == body["steered"]["tokens"]
    again = client.get(f"/{model_id}/-/steer.json", params=params).json()
    assert again["default"] == body["default"]  # same seed, same text: the shared link reproduces it


def test_steering_moves_the_output_towards_the_features_promoted_tokens(client, model_id, live_data_dir):
    con = duckdb.connect(str(_published(live_data_dir)), read_only=True)
    feature, promoted = con.execute("SELECT feature, logit_pos_ids FROM features WHERE sae_id = '3-res-c' "
                                    "ORDER BY logit_pos_values[1] - logit_pos_values[2] DESC LIMIT 1").fetchone()
    con.close()
    params = {"text": "The capital of", "feature": f"3-res-c:{feature}", "strength": "300", "n_tokens": 8, "temperature": 0}
    body = client.get(f"/{model_id}/-/steer.json", params=params).json()
    steered = [t["token_id"] for t in body["steered"]["tokens"]]
    default = [t["token_id"] for t in body["default"]["tokens"]]
    top = set(promoted[:5])
    assert steered[0] == promoted[0]
    assert sum(t in top for t in steered) > sum(t in top for t in default)


def test_steering_rejects_out_of_range_input_with_reasons(client, model_id):
    base = {"text": "Hi", "feature": "3-res-c:1"}
    too_strong = client.get(f"/{model_id}/-/steer.json", params={**base, "strength": "5000"})
    assert too_strong.status_code == 422 and "out of range" in too_strong.json()["message"]
    too_long = client.get(f"/{model_id}/-/steer.json", params={**base, "n_tokens": 500})
    assert too_long.status_code == 422 and "at most 12" in too_long.json()["message"]
    assert client.get(f"/{model_id}/-/steer.json", params={**base, "strength": "abc"}).status_code == 422
    assert client.get(f"/{model_id}/-/steer.json", params={"text": "Hi"}).status_code == 422
    hostile = client.get(f"/{model_id}/-/steer", params={**base, "text": "<script>x()</script>", "n_tokens": 2})
    assert hostile.status_code == 200 and "<script>x()</script>" not in hostile.text


def test_steering_defaults_the_strength_from_the_features_largest_activation(client, model_id):
    page = client.get(f"/{model_id}/-/steer.json", params={"text": "Hi", "feature": "3-res-c:1", "n_tokens": 2}).json()
    (f,) = page["features"]
    assert f["strength"] == pytest.approx(round(DEFAULT_STRENGTH_MULTIPLE * f["max_act"], 1) if f["max_act"] > 0 else 10.0)


def test_generation_stops_when_the_caller_cancels(tiny_gemma2, live_data_dir):
    sae = load_sae(str(live_data_dir.parent / "saes" / "3-res"))
    calls = iter(range(100))
    with pytest.raises(GenerationCancelled):
        generate_pair(tiny_gemma2, tiny_gemma2.tokenize("Hello"), [SteeringVector(parse_site("3-res"), sae.W_dec[0])],
                      n_new=50, should_stop=lambda: next(calls) >= 2)


def test_highlighting_a_feature_brings_its_cross_layer_links_with_their_live_activations(client, model_id, live_data_dir):
    con = duckdb.connect(str(_published(live_data_dir)), read_only=True)
    (feature,) = con.execute("SELECT feature FROM features WHERE sae_id = '2-mlp-b' AND n_firing > 0 "
                             "ORDER BY max_act DESC LIMIT 1").fetchone()
    con.close()
    text = "The capital of France is Paris. def add(a, b): return a + b"
    body = client.get(f"/{model_id}/-/encode.json", params={"text": text, "feature": f"2-mlp-b:{feature}"}).json()
    links = body["highlight"]["links"]
    assert links["upstream"] and links["downstream"]
    assert {link["sae_id"] for link in links["upstream"]} == {"1-res-a"}
    assert {link["sae_id"] for link in links["downstream"]} == {"3-res-c"}
    for link in links["upstream"][:2] + links["downstream"][:2]:
        alone = client.get(f"/{model_id}/-/encode.json", params={"text": text, "feature": f"{link['sae_id']}:{link['feature']}"}).json()
        assert link["live_max"] == pytest.approx(alone["highlight"]["activation"], rel=1e-5, abs=1e-6)
    page = client.get(f"/{model_id}/-/encode", params={"text": text, "feature": f"2-mlp-b:{feature}"})
    assert 'class="live-links"' in page.text


def test_bos_is_shown_but_only_counted_when_asked(client, model_id):
    text = "The capital of France is Paris."
    default = client.get(f"/{model_id}/-/encode.json", params={"text": text}).json()
    included = client.get(f"/{model_id}/-/encode.json", params={"text": text, "include_special": 1}).json()
    assert all(layer["l0"][0] == 0 for layer in default["layers"])
    assert any(layer["l0"][0] > 0 for layer in included["layers"])
    assert any(f["pos"] == 0 for col in included["prompt_features"] for f in col["features"])
    home = client.get("/")
    assert f'href="/{model_id}/-/encode"' in home.text and f'href="/{model_id}/-/steer"' in home.text


def test_an_sae_that_cannot_be_loaded_fails_only_its_own_requests_with_the_reason(settings, tiny_gemma2):
    from dataclasses import replace as dc_replace

    catalog = CatalogSource(DataDir(settings.db_dir)).current()
    (model,) = catalog.models.values()
    broken = dc_replace(model.saes["2-mlp-b"], source="/nowhere/params.npz")
    live = LiveModel(model, settings, loaded=tiny_gemma2)
    live.start(preload=[broken, model.saes["1-res-a"]])
    assert live.ready.wait(60) and live.error is None
    failing = live.submit(EncodeJob(saes=[broken], text="hello"))
    with pytest.raises(Exception, match="could not be loaded from '/nowhere/params.npz'"):
        failing.result(timeout=60)
    assert live.submit(EncodeJob(saes=[model.saes["1-res-a"]], text="hello")).result(timeout=60).saes
    live.close()


def test_the_feature_page_greys_the_warm_up_of_top_examples_cut_mid_document(client, live_data_dir, model_id):
    con = duckdb.connect(str(_published(live_data_dir)), read_only=True)
    starts = dict(con.execute("SELECT context_id, starts_document FROM contexts").fetchall())
    (feature,) = con.execute("SELECT e.feature FROM examples e JOIN contexts c USING (run_id, context_id) WHERE e.sae_id = "
                             "'1-res-a' AND e.kind = 'top' GROUP BY e.feature HAVING bool_or(c.starts_document) AND "
                             "bool_or(NOT c.starts_document) ORDER BY e.feature LIMIT 1").fetchone()
    con.close()
    top = client.get(f"/{model_id}/1-res-a/{feature}.json").json()["top_examples"]
    assert [e["warmup"] for e in top] == [0 if starts[e["context_id"]] else WARMUP_POSITIONS for e in top]
    page = parse_html(client.get(f"/{model_id}/1-res-a/{feature}", params={"context": "full"}).text)
    rows = page.find_all("li", cls="example")[:len(top)]  # the top examples come first
    for row, e in zip(rows, top):
        tokens = row.find("span", cls="ctx").find_all("span", cls="t")
        assert len(tokens) == len(e["token_ids"])
        assert [i for i, t in enumerate(tokens) if "warmup" in t.attrs["class"].split()] == list(range(1, e["warmup"] + 1))
    assert all(e["max_pos"] > e["warmup"] for e in top)  # no top example peaks in a warm-up
