"""GPU benchmark: Gemma 2 2B architecture (random weights, bf16) with a random 16k JumpReLU SAE at every
one of its 26 residual layers, thresholds set for L0 ~ 70. Prints the streaming precompute throughput
(one forward pass, all SAEs encoding it, all FeatureStats updated) against the bare truncated forward
pass, same process, same tokens, same batch; for one SAE (layer 12) and for all 26 at once.

    python bench/precompute_gpu.py                      # on a CUDA machine
    python bench/precompute_gpu.py --tiny --device cpu  # a small config, to check the script runs anywhere
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch


from featurescope.corpus import content_mask  # noqa: E402
from featurescope.encoder import FeatureEncoder  # noqa: E402
from featurescope.models import LoadedModel  # noqa: E402
from featurescope.sae import JumpReLUSAE, SAEConfig  # noqa: E402
from featurescope.sites import Site, capture_sites, run_truncated  # noqa: E402
from featurescope.precompute.feature_stats import FeatureStats  # noqa: E402

GEMMA2_2B = dict(vocab_size=256_000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096,
                 query_pre_attn_scalar=256, max_position_embeddings=8192)
TINY = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, sliding_window=64, query_pre_attn_scalar=32, max_position_embeddings=512)


def build_model(arch: dict, device: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**arch, pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager")
    with torch.device(device):
        model = Gemma2ForCausalLM(config).to(dtype).eval().requires_grad_(False)
    # Random weights need no tokenizer: token ids are random, BOS (2) first; this names the special ids.
    tokenizer = SimpleNamespace(bos_token_id=2, eos_token_id=1, pad_token_id=0, all_special_ids=[0, 1, 2])
    return LoadedModel(name="gemma-2-2b-random", source="random", model=model, tokenizer=tokenizer,
                       device=torch.device(device), dtype=dtype)


def random_sae(lm: LoadedModel, layer: int, d_sae: int, sample: torch.Tensor, target_l0: float) -> JumpReLUSAE:
    """Random unit-norm decoder, W_enc = W_dec^T scaled; thresholds at each feature's (1 - L0/d_sae) quantile."""
    d = lm.d_model
    W_dec = torch.randn(d_sae, d, device=lm.device)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    sae = JumpReLUSAE(SAEConfig(d_in=d, d_sae=d_sae, hook_name=Site(layer, "res").hook_name),
                      {"W_enc": W_dec.T.contiguous(), "W_dec": W_dec, "b_enc": torch.zeros(d_sae, device=lm.device),
                       "b_dec": torch.zeros(d, device=lm.device), "threshold": torch.zeros(d_sae, device=lm.device)})
    acts = capture_sites(lm, sample, [Site(layer, "res")])[Site(layer, "res")][:, 1:].reshape(-1, d)  # BOS dropped
    pre = sae.pre_acts(acts)  # [n, d_sae]
    k = max(1, int(round(pre.shape[0] * target_l0 / d_sae)))
    sae.threshold.copy_(pre.topk(k, dim=0).values[-1])
    return sae


def time_loop(fn, n_batches: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.time()
    for b in range(n_batches):
        fn(b)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small model and SAEs, for a CPU smoke run")
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--target-l0", type=float, default=70.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    arch = TINY if args.tiny else GEMMA2_2B
    d_sae = 512 if args.tiny else args.d_sae
    dtype = torch.float32 if args.tiny else torch.bfloat16
    lm = build_model(arch, args.device, dtype)
    n_layers, B, T = arch["num_hidden_layers"], args.batch_size, args.context_len
    batches = torch.randint(3, arch["vocab_size"], (args.batches, B, T), device=args.device)
    batches[:, :, 0] = 2  # BOS first
    saes = {f"{layer}-res": random_sae(lm, layer, d_sae, batches[0, :8], args.target_l0) for layer in range(n_layers)}
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {device_name}; model {'tiny Gemma 2' if args.tiny else 'Gemma 2 2B architecture'} ({dtype}), "
          f"random weights; {n_layers} residual SAEs of width {d_sae}; {args.batches} batches of {B} x {T} tokens")

    for label, names in (("one SAE (layer 12)" if not args.tiny else "one SAE (layer 3)", [f"{12 if not args.tiny else 3}-res"]),
                         (f"all {n_layers} SAEs", list(saes))):
        encoder = FeatureEncoder(lm, {n: saes[n] for n in names})
        stats = {n: FeatureStats(d_sae, T, device=args.device) for n in names}
        context_base = torch.arange(B, device=args.device)

        def bare(b):
            with torch.no_grad():
                run_truncated(lm, batches[b], encoder.last_layer)

        def precompute(b):
            ids = batches[b]
            mask = content_mask(lm, ids)
            for n, acts in encoder(ids).items():
                stats[n].update(acts, context_base + b * B, mask)

        bare(0), precompute(0)  # warm-up (kernels, allocator)
        stats = {n: FeatureStats(d_sae, T, device=args.device) for n in names}
        t_bare = time_loop(bare, args.batches, args.device)
        t_pre = time_loop(precompute, args.batches, args.device)
        n_tok = args.batches * B * T
        l0 = float(torch.stack([(encoder(batches[0, :2])[n][:, 1:] > 0).sum(-1).float().mean() for n in names]).mean())
        print(f"{label:<20} bare {n_tok / t_bare:>10.0f} tok/s   precompute {n_tok / t_pre:>10.0f} tok/s   "
              f"ratio {t_bare / t_pre:.2f}   (mean L0 {l0:.0f})")
        if args.device == "cuda":
            print(f"{'':<20} peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
