"""Hostile token strings (from the vocabulary) and hostile user input (query parameters, URL paths) render
as text on every page: the parsed documents hold no script or event handler the app did not write, and
the hostile strings come back intact as text and attribute values."""

from __future__ import annotations

import pytest

from featurescope.app.settings import HTMX_CDN_URL
from factories import make_app_client, parse_html, shared_data_dir

MODEL, SAE = "tiny-gemma-2", "2-res-64"
PROMPT = "<script>window.__pwned = 1</script>\"'><img src=x onerror=alert(1)>{{ 7*7 }}&amp;"
ALLOWED_SCRIPTS = {"/-/static/app.js"}


@pytest.fixture(scope="module")
def client():
    with make_app_client(shared_data_dir()) as c:
        yield c


def assert_only_app_markup(document) -> None:
    for element in document.iter():
        handlers = [name for name in element.attrs if name.lower().startswith("on")]
        assert not handlers, f"<{element.tag}> carries event handlers {handlers}"
        assert element.tag not in {"img", "iframe", "object", "embed", "textarea"} or element.attrs.get("id") == "test-text", \
            f"unexpected <{element.tag}> {element.attrs}"
        for name in ("href", "src", "action"):
            assert not (element.attrs.get(name) or "").lower().startswith("javascript:")
    scripts = document.find_all("script")
    assert all(s.text().strip() == "" for s in scripts), "inline script found"
    assert {s.attrs.get("src") for s in scripts} <= ALLOWED_SCRIPTS | {HTMX_CDN_URL}


@pytest.mark.parametrize("url", [
    f"/{MODEL}/{SAE}/0", f"/{MODEL}/{SAE}/0?context=full", f"/{MODEL}/{SAE}/0?embed=1", f"/{MODEL}/{SAE}?size=500",
])
def test_hostile_tokens_render_as_text(client, url):
    response = client.get(url)
    assert response.status_code == 200
    document = parse_html(response.text)
    assert_only_app_markup(document)
    shown = document.text()
    for token in ("<script>alert(1)</script>", "&amp;"):  # feature 0 promotes both: in its label and logit table
        assert token in shown, f"{token!r} not shown as text on {url}"


def test_hostile_label_in_meta_tags_is_an_attribute_value(client):
    data = client.get(f"/{MODEL}/{SAE}/0.json").json()
    assert "<script>alert(1)</script>" in data["label"]  # feature 0 fires on and promotes hostile tokens
    document = parse_html(client.get(f"/{MODEL}/{SAE}/0").text)
    description = document.find("meta", property="og:description").attrs["content"]
    assert description.startswith(data["label"])
    assert document.find("p", cls="feature-label").find("span", cls="label").text() == data["label"]
    assert_only_app_markup(document)


def test_hostile_prompt_stays_text_in_test_box_share_link_and_embed_code(client):
    response = client.get(f"/{MODEL}/{SAE}/3", params={"text": PROMPT})
    document = parse_html(response.text)
    assert_only_app_markup(document)
    assert document.find("textarea", id="test-text").text() == PROMPT
    assert document.find("pre", cls="test-text").text() == PROMPT
    share = document.find("input", cls="share-url").attrs["value"]
    assert share.startswith(f"http://testserver/{MODEL}/{SAE}/3?text=%3Cscript%3E")
    embed_code = document.find("input", cls="embed-code").attrs["value"]
    assert embed_code.startswith('<iframe src="http://testserver/') and "%3Cscript%3E" in embed_code
    assert "49" not in document.find("pre", cls="test-text").text()  # no template evaluation of {{ 7*7 }}


@pytest.mark.parametrize("params", [{"q": PROMPT}, {"token": PROMPT}])
def test_hostile_search_input_is_echoed_as_text(client, params):
    document = parse_html(client.get(f"/{MODEL}/{SAE}", params=params).text)
    assert_only_app_markup(document)
    field = "q" if "q" in params else "token"
    assert document.find("input", name=field).attrs["value"] == PROMPT
    assert PROMPT in document.find("p", cls="result-count").text()


@pytest.mark.parametrize("path", ["/<script>alert(1)<%2Fscript>", f"/{MODEL}/<img src=x onerror=alert(1)>",
                                  f"/{MODEL}/{SAE}/<svg onload=alert(1)>"])
def test_hostile_ids_in_404_pages_are_text(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert_only_app_markup(parse_html(response.text))


def test_hostile_422_input_is_text(client):
    response = client.get(f"/{MODEL}/{SAE}", params={"page": "<script>alert(1)</script>"})
    assert response.status_code == 422
    document = parse_html(response.text)
    assert_only_app_markup(document)
    assert "<script>alert(1)</script>" in document.find("ul", cls="problems").text()


def test_hostile_context_tokens_round_trip_through_json_and_html(client):
    texts, shown = set(), ""
    for index in range(0, 64, 3):
        texts.update(t for e in client.get(f"/{MODEL}/{SAE}/{index}.json").json()["top_examples"] for t in e["tokens"])
        shown += parse_html(client.get(f"/{MODEL}/{SAE}/{index}?context=full").text).find("section", id="examples").text()
    for token in ("<script>alert(1)</script>", "&amp;", "</textarea><b>", "<img src=x onerror=alert(2)>", "\n"):
        assert token in texts, f"{token!r} missing from the JSON contexts"
    assert "<img·src=x·onerror=alert(2)>" in shown and "</textarea><b>" in shown  # spaces drawn as ·


@pytest.mark.parametrize("markup", ['<p onclick="x">a</p>', "<script>alert(1)</script>", '<img src="x">',
                                    '<a href="javascript:alert(1)">a</a>', '<script src="https://evil.example/x.js"></script>'])
def test_the_markup_check_catches_injections(markup):
    with pytest.raises(AssertionError):
        assert_only_app_markup(parse_html(markup))
