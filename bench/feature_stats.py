"""Cost of FeatureStats.update() per batch against the SAE encoder matmul of the same batch, same process.

    .venv/bin/python bench/feature_stats.py                  # F = 4096 and 16384, B = 16, T = 128
    .venv/bin/python bench/feature_stats.py --widths 4096 --batches 30 --device cuda
    .venv/bin/python bench/feature_stats.py --threads 1

Activations come from a random JumpReLU SAE (d_in 576, SmolLM2's width) whose thresholds give each feature a
log-normal firing rate with mean L0 ~ 70, like Gemma Scope; BOS (position 0) is masked. The first batches
fill the empty top-k and candidate tables, so "warm-up" and "steady" (the rest) are reported apart; the
steady cost keeps falling over a long run as fewer contexts enter the top-k and the interval samples.
On a shared, oversubscribed CPU, OpenMP's default active wait makes the many small ops of update() ~15x
slower with 2 threads: measure with --threads 1 or OMP_WAIT_POLICY=PASSIVE there (the load average is printed).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


from featurescope.sae import JumpReLUSAE, SAEConfig  # noqa: E402
from featurescope.precompute.feature_stats import FeatureStats, expected_memory_bytes  # noqa: E402


def random_sae(d_in: int, d_sae: int, l0: float, seed: int = 0) -> JumpReLUSAE:
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5  # pre-activations ~ N(0, 1) for x ~ N(0, I)
    sigma = 1.5
    rate = torch.exp(torch.randn(d_sae, generator=g) * sigma + torch.log(torch.tensor(l0 / d_sae)) - sigma ** 2 / 2)
    threshold = torch.special.ndtri(1 - rate.clamp(max=0.5))
    params = {"W_enc": W_enc, "W_dec": W_enc.T.contiguous(), "b_enc": torch.zeros(d_sae), "b_dec": torch.zeros(d_in),
              "threshold": threshold}
    return JumpReLUSAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name="blocks.15.hook_resid_post"), params)


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def bench(d_sae: int, batch: int, ctx: int, n_batches: int, warmup: int, device: torch.device) -> None:
    sae = random_sae(576, d_sae, l0=70).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stats = FeatureStats(d_sae, ctx, device=device)
    mask = torch.ones(batch, ctx, dtype=torch.bool, device=device)
    mask[:, 0] = False
    g = torch.Generator().manual_seed(1)
    t_mm, t_enc, t_upd, l0 = [], [], [], []
    for i in range(n_batches):
        x = torch.randn(batch * ctx, 576, generator=g).to(device)  # [B*T, d_in]
        t_mm.append(timed(lambda: x @ sae.W_enc, sync))
        acts = None

        def encode():
            nonlocal acts
            acts = sae.encode(x).view(batch, ctx, d_sae)  # [B, T, F]
        t_enc.append(timed(encode, sync))
        l0.append(float((acts[:, 1:] > 0).sum()) / (batch * (ctx - 1)))
        ids = torch.arange(i * batch, (i + 1) * batch, device=device)
        t_upd.append(timed(lambda: stats.update(acts, ids, mask), sync))
    steady = slice(warmup, None)
    mean = lambda xs: sum(xs) / len(xs) * 1e3
    mm, enc, upd, first = mean(t_mm[steady]), mean(t_enc[steady]), mean(t_upd[steady]), mean(t_upd[:warmup])
    t_fin = timed(stats.finalize, sync)
    print(f"d_sae={d_sae:6d} B={batch} T={ctx} L0={sum(l0) / len(l0):5.1f} | matmul {mm:7.1f} ms | encode {enc:7.1f} ms"
          f" | update {upd:7.1f} ms steady ({first:6.1f} ms over the first {warmup}) | update/matmul {upd / mm:.2f}"
          f" | update/encode {upd / enc:.2f} | finalize {t_fin:.2f} s"
          f" | state {expected_memory_bytes(d_sae) / 2**20:.1f} MiB ({expected_memory_bytes(d_sae) / d_sae:.0f} B/feature)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    print(f"load average {load} |", end=" ")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for d_sae in args.widths:
        bench(d_sae, args.batch, args.ctx, args.batches, args.warmup, torch.device(args.device))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
