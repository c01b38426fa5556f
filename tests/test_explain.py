"""`featurescope explain` against a real OpenAI-compatible server started here: `transformers serve` with the
embedded SmolLM2-135M-Instruct (featurescope.explain.local_endpoint, what `--endpoint local` runs). Explanations
and scores land in the run's side file, the run file stays byte for byte the same, a killed run resumes without
redoing its published batches, and 429/500/503 answers from the endpoint (a small real proxy in front of it)
are retried. Prompts are kept tiny (2 examples of 8 tokens, 8-token answers): SmolLM2 on 2 CPU cores
answers such a request in a second or two."""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import httpx
import pytest

from featurescope.explain import ChatClient, ExplainError, explainer_messages, local_endpoint, parse_features, run_explain
from featurescope.explain_config import ExplainConfig
from featurescope.explanations import side_path
from factories import make_db

pytestmark = pytest.mark.slow
SAE = "2-res-64"
SMALL = dict(sae=SAE, examples_shown=2, window=8, max_tokens=8, score_examples=1, concurrency=2, progress=False)


@pytest.fixture(scope="module")
def endpoint():
    with local_endpoint(log=lambda _: None) as (url, served):
        yield url, served


@pytest.fixture()
def run_file(tmp_path):
    return make_db(tmp_path / "db" / "tiny.duckdb")


def rows(run_file: Path, sql: str) -> list[tuple]:
    with duckdb.connect(":memory:") as conn:
        conn.execute("ATTACH ? AS x (READ_ONLY)", [str(side_path(run_file))])
        return conn.execute(sql.replace("FROM ", "FROM x.")).fetchall()


def test_explanations_and_scores_are_written_beside_an_unchanged_run_file(endpoint, run_file):
    url, served = endpoint
    before = hashlib.sha256(run_file.read_bytes()).hexdigest()
    result = run_explain(ExplainConfig(run=run_file, features="0-1", endpoint=url, model=served, **SMALL), log=lambda _: None)
    assert (result.explained, result.skipped, result.failed) == (2, 0, [])
    assert hashlib.sha256(run_file.read_bytes()).hexdigest() == before
    explained = rows(run_file, "SELECT feature, text, completion_tokens FROM explanations ORDER BY feature")
    assert [r[0] for r in explained] == [0, 1]
    assert all(r[1].strip() and 0 < r[2] <= 8 for r in explained)
    scores = rows(run_file, "SELECT kind, score, n_pos, n_neg FROM scores ORDER BY explanation_id, kind")
    assert [s[0] for s in scores] == ["detection", "fuzz"] * 2
    assert all(0.0 <= s[1] <= 1.0 and s[2] == s[3] == 1 for s in scores)
    assert result.usage.requests == 2 * (1 + 2 + 2)  # an explanation, then 1 + 1 windows per scorer
    again = run_explain(ExplainConfig(run=run_file, features="0-1", endpoint=url, model=served, **SMALL), log=lambda _: None)
    assert (again.explained, again.skipped, again.usage.requests) == (0, 2, 0)


def test_a_killed_run_resumes_without_redoing_published_batches(endpoint, run_file):
    url, served = endpoint
    args = [sys.executable, "-m", "featurescope.cli", "explain", "--run", str(run_file), "--sae", SAE, "--features", "0-3",
            "--endpoint", url, "--model", served, "--batch-size", "1", "--concurrency", "1", "--score", "none",
            "--examples-shown", "2", "--window", "8", "--max-tokens", "8", "--no-progress"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not side_path(run_file).exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        assert side_path(run_file).exists(), process.stderr.read().decode() if process.poll() is not None else "timeout"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    first = rows(run_file, "SELECT feature, created_at FROM explanations ORDER BY feature")
    assert 1 <= len(first) < 4  # whole batches only
    result = run_explain(ExplainConfig(run=run_file, features="0-3", endpoint=url, model=served, score="none",
                                       **{**SMALL, "batch_size": 1}), log=lambda _: None)
    assert (result.skipped, result.explained) == (len(first), 4 - len(first))
    final = rows(run_file, "SELECT feature, created_at FROM explanations ORDER BY feature")
    assert [f for f, _ in final] == [0, 1, 2, 3]
    assert [r for r in final if r[0] in {f for f, _ in first}] == first  # not redone
    assert not list(run_file.parent.glob(".*.tmp"))


class FailingProxy(http.server.ThreadingHTTPServer):
    """Answers the first len(failures) POSTs with those statuses, then forwards to the endpoint."""

    def __init__(self, upstream: str, failures: list[int]) -> None:
        self.upstream, self.failures, self.seen = upstream.rstrip("/"), list(failures), []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: FailingProxy

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.failures:
            status = self.server.failures.pop(0)
            self.server.seen.append(status)
            self.send_response(status)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        upstream = httpx.post(self.server.upstream + self.path.removeprefix("/v1"), content=body,
                              headers={"content-type": "application/json"}, timeout=120)
        self.server.seen.append(upstream.status_code)
        self.send_response(upstream.status_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(upstream.content)))
        self.end_headers()
        self.wfile.write(upstream.content)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def proxy(endpoint):
    servers = []

    def start(failures: list[int]) -> tuple[FailingProxy, str]:
        server = FailingProxy(endpoint[0], failures)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_429_and_5xx_answers_are_retried(endpoint, run_file, proxy):
    server, url = proxy([429, 500, 503])
    result = run_explain(ExplainConfig(run=run_file, features="4", endpoint=url, model=endpoint[1], score="none", **SMALL),
                         log=lambda _: None)
    assert (result.explained, result.failed, result.usage.retries) == (1, [], 3)
    assert server.seen == [429, 500, 503, 200]
    assert rows(run_file, "SELECT feature FROM explanations") == [(4,)]


def test_an_endpoint_that_keeps_failing_gives_one_sentence_and_writes_nothing(endpoint, run_file, proxy):
    server, url = proxy([500] * 10)
    result = run_explain(ExplainConfig(run=run_file, features="5", endpoint=url, model=endpoint[1], score="none",
                                       retries=2, **SMALL), log=lambda _: None)
    assert result.explained == 0 and len(result.failed) == 1
    assert "answered 500" in result.failed[0][1]
    assert server.seen == [500, 500, 500]
    assert not side_path(run_file).exists()


def test_explainer_prompt_marks_firing_tokens_and_names_promoted_ones(run_file):
    from featurescope.explain import RunFile

    run = RunFile.open(run_file, SAE)
    feature = run.features([0], ExplainConfig(**SMALL))[0]
    text = explainer_messages(feature)[1]["content"]
    assert "<<" in text and ">>" in text and "Tokens it promotes next:" in text
    assert len(feature.shown) == 2 + 5 and feature.held_out  # 2 top + one sample per interval; the rest held out


def test_the_embedded_scorer_answers_yes_or_no_and_tells_a_marked_firing_token_from_others(endpoint):
    # Asked without demonstrations, SmolLM2 began its fuzzing answers with "The token ..." (read as "no"), so
    # every score was chance whatever the explanation.
    from featurescope.explain import is_yes, scorer_messages

    client = ChatClient(*endpoint, None, 120, 2, 1)
    explanation = "the word 'error' in error messages"
    answers = {text: client.complete(scorer_messages("fuzz", explanation, text), 3)[0]
               for text in ("An <<error>> occurred while reading", "An error <<occurred>> while <<reading>>")}
    client.close()
    assert all(a.strip().lower().rstrip(".!").split()[0] in ("yes", "no") for a in answers.values()), answers
    assert [is_yes(a) for a in answers.values()] == [True, False], answers


def test_bad_feature_ranges_get_one_sentence():
    with pytest.raises(ExplainError, match="outside the SAE's features 0 to 63"):
        parse_features("60-70", False, 64)
    with pytest.raises(ExplainError, match="ranges like 0-49"):
        parse_features("first ten", False, 64)
    with pytest.raises(ExplainError, match="--all"):
        parse_features(None, False, 64)
    assert parse_features("3,1-2,3", False, 64) == [1, 2, 3]


def test_client_sends_the_api_key_as_a_bearer_token():
    seen = {}

    class Echo(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            seen["auth"] = self.headers.get("Authorization")
            body = b'{"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ChatClient(f"http://127.0.0.1:{server.server_address[1]}/v1", "m", "sk-test", 5, 0, 1)
        assert client.complete([{"role": "user", "content": "hi"}], 4)[0] == "ok"
        assert seen["auth"] == "Bearer sk-test"
    finally:
        server.shutdown()
        server.server_close()
