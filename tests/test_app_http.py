"""The explorer over HTTP (FastAPI TestClient on a factory data dir): every page's JSON twin, the HTML
pages parsed, htmx fragments, and every error path (404 with nearest choices, 422 with a message)."""

from __future__ import annotations

import os

import pytest

from factories import PARIS, make_app_client, parse_html, shared_data_dir

MODEL, SAE = "tiny-gemma-2", "2-res-64"
D_SAE = 64
DEAD = [f for f in range(D_SAE) if f % 11 == 10]  # the factory's rule


@pytest.fixture(scope="module")
def client():
    with make_app_client(shared_data_dir()) as c:
        yield c


def get_json(client, url: str, status: int = 200) -> dict:
    response = client.get(url, follow_redirects=False)
    assert response.status_code == status, (url, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def get_page(client, url: str, status: int = 200, **headers):
    response = client.get(url, headers=headers, follow_redirects=False)
    assert response.status_code == status, (url, response.text[:500])
    assert response.headers["content-type"].startswith("text/html")
    return parse_html(response.text)


# ----------------------------------------------------------------------------------------------- home
def test_home_json_lists_models_and_saes_with_metrics(client):
    home = get_json(client, "/.json")
    assert [m["id"] for m in home["models"]] == ["second-model", MODEL]
    tiny = home["models"][1]
    assert [s["id"] for s in tiny["saes"]] == ["2-res-64", "4-mlp-48", "6-att-32"]
    first = tiny["saes"][0]
    assert first["hook_name"] == "blocks.2.hook_resid_post" and first["site"] == "2-res" and first["d_sae"] == 64
    assert first["l0"] == pytest.approx(41.5) and first["corpus"] == "pydoc_data.topics" and first["n_tokens"] == 96 * 47
    assert tiny["saes"][2]["l0"] is None  # not evaluated: stays null, not 0
    assert home["databases"] == 2 and home["problems"] == []


def test_home_html_links_every_sae(client):
    page = get_page(client, "/")
    hrefs = {a.attrs["href"] for a in page.find_all("a")}
    for sae in ("2-res-64", "4-mlp-48", "6-att-32"):
        assert f"/{MODEL}/{sae}" in hrefs
    assert "/second-model/3-res-24" in hrefs
    assert page.find("a", cls="twin").attrs["href"] == "/.json"
    assert "–" in page.find("table").text()  # unknown metrics shown as a dash


def test_model_page_and_twin(client):
    model = get_json(client, f"/{MODEL}.json")["model"]
    assert model["id"] == MODEL and len(model["saes"]) == 3
    page = get_page(client, f"/{MODEL}")
    assert page.find("h1").text() == MODEL


def test_model_page_shows_its_saes_as_a_layer_by_site_grid_in_forward_pass_order(client):
    grid = get_json(client, f"/{MODEL}.json")["model"]["grid"]
    assert grid["kinds"] == ["att", "mlp", "res"] and [row["layer"] for row in grid["rows"]] == [2, 4, 6]
    assert [[[s["id"] for s in cell] for cell in row["cells"]] for row in grid["rows"]] == [
        [[], [], ["2-res-64"]], [[], ["4-mlp-48"], []], [["6-att-32"], [], []]]
    page = get_page(client, f"/{MODEL}")
    row = page.find("tr", id="layer-2")
    assert [a.text() for a in row.find_all("a")] == ["2-res-64"] and "L0 41.5" in row.text()
    home = get_page(client, "/").find("section", id=f"model-{MODEL}")
    assert [a.text() for a in home.find_all("a", cls="sae-id")] == ["2-res-64", "4-mlp-48", "6-att-32"]


def test_layer_site_and_width_narrow_the_model_grid_and_nonsense_gets_a_clear_422(client):
    view = get_json(client, f"/{MODEL}.json?layer=4&site=mlp&width=48")
    assert [s["id"] for row in view["shown"]["rows"] for cell in row["cells"] for s in cell] == ["4-mlp-48"]
    assert view["filters"] == {"layer": 4, "site": "mlp", "width": "48"} and view["choices"]["sites"] == ["att", "mlp", "res"]
    assert get_json(client, f"/{MODEL}.json?layer=&site=&width=")["shown"]["n_saes"] == 3  # the form's "any"
    assert get_json(client, f"/{MODEL}.json?layer=3")["shown"]["n_saes"] == 0
    page = get_page(client, f"/{MODEL}?layer=3")
    assert "No SAE of tiny-gemma-2 matches" in page.text()
    for query, message in (("site=resid", "has no 'resid' SAEs"), ("layer=x", "layer must be a layer number")):
        response = client.get(f"/{MODEL}.json?{query}")
        assert response.status_code == 422 and message in response.json()["message"]


# ------------------------------------------------------------------------------------------- SAE page
def test_sae_json_pages_through_every_feature(client):
    seen = []
    for page in (1, 2, 3, 4):
        view = get_json(client, f"/{MODEL}/{SAE}.json?size=20&page={page}")
        assert view["total"] == D_SAE and view["pages"] == 4
        seen += [f["index"] for f in view["features"]]
    assert seen == list(range(D_SAE))


def test_sae_json_sorts(client):
    by_density = get_json(client, f"/{MODEL}/{SAE}.json?sort=density&desc=1&size=500")["features"]
    densities = [f["density"] for f in by_density]
    assert densities == sorted(densities, reverse=True)
    by_max = get_json(client, f"/{MODEL}/{SAE}.json?sort=max_act&size=500")["features"]
    assert [f["max_act"] for f in by_max] == sorted(f["max_act"] for f in by_max)
    by_label = get_json(client, f"/{MODEL}/{SAE}.json?sort=label&size=500")["features"]
    assert [f["label"] for f in by_label] == sorted(f["label"] for f in by_label)


def test_sae_json_filters(client):
    dead = get_json(client, f"/{MODEL}/{SAE}.json?show=dead&size=500")
    assert [f["index"] for f in dead["features"]] == DEAD and all(f["dead"] for f in dead["features"])
    alive = get_json(client, f"/{MODEL}/{SAE}.json?show=alive&size=500")
    assert alive["total"] == D_SAE - len(DEAD)
    dense = get_json(client, f"/{MODEL}/{SAE}.json?show=dense&size=500")["features"]
    assert dense and all(f["density"] > 0.1 for f in dense)
    ranged = get_json(client, f"/{MODEL}/{SAE}.json?min_density=0.001&max_density=0.01&size=500")["features"]
    assert ranged and all(0.001 <= f["density"] <= 0.01 for f in ranged)


def test_sae_json_searches_labels_case_insensitively(client):
    found = get_json(client, f"/{MODEL}/{SAE}.json?q=paris&size=500")["features"]
    assert found and all("paris" in f["label"].lower() for f in found)
    assert get_json(client, f"/{MODEL}/{SAE}.json?q=%25")["total"] == 0  # LIKE wildcards are literal


@pytest.mark.parametrize("typed", [PARIS, PARIS.strip()])
def test_sae_json_searches_by_peak_token(client, typed):
    view = client.get(f"/{MODEL}/{SAE}.json", params={"token": typed, "size": 500}).json()
    indices = [f["index"] for f in view["features"]]
    expected = [f for f in range(D_SAE) if f % 7 == 3 and f not in DEAD]  # the factory's " Paris" features
    assert set(expected) <= set(indices)
    for index in indices:  # every hit really has a top example peaking on " Paris"
        feature = get_json(client, f"/{MODEL}/{SAE}/{index}.json")
        assert PARIS in [e["tokens"][e["max_pos"]] for e in feature["top_examples"]]


def test_sae_json_token_search_without_match(client):
    view = client.get(f"/{MODEL}/{SAE}.json", params={"token": "no such token"}).json()
    assert view["total"] == 0 and view["matched_token_ids"] == []
    page = parse_html(client.get(f"/{MODEL}/{SAE}", params={"token": "no such token"}).text)
    assert "no token in the vocabulary has that text" in page.find("p", cls="result-count").text()


def test_sae_html_table_sort_links_and_density_chart(client):
    page = get_page(client, f"/{MODEL}/{SAE}?sort=density&desc=1")
    rows = page.find("table", cls="feature-table").find_all("tr")[1:]
    assert len(rows) == 50
    sort_links = {a.text().split()[0]: a.attrs["href"] for a in page.find_all("a", cls="sort")}
    assert sort_links["density"] == f"/{MODEL}/{SAE}?sort=density"  # active column: a click flips the order
    assert sort_links["#"] == f"/{MODEL}/{SAE}"  # index ascending is the default: no parameters
    bars = page.find("figure", cls="density").find_all("rect")
    assert bars and all(b.find("title").text() for b in bars)
    assert page.find("a", cls="twin").attrs["href"] == f"/{MODEL}/{SAE}.json?sort=density&desc=1"


def test_sae_htmx_request_gets_only_the_table(client):
    response = client.get(f"/{MODEL}/{SAE}?page=2", headers={"HX-Request": "true", "HX-Target": "features"})
    assert response.status_code == 200 and "<html" not in response.text
    fragment = parse_html(response.text)
    assert fragment.find("section", id="features")
    assert fragment.find("table").find_all("tr")[1].find("a").text() == "50"


# --------------------------------------------------------------------------------------- feature page
def test_feature_json_has_the_whole_dashboard(client):
    f = get_json(client, f"/{MODEL}/{SAE}/3.json")
    assert f["index"] == 3 and f["model_id"] == MODEL and f["sae"]["id"] == SAE
    assert f["label"] and f["label_kind"] == "auto" and PARIS.strip() in f["label"]
    assert 0 < f["density"] < 1 and f["max_act"] > 0 and len(f["activation_histogram"]["counts"]) == 50
    top = f["top_examples"]
    assert len(top) == 8 and [e["max_act"] for e in top] == sorted((e["max_act"] for e in top), reverse=True)
    assert top[0]["max_act"] == pytest.approx(f["max_act"], rel=1e-6)
    for e in top:
        assert len(e["tokens"]) == len(e["token_ids"]) == 48 and e["tokens"][0] == "<bos>"
        assert e["max_pos"] in e["positions"] and max(e["acts"]) == pytest.approx(e["max_act"], rel=1e-6)
    assert [i["bin"] for i in f["intervals"]] == [0, 1, 2, 3, 4]
    assert sum(i["share"] for i in f["intervals"]) == pytest.approx(1.0, abs=1e-5)
    for interval in f["intervals"]:
        assert all(interval["lo"] <= e["max_act"] < interval["hi"] + 1e-4 for e in interval["examples"])
    assert len(f["logits"]["promoted"]) == 10 and f["logits"]["promoted"][0]["value"] > 0
    assert len(f["logits"]["suppressed"]) == 10 and f["logits"]["suppressed"][0]["value"] < 0
    assert len(f["neighbours"]) == 5 and all(n["label"] for n in f["neighbours"])
    assert (f["prev"], f["next"]) == (2, 4)
    assert f["test"] == {"text": "", "live_encoding": True}  # the server has live encoding on (its default)


def test_feature_prev_next_at_the_ends(client):
    assert get_json(client, f"/{MODEL}/{SAE}/0.json")["prev"] is None
    last = get_json(client, f"/{MODEL}/{SAE}/{D_SAE - 1}.json")
    assert last["next"] is None and last["prev"] == D_SAE - 2


def test_dead_feature_page(client):
    f = get_json(client, f"/{MODEL}/{SAE}/{DEAD[0]}.json")
    assert f["n_firing"] == 0 and f["top_examples"] == []
    page = get_page(client, f"/{MODEL}/{SAE}/{DEAD[0]}")
    assert "never fired" in page.find("section", id="examples").text()


def test_feature_html_highlights_tokens_by_activation(client):
    data = get_json(client, f"/{MODEL}/{SAE}/3.json")
    page = get_page(client, f"/{MODEL}/{SAE}/3")
    examples = page.find("section", id="examples")
    first = examples.find("li", cls="example")
    firing = [t for t in first.find_all("span", cls="t") if "title" in t.attrs]
    assert firing, "the strongest example shows highlighted tokens"
    peak = first.find("span", cls="peak")
    assert float(peak.attrs["title"]) == pytest.approx(data["top_examples"][0]["max_act"], rel=1e-5)
    assert peak.attrs["style"] == "--a:1.00"
    for token in firing:
        alpha = float(token.attrs["style"].removeprefix("--a:"))
        assert alpha == pytest.approx(min(float(token.attrs["title"]) / data["max_act"], 1), abs=0.006)
    headings = [h.text() for h in examples.find_all("h3")]
    assert headings[0].startswith("activation interval [") and "of firing tokens" in headings[0]
    assert not any("quantile" in h for h in headings)


def test_feature_snippet_and_full_context(client):
    snippet = get_page(client, f"/{MODEL}/{SAE}/3").find("section", id="examples").find("li", cls="example")
    full = get_page(client, f"/{MODEL}/{SAE}/3?context=full").find("section", id="examples").find("li", cls="example")
    assert len(full.find_all("span", cls="t")) == 48 > len(snippet.find_all("span", cls="t"))
    assert full.find("span", cls="special").text() == "<bos>"
    fragment = client.get(f"/{MODEL}/{SAE}/3?context=full", headers={"HX-Request": "true", "HX-Target": "examples"})
    assert "<html" not in fragment.text and parse_html(fragment.text).find("section", id="examples")


def test_feature_whitespace_is_visible(client):
    page = get_page(client, f"/{MODEL}/{SAE}/3?context=full")
    texts = [t.text() for t in page.find_all("span", cls="t")]
    assert all("\n" not in t for t in texts)
    newline_tokens = [t for t in page.find_all("span", cls="nl")]
    assert newline_tokens and all("↵" in t.text() for t in newline_tokens)
    leading_space = page.find_all("span", cls="lead")
    assert leading_space and all(not t.text().startswith(" ") for t in leading_space)


def test_feature_sharing_meta_and_embed(client):
    page = get_page(client, f"/{MODEL}/{SAE}/3?text=hello")
    meta = {m.attrs.get("property") or m.attrs.get("name"): m.attrs.get("content") for m in page.find_all("meta")}
    assert meta["og:title"] == f"Feature 3 · {SAE} · {MODEL}"
    assert meta["og:url"] == f"http://testserver/{MODEL}/{SAE}/3?text=hello"
    assert meta["twitter:card"] == "summary" and "fires on" in meta["og:description"]
    assert page.find("button", **{"data-copy": "location"})
    assert page.find("input", cls="share-url").attrs["value"] == f"http://testserver/{MODEL}/{SAE}/3?text=hello"
    assert page.find("textarea", id="test-text").text() == "hello"
    embed = get_page(client, f"/{MODEL}/{SAE}/3?embed=1")
    assert not embed.find_all("header", cls="site") and not embed.find_all("aside")
    assert embed.find("section", id="examples") and embed.find("a", target="_blank").attrs["href"].endswith(f"/{MODEL}/{SAE}/3")


def test_random_and_jump_redirect_to_stable_urls(client):
    response = client.get(f"/{MODEL}/{SAE}/-/random", follow_redirects=False)
    assert response.status_code == 302
    index = int(response.headers["location"].rsplit("/", 1)[1])
    assert index not in DEAD and 0 <= index < D_SAE
    jump = client.get(f"/{MODEL}/{SAE}/-/jump?index=12", follow_redirects=False)
    assert jump.status_code == 302 and jump.headers["location"] == f"/{MODEL}/{SAE}/12"



@pytest.mark.parametrize("old,new", [
    (f"/{MODEL}/encode?text=Paris&sort=layer", f"/{MODEL}/-/encode?text=Paris&sort=layer"),
    (f"/{MODEL}/steer.json?text=hi&feature={SAE}%3A3", f"/{MODEL}/-/steer.json?text=hi&feature={SAE}%3A3"),
    (f"/{MODEL}/{SAE}/random", f"/{MODEL}/{SAE}/-/random"),
    (f"/{MODEL}/{SAE}/jump?index=12", f"/{MODEL}/{SAE}/-/jump?index=12"),
    (f"/{MODEL}/{SAE}/3/test?text=a%20b", f"/{MODEL}/{SAE}/3/-/test?text=a%20b"),
    (f"/{MODEL}/{SAE}/3/lineage.json?breadth=2", f"/{MODEL}/{SAE}/3/-/lineage.json?breadth=2"),
])
def test_app_pages_moved_under_dash_answer_their_old_urls_with_a_redirect_keeping_the_query(client, old, new):
    response = client.get(old, follow_redirects=False)
    assert response.status_code == 308 and response.headers["location"] == new


def test_an_sae_named_like_an_app_page_is_served_and_the_page_still_reachable(tmp_path):
    from factories import SAESpec, make_db

    make_db(tmp_path / "db" / "run.duckdb", saes=(SAESpec("encode", 2, "res", 16), SAESpec("steer", 3, "res", 16)))
    with make_app_client(tmp_path, live=False) as named:
        assert get_json(named, f"/{MODEL}/encode.json")["sae"]["id"] == "encode"
        assert get_page(named, f"/{MODEL}/steer").find("h1").text().startswith("steer")
        assert get_json(named, f"/{MODEL}/encode/3.json")["index"] == 3
        assert get_page(named, f"/{MODEL}/-/encode").find("textarea", id="encode-text")


# ----------------------------------------------------------------------------------------------- errors
def test_unknown_model_404_offers_close_matches(client):
    body = get_json(client, "/tiny-gemma.json", status=404)
    assert body["kind"] == "model" and body["suggestions"][0] == {"id": MODEL, "url": f"/{MODEL}.json"}
    page = get_page(client, "/tiny-gemma/2-res-64/3", status=404)
    assert page.find("ul", cls="suggestions").find("a").attrs["href"] == f"/{MODEL}"


def test_unknown_sae_404_offers_the_models_saes(client):
    body = get_json(client, f"/{MODEL}/2-res-46.json", status=404)
    assert body["kind"] == "sae" and body["suggestions"][0]["id"] == "2-res-64"
    page = get_page(client, f"/{MODEL}/2-res-46", status=404)
    assert f"/{MODEL}/2-res-64" in [a.attrs["href"] for a in page.find("ul", cls="suggestions").find_all("a")]


@pytest.mark.parametrize("index,nearest", [("64", 63), ("999", 63), ("-1", 0)])
def test_feature_index_out_of_range_404(client, index, nearest):
    body = get_json(client, f"/{MODEL}/{SAE}/{index}.json", status=404)
    assert body["valid_range"] == [0, D_SAE - 1]
    assert body["suggestions"] == [{"id": nearest, "url": f"/{MODEL}/{SAE}/{nearest}.json"}]
    page = get_page(client, f"/{MODEL}/{SAE}/{index}", status=404)
    assert "0 to 63" in page.text()


def test_non_numeric_feature_index_404(client):
    body = get_json(client, f"/{MODEL}/{SAE}/abc.json", status=404)
    assert body["valid_range"] == [0, D_SAE - 1]
    get_page(client, f"/{MODEL}/{SAE}/١٢", status=404)  # non-ASCII digits are not an index


@pytest.mark.parametrize("query,param", [
    ("page=0", "page"), ("page=x", "page"), ("size=501", "size"), ("sort=bogus", "sort"), ("desc=maybe", "desc"),
    ("show=some", "show"), ("min_density=2", "min_density"), ("max_density=nan", "max_density"),
])
def test_sae_malformed_query_422(client, query, param):
    body = get_json(client, f"/{MODEL}/{SAE}.json?{query}", status=422)
    assert body["error"] == "invalid_parameter" and f"'{param}'" in body["message"]
    page = get_page(client, f"/{MODEL}/{SAE}?{query}&q=x", status=422)
    assert page.find("h1").text() == "Invalid query parameter" and f"'{param}'" in page.find("ul", cls="problems").text()
    retry = [a.attrs["href"] for a in page.find_all("a") if "without the invalid parameter" in a.text()]
    assert retry == [f"/{MODEL}/{SAE}?q=x"]


def test_inconsistent_density_range_422(client):
    body = get_json(client, f"/{MODEL}/{SAE}.json?min_density=0.5&max_density=0.1", status=422)
    assert "above max_density" in body["message"]


@pytest.mark.parametrize("url", [
    f"/{MODEL}/{SAE}/3?context=wide", f"/{MODEL}/{SAE}/3?embed=perhaps", f"/{MODEL}/{SAE}/3?text=" + "x" * 20001,
    f"/{MODEL}/{SAE}/-/jump?index=abc", f"/{MODEL}/{SAE}/-/jump",
])
def test_feature_malformed_query_422(client, url):
    assert client.get(url).status_code == 422
    assert get_page(client, url, status=422).find("h1").text() == "Invalid query parameter"


def test_jump_out_of_range_404(client):
    assert client.get(f"/{MODEL}/{SAE}/-/jump?index=64", follow_redirects=False).status_code == 404


def test_unknown_path_404_html_and_json(client):
    get_page(client, "/a/b/c/d", status=404)
    assert get_json(client, "/a/b/c/d.json", status=404)["error"] == "not_found"


# ------------------------------------------------------------------------------------------- app pages
def test_health_and_docs(client):
    health = get_json(client, "/-/health")
    assert health == {"status": "ok", "pid": os.getpid(), "workers": 1, "workers_ready": 1, "databases": 2, "models": 2, "saes": 4, "problems": []}
    assert client.get("/-/docs").status_code == 200
    paths = client.get("/-/openapi.json").json()["paths"]
    assert {"/.json", "/{model_id}/{sae_id}.json", "/{model_id}/{sae_id}/{index}.json", "/-/health"} <= set(paths)


def test_htmx_from_cdn_by_default_and_local_copy_when_set(tmp_path):
    from featurescope.app.settings import HTMX_CDN_INTEGRITY, HTMX_CDN_URL

    with make_app_client(shared_data_dir()) as cdn:
        script = [s for s in parse_html(cdn.get("/").text).find_all("script") if "htmx" in s.attrs["src"]][0]
        assert script.attrs["src"] == HTMX_CDN_URL and script.attrs["integrity"] == HTMX_CDN_INTEGRITY
        assert cdn.get("/-/static/htmx.min.js").status_code == 404
    local = tmp_path / "htmx.min.js"
    local.write_text("/* htmx stand-in */")
    with make_app_client(shared_data_dir(), local_htmx=local) as served:
        script = [s for s in parse_html(served.get("/").text).find_all("script") if "htmx" in s.attrs["src"]][0]
        assert script.attrs["src"] == "/-/static/htmx.min.js" and "integrity" not in script.attrs
        assert served.get("/-/static/htmx.min.js").text == "/* htmx stand-in */"
    assert served.get("/-/static/app.css").status_code == 200


def test_blank_filter_fields_mean_no_bound_and_htmx_pushes_the_canonical_url(client):
    form = "q=&token=&show=all&min_density=&max_density=&sort=density&desc=1"
    assert get_json(client, f"/{MODEL}/{SAE}.json?{form}")["total"] == D_SAE
    response = client.get(f"/{MODEL}/{SAE}?{form}", headers={"HX-Request": "true", "HX-Target": "features"})
    assert response.status_code == 200
    assert response.headers["HX-Push-Url"] == f"/{MODEL}/{SAE}?sort=density&desc=1"


# ------------------------------------------------------------------------------ several corpora per SAE
@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from factories import make_corpora_data_dir

    with make_app_client(make_corpora_data_dir(tmp_path_factory.mktemp("corpora")), live=False) as c:
        yield c


def _site_hrefs(page) -> list[str]:
    """Every link of a page into the model's pages (href and htmx), the run list's links left out."""
    runs = {id(a) for section in page.find_all("section", cls="runs") for a in section.find_all("a")}
    hrefs = [a.attrs[k] for a in page.find_all("a") if id(a) not in runs for k in ("href", "hx-get") if k in a.attrs]
    return [h for h in hrefs if h.startswith(f"/{MODEL}/")]


def test_both_corpora_of_an_sae_are_reachable_and_the_newest_is_the_default(corpora):
    from factories import NEW_CORPUS, NEW_RUN, OLD_CORPUS, OLD_RUN

    newest = get_json(corpora, f"/{MODEL}/{SAE}/5.json")
    older = get_json(corpora, f"/{MODEL}/{SAE}/5.json?run={OLD_RUN}")
    assert (newest["sae"]["corpus"], newest["sae"]["run_id"], newest["run"]) == (NEW_CORPUS, NEW_RUN, None)
    assert (older["sae"]["corpus"], older["sae"]["run_id"], older["run"]) == (OLD_CORPUS, OLD_RUN, OLD_RUN)
    assert newest["sae"]["n_tokens"] == 64 * 47 and older["sae"]["n_tokens"] == 96 * 47
    assert newest["top_examples"] != older["top_examples"]  # each page reads its own run's file
    assert [(r["run_id"], r["newest"], r["shown"]) for r in older["runs"]] == [(NEW_RUN, True, False), (OLD_RUN, False, True)]
    assert get_json(corpora, f"/{MODEL}/{SAE}/5.json?run={NEW_RUN}")["top_examples"] == newest["top_examples"]
    table = get_json(corpora, f"/{MODEL}/{SAE}.json?run=a1b&sort=density&desc=1")  # an unambiguous prefix
    assert table["run"] == OLD_RUN and table["sae"]["corpus"] == OLD_CORPUS
    assert table["features"] != get_json(corpora, f"/{MODEL}/{SAE}.json?sort=density&desc=1")["features"]
    home = get_json(corpora, "/.json")["models"][0]
    assert [s["id"] for s in home["saes"]] == ["2-res-64", "4-mlp-48", "6-att-32"]  # one row per SAE, its newest run
    assert [s["run_id"] for s in home["saes"]] == [NEW_RUN, NEW_RUN, OLD_RUN]


def test_a_feature_page_of_an_older_run_names_its_corpus_and_every_link_keeps_the_run(corpora):
    from factories import NEW_CORPUS, OLD_CORPUS, OLD_RUN

    page = get_page(corpora, f"/{MODEL}/{SAE}/5?run=a1b2&context=full")
    assert OLD_CORPUS in page.find("p", cls="corpus").text() and "4,512 tokens" in page.find("p", cls="corpus").text()
    hrefs = _site_hrefs(page)
    assert {f"/{MODEL}/{SAE}/4?run={OLD_RUN}", f"/{MODEL}/{SAE}/6?run={OLD_RUN}", f"/{MODEL}/{SAE}?run={OLD_RUN}",
            f"/{MODEL}/{SAE}/-/random?run={OLD_RUN}", f"/{MODEL}/{SAE}/5/-/lineage?run={OLD_RUN}"} <= set(hrefs)
    assert any(h.startswith("/tiny-gemma-2/4-mlp-48/") for h in hrefs)  # cross-layer links, in the same run
    missing = [h for h in hrefs if f"run={OLD_RUN}" not in h]
    assert missing == []
    assert page.find("a", cls="twin").attrs["href"] == f"/{MODEL}/{SAE}/5.json?run={OLD_RUN}"
    assert page.find("input", cls="share-url").attrs["value"] == f"http://testserver/{MODEL}/{SAE}/5?run={OLD_RUN}&context=full"
    assert page.find("form", cls="jump").find("input", name="run").attrs["value"] == OLD_RUN
    runs = page.find("section", cls="runs")
    assert [a.attrs["href"] for a in runs.find_all("a")] == [f"/{MODEL}/{SAE}/5"]  # the newest: no ?run= needed
    assert NEW_CORPUS in runs.text() and runs.find("li", cls="shown").find("strong").text() == OLD_CORPUS


def test_the_default_page_links_without_a_run_and_offers_the_older_corpus(corpora):
    from factories import NEW_CORPUS, OLD_RUN

    page = get_page(corpora, f"/{MODEL}/{SAE}/5")
    assert NEW_CORPUS in page.find("p", cls="corpus").text()
    assert [h for h in _site_hrefs(page) if "run=" in h] == []
    assert [a.attrs["href"] for a in page.find("section", cls="runs").find_all("a")] == [f"/{MODEL}/{SAE}/5?run={OLD_RUN}"]
    table = get_page(corpora, f"/{MODEL}/{SAE}?run={OLD_RUN}&sort=density&desc=1")
    assert [a.attrs["href"] for a in table.find("section", cls="runs").find_all("a")] == [f"/{MODEL}/{SAE}"]
    rows = table.find("table", cls="feature-table").find("tbody").find_all("a")
    assert rows and all(a.attrs["href"].endswith(f"?run={OLD_RUN}") for a in rows)
    assert all(f"run={OLD_RUN}" in h for h in _site_hrefs(table))


def test_cross_layer_links_stay_in_the_run_that_computed_them(corpora):
    from factories import OLD_RUN

    # 6-att-32 was only precomputed in the older run, so its newest run is that one; its neighbour 4-mlp-48's
    # newest is another: a link must name the run and show the label from the run's own file.
    view = get_json(corpora, f"/{MODEL}/6-att-32/3.json")
    links = view["links"]["upstream"]
    assert view["run"] is None and links and {link["run"] for link in links} == {OLD_RUN}
    target = get_json(corpora, f"/{MODEL}/4-mlp-48/{links[0]['feature']}.json?run={OLD_RUN}")
    assert target["label"] == links[0]["label"] and target["sae"]["run_id"] == OLD_RUN
    page = get_page(corpora, f"/{MODEL}/6-att-32/3")
    assert f"/{MODEL}/4-mlp-48/{links[0]['feature']}?run={OLD_RUN}" in _site_hrefs(page)
    lineage = get_json(corpora, f"/{MODEL}/{SAE}/5/-/lineage.json?run={OLD_RUN}")
    assert lineage["run"] == OLD_RUN and len(lineage["nodes"]) > 1
    assert {n["run"] for n in lineage["nodes"]} == {OLD_RUN}
    assert {s for c in lineage["columns"] for s in c["sae_ids"]} == {"2-res-64", "4-mlp-48", "6-att-32"}
    newest = get_json(corpora, f"/{MODEL}/{SAE}/5/-/lineage.json")
    assert {s for c in newest["columns"] for s in c["sae_ids"]} <= {"2-res-64", "4-mlp-48"}  # the newer run has no 6-att-32


def test_random_and_jump_keep_the_run(corpora):
    from factories import OLD_RUN

    random_ = corpora.get(f"/{MODEL}/{SAE}/-/random?run=a1b", follow_redirects=False)
    assert random_.status_code == 302 and random_.headers["location"].endswith(f"?run={OLD_RUN}")
    jump = corpora.get(f"/{MODEL}/{SAE}/-/jump?index=12&run={OLD_RUN}", follow_redirects=False)
    assert jump.headers["location"] == f"/{MODEL}/{SAE}/12?run={OLD_RUN}"
    assert corpora.get(f"/{MODEL}/{SAE}/-/jump?index=12", follow_redirects=False).headers["location"] == f"/{MODEL}/{SAE}/12"


@pytest.mark.parametrize("run", ["b00", "a1", "<script>"])
def test_an_unknown_or_ambiguous_run_is_a_404_offering_the_saes_runs(corpora, run):
    from urllib.parse import quote

    from factories import NEW_RUN, OLD_RUN

    body = get_json(corpora, f"/{MODEL}/{SAE}/5.json?run={quote(run)}&context=full", status=404)
    assert body["kind"] == "run" and body["missing"] == run
    assert body["suggestions"] == [{"id": r, "url": f"/{MODEL}/{SAE}/5.json?context=full&run={r}"} for r in (NEW_RUN, OLD_RUN)]
    page = get_page(corpora, f"/{MODEL}/{SAE}?run={quote(run)}", status=404)
    assert page.find("h1").text() == "Unknown run"
    assert [a.attrs["href"] for a in page.find("ul", cls="suggestions").find_all("a")] == [
        f"/{MODEL}/{SAE}?run={NEW_RUN}", f"/{MODEL}/{SAE}?run={OLD_RUN}"]
    get_json(corpora, f"/{MODEL}/6-att-32/3.json?run={NEW_RUN}", status=404)  # a run without that SAE
