"""The explorer in a real browser: a real uvicorn server on 127.0.0.1 over a factory data dir, with the
local htmx copy, driven by Debian's Chromium through Playwright. Home -> SAE page -> feature page,
highlighted tokens, htmx sorting and search, the copy-link URL reopening the same view, hostile tokens
that never execute, and a screenshot of the feature page in test-artifacts/ for review.

Waits use locators and Python URL predicates, never page.wait_for_function("..."): Playwright polls a
string predicate with eval(), which the pages' Content-Security-Policy (script-src 'self') refuses.

Needs /usr/bin/chromium, the playwright package and node_modules/htmx.org (bash scripts/install_test_tools.sh).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import live_app, require_test_tool
from factories import shared_data_dir

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
MODEL, SAE = "tiny-gemma-2", "2-res-64"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                             "(bash scripts/install_test_tools.sh)")


def require_browser_tools() -> None:
    from featurescope.app.settings import DEFAULT_LOCAL_HTMX

    require_test_tool(CHROMIUM.exists(), f"{CHROMIUM} is not installed (bash scripts/install_test_tools.sh)")
    require_test_tool(DEFAULT_LOCAL_HTMX.is_file(), f"{DEFAULT_LOCAL_HTMX} is missing (bash scripts/install_test_tools.sh)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, port: int) -> Iterator[str]:
    """A real uvicorn server for `app` on 127.0.0.1:port in a thread; yields its base URL."""
    import uvicorn

    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # generous: a busy machine starts slowly, which is not a failure
    while not uvicorn_server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def live_server(data_dir: Path, lm, **settings) -> Iterator[str]:
    """A real uvicorn serving data_dir with a live encoder holding `lm` and the local htmx; yields its base URL."""
    from featurescope.app import Settings
    from featurescope.app.settings import DEFAULT_LOCAL_HTMX

    require_browser_tools()
    port = free_port()
    app_settings = Settings(data_dir=data_dir, port=port, local_htmx=DEFAULT_LOCAL_HTMX, device="cpu", **settings)
    with serving(live_app(app_settings, lm), port) as url:
        yield url


@pytest.fixture(scope="module")
def server():
    from featurescope.app import Settings, create_app
    from featurescope.app.settings import DEFAULT_LOCAL_HTMX

    require_browser_tools()
    port = free_port()
    # Factory databases have no model behind them: live encoding is off (tests/test_browser_live.py has it on).
    app = create_app(Settings(data_dir=shared_data_dir(), port=port, local_htmx=DEFAULT_LOCAL_HTMX, live=False))
    with serving(app, port) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(90_000)  # waits are for events; a slow machine is not a failure
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
    page = context.new_page()
    page.problems = []  # console errors, failed requests, dialogs: none are expected on any page
    page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: page.problems.append(f"request failed: {r.url}"))
    page.on("dialog", lambda d: (page.problems.append(f"dialog: {d.message}"), d.dismiss()))
    yield page
    context.close()


def test_home_to_sae_to_feature_with_highlighted_tokens(page, server):
    page.goto(server + "/")
    page.locator(f"#model-{MODEL}").get_by_role("link", name=SAE, exact=True).click()
    page.wait_for_url(f"{server}/{MODEL}/{SAE}")
    assert page.evaluate("typeof htmx") == "object", "the local htmx copy did not load"
    page.locator("table.feature-table").get_by_role("link", name="3", exact=True).click()
    page.wait_for_url(f"{server}/{MODEL}/{SAE}/3")
    assert page.locator("h1").inner_text() == "Feature 3"
    highlighted = page.locator("#examples li.example").first.locator(".t[title]")
    assert highlighted.count() > 0
    peak = page.locator("#examples li.example").first.locator(".t.peak")
    assert peak.evaluate("e => getComputedStyle(e).backgroundColor") not in ("rgba(0, 0, 0, 0)", "transparent")
    assert float(peak.get_attribute("title")) > 0
    assert page.locator("figure.activation svg rect").count() == 50
    assert page.locator("span.badge", has_text="auto").count() >= 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "feature-page.png"), full_page=True)
    assert page.problems == []


def densities(page) -> list[float]:
    cells = page.locator("table.feature-table tbody tr td:nth-child(3)").all_inner_texts()
    return [float(c.rstrip("%")) for c in cells]


def test_sorting_and_search_swap_the_table_and_keep_the_url(page, server):
    page.goto(f"{server}/{MODEL}/{SAE}")
    marker = page.evaluate("() => { window.__sameDocument = true; return true; }")
    page.locator("table.feature-table a.sort", has_text="density").click()
    page.wait_for_url(f"{server}/{MODEL}/{SAE}?sort=density&desc=1")
    page.locator("a.sort.active", has_text="density").wait_for()
    values = densities(page)
    assert len(values) == 50 and values == sorted(values, reverse=True)
    assert marker and page.evaluate("window.__sameDocument === true"), "sorting reloaded the page instead of swapping the table"

    page.fill("input[name=q]", "Paris")
    page.locator("#filters button[type=submit]").click()
    page.wait_for_url(lambda url: "q=Paris" in url)
    page.locator(".result-count", has_text="Paris").wait_for()
    labels = page.locator("table.feature-table tbody tr td:nth-child(2) .label").all_inner_texts()
    assert labels and all("paris" in label.lower() for label in labels)

    page.goto(f"{server}/{MODEL}/{SAE}")
    page.fill("input[name=token]", "Paris")
    page.locator("#filters button[type=submit]").click()
    page.wait_for_url(lambda url: "token=Paris" in url)
    page.locator(".result-count", has_text="peak on").wait_for()
    tokens = page.locator("table.feature-table tbody tr td.toks").all_inner_texts()
    assert tokens and all("Paris" in t for t in tokens)
    assert page.problems == []


def test_copy_link_reopens_the_same_view(page, browser, server):
    page.goto(f"{server}/{MODEL}/{SAE}/5?text=" + "The capital of France is")
    page.locator("#examples a.seg", has_text="Full context").click()
    page.wait_for_url(lambda url: "context=full" in url)
    page.wait_for_selector("#examples.full")
    page.get_by_role("button", name="Copy link").first.click()
    page.locator("button.copied").first.wait_for()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert parse_qs(urlsplit(copied).query) == {"text": ["The capital of France is"], "context": ["full"]}
    shown_before = page.locator("#examples").inner_text()

    other = browser.new_page()
    other.goto(copied)
    assert other.locator("#examples").inner_text() == shown_before
    assert other.locator("#examples.full").count() == 1
    assert other.locator("#test-text").input_value() == "The capital of France is"
    other.close()
    assert page.problems == []


def test_hostile_tokens_and_prompts_never_execute(page, server):
    page.add_init_script("window.__pwned = 0")
    prompt = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"
    page.goto(f"{server}/{MODEL}/{SAE}/0?context=full&text=" + prompt.replace("#", "%23"))
    assert page.evaluate("window.__pwned") == 0
    assert page.locator("#examples script, #examples img, .test-box img, .test-box script").count() == 0
    assert "<script>alert(1)</script>" in page.locator("#examples").inner_text()
    assert page.locator("pre.test-text").inner_text() == prompt
    page.goto(f"{server}/{MODEL}/{SAE}?size=500")
    assert "<script>alert(1)</script>" in page.locator("table.feature-table").inner_text()
    assert page.evaluate("window.__pwned") == 0
    assert page.problems == []


@pytest.fixture(scope="module")
def corpora_server(tmp_path_factory):
    from factories import make_corpora_data_dir

    from featurescope.app import Settings, create_app
    from featurescope.app.settings import DEFAULT_LOCAL_HTMX

    require_browser_tools()
    port = free_port()
    data_dir = make_corpora_data_dir(tmp_path_factory.mktemp("corpora"))
    with serving(create_app(Settings(data_dir=data_dir, port=port, local_htmx=DEFAULT_LOCAL_HTMX, live=False)), port) as url:
        yield url


def test_switching_to_another_corpus_keeps_the_run_through_htmx_swaps_and_navigation(page, corpora_server):
    from factories import NEW_CORPUS, OLD_CORPUS, OLD_RUN

    base = f"{corpora_server}/{MODEL}/{SAE}"
    page.goto(f"{base}/5")
    assert NEW_CORPUS in page.locator("p.corpus").inner_text()
    page.locator("section.runs").get_by_role("link", name=OLD_CORPUS).click()
    page.wait_for_url(f"{base}/5?run={OLD_RUN}")
    assert OLD_CORPUS in page.locator("p.corpus").inner_text()
    page.locator("#examples a.seg", has_text="Full context").click()  # an htmx swap pushing its URL
    page.wait_for_url(f"{base}/5?run={OLD_RUN}&context=full")
    page.locator("a[rel=next]").click()
    page.wait_for_url(f"{base}/6?run={OLD_RUN}")
    page.locator(".crumbs a", has_text=SAE).click()
    page.wait_for_url(f"{base}?run={OLD_RUN}")
    page.locator("table.feature-table a.sort", has_text="density").click()
    page.wait_for_url(f"{base}?run={OLD_RUN}&sort=density&desc=1")
    page.locator("a.sort.active", has_text="density").wait_for()
    page.locator("table.feature-table tbody a").first.click()
    page.wait_for_url(lambda url: url.startswith(base + "/") and url.endswith(f"?run={OLD_RUN}"))
    assert OLD_CORPUS in page.locator("p.corpus").inner_text()
    assert page.problems == []


@pytest.fixture(scope="module")
def explained_server(tmp_path_factory):
    """The factory data dir with an explanations side file: a hostile best explanation, a weaker second one."""
    from test_explanations_web import HOSTILE, explanation, score

    from factories import make_data_dir
    from featurescope.app import Settings, create_app
    from featurescope.app.settings import DEFAULT_LOCAL_HTMX
    from featurescope.explanations import ExplanationStore

    require_browser_tools()
    data_dir = make_data_dir(tmp_path_factory.mktemp("explained-browser"))
    ExplanationStore.for_run(data_dir / "db" / "tiny.duckdb").write_batch([
        explanation(SAE, 3, HOSTILE, scores=[score("detection", 0.75), score("fuzz", 0.5)]),
        explanation(SAE, 3, "a weaker guess about messages", explainer="other", scores=[score("detection", 0.5)]),
        explanation(SAE, 5, "Python error tracebacks", scores=[score("detection", 1.0)]),
    ])
    port = free_port()
    with serving(create_app(Settings(data_dir=data_dir, port=port, local_htmx=DEFAULT_LOCAL_HTMX, live=False)), port) as url:
        yield url


def test_explanation_search_leads_to_a_feature_headlined_by_its_best_explanation(page, explained_server):
    from test_explanations_web import HOSTILE

    page.add_init_script("window.__pwned = 0")
    page.goto(f"{explained_server}/{MODEL}")
    page.locator("form[role=search] input[name=q]").fill("error")
    page.locator("form[role=search] button[type=submit]").click()
    page.wait_for_url(f"{explained_server}/{MODEL}/-/explanations?q=error")
    hits = page.locator("table.search-hits tbody tr")
    assert hits.count() == 2
    assert sorted(hits.locator("td.explanation").all_inner_texts()) == sorted([HOSTILE, "Python error tracebacks"])
    assert page.locator("table.search-hits img, table.search-hits script").count() == 0
    assert page.evaluate("window.__pwned") == 0

    hits.filter(has_text="onerror").get_by_role("link", name="3", exact=True).click()
    page.wait_for_url(f"{explained_server}/{MODEL}/{SAE}/3")
    headline = page.locator("p.feature-explanation")
    assert headline.inner_text() == HOSTILE and headline.is_visible()
    assert "detection 0.75" in page.locator("p.explanation-meta").inner_text()
    label = page.locator("p.feature-label.secondary")
    assert label.is_visible() and label.inner_text().strip()
    size = lambda locator: float(locator.evaluate("e => parseFloat(getComputedStyle(e).fontSize)"))
    assert size(headline) > size(label), "the explanation should read as the headline, the token label below it"
    assert page.locator("section.explanations li").count() == 2  # both explanations, best first
    assert "a weaker guess" in page.locator("section.explanations li").nth(1).inner_text()
    assert page.evaluate("window.__pwned") == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "feature-page-explained.png"), full_page=True)

    page.locator(".crumbs a", has_text=SAE).click()
    page.wait_for_url(f"{explained_server}/{MODEL}/{SAE}")
    assert "Python error tracebacks" in page.locator("table.feature-table span.explanation").all_inner_texts()
    assert page.evaluate("window.__pwned") == 0
    assert page.problems == []
