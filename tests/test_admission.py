"""Admission control of live work: a request is admitted only when the work queued ahead of it is expected
to take at most --max-wait seconds (the queue of each kind x that kind's measured service time); otherwise
503 + Retry-After at once. Steering jobs have their own cap."""

from __future__ import annotations

import time

import pytest

from featurescope.app import Settings, create_app
from featurescope.app.live import AdmissionControl, EncodeJob, LiveService, ServiceBusy, SteerJob


# -------------------------------------------------------------------------------------------- the rule
def test_the_expected_wait_is_the_queued_work_of_each_kind_times_its_service_time():
    control = AdmissionControl(max_wait_seconds=10, max_steer_jobs=4, encode_seconds=0.5, steer_seconds=3.0)
    for _ in range(4):
        control.admit("encode", "m")
    control.admit("steer", "m")
    assert control.expected_wait() == pytest.approx(4 * 0.5 + 3.0)


def test_a_request_whose_answer_would_come_later_than_the_bound_is_refused_with_retry_after():
    control = AdmissionControl(max_wait_seconds=2, max_steer_jobs=4, encode_seconds=0.5)
    for _ in range(4):  # the fourth is answered after 4 x 0.5 = 2.0 s: still admitted
        control.admit("encode", "m")
    with pytest.raises(ServiceBusy) as refused:
        control.admit("encode", "m")
    assert refused.value.retry_after >= 1
    assert "--max-wait" in refused.value.message and "about 2 s" in refused.value.message
    assert control.waiting["encode"] == 4  # a refused request leaves nothing behind


def test_the_job_in_service_counts_with_what_is_left_of_it():
    control = AdmissionControl(max_wait_seconds=10, max_steer_jobs=4, steer_seconds=3.0)
    control.admit("steer", "m")
    control.started("steer", 1)
    assert control.waiting["steer"] == 0
    assert 2.5 < control.expected_wait() <= 3.0
    control.finished("steer", 3.0, 1)
    assert control.expected_wait() == 0.0


def test_service_times_follow_the_measurements_per_request_of_a_batch():
    control = AdmissionControl(max_wait_seconds=10, max_steer_jobs=4, encode_seconds=1.0)
    for _ in range(50):
        control.started("encode", 0)
        control.finished("encode", 0.8, 8)  # a batch of 8 in 0.8 s: 0.1 s a request
    assert control.service_seconds["encode"] == pytest.approx(0.1, rel=1e-3)
    control.finished("encode", 5.0, 0)  # a batch that served nobody measures nothing
    assert control.service_seconds["encode"] == pytest.approx(0.1, rel=1e-3)


def test_steering_jobs_have_their_own_cap():
    control = AdmissionControl(max_wait_seconds=1000, max_steer_jobs=2, steer_seconds=0.1)
    control.admit("steer", "m")
    control.admit("steer", "m")
    with pytest.raises(ServiceBusy) as refused:
        control.admit("steer", "m")
    assert "--max-steer-jobs" in refused.value.message
    control.admit("encode", "m")  # encoding is still admitted


# ----------------------------------------------------------------------------------- in the real server
@pytest.fixture
def held_server(live_data_dir, tiny_gemma2):
    """A live server whose worker is held back, so queued work stays queued."""
    from fastapi.testclient import TestClient

    settings = Settings(data_dir=live_data_dir, device="cpu", max_wait_seconds=1.0, max_steer_jobs=1, max_new_tokens=8)
    service = LiveService(settings, preloaded={tiny_gemma2.name: tiny_gemma2})
    app = create_app(settings, service)
    with TestClient(app) as client:
        (model,) = app.state.catalogs.current().models.values()
        live = service.model(model)
        live.start = lambda *args, **kwargs: None
        yield client, model, live


def test_an_overloaded_live_encoder_answers_503_at_once_not_after_a_long_wait(held_server):
    client, model, live = held_server
    live.admission.service_seconds["encode"] = 0.4
    live.submit(EncodeJob(saes=[], text="one"))
    live.submit(EncodeJob(saes=[], text="two"))  # 0.8 s queued: a third would be answered after 1.2 s > 1 s
    started = time.perf_counter()
    for path in (f"/{model.id}/-/encode.json", f"/{model.id}/-/encode"):
        response = client.get(path, params={"text": "hello"})
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) >= 1
    assert time.perf_counter() - started < 5  # refused at once (the held worker would never answer)
    assert "--max-wait" in response.text


def test_a_second_steering_job_waits_for_no_one_when_the_cap_is_one(held_server):
    client, model, live = held_server
    sae = next(iter(model.saes.values()))
    live.admission.service_seconds["steer"] = 0.1  # well inside --max-wait: only the cap can refuse
    live.submit(SteerJob(text="hi", features=[(sae, 0, 1.0)], n_tokens=4, temperature=0.0, seed=0))
    response = client.get(f"/{model.id}/-/steer.json", params={"text": "hi", "feature": f"{sae.id}:0"})
    assert response.status_code == 503 and "--max-steer-jobs" in response.json()["message"]


def test_served_requests_measure_the_encoders_service_time(live_data_dir, tiny_gemma2):
    from fastapi.testclient import TestClient

    settings = Settings(data_dir=live_data_dir, device="cpu")
    service = LiveService(settings, preloaded={tiny_gemma2.name: tiny_gemma2})
    app = create_app(settings, service)
    with TestClient(app) as client:
        (model,) = app.state.catalogs.current().models.values()
        initial = service.model(model).admission.service_seconds["encode"]
        for text in ("a first prompt", "a second prompt", "and a third"):
            assert client.get(f"/{model.id}/-/encode.json", params={"text": text}).status_code == 200
        live = service.model(model)
        assert live.admission.service_seconds["encode"] != initial
        assert live.admission.waiting == {"encode": 0, "steer": 0} and live.admission.expected_wait() == 0.0


def test_the_soak_benchmark_runs_against_a_real_live_server(live_data_dir):
    """bench/soak.py stays runnable (its figures are read, not asserted): a real `featurescope serve` with
    live encoding over the tiny Gemma 2 run, a few clients for a few seconds."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(root / "bench" / "soak.py"), "--data-dir", str(live_data_dir),
                             "--clients", "4", "--seconds", "3", "--runs", "1", "--steer-tokens", "4",
                             "--baseline-repeats", "1", "--log", str(live_data_dir.parent / "soak-server.log")],
                            capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "4 clients, run 1:" in result.stdout and "service time alone" in result.stdout
    for kind in ("encode", "test", "steer", "page"):
        assert f"  {kind} " in result.stdout
