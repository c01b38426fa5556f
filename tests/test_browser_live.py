"""Live encoding in a real browser: a real uvicorn server over a real precompute run of the tiny Gemma 2,
with its live encoder, driven by Debian's Chromium. A user types a prompt on the encode page, clicks a
token, sees its features in every layer, opens one (its test box encodes the prompt), steers it and
shares the link, which reproduces the same continuation."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from featurescope.positions import WARMUP_POSITIONS
from test_browser import ARTIFACTS, browser, live_server, page  # noqa: F401 - shared browser fixtures

PROMPT = "The capital of France is Paris."


@pytest.fixture(scope="module")
def server(live_data_dir, tiny_gemma2):
    with live_server(live_data_dir, tiny_gemma2, max_new_tokens=16) as url:
        yield url


def test_prompt_to_token_to_feature_to_steering_and_a_shared_link(page, browser, server, tiny_gemma2):  # noqa: F811
    model = tiny_gemma2.name
    page.goto(f"{server}/{model}/-/encode")
    page.fill("#encode-text", PROMPT)
    page.locator("#encode-form button[type=submit]").click()
    page.wait_for_url(lambda url: "text=" in url)
    page.wait_for_selector("#encode-result .prompt-tokens a.t")
    assert page.locator("table.layer-grid tbody tr").count() == 3  # one row per SAE, ordered by layer

    france = page.locator(".prompt-tokens a.t", has_text="France")
    france.first.click()
    page.wait_for_url(lambda url: "token" in parse_qs(urlsplit(url).query))
    position = int(parse_qs(urlsplit(page.url).query)["token"][0])
    assert "France" in page.locator("#encode-result h2", has_text=f"Token {position}").inner_text()
    columns = page.locator(".layer-columns").first.locator(".layer-col")
    assert columns.count() == 3
    assert page.locator(".layer-columns").first.locator("li .f-id a").count() > 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "encode-page.png"), full_page=True)

    first = page.locator(".layer-columns").first.locator(".layer-col").last.locator("li .f-id a").first
    feature_url = first.get_attribute("href")
    first.click()
    page.wait_for_url("**" + feature_url.split("?")[0] + "?text=*")
    assert page.locator("#test-text").input_value() == PROMPT
    page.wait_for_selector("#test-result .ctx .t")  # the test box encoded the prompt for this feature
    assert page.locator("#test-result .ctx").inner_text().replace("·", " ").strip().endswith("Paris.")

    page.get_by_role("link", name="Steer", exact=True).click()
    page.wait_for_url("**/-/steer?*")
    assert page.locator("input[name=feature]").first.input_value() == feature_url.split("/")[2] + ":" + feature_url.split("/")[3].split("?")[0]
    page.fill("input[name=n_tokens]", "8")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector(".continuation.steered .t.gen")
    steered = page.locator(".continuation.steered .ctx").inner_text()
    assert page.locator(".continuation.default .t.gen").count() >= 1

    page.get_by_role("button", name="Copy link").first.click()
    page.locator("button.copied").first.wait_for()
    copied = page.evaluate("navigator.clipboard.readText()")
    other = browser.new_page()
    other.goto(copied)
    assert other.locator(".continuation.steered .ctx").inner_text() == steered  # same seed: same text
    other.close()
    assert page.problems == []


def test_search_via_inference_swaps_its_table_and_keeps_the_url(page, server, tiny_gemma2):  # noqa: F811
    model = tiny_gemma2.name
    page.goto(f"{server}/{model}/-/encode?text=def+add(a,+b):+return+a+%2B+b")
    page.evaluate("() => { window.__sameDocument = true; }")
    page.select_option("#search select[name=sort]", "density")
    page.fill("#search input[name=max_density]", "1")
    page.locator("#search button[type=submit]").click()
    page.wait_for_url(lambda url: "sort=density" in url)
    page.wait_for_selector("#search table.search-results")
    densities = [float(c.rstrip("%")) for c in page.locator("table.search-results tbody td:nth-child(6)").all_inner_texts()]
    assert densities and densities == sorted(densities)
    assert page.evaluate("window.__sameDocument === true"), "the search reloaded the page instead of swapping its table"
    assert page.problems == []


def test_choosing_saes_in_the_layer_grid_updates_their_total_and_encodes_only_them(page, server, tiny_gemma2):  # noqa: F811
    from featurescope.memory import format_bytes

    one = 4 * (2 * 64 * 48 + 2 * 48 + 64)  # an SAE of the run: float32 weights, 64 x 48
    page.goto(f"{server}/{tiny_gemma2.name}/-/encode")
    total = page.locator(".sae-picks .sae-total")
    assert total.inner_text() == format_bytes(3 * one)  # the run's three SAEs fit the default budget: all chosen
    page.locator(".sae-grid input[value='2-mlp-b']").uncheck()
    page.locator(".sae-grid input[value='3-res-c']").uncheck()
    assert total.inner_text() == format_bytes(one)  # app.js recounts as boxes change
    page.fill("#encode-text", PROMPT)
    page.locator("#encode-form button[type=submit]").click()
    page.wait_for_url(lambda url: parse_qs(urlsplit(url).query).get("saes") == ["1-res-a"])
    page.wait_for_selector("#encode-result table.layer-grid")
    assert page.locator("table.layer-grid tbody tr").count() == 1
    assert page.problems == []


def test_warm_up_tokens_of_a_context_cut_mid_document_are_greyed_like_bos(page, server, live_data_dir, tiny_gemma2):  # noqa: F811
    import duckdb

    (path,) = sorted((live_data_dir / "db").glob("*.duckdb"))
    con = duckdb.connect(str(path), read_only=True)
    feature, token_ids = con.execute(
        "SELECT e.feature, c.token_ids FROM examples e JOIN contexts c USING (run_id, context_id) WHERE e.sae_id = '3-res-c' "
        "AND e.kind = 'top' AND e.rank = 0 AND NOT c.starts_document ORDER BY e.feature LIMIT 1").fetchone()
    con.close()
    model = tiny_gemma2.name
    grey = "color: rgb(156, 163, 175)"  # static/app.css: BOS and the warm-up
    colour = "el => 'color: ' + getComputedStyle(el).color"

    page.goto(f"{server}/{model}/3-res-c/{feature}?context=full")
    first = page.locator("ol li.example").first.locator(".ctx > .t")
    assert first.nth(0).evaluate(colour) == grey  # BOS
    for pos in range(1, WARMUP_POSITIONS + 1):
        assert "warmup" in first.nth(pos).get_attribute("class") and first.nth(pos).evaluate(colour) == grey
        assert "mid-document" in first.nth(pos).get_attribute("title")
    assert "warmup" not in first.nth(WARMUP_POSITIONS + 1).get_attribute("class")

    page.goto(f"{server}/{model}/-/encode?ids={','.join(map(str, token_ids))}&mid_document=1&saes=3-res-c&feature=3-res-c:{feature}")
    tokens = page.locator("#encode-result .prompt-tokens a.t")
    warm = [("warmup" in (tokens.nth(i).get_attribute("class") or "")) for i in range(WARMUP_POSITIONS + 2)]
    assert warm == [False] + [True] * WARMUP_POSITIONS + [False]
    assert tokens.nth(WARMUP_POSITIONS).evaluate(colour) == grey
    assert not page.problems
