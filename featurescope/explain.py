"""Explain features with a language model behind any OpenAI-compatible endpoint, and score the explanations.

    featurescope explain --run data/db/demo.duckdb --sae 12-res-2k --features 0-49 --endpoint local
    featurescope explain --sae 20-res-16k --all --endpoint https://api.openai.com/v1 --model gpt-4.1-nano

For each feature: one chat completion whose prompt shows its top examples and one interval sample per interval
(a window around each maximum, the firing tokens marked <<like this>> with their activations) and its
promoted logit tokens; the answer is its explanation. Scorers (delphi's detection and fuzzing) then show the
scorer model held-out activating windows (the other interval samples, then the top examples not shown) mixed
with as many non-activating windows (random windows of the run's contexts that are none of the feature's
examples), one per request, and ask yes or no; the score is balanced accuracy (0.5 = chance).
Results go to the run's side file (featurescope/explanations.py), a batch at a time, so a killed run
resumes where its last batch ended.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import httpx

from featurescope.errors import FeatureScopeError
from featurescope.explain_config import LOCAL, METHOD, PROMPT_VERSION, ExplainConfig
from featurescope.explanations import Explanation, ExplanationStore, Score, balanced_accuracy, is_side_file

LOCAL_MODEL_NAME = "SmolLM2-135M-Instruct"
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
MARK_OPEN, MARK_CLOSE = "<<", ">>"


class ExplainError(FeatureScopeError):
    """Bad input to `featurescope explain`, or an endpoint that cannot be used."""


# --------------------------------------------------------------------------------------- the run's features
@dataclass(frozen=True)
class Window:
    tokens: list[str]
    acts: list[float]  # per token; 0 where the feature does not fire (or is not known to)


@dataclass(frozen=True)
class FeatureData:
    feature: int
    shown: list[Window]  # for the explainer
    held_out: list[Window]  # for the scorers
    promoted: list[str]
    example_contexts: frozenset[int]  # every context among its examples


@dataclass
class RunFile:
    """A published run, read-only: its model, run id, SAEs, vocabulary and contexts."""
    path: Path
    model_id: str
    run_id: str
    sae_id: str
    d_sae: int
    vocab: list[str]
    contexts: dict[int, list[int]] = field(repr=False)

    @classmethod
    def open(cls, path: Path, sae_id: str | None) -> "RunFile":
        with _read_only(path) as conn:
            saes = conn.execute("SELECT id, model_id, run_id, d_sae FROM saes ORDER BY id").fetchall()
            if sae_id is None and len(saes) != 1:
                raise ExplainError(f"{path} holds the SAEs {', '.join(s[0] for s in saes)}: choose one with --sae.")
            chosen = [s for s in saes if sae_id is None or s[0] == sae_id]
            if not chosen:
                raise ExplainError(f"{path} has no SAE {sae_id!r}; it has {', '.join(s[0] for s in saes)}.")
            sid, model_id, run_id, d_sae = chosen[0]
            vocab_rows = conn.execute("SELECT token_id, text FROM vocab WHERE model_id = ?", [model_id]).fetchall()
            vocab = [""] * (max((r[0] for r in vocab_rows), default=-1) + 1)
            for token_id, text in vocab_rows:
                vocab[token_id] = text
            contexts = dict(conn.execute("SELECT context_id, token_ids FROM contexts WHERE run_id = ?", [run_id]).fetchall())
        return cls(path, model_id, run_id, sid, d_sae, vocab, contexts)

    def features(self, indices: Sequence[int], cfg: ExplainConfig) -> list[FeatureData]:
        with _read_only(self.path) as conn:
            rows = conn.execute(
                "SELECT feature, examples, logit_pos_ids FROM features WHERE sae_id = ? AND model_id = ? AND "
                f"feature IN ({', '.join('?' * len(indices))}) ORDER BY feature",
                [self.sae_id, self.model_id, *indices]).fetchall()
        return [self._feature(f, examples or [], promoted or [], cfg) for f, examples, promoted in rows]

    def _feature(self, index: int, examples: list[dict], promoted: list[int], cfg: ExplainConfig) -> FeatureData:
        top = [e for e in examples if e["kind"] == "top"]
        intervals = [e for e in examples if e["kind"] == "interval"]
        shown = top[:cfg.examples_shown] + [e for e in intervals if e["rank"] == 0]
        held = [e for e in intervals if e["rank"] > 0] + top[cfg.examples_shown:]
        return FeatureData(index, [self.window(e, cfg.window) for e in shown],
                           [self.window(e, cfg.window) for e in held], [self.vocab[t] for t in promoted[:8]],
                           frozenset(e["context_id"] for e in examples))

    def window(self, example: dict, width: int) -> Window:
        ids = self.contexts[example["context_id"]]
        start = max(1, example["max_pos"] - (2 * width) // 3)  # BOS (position 0) never shown
        end = min(len(ids), start + width)
        acts = dict(zip(example["positions"] or [], example["acts"] or []))
        return Window([self.vocab[t] for t in ids[start:end]], [float(acts.get(p, 0.0)) for p in range(start, end)])

    def non_activating(self, feature: FeatureData, n: int, width: int, rng: random.Random
                       ) -> list[Window]:
        """Random windows of contexts that are none of the feature's examples (not checked token by token:
        on a sparse feature such a window rarely holds a firing token)."""
        pool = [c for c in self.contexts if c not in feature.example_contexts]
        out = []
        for c in rng.sample(pool, min(n, len(pool))):
            ids = self.contexts[c]
            start = rng.randrange(1, max(2, len(ids) - width))
            out.append(Window([self.vocab[t] for t in ids[start:start + width]], [0.0] * len(ids[start:start + width])))
        return out


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    conn = duckdb.connect(":memory:")
    try:
        conn.execute("ATTACH ? AS run (READ_ONLY)", [str(path)])
        conn.execute("USE run")
        yield conn
    finally:
        conn.close()


def find_run(data_dir: Path, sae_id: str | None) -> Path:
    """The newest published file of data_dir/db holding the SAE."""
    files = sorted((p for p in (Path(data_dir) / "db").glob("*.duckdb")
                    if not p.name.startswith(".") and not is_side_file(p.name)),
                   key=lambda p: -p.stat().st_mtime_ns)
    for path in files:
        with _read_only(path) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM saes").fetchall()]
        if sae_id is None or sae_id in ids:
            return path
    raise ExplainError(f"No published run in {Path(data_dir) / 'db'} holds SAE {sae_id!r}; name the file with --run.")


def parse_features(text: str | None, all_features: bool, d_sae: int) -> list[int]:
    if all_features:
        return list(range(d_sae))
    if not text:
        raise ExplainError("Say which features to explain: --features 0-49 (or 3,7,10-12), or --all.")
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ExplainError(f"--features takes ranges like 0-49 or 3,7,10-12, not {text!r}.")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if hi < lo or hi >= d_sae:
            raise ExplainError(f"--features {part.strip()} is outside the SAE's features 0 to {d_sae - 1}.")
        out.update(range(lo, hi + 1))
    return sorted(out)


# ------------------------------------------------------------------------------------------------- prompts
EXPLAINER_SYSTEM = ("You are studying one feature of a language model. You are shown text excerpts where it fires, "
                    f"with the tokens it fires on marked {MARK_OPEN}like this{MARK_CLOSE} and their activations, and "
                    "the tokens it makes the model predict next. Reply with one short phrase (at most 12 words) "
                    "saying what the feature detects. Reply with the phrase only.")


def mark(window: Window, marked: Sequence[bool] | None = None) -> str:
    marked = marked if marked is not None else [a > 0 for a in window.acts]
    return "".join(f"{MARK_OPEN}{t}{MARK_CLOSE}" if m else t for t, m in zip(window.tokens, marked)).replace("\n", "↵")


def explainer_messages(feature: FeatureData) -> list[dict]:
    lines = []
    for i, w in enumerate(feature.shown, 1):
        firing = sorted(((a, t) for t, a in zip(w.tokens, w.acts) if a > 0), reverse=True)[:3]
        values = ", ".join(f"{t.strip() or repr(t)!s} {a:.1f}" for a, t in firing)
        lines.append(f"{i}. {mark(w)}  (activations: {values})")
    promoted = ", ".join(t.strip() or repr(t) for t in feature.promoted)
    user = "Excerpts:\n" + "\n".join(lines) + f"\n\nTokens it promotes next: {promoted}\n\nWhat does the feature detect?"
    return [{"role": "system", "content": EXPLAINER_SYSTEM}, {"role": "user", "content": user}]


SCORER_QUESTIONS = {
    "detection": ("A language model feature is explained as: \"{explanation}\".\nText: {text}\n"
                  "Does this feature fire anywhere in the text? Answer yes or no."),
    "fuzz": ("A language model feature is explained as: \"{explanation}\".\nIn this text some tokens are marked "
             f"{MARK_OPEN}like this{MARK_CLOSE}: {{text}}\nAre the marked tokens ones this feature fires on? "
             "Answer yes or no."),
}


# One "yes" and one "no" demonstration per scorer, about an unrelated feature. Without them small models answer
# in prose ("The token 'error' is indeed ...") or say "no" to everything: SmolLM2-135M did both.
SCORER_SHOTS = {
    "detection": (("numbers written as digits", "The meeting is at 10 on Monday.", "yes"),
                  ("numbers written as digits", "She walked home slowly.", "no")),
    "fuzz": (("numbers written as digits", f"The meeting is at {MARK_OPEN}10{MARK_CLOSE} on Monday.", "yes"),
             ("numbers written as digits", f"The {MARK_OPEN}meeting{MARK_CLOSE} is at 10 on {MARK_OPEN}Monday{MARK_CLOSE}.", "no")),
}
SCORER_SYSTEM = "You judge whether an explanation of a language model feature fits a text. Answer with one word: yes or no."


def scorer_messages(kind: str, explanation: str, text: str) -> list[dict]:
    """The scorer's chat: its rule, the two demonstrations of SCORER_SHOTS, then the question about `text`."""
    question = SCORER_QUESTIONS[kind].format
    messages = [{"role": "system", "content": SCORER_SYSTEM}]
    for shot_explanation, shot_text, answer in SCORER_SHOTS[kind]:
        messages += [{"role": "user", "content": question(explanation=shot_explanation, text=shot_text)},
                     {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": question(explanation=explanation, text=text)}]


def clean_explanation(text: str) -> str:
    """The first non-empty line, without a leading 'Explanation:' or quotes, at most 200 characters."""
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(the\s+)?(explanation|answer|feature)\s*:\s*", "", line, flags=re.IGNORECASE)
    return line.strip(" \"'`*")[:200]


def is_yes(answer: str) -> bool:
    word = re.match(r"\W*(\w+)", answer.lower())
    return bool(word) and word[1] in ("yes", "y", "true", "1")


# -------------------------------------------------------------------------------------------- the endpoint
@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, prompt: int, completion: int, retries: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.requests += 1
            self.retries += retries


class ChatClient:
    """POST {endpoint}/chat/completions with retries: 429, 5xx, timeouts and broken connections are retried
    with exponential backoff (0.5 s, 1 s, 2 s, ... at most 30 s, or the server's Retry-After)."""

    def __init__(self, endpoint: str, model: str, api_key: str | None, timeout: float, retries: int,
                 concurrency: int, backoff: float = 0.5) -> None:
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model, self.retries, self.backoff = model, retries, backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout, headers=headers,
                                 limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
        self.usage = Usage()

    def complete(self, messages: list[dict], max_tokens: int) -> tuple[str, int, int]:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        for attempt in range(self.retries + 1):
            try:
                response = self.http.post(self.url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if attempt == self.retries:
                    raise ExplainError(f"The endpoint {self.url} did not answer ({type(exc).__name__}) after "
                                       f"{attempt + 1} tries.") from exc
                time.sleep(self._delay(attempt, None))
                continue
            if response.status_code in RETRY_STATUS and attempt < self.retries:
                time.sleep(self._delay(attempt, response.headers.get("retry-after")))
                continue
            if response.status_code != 200:
                raise ExplainError(f"The endpoint {self.url} answered {response.status_code}: {response.text[:200]}")
            data = response.json()
            usage = data.get("usage") or {}
            prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            self.usage.add(prompt, completion, attempt)
            return (data["choices"][0]["message"].get("content") or ""), prompt, completion
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        try:
            return min(30.0, float(retry_after))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return min(30.0, self.backoff * 2 ** attempt)

    def close(self) -> None:
        self.http.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_endpoint(log: Callable[[str], None] = print, startup_timeout: float = 180.0) -> Iterator[tuple[str, str]]:
    """`transformers serve` with the embedded SmolLM2-135M-Instruct (its dequantised folder in the model cache),
    on 127.0.0.1 and a free port, for the duration of the block: yields (base URL, model name)."""
    from featurescope.models import converted_gguf, embedded_model_path

    folder = str(converted_gguf(embedded_model_path("smollm2-135m")))
    cli = Path(sys.executable).with_name("transformers")
    if not cli.exists():
        raise ExplainError("--endpoint local needs transformers' server: pip install 'featurescope[explain]' "
                           "(transformers[serving]).")
    port = _free_port()
    log(f"Starting transformers serve with {LOCAL_MODEL_NAME} on 127.0.0.1:{port} ...")
    # Its log goes to a file, not a pipe: it writes a line per request, and an undrained pipe would block it.
    server_log = tempfile.TemporaryFile()
    process = subprocess.Popen([str(cli), "serve", folder, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
                               stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port}/health", process, startup_timeout, server_log)
        yield f"http://127.0.0.1:{port}/v1", folder
    finally:
        server_log.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_ready(url: str, process: subprocess.Popen, timeout: float, server_log) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            server_log.seek(0)
            err = server_log.read().decode(errors="replace")[-500:]
            raise ExplainError(f"transformers serve exited with {process.returncode}: {err}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise ExplainError(f"transformers serve was not ready after {timeout:.0f} s.")


# ------------------------------------------------------------------------------------------------- the job
@dataclass
class ExplainResult:
    explained: int
    skipped: int
    failed: list[tuple[int, str]]
    usage: Usage
    seconds: float
    side_file: Path


def run_explain(cfg: ExplainConfig, log: Callable[[str], None] = print) -> ExplainResult:
    """Explain (and score) the chosen features of one SAE; see the module docstring."""
    scorers = cfg.scorers
    path = Path(cfg.run) if cfg.run else find_run(cfg.data_dir, cfg.sae)
    if not path.is_file():
        raise ExplainError(f"{path} does not exist.")
    run = RunFile.open(path, cfg.sae)
    wanted = parse_features(cfg.features, cfg.all_features, run.d_sae)
    if cfg.endpoint == LOCAL:
        with local_endpoint(log) as (url, served):
            return _explain(cfg, run, wanted, scorers, url, served, cfg.model or LOCAL_MODEL_NAME, log)
    if not cfg.model:
        raise ExplainError("--model names the explainer model the endpoint serves (e.g. gpt-4.1-nano).")
    return _explain(cfg, run, wanted, scorers, cfg.endpoint, cfg.model, cfg.model, log)


def _explain(cfg: ExplainConfig, run: RunFile, wanted: list[int], scorers: tuple[str, ...], url: str, served: str,
             explainer: str, log: Callable[[str], None]) -> ExplainResult:
    from tqdm.auto import tqdm

    store = ExplanationStore.for_run(run.path)
    done = set() if cfg.force else store.done(explainer, METHOD, PROMPT_VERSION, run.sae_id)
    todo = [f for f in wanted if f not in done]
    log(f"{run.sae_id}: {len(todo)} features to explain, {len(wanted) - len(todo)} already explained by {explainer} "
        f"({PROMPT_VERSION}); results in {store.path}")
    client = ChatClient(url, served, os.environ.get(cfg.api_key_env) or None, cfg.timeout, cfg.retries, cfg.concurrency)
    scorer_name = cfg.scorer_model or explainer
    failed: list[tuple[int, str]] = []
    started, explained = time.monotonic(), 0
    bar = tqdm(total=len(todo), desc="explain", unit="feature", disable=not cfg.progress)
    pool = ThreadPoolExecutor(cfg.concurrency)
    try:
        for start in range(0, len(todo), cfg.batch_size):
            batch = run.features(todo[start:start + cfg.batch_size], cfg)
            futures = {f.feature: pool.submit(_one, client, run, f, cfg, scorers, explainer, scorer_name) for f in batch}
            results = []
            for index, future in futures.items():
                try:
                    results.append(future.result())
                except ExplainError as exc:
                    failed.append((index, str(exc)))
                bar.update(1)
                bar.set_postfix(tokens=client.usage.prompt_tokens + client.usage.completion_tokens, refresh=False)
            store.write_batch(results)
            explained += len(results)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        client.close()
    for index, error in failed[:5]:
        log(f"feature {index} failed: {error}")
    if failed:
        log(f"{len(failed)} features failed; run the same command again to retry them.")
    return ExplainResult(explained, len(wanted) - len(todo), failed, client.usage, time.monotonic() - started, store.path)


def _one(client: ChatClient, run: RunFile, feature: FeatureData, cfg: ExplainConfig, scorers: tuple[str, ...],
         explainer: str, scorer_name: str) -> Explanation:
    if not feature.shown:
        text, prompt, completion = "(never fires in this run)", 0, 0
    else:
        answer, prompt, completion = client.complete(explainer_messages(feature), cfg.max_tokens)
        text = clean_explanation(answer) or "(no explanation given)"
    scores = tuple(s for s in (_score(client, run, feature, text, kind, cfg, scorer_name) for kind in scorers)
                   if s is not None) if feature.shown else ()
    return Explanation(run.model_id, run.sae_id, feature.feature, run.run_id, explainer, METHOD, PROMPT_VERSION, text,
                       prompt, completion, scores)


def _score(client: ChatClient, run: RunFile, feature: FeatureData, explanation: str, kind: str, cfg: ExplainConfig,
           scorer_name: str) -> Score | None:
    positives = feature.held_out[:cfg.score_examples]
    if not positives:
        return None
    rng = random.Random(f"{cfg.seed}-{run.sae_id}-{feature.feature}-{kind}")
    negatives = run.non_activating(feature, len(positives), cfg.window, rng)
    if not negatives:
        return None
    if kind == "fuzz":  # the true firing tokens marked vs as many random tokens marked in the negatives
        pos_texts = [mark(w) for w in positives]
        neg_texts = []
        for w, p in zip(negatives, positives):
            k = max(1, sum(a > 0 for a in p.acts))
            chosen = set(rng.sample(range(len(w.tokens)), min(k, len(w.tokens))))
            neg_texts.append(mark(w, [i in chosen for i in range(len(w.tokens))]))
    else:
        pos_texts = ["".join(w.tokens).replace("\n", "↵") for w in positives]
        neg_texts = ["".join(w.tokens).replace("\n", "↵") for w in negatives]
    ask = lambda text: is_yes(client.complete(scorer_messages(kind, explanation, text), 3)[0])  # noqa: E731
    correct_pos = sum(ask(t) for t in pos_texts)
    correct_neg = sum(not ask(t) for t in neg_texts)
    return Score(scorer_name, kind, balanced_accuracy(correct_pos, len(pos_texts), correct_neg, len(neg_texts)),
                 len(pos_texts), len(neg_texts), correct_pos, correct_neg)
