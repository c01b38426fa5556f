"""Contrastive search in a real browser: a real uvicorn server over a real precompute run of the tiny Gemma 2,
with its live encoder, driven by Debian's Chromium. A user pastes two sets of prompts, runs the contrast (the
page polls its progress, then shows the ranking), saves a detector, opens its link in a fresh page and
applies it to a prompt."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from test_browser import ARTIFACTS, browser, live_server, page  # noqa: F401 - shared browser fixtures
from test_contrast import CODE, PROSE


@pytest.fixture(scope="module")
def server(live_data_dir, tiny_gemma2):
    with live_server(live_data_dir, tiny_gemma2, max_batch=2) as url:
        yield url


def test_paste_run_save_a_detector_open_its_link_in_a_fresh_page_and_apply_it(page, browser, server, tiny_gemma2):  # noqa: F811
    model = tiny_gemma2.name
    page.goto(f"{server}/{model}")
    page.get_by_role("link", name="Contrast two sets", exact=True).click()
    page.wait_for_url("**/-/contrast")
    page.fill("input[name=label_a]", "code")
    page.fill("input[name=label_b]", "prose")
    page.fill("#contrast-a", "\n".join(CODE))
    page.fill("#contrast-b", "\n".join(PROSE))
    page.get_by_role("button", name="Contrast").click()
    page.wait_for_url(re.compile(r".*/-/contrast/[^/]+$"))
    page.locator("#detector-form").wait_for(timeout=60_000)  # polled until the run finished
    rows = page.locator("table.contrast-rows").first.locator("tbody tr")
    assert rows.count() > 0
    assert page.locator("svg.strip").first.locator("rect").count() == len(CODE) + len(PROSE)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "contrast-page.png"), full_page=True)

    page.fill("#detector-form input[name=name]", "browser-code")
    page.fill("#detector-form input[name=k]", "3")
    page.get_by_role("button", name="Save detector").click()
    page.wait_for_url("**/-/detectors/browser-code")
    expect(page.locator("#detector-name")).to_have_text("browser-code")
    link = page.url

    fresh = browser.new_page()
    fresh_problems: list[str] = []
    fresh.on("console", lambda m: m.type == "error" and fresh_problems.append(m.text))
    fresh.on("pageerror", lambda e: fresh_problems.append(str(e)))
    fresh.goto(link)
    expect(fresh.locator("#detector-name")).to_have_text("browser-code")
    assert fresh.locator("table.detector-features tbody tr").count() == 3
    fresh.fill("#detector-text", CODE[0])
    fresh.get_by_role("button", name="Apply").click()
    fresh.locator("#detector-score").wait_for()
    expect(fresh.locator("#detector-predicted")).to_have_text(re.compile(r"^(code|prose)$"))
    assert fresh.locator(".detector-tokens .t").count() > 1
    fresh.wait_for_url(lambda url: "text=" in url)  # the applied prompt is in the shareable URL
    fresh.screenshot(path=str(ARTIFACTS / "detector-page.png"), full_page=True)
    fresh.close()
    assert fresh_problems == [] and page.problems == []


def test_a_large_run_shows_its_progress_and_can_be_cancelled(page, server, tiny_gemma2):  # noqa: F811
    page.goto(f"{server}/{tiny_gemma2.name}/-/contrast")
    page.fill("#contrast-a", "\n".join(CODE * 12))
    page.fill("#contrast-b", "\n".join(PROSE * 12))
    page.get_by_role("button", name="Contrast").click()
    page.locator("#contrast-progress").wait_for()
    page.locator("#contrast-cancel").click()
    expect(page.locator("#contrast-run")).to_contain_text("Cancelled after")
    assert page.problems == []
