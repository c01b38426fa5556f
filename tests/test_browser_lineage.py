"""Cross-layer links in a real browser (the real uvicorn + Debian Chromium setup of test_browser.py): from a
feature at the middle SAE, follow a downstream link, come back upstream, open the lineage graph, and check
that every node of the graph links to an existing feature page. A screenshot lands in test-artifacts/."""

from __future__ import annotations

from test_browser import ARTIFACTS, MODEL, browser, page, server  # noqa: F401  (fixtures)

MIDDLE = "4-mlp-48"


def settle(page) -> None:
    """Go on only once a page has loaded everything: leaving it earlier aborts its pending favicon request,
    which the page fixture counts as a failed request."""
    page.wait_for_load_state("networkidle")


def test_follow_links_down_and_back_then_the_lineage_graph(page, server):  # noqa: F811
    page.goto(f"{server}/{MODEL}/{MIDDLE}/3")
    settle(page)
    downstream = page.locator("#links ol.downstream a").first
    target = downstream.get_attribute("href")
    downstream.click()
    page.wait_for_url(server + target)
    settle(page)
    assert page.locator("h1").inner_text() == f"Feature {target.rsplit('/', 1)[1]}"
    upstream = page.locator("#links ol.upstream a")
    assert upstream.count() > 0
    upstream.first.click()
    page.wait_for_url(f"{server}/{MODEL}/{MIDDLE}/*")
    settle(page)

    page.goto(f"{server}/{MODEL}/{MIDDLE}/3")
    settle(page)
    page.get_by_role("link", name="Lineage graph").click()
    page.wait_for_url(f"{server}/{MODEL}/{MIDDLE}/3/-/lineage")
    settle(page)
    nodes = page.locator("svg.lineage a.node")
    assert nodes.count() == 7  # the start, and 3 features of each neighbouring SAE
    assert page.locator("svg.lineage a.node.start").count() == 1
    assert page.locator("svg.lineage path.edge").count() >= 6
    box = page.locator("svg.lineage").bounding_box()
    assert box["width"] > 400 and box["height"] > 100, "the graph did not render"
    hrefs = [nodes.nth(i).get_attribute("href") for i in range(nodes.count())]
    for href in hrefs:
        response = page.request.get(server + href)
        assert response.status == 200, href
        assert "<h1>Feature " in response.text()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "lineage.png"), full_page=True)
    nodes.last.click()
    page.wait_for_url(server + hrefs[-1])
    settle(page)
    assert page.locator("h1").inner_text().startswith("Feature ")

    page.goto(f"{server}/{MODEL}/{MIDDLE}/3/-/lineage")
    settle(page)
    page.fill("input[name=breadth]", "1")
    page.locator(".lineage-form button[type=submit]").click()
    page.wait_for_url("**/-/lineage?depth=&breadth=1&by=coact")
    settle(page)
    assert page.locator("svg.lineage a.node").count() == 3
    assert page.problems == []
