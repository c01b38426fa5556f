"""Every answer carries the security headers: nosniff, a referrer policy, and a Content-Security-Policy
that allows scripts only from this server and htmx's configured source; framing is refused except for
the embed view. In Chromium: an embed frames on another site, a normal page does not."""

from __future__ import annotations

import pytest

from factories import make_app_client, shared_data_dir
from featurescope.app.settings import HTMX_CDN_URL
from test_browser import browser, free_port, server  # noqa: F401  (fixtures)

MODEL, SAE = "tiny-gemma-2", "2-res-64"


def _csp(response) -> dict[str, str]:
    return {part.split()[0]: part.partition(" ")[2] for part in response.headers["Content-Security-Policy"].split("; ")}


@pytest.fixture(scope="module")
def client():
    with make_app_client(shared_data_dir(), live=False) as client:
        yield client


@pytest.mark.parametrize("path", ["/", f"/{MODEL}", f"/{MODEL}/{SAE}", f"/{MODEL}/{SAE}/3", f"/{MODEL}/{SAE}/3.json",
                                  "/-/health", "/-/static/app.css", "/no-such-model", "/no-such-model.json",
                                  f"/{MODEL}/{SAE}?size=0", f"/{MODEL}/-/encode?text=hi"])
def test_every_answer_has_nosniff_a_referrer_policy_and_a_csp_that_refuses_framing(client, path):
    response = client.get(path)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
    csp = _csp(response)
    assert csp["frame-ancestors"] == "'none'" and response.headers["X-Frame-Options"] == "DENY"
    assert csp["object-src"] == "'none'" and "'unsafe-inline'" not in csp["script-src"]


def test_scripts_are_allowed_from_this_server_and_htmx_cdn_only(client):
    assert _csp(client.get("/"))["script-src"] == "'self' https://unpkg.com"
    assert HTMX_CDN_URL.startswith("https://unpkg.com/")


def test_with_the_local_htmx_copy_scripts_come_from_this_server_only(tmp_path):
    from featurescope.app.settings import DEFAULT_LOCAL_HTMX

    if not DEFAULT_LOCAL_HTMX.is_file():
        DEFAULT_LOCAL_HTMX = tmp_path / "htmx.min.js"
        DEFAULT_LOCAL_HTMX.write_text("/* htmx */")
    with make_app_client(shared_data_dir(), live=False, local_htmx=DEFAULT_LOCAL_HTMX) as client:
        assert _csp(client.get("/"))["script-src"] == "'self'"
    with make_app_client(shared_data_dir(), live=False, htmx_url="https://cdn.example.org:8443/htmx.js") as client:
        assert _csp(client.get("/"))["script-src"] == "'self' https://cdn.example.org:8443"


def test_only_the_embed_view_may_be_framed(client):
    embed = client.get(f"/{MODEL}/{SAE}/3?embed=1")
    assert embed.status_code == 200 and _csp(embed)["frame-ancestors"] == "*"
    assert "X-Frame-Options" not in embed.headers
    assert embed.headers["X-Content-Type-Options"] == "nosniff"
    assert _csp(client.get(f"/{MODEL}/{SAE}/3"))["frame-ancestors"] == "'none'"


def test_the_api_docs_page_keeps_working_under_its_own_policy(client):
    docs = client.get("/-/docs")
    assert docs.status_code == 200 and "cdn.jsdelivr.net" in _csp(docs)["script-src"]


def test_in_chromium_another_site_can_frame_the_embed_view_but_not_the_page(browser, server, tmp_path):
    import http.server
    import threading

    port = free_port()  # a second origin: the page of "another site" holding both iframes
    (tmp_path / "host.html").write_text(f'<iframe id="embed" src="{server}/{MODEL}/{SAE}/3?embed=1"></iframe>'
                                        f'<iframe id="page" src="{server}/{MODEL}/{SAE}/3"></iframe>')

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/host.html")
        page.wait_for_load_state("load")
        embed = page.frame_locator("#embed")
        assert embed.locator(".dashboard, main, body").first.inner_text(timeout=10_000).strip()
        assert embed.locator("svg").count() > 0  # the activation histogram drew
        page.wait_for_timeout(500)
        refused = page.frame_locator("#page").locator("body").inner_text(timeout=10_000)
        assert "Feature 3" not in refused  # Chromium shows its own error page instead: frame-ancestors 'none'
        assert "Feature 3" in embed.locator("body").inner_text()
    finally:
        page.close()
        httpd.shutdown()
