"""Explanations per minute, tokens per feature and the score distribution of `featurescope explain` with the
embedded endpoint (transformers serve + SmolLM2-135M-Instruct) on this machine. The baseline, in the same
process against the same server: one bare chat completion of the same length as an explanation, so the
figure shows what the prompt (examples, scoring) costs on top of the endpoint's own speed.

    python bench/explain.py --run data/db/NAME.duckdb --sae 12-res-2k --features 0-99
    python bench/explain.py --factory --features 0-9          # the tests' factory run (random tokens)

Prints the figures and the first 10 explanations as they are. Writes into a copy of the run's side file
(the published run and its explanations are left alone).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="A published run file (copied to a temp folder first).")
    parser.add_argument("--factory", action="store_true", help="Use tests/factories.py's run instead of --run.")
    parser.add_argument("--sae", default=None)
    parser.add_argument("--features", default="0-9")
    parser.add_argument("--score", default="detection,fuzz")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--examples-shown", type=int, default=8)
    parser.add_argument("--window", type=int, default=24)
    parser.add_argument("--score-examples", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    from featurescope.explain import ChatClient, local_endpoint, run_explain
    from featurescope.explain_config import ExplainConfig
    from featurescope.explanations import side_path

    tmp = Path(tempfile.mkdtemp(prefix="featurescope-bench-explain-"))
    try:
        if args.factory:
            from factories import make_db

            run = make_db(tmp / "db" / "tiny.duckdb")
            sae = args.sae or "2-res-64"
        else:
            run = tmp / "db" / args.run.name
            run.parent.mkdir(parents=True)
            shutil.copyfile(args.run, run)
            sae = args.sae
        with local_endpoint() as (url, served):
            client = ChatClient(url, served, None, 300, 2, 1)
            started = time.perf_counter()
            for _ in range(3):
                client.complete([{"role": "user", "content": "Say what a word-level feature detects in a phrase."}], 24)
            bare = (time.perf_counter() - started) / 3
            client.close()
            cfg = ExplainConfig(run=run, sae=sae, features=args.features, endpoint=url, model=served,
                                concurrency=args.concurrency, score=args.score, examples_shown=args.examples_shown,
                                window=args.window, score_examples=args.score_examples, max_tokens=args.max_tokens,
                                batch_size=args.batch_size, progress=False)
            result = run_explain(cfg, log=lambda _: None)
        n = max(result.explained, 1)
        usage = result.usage
        print(f"features explained: {result.explained} in {result.seconds:.1f} s -> {60 * result.explained / result.seconds:.2f} "
              f"explanations/minute (scoring included: {args.score})")
        print(f"tokens per feature: {usage.prompt_tokens / n:.0f} prompt + {usage.completion_tokens / n:.0f} completion, "
              f"{usage.requests / n:.1f} requests; {usage.retries} retries")
        print(f"baseline: one bare 24-token chat completion {bare:.2f} s; per feature {result.seconds / n:.2f} s "
              f"= {result.seconds / n / bare:.1f} bare completions")
        with duckdb.connect(str(side_path(run)), read_only=True) as conn:
            for kind, in conn.execute("SELECT DISTINCT kind FROM scores ORDER BY kind").fetchall():
                values = [r[0] for r in conn.execute("SELECT score FROM scores WHERE kind = ? AND NOT isnan(score)",
                                                     [kind]).fetchall()]
                buckets = {b: sum(1 for v in values if b <= v < b + 0.25 or (b == 0.75 and v == 1.0))
                           for b in (0.0, 0.25, 0.5, 0.75)}
                print(f"{kind}: n={len(values)} mean {statistics.mean(values):.3f} median {statistics.median(values):.3f} "
                      f"| [0,.25) {buckets[0.0]} [.25,.5) {buckets[0.25]} [.5,.75) {buckets[0.5]} [.75,1] {buckets[0.75]}")
            print("first 10 explanations:")
            for feature, text, score in conn.execute(
                    "SELECT e.feature, e.text, avg(s.score) FROM explanations e LEFT JOIN scores s ON s.explanation_id = e.id "
                    "GROUP BY ALL ORDER BY e.feature LIMIT 10").fetchall():
                print(f"  {feature:>5}  {score if score is not None else float('nan'):.2f}  {text}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
