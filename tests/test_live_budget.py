"""Live encoding under an SAE memory budget (app/sae_cache.py; `featurescope serve --sae-memory-budget`): SAEs
load on first use, the least recently used are evicted, one held by a running request never is, a request
over the budget gets 422 naming it, and live values equal stored ones after an SAE was evicted and reloaded.
The cache is tested on the real SAEs of the tiny Gemma 2 run (conftest.py: live_data_dir), with a loader
that records its calls; the server on that run."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from factories import parse_html
from featurescope.app import Settings, create_app
from featurescope.app.catalog import CatalogSource, SAEInfo
from featurescope.app.databases import DataDir
from featurescope.app.live import LiveService
from featurescope.app.sae_cache import OverBudget, SAECache, default_saes, sae_bytes
from featurescope.memory import format_bytes
from test_live import _dense, _stored_examples

SAE_BYTES = 4 * (2 * 64 * 48 + 2 * 48 + 64)  # every SAE of the run: d_in 64, d_sae 48, float32


@pytest.fixture(scope="module")
def model(live_data_dir):
    (found,) = CatalogSource(DataDir(live_data_dir / "db")).current().models.values()
    return found


@pytest.fixture(scope="module")
def saes(model) -> dict[str, SAEInfo]:
    return dict(model.saes)


class Loader:
    """load(info) for the cache: a distinct object per load, and the ids in the order they loaded."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, info: SAEInfo) -> tuple[str, int]:
        with self._lock:
            self.loaded.append(info.id)
            return info.id, len(self.loaded)


def _ids(cache: SAECache) -> list[str]:
    return [sae_id for _, sae_id, _ in cache.resident()]


# -------------------------------------------------------------------------------------------- the cache
def test_an_sae_costs_its_float32_weights(saes):
    assert {sae_bytes(s) for s in saes.values()} == {SAE_BYTES}


def test_saes_load_on_first_use_and_the_least_recently_used_is_evicted(model, saes):
    cache, load = SAECache(2 * SAE_BYTES), Loader()
    a, b, c = saes["1-res-a"], saes["2-mlp-b"], saes["3-res-c"]
    assert _ids(cache) == []
    for sae in (a, b, a):  # a used again: b is now the least recently used
        cache.lease(model.id, [sae], load).release()
    assert load.loaded == ["1-res-a", "2-mlp-b"] and _ids(cache) == ["2-mlp-b", "1-res-a"]
    with cache.lease(model.id, [c], load) as held:
        assert set(held) == {"3-res-c"}
    assert _ids(cache) == ["1-res-a", "3-res-c"] and cache.used_bytes == 2 * SAE_BYTES
    cache.lease(model.id, [b], load).release()
    assert load.loaded == ["1-res-a", "2-mlp-b", "3-res-c", "2-mlp-b"]  # evicted, then loaded again


def test_an_sae_held_by_a_running_request_is_never_evicted(model, saes):
    cache, load = SAECache(2 * SAE_BYTES), Loader()
    a, b, c = saes["1-res-a"], saes["2-mlp-b"], saes["3-res-c"]
    running = cache.lease(model.id, [a], load)  # older than b, but in use
    cache.lease(model.id, [b], load).release()
    cache.lease(model.id, [c], load).release()
    assert _ids(cache) == ["1-res-a", "3-res-c"]  # b went, though a was used longer ago
    blocker = cache.lease(model.id, [c], load)
    done = threading.Event()
    waiting = threading.Thread(target=lambda: (cache.lease(model.id, [b], load).release(), done.set()))
    waiting.start()
    assert not done.wait(0.3)  # both SAEs in the cache are held: b waits for room rather than evict one
    blocker.release()
    assert done.wait(10)
    waiting.join()
    assert _ids(cache) == ["1-res-a", "2-mlp-b"] and running.saes["1-res-a"] == ("1-res-a", 1)
    running.release()


def test_a_lease_over_the_budget_fails_at_once_naming_the_budget_and_loads_nothing(model, saes):
    cache, load = SAECache(2 * SAE_BYTES), Loader()
    with pytest.raises(OverBudget) as caught:
        cache.lease(model.id, list(saes.values()), load)
    message = caught.value.message
    assert f"SAE memory budget of {format_bytes(2 * SAE_BYTES)}" in message and "--sae-memory-budget" in message
    assert format_bytes(3 * SAE_BYTES) in message and all(sae_id in message for sae_id in saes)
    assert load.loaded == [] and _ids(cache) == []


def test_a_failed_load_holds_nothing_and_the_next_request_tries_again(model, saes):
    cache, calls = SAECache(SAE_BYTES), []

    def flaky(info: SAEInfo) -> str:
        calls.append(info.id)
        if len(calls) == 1:
            raise OSError("disk gone")
        return info.id

    with pytest.raises(OSError, match="disk gone"):
        cache.lease(model.id, [saes["1-res-a"]], flaky)
    assert _ids(cache) == [] and cache.used_bytes == 0
    with cache.lease(model.id, [saes["1-res-a"]], flaky) as held:
        assert held == {"1-res-a": "1-res-a"} and calls == ["1-res-a", "1-res-a"]


def test_concurrent_requests_stay_within_the_budget_and_keep_the_saes_they_hold(model, saes):
    cache, load = SAECache(2 * SAE_BYTES), Loader()
    infos = list(saes.values())
    problems: list[str] = []

    def requests(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            wanted = rng.sample(infos, rng.choice((1, 2)))
            with cache.lease(model.id, wanted, load) as held:
                if cache.used_bytes > cache.budget_bytes:
                    problems.append(f"{cache.used_bytes} bytes loaded")
                for _ in range(3):
                    time.sleep(0.001)  # let the other requests run while this one holds its SAEs
                    if not {s.id for s in wanted} <= set(_ids(cache)):
                        problems.append(f"{[s.id for s in wanted]} evicted while held")
                    if {sae_id for sae_id, _ in held.values()} != {s.id for s in wanted}:
                        problems.append(f"{held} for {[s.id for s in wanted]}")

    threads = [threading.Thread(target=requests, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a request never got its SAEs"
    assert problems == []
    assert len(load.loaded) > len(infos)  # SAEs were evicted and loaded again along the way


# ------------------------------------------------------------------------------------- default choice
def _release(template: SAEInfo, n_layers: int = 26, widths: tuple[int, ...] = (16384,)) -> list[SAEInfo]:
    """A Gemma-Scope-shaped release: every layer x att, mlp, res, at each width."""
    return [replace(template, id=f"{layer}-{kind}-{width // 1024}k", layer=layer, site_kind=kind, site=f"{layer}-{kind}",
                    d_in=2304, d_sae=width)
            for layer in range(n_layers) for kind in ("att", "mlp", "res") for width in widths]


def test_default_choice_of_a_release_is_the_narrowest_residual_sae_of_every_4th_layer_as_many_as_fit(saes):
    release = _release(saes["3-res-c"], widths=(16384, 65536))
    everyone = [s.id for s in default_saes(release, None)]
    assert everyone == [f"{layer}-res-16k" for layer in range(0, 26, 4)]
    one = sae_bytes(release[0])
    assert [s.id for s in default_saes(release, 3 * one + 1)] == ["0-res-16k", "4-res-16k", "8-res-16k"]


def test_default_choice_of_a_small_run_is_all_its_saes_when_they_fit(saes):
    infos = list(saes.values())
    assert [s.id for s in default_saes(infos, 3 * SAE_BYTES)] == ["1-res-a", "2-mlp-b", "3-res-c"]
    assert [s.id for s in default_saes(infos, 2 * SAE_BYTES)] == ["1-res-a"]  # the residual rule: layers 1, 3 -> 1


# -------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def budget_client(live_data_dir, tiny_gemma2):
    """A server whose SAE budget holds one SAE of the run."""
    from fastapi.testclient import TestClient

    settings = Settings(data_dir=live_data_dir, device="cpu", sae_memory_budget=SAE_BYTES, max_new_tokens=4)
    service = LiveService(settings, preloaded={tiny_gemma2.name: tiny_gemma2})
    with TestClient(create_app(settings, service)) as client:
        client.service = service
        yield client


def test_a_request_naming_saes_over_the_budget_gets_422_naming_the_budget(budget_client, model):
    response = budget_client.get(f"/{model.id}/-/encode.json", params={"text": "hello", "saes": ["1-res-a", "3-res-c"]})
    assert response.status_code == 422
    message = response.json()["message"]
    assert f"SAE memory budget of {format_bytes(SAE_BYTES)}" in message and "--sae-memory-budget" in message
    page = budget_client.get(f"/{model.id}/-/encode", params={"text": "hello", "saes": ["1-res-a", "3-res-c"]})
    assert page.status_code == 422 and "SAE memory budget" in page.text
    steer = budget_client.get(f"/{model.id}/-/steer.json", params={"text": "hi", "feature": ["1-res-a:0", "3-res-c:0"],
                                                                  "strength": ["1", "1"], "n_tokens": 2})
    assert steer.status_code == 422 and "SAE memory budget" in steer.json()["message"]
    alone = budget_client.get(f"/{model.id}/-/encode.json", params={"text": "hello", "saes": ["3-res-c"]})
    assert alone.status_code == 200


def test_live_values_equal_stored_ones_after_an_sae_is_evicted_and_reloaded(budget_client, live_data_dir, model):
    cache = budget_client.service.saes
    for sae_id in ("1-res-a", "2-mlp-b", "1-res-a", "3-res-c", "2-mlp-b"):  # each request evicts the one before
        for feature, positions, acts, token_ids, starts_document in _stored_examples(live_data_dir, sae_id, limit=4):
            body = budget_client.get(f"/{model.id}/-/encode.json", params={
                "ids": ",".join(map(str, token_ids)), "saes": [sae_id], "feature": f"{sae_id}:{feature}",
                "mid_document": int(not starts_document)}).json()
            assert _ids(cache) == [sae_id]
            counted = np.array(body["highlight"]["counted"])  # the precompute's rule: no BOS/EOS/pad, no warm-up
            live = np.array(body["highlight"]["acts"])[counted]
            np.testing.assert_allclose(live, _dense(positions, acts, len(token_ids))[counted], rtol=1e-5, atol=1e-6)


def test_encode_form_offers_every_sae_by_layer_and_site_and_checks_the_default_that_fits(budget_client, model):
    page = budget_client.get(f"/{model.id}/-/encode")
    doc = parse_html(page.text)
    grid = doc.find("table", cls="sae-grid")
    assert [th.text() for th in grid.find("thead").find_all("th")] == ["layer", "mlp", "res"]
    assert [tr.find("th").text() for tr in grid.find("tbody").find_all("tr")] == ["1", "2", "3"]
    boxes = {box.attrs["value"]: box for box in grid.find_all("input", name="saes")}
    assert set(boxes) == set(model.saes)
    assert [v for v, box in boxes.items() if "checked" in box.attrs] == ["1-res-a"]  # 3 do not fit: the residual rule
    assert all(box.attrs["data-bytes"] == str(SAE_BYTES) for box in boxes.values())
    assert f"SAE memory budget of {format_bytes(SAE_BYTES)}" in doc.find("p", cls="sae-budget").text()
    body = budget_client.get(f"/{model.id}/-/encode.json", params={"text": "hello"}).json()
    assert [layer["sae_id"] for layer in body["layers"]] == ["1-res-a"]
