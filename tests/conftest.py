"""Shared fixtures: tiny randomly initialised Gemma 2 and Llama models saved as real model folders,
a byte-level BPE tokenizer with Gemma's special-token ids (pad 0, eos 1, bos 2), and an offline,
test-private Hugging Face cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub: a private cache and no network.
_HF_HOME = tempfile.mkdtemp(prefix="featurescope-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = str(Path(_HF_HOME) / "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_VOCAB = 384
TOKENIZER_TEXT = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def add(a, b):\n    return a + b\n",
    "Sparse autoencoders find features in the residual stream of a transformer.",
    "<script>alert('x')</script> &amp; tokens that look like HTML",
] * 20


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def save_tiny_model(folder: Path, arch: str, n_layers: int = 4, seed: int = 0) -> Path:
    """A randomly initialised model folder, as save_pretrained writes it (config.json, weights, tokenizer)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if arch == "gemma2":
        config = Gemma2Config(**common, sliding_window=16, query_pre_attn_scalar=24,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
        model = Gemma2ForCausalLM(config)
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    # Random init gives tiny norms; bigger weights make soft-capping and norms matter in the tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gemma2_path(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gemma2"), "gemma2")


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gemma2(tiny_gemma2_path):
    from featurescope.models import load_model

    return load_model(str(tiny_gemma2_path), device="cpu")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_path):
    from featurescope.models import load_model

    return load_model(str(tiny_llama_path), device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M, loaded once per test session (~20 s)."""
    from featurescope.models import load_model

    return load_model("smollm2-135m", device="cpu")


def require_test_tool(present: bool, message: str) -> None:
    """Skip when a test tool is missing on a developer's machine; in CI (which installs it via
    scripts/install_test_tools.sh) a missing tool is a failure, so the browser tests can never silently vanish."""
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{message} - CI must install it", pytrace=False)
    pytest.skip(message)


def live_app(settings, lm):
    """The explorer app whose live encoder already holds `lm` (no second model load per test module)."""
    from featurescope.app import create_app
    from featurescope.app.live import LiveService

    return create_app(settings, LiveService(settings, preloaded={lm.name: lm}))


def random_sae_params(d_in: int, d_sae: int, seed: int = 0, threshold: float = 0.05) -> dict:
    """Float32 arrays in the Gemma Scope params.npz layout."""
    import numpy as np

    rng = np.random.default_rng(seed)
    W_dec = rng.normal(size=(d_sae, d_in)).astype(np.float32)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    return {
        "W_enc": np.ascontiguousarray(W_dec.T * 0.5, dtype=np.float32),
        "W_dec": W_dec,
        "b_enc": rng.normal(scale=0.01, size=d_sae).astype(np.float32),
        "b_dec": rng.normal(scale=0.01, size=d_in).astype(np.float32),
        "threshold": np.full(d_sae, threshold, dtype=np.float32),
    }


@pytest.fixture(scope="session")
def live_data_dir(tiny_gemma2, tiny_gemma2_path, tmp_path_factory) -> Path:
    """A real precompute run of the tiny Gemma 2 with SAEs at three sites (1-res, 2-mlp, 3-res; the model has
    4 layers): the data dir a live-encoding server serves, whose SAE folders the server loads itself."""
    import numpy as np

    from featurescope.sae_loading import load_sae, save_sae
    from featurescope.precompute.job import PrecomputeConfig, run_precompute

    root = tmp_path_factory.mktemp("live")
    folders = []
    for site, seed in (("1-res", 11), ("2-mlp", 12), ("3-res", 13)):
        params = random_sae_params(64, 48, seed=seed, threshold=0.0)
        params["b_enc"] -= 1.5  # each feature fires on a minority of tokens
        np.savez(root / "params.npz", **params)
        folders.append(str(save_sae(load_sae(str(root / "params.npz"), site=site), root / "saes" / site)))
    cfg = PrecomputeConfig(model=str(tiny_gemma2_path), saes=folders, sae_ids=["1-res-a", "2-mlp-b", "3-res-c"],
                           max_tokens=3000, context_len=32, batch_size=4, top_k=5, n_intervals=3,
                           examples_per_interval=2, device="cpu", data_dir=str(root / "data"), progress=False)
    run_precompute(cfg, lm=tiny_gemma2, log=lambda *_: None)
    return root / "data"
