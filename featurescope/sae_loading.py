"""Find, load and save JumpReLU SAEs. Every source ends up as one `JumpReLUSAE`.

Accepted sources (all are plain strings, so the CLI, the config and URLs share them):
    google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71   Gemma Scope on the hub
    google/gemma-scope-2b-pt-res/layer_20/width_16k/canonical       ... the variant with L0 closest to 100
    gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical    SAELens release:id (or release/id)
    gemma-2-2b/20-gemmascope-res-16k                                Neuronpedia's name (canonical variant)
    path/to/params.npz, or a folder holding it                      Gemma Scope layout (our own SAEs too)
    path/to/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71  ... its site and model read from the path
    path/to/saelens_folder                                          cfg.json + sae_weights.safetensors
Release patterns (`layer_*/width_16k/canonical`) and --sae-list files expand in featurescope/sae_sources.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featurescope.sae import PARAM_NAMES, JumpReLUSAE, SAEConfig
# The names live there (torch-free, so the command line expands sources without torch).
from featurescope.sae_sources import (GemmaScopePath, SAELoadError, gemma_scope_layout, parse_gemma_scope,  # noqa: F401
                                      resolve_canonical)
from featurescope.sites import Site, SiteError, parse_site

CARD_FILE = "featurescope.json"  # written beside params.npz for SAEs this project trains


@dataclass(frozen=True)
class SAEShape:
    hook_name: str
    d_in: int
    d_sae: int


def load_sae(source: str, site: str | Site | None = None, device: str | torch.device = "cpu") -> JumpReLUSAE:
    """Load an SAE from any accepted source. `site` is needed only for a bare params.npz with no card."""
    target, npz_fields = _locate(source, site)
    sae = sae_from_npz(target, **npz_fields) if npz_fields is not None else _load_saelens_folder(target)
    _check_site(source, site, sae.cfg.hook_name)
    return sae.to(device)


def sae_shape(source: str, site: str | Site | None = None) -> SAEShape:
    """An SAE's site and size without reading its weights (a params.npz's b_dec and threshold, or a SAELens
    cfg.json): what planning the SAEs of a whole release needs. A hub SAE is downloaded, as load_sae would."""
    target, npz_fields = _locate(source, site)
    if npz_fields is None:
        cfg = json.loads((target / "cfg.json").read_text())
        shape = SAEShape(parse_site(_saelens_hook_name(cfg)).hook_name, int(cfg["d_in"]), int(cfg["d_sae"]))
    else:
        with np.load(target) as npz:  # an npz reads only the members asked for
            shape = SAEShape(npz_fields["hook_name"], npz["b_dec"].shape[0], npz["threshold"].shape[0])
    _check_site(source, site, shape.hook_name)
    return shape


def _check_site(source: str, site: str | Site | None, hook_name: str) -> None:
    if site is not None and parse_site(site) != parse_site(hook_name):
        raise SAELoadError(f"SAE {source!r} reads {hook_name}, not {parse_site(site).hook_name}.")


def _locate(source: str, site: str | Site | None) -> tuple[Path, dict | None]:
    """(params.npz, sae_from_npz's keyword arguments), or (a SAELens folder, None)."""
    gemma_scope = parse_gemma_scope(source)
    if gemma_scope is not None:
        return _gemma_scope_npz(gemma_scope)
    path = Path(source).expanduser()
    if not path.exists():
        raise SAELoadError(
            f"SAE source {source!r} is neither an existing file or folder nor a Gemma Scope name "
            "(e.g. google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71)."
        )
    return _locate_local(path, site)


def _locate_local(path: Path, site: str | Site | None) -> tuple[Path, dict | None]:
    if path.is_dir():
        if (path / "params.npz").is_file():
            path = path / "params.npz"
        elif (path / "cfg.json").is_file():
            return path, None
        else:
            raise SAELoadError(f"Folder {str(path)!r} holds neither params.npz nor cfg.json + sae_weights.safetensors.")
    if path.suffix != ".npz":
        raise SAELoadError(f"SAE file {str(path)!r} is not a params.npz file.")
    card = _read_card(path.parent / CARD_FILE)
    layout = gemma_scope_layout(path.parent)  # .../gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71
    hook_name = (card.get("hook_name") or (layout.site.hook_name if layout else None)
                 or (parse_site(site).hook_name if site is not None else None))
    if hook_name is None:
        raise SAELoadError(f"{str(path)!r} does not say which site it reads: pass its site (e.g. '20-res'), or keep "
                           "the Gemma Scope folder layout (gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71).")
    model_name = card.get("model_name") or (layout.model_name if layout else "")
    return path, dict(hook_name=parse_site(hook_name).hook_name, model_name=model_name, source=str(path), metadata=card)


def sae_from_npz(path: Path, hook_name: str, model_name: str = "", source: str = "", metadata: dict | None = None) -> JumpReLUSAE:
    """Read the Gemma Scope params.npz layout: W_enc, W_dec, b_enc, b_dec, threshold (float32)."""
    try:
        with np.load(path) as npz:
            missing = [n for n in PARAM_NAMES if n not in npz.files]
            if missing:
                raise SAELoadError(f"{str(path)!r} lacks {', '.join(missing)}: not a Gemma Scope params.npz.")
            # np.load reads each array once; torch.from_numpy shares that memory (no second copy).
            params = {n: torch.from_numpy(npz[n]) for n in PARAM_NAMES}
    except (OSError, ValueError) as exc:
        if isinstance(exc, SAELoadError):
            raise
        raise SAELoadError(f"Could not read {str(path)!r} as a params.npz file: {exc}") from exc
    d_in, d_sae = params["W_enc"].shape
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=parse_site(hook_name).hook_name, model_name=model_name,
                    source=source or str(path), metadata=metadata or {})
    return JumpReLUSAE(cfg, params)


def _read_card(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _load_saelens_folder(folder: Path) -> JumpReLUSAE:
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    meta = cfg.get("metadata") or {}
    hook_name = _saelens_hook_name(cfg)
    architecture = cfg.get("architecture", "jumprelu")
    if architecture not in ("jumprelu", "standard", "relu"):
        raise SAELoadError(f"SAELens SAE in {str(folder)!r} has architecture {architecture!r}; FeatureScope reads jumprelu and standard (ReLU) SAEs.")
    if (cfg.get("normalize_activations") or "none") != "none":
        raise SAELoadError(f"SAELens SAE in {str(folder)!r} normalises its inputs ({cfg['normalize_activations']}); fold the normalisation into the weights first.")
    weights_file = folder / "sae_weights.safetensors"
    if not weights_file.is_file():
        raise SAELoadError(f"SAELens folder {str(folder)!r} has cfg.json but no sae_weights.safetensors.")
    weights = load_file(str(weights_file))
    try:
        parse_site(hook_name or "")
    except SiteError as exc:
        raise SAELoadError(f"SAELens cfg.json in {str(folder)!r} names hook {hook_name!r}: {exc}") from exc
    if "threshold" not in weights:
        weights["threshold"] = (torch.exp(weights["log_threshold"]) if "log_threshold" in weights
                                else torch.zeros_like(weights["b_enc"]))  # standard ReLU SAE == JumpReLU at 0
    if cfg.get("apply_b_dec_to_input", False):
        # SAELens subtracts b_dec before encoding; fold it into b_enc so encode() stays x @ W_enc + b_enc.
        weights["b_enc"] = weights["b_enc"] - weights["b_dec"].float() @ weights["W_enc"].float()
    params = {n: weights[n].float() for n in PARAM_NAMES}
    d_in, d_sae = params["W_enc"].shape
    sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=parse_site(hook_name).hook_name,
                        model_name=cfg.get("model_name") or meta.get("model_name", ""),
                        architecture=architecture, source=str(folder))
    return JumpReLUSAE(sae_cfg, params)


def _saelens_hook_name(cfg: dict) -> str | None:
    return cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")


def _gemma_scope_npz(path: GemmaScopePath) -> tuple[Path, dict]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hub_errors

    if path.variant == "canonical":
        path = GemmaScopePath(path.repo_id, path.layer, path.width, resolve_canonical(path))
    filename = f"{path.folder}/params.npz"
    try:
        local = hf_hub_download(path.repo_id, filename)
    # LocalEntryNotFoundError subclasses EntryNotFoundError, so it must be caught first.
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled) as exc:
        raise SAELoadError(
            f"{path.repo_id}/{filename} is not in the local Hugging Face cache and the hub cannot be reached "
            "(or HF_HUB_OFFLINE is set): download it once with network access."
        ) from exc
    except hub_errors.GatedRepoError as exc:
        raise SAELoadError(f"{path.repo_id} is gated: accept its terms on the hub and set HF_TOKEN.") from exc
    except hub_errors.RepositoryNotFoundError as exc:
        raise SAELoadError(f"No repo {path.repo_id!r} on the Hugging Face hub.") from exc
    except hub_errors.EntryNotFoundError as exc:
        raise SAELoadError(f"{path.repo_id} has no {filename}: check the layer, width and average_l0 variant.") from exc
    return Path(local), dict(hook_name=path.site.hook_name, model_name=path.model_name,
                             source=f"{path.repo_id}/{path.folder}")


def save_sae(sae: JumpReLUSAE, folder: str | Path, card: dict | None = None) -> Path:
    """Write params.npz (exact Gemma Scope layout) plus a JSON card; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **sae.numpy_params())
    full_card = {"d_in": sae.d_in, "d_sae": sae.d_sae, "hook_name": sae.cfg.hook_name,
                 "model_name": sae.cfg.model_name, "architecture": sae.cfg.architecture, **(card or {})}
    (folder / CARD_FILE).write_text(json.dumps(full_card, indent=2) + "\n")
    return folder
