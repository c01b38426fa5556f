"""Benchmark: quality and speed of the SAEs FeatureScope trains for the embedded model (prints figures, asserts nothing).

    .venv/bin/python bench/train_quality.py                       # all parts, into bench_out/
    .venv/bin/python bench/train_quality.py --parts demo,compare  # a subset
    .venv/bin/python bench/train_quality.py --parts long --long-tokens 2000000

Parts:
    demo        train the demo SAEs from scratch (wall time), then L0 / FVU / delta LM loss / dead / dense
                on held-out contexts of the built-in corpus
    compare     JumpReLU against ReLU + L1, same code path, same tokens, L0 matched by the target-L0 controller
    throughput  training tokens/s (forward + SAE steps, one epoch) against the bare truncated forward pass
    long        the demo recipe with a bigger budget, to show what more CPU time buys
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from featurescope.corpus import content_mask
from featurescope.evaluation import evaluate_saes, format_table, store_metrics
from featurescope.models import load_model
from featurescope.sae_loading import load_sae
from featurescope.sites import parse_site, run_truncated
from featurescope.training import DEMO_CONFIG, default_contexts, train_demo_saes, train_saes

EVAL_TOKENS = 20_000


def evaluate_folders(lm, folders: dict, held_out: torch.Tensor, label: str) -> dict:
    saes = {name: load_sae(str(folder)) for name, folder in folders.items()}
    # each SAE's own attention-sink limit (max_norm); the table's "outliers" column says how many were left out
    metrics = evaluate_saes(lm, saes, held_out, max_tokens=EVAL_TOKENS)
    for name, folder in folders.items():
        store_metrics(folder, metrics[name], {"corpus": "built-in python docs, held-out contexts"})
    print(f"\n{label}\n{format_table(metrics)}", flush=True)
    return metrics


def part_demo(lm, out: Path, held_out: torch.Tensor) -> None:
    t0 = time.perf_counter()
    paths = train_demo_saes(lm, out / "demo", force=True)
    wall = time.perf_counter() - t0
    card = load_sae(str(next(iter(paths.values())))).cfg.metadata
    print(f"\n[demo] wall time of train_demo_saes (corpus + activations + training, 4 SAEs): {wall:.0f} s; "
          f"model forward {card['model_forward_s']:.0f} s; {card['tokens_seen']} tokens per SAE "
          f"({card['unique_contexts']} unique contexts x {card['context_len']})", flush=True)
    evaluate_folders(lm, {s.short_name: p for s, p in paths.items()}, held_out, "[demo] held-out quality")


def part_compare(lm, out: Path, held_out: torch.Tensor, site: str) -> None:
    base = replace(DEMO_CONFIG, sites=(site,))
    folders = {}
    for arch, coeff in (("jumprelu", base.sparsity_coeff), ("relu", 1e-2)):
        t0 = time.perf_counter()
        folders[arch] = train_saes(lm, replace(base, architecture=arch, sparsity_coeff=coeff), out / f"compare-{arch}")[parse_site(site)]
        print(f"[compare] {arch}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
    m = evaluate_folders(lm, folders, held_out, f"[compare] {site}, target L0 {base.target_l0}, same tokens and code path")
    print(f"\n{'':12}{'JumpReLU':>10}{'ReLU+L1':>10}")
    for key in ("l0", "fvu", "delta_loss", "dead_share", "dense_share"):
        print(f"{key:12}{getattr(m['jumprelu'], key):10.3f}{getattr(m['relu'], key):10.3f}")


def part_throughput(lm, out: Path, tokens: int) -> None:
    cfg = replace(DEMO_CONFIG, corpus_tokens=tokens, train_tokens=tokens, buffer_tokens=32_768, checkpoint_every=0)
    contexts = default_contexts(lm, cfg)[0]
    n_tokens = int(content_mask(lm, contexts).sum())
    cfg = replace(cfg, train_tokens=n_tokens - n_tokens % cfg.batch_size)  # one epoch, streamed through the buffer
    last = max(parse_site(s).layer for s in cfg.sites)
    t0 = time.perf_counter()
    with torch.no_grad():
        for ids in contexts.split(cfg.model_batch):
            run_truncated(lm, ids, last)
    forward_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_saes(lm, cfg, out / "throughput", contexts=contexts)
    train_s = time.perf_counter() - t0
    fwd_rate, train_rate = n_tokens / forward_s, cfg.train_tokens / train_s
    print(f"\n[throughput] {contexts.shape[0]} contexts x {contexts.shape[1]}, layers 0..{last}, {len(cfg.sites)} SAEs of width {cfg.d_sae}")
    print(f"  bare truncated forward: {fwd_rate:8.0f} tok/s ({forward_s:.1f} s)")
    print(f"  training (1 epoch)    : {train_rate:8.0f} tok/s ({train_s:.1f} s)")
    print(f"  ratio training / forward: {train_rate / fwd_rate:.2f}", flush=True)


def part_long(lm, out: Path, held_out: torch.Tensor, train_tokens: int, corpus_tokens: int | None) -> None:
    cfg = replace(DEMO_CONFIG, train_tokens=train_tokens, corpus_tokens=corpus_tokens, buffer_tokens=300_000,
                  lr_warmup_steps=20, sparsity_warmup_steps=50)
    t0 = time.perf_counter()
    paths = train_saes(lm, cfg, out / "long")
    print(f"\n[long] {train_tokens} tokens per SAE, corpus tokens {corpus_tokens or 'all'}: {time.perf_counter() - t0:.0f} s", flush=True)
    evaluate_folders(lm, {s.short_name: p for s, p in paths.items()}, held_out, "[long] held-out quality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"))
    parser.add_argument("--parts", default="demo,compare,throughput")
    parser.add_argument("--compare-site", default="12-res")
    parser.add_argument("--throughput-tokens", type=int, default=40_000)
    parser.add_argument("--long-tokens", type=int, default=1_600_000)
    parser.add_argument("--long-corpus-tokens", type=int, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    lm = load_model("smollm2-135m", device="cpu")
    print(f"model loaded in {time.perf_counter() - t0:.0f} s; torch threads {torch.get_num_threads()}", flush=True)
    held_out = default_contexts(lm, DEMO_CONFIG)[1]
    parts = args.parts.split(",")
    if "demo" in parts:
        part_demo(lm, args.out, held_out)
    if "compare" in parts:
        part_compare(lm, args.out, held_out, args.compare_site)
    if "throughput" in parts:
        part_throughput(lm, args.out, args.throughput_tokens)
    if "long" in parts:
        part_long(lm, args.out, held_out, args.long_tokens, args.long_corpus_tokens)


if __name__ == "__main__":
    main()
