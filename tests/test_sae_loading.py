"""Every SAE source loads into the same JumpReLU module: Gemma Scope on the hub (a fake cache in the real
layout, read offline by huggingface_hub), SAELens names, local params.npz, SAELens folders, our own saves."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_sae_params
from featurescope.encoder import FeatureEncoder, SAEShapeError
from featurescope.sae_loading import SAELoadError, load_sae, parse_gemma_scope, save_sae

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_fake_hub_repo(repo_id: str, folders: dict[str, dict]) -> Path:
    """Lay files out exactly as huggingface_hub caches them: refs/main -> snapshots/<commit>/<path>."""
    from huggingface_hub import constants

    repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for folder, params in folders.items():
        target = repo_dir / "snapshots" / COMMIT / folder
        target.mkdir(parents=True, exist_ok=True)
        np.savez(target / "params.npz", **params)
    return repo_dir


@pytest.fixture(scope="module")
def fake_gemma_scope():
    """google/gemma-scope-2b-pt-res with three L0 variants at layer 1 (d_in 64 like the tiny Gemma 2)."""
    variants = {f"layer_1/width_16k/average_l0_{l0}": random_sae_params(64, 32, seed=l0) for l0 in (5, 71, 139)}
    write_fake_hub_repo("google/gemma-scope-2b-pt-res", variants)
    return variants


def test_all_spellings_of_a_gemma_scope_sae_name_the_same_hub_path():
    hub = parse_gemma_scope("google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")
    assert (hub.repo_id, hub.layer, hub.width, hub.variant) == ("google/gemma-scope-2b-pt-res", 20, "16k", "average_l0_71")
    assert parse_gemma_scope("gemma-scope-2b-pt-res:layer_20/width_16k/average_l0_71") == hub
    assert parse_gemma_scope("gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71") == hub
    canonical = parse_gemma_scope("gemma-scope-2b-pt-res-canonical:layer_20/width_16k/canonical")
    assert canonical == parse_gemma_scope("gemma-2-2b/20-gemmascope-res-16k")
    assert canonical.variant == "canonical"
    assert hub.site.hook_name == "blocks.20.hook_resid_post" and hub.model_name == "google/gemma-2-2b"
    mlp = parse_gemma_scope("google/gemma-scope-9b-it-mlp/layer_3/width_131k/average_l0_10")
    assert mlp.site.hook_name == "blocks.3.hook_mlp_out" and mlp.model_name == "google/gemma-2-9b-it"
    assert parse_gemma_scope("gemma-scope-2b-pt-att:layer_4/width_16k/average_l0_9").site.hook_name == "blocks.4.attn.hook_z"
    assert parse_gemma_scope("./my_sae") is None


@pytest.mark.parametrize("bad,msg", [
    ("google/gemma-scope-2b-pt-foo/layer_20/width_16k/average_l0_71", "Unknown Gemma Scope repo"),
    ("google/gemma-scope-2b-pt-res/layer_20/average_l0_71", "does not parse"),
    ("gemma-scope-2b-pt-res-canonical:layer_20/width_16k/average_l0_71", "canonical ids only"),
])
def test_malformed_gemma_scope_names_get_a_clear_error(bad, msg):
    with pytest.raises(SAELoadError, match=msg):
        parse_gemma_scope(bad)


def test_gemma_scope_sae_loads_from_the_hub_cache_with_the_real_download_code(fake_gemma_scope):
    sae = load_sae("google/gemma-scope-2b-pt-res/layer_1/width_16k/average_l0_71")
    expected = fake_gemma_scope["layer_1/width_16k/average_l0_71"]
    for name, value in expected.items():
        np.testing.assert_array_equal(getattr(sae, name).detach().numpy(), value)
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post"
    assert sae.cfg.model_name == "google/gemma-2-2b"
    assert sae.cfg.source == "google/gemma-scope-2b-pt-res/layer_1/width_16k/average_l0_71"


@pytest.mark.parametrize("name", [
    "google/gemma-scope-2b-pt-res/layer_1/width_16k/canonical",
    "gemma-scope-2b-pt-res-canonical:layer_1/width_16k/canonical",
    "gemma-2-2b/1-gemmascope-res-16k",
])
def test_canonical_names_resolve_to_the_variant_with_l0_closest_to_100(fake_gemma_scope, name):
    sae = load_sae(name)
    assert sae.cfg.source.endswith("average_l0_71")
    np.testing.assert_array_equal(sae.W_enc.numpy(), fake_gemma_scope["layer_1/width_16k/average_l0_71"]["W_enc"])


def test_a_gemma_scope_sae_missing_from_the_cache_offline_says_how_to_get_it(fake_gemma_scope):
    with pytest.raises(SAELoadError, match="not in the local Hugging Face cache"):
        load_sae("google/gemma-scope-2b-pt-res/layer_7/width_16k/average_l0_71")


def test_local_params_npz_needs_a_site_unless_a_card_says_it(tmp_path):
    np.savez(tmp_path / "params.npz", **random_sae_params(64, 32))
    with pytest.raises(SAELoadError, match="does not say which site"):
        load_sae(str(tmp_path / "params.npz"))
    sae = load_sae(str(tmp_path / "params.npz"), site="2-mlp")
    assert sae.cfg.hook_name == "blocks.2.hook_mlp_out"
    assert load_sae(str(tmp_path), site="blocks.2.hook_mlp_out").d_sae == 32


def test_our_saved_saes_round_trip_through_the_gemma_scope_layout(tmp_path):
    original = load_sae(_npz(tmp_path / "src"), site="3-res")
    folder = save_sae(original, tmp_path / "saved", card={"tokens_seen": 1000})
    with np.load(folder / "params.npz") as npz:
        assert sorted(npz.files) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
        assert all(npz[k].dtype == np.float32 for k in npz.files)
    again = load_sae(str(folder))
    assert again.cfg.hook_name == "blocks.3.hook_resid_post"
    assert json.loads((folder / "featurescope.json").read_text())["tokens_seen"] == 1000
    x = torch.randn(10, 64)
    torch.testing.assert_close(again.encode(x), original.encode(x), rtol=0, atol=0)


def _npz(folder: Path, d_in=64, d_sae=32) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **random_sae_params(d_in, d_sae))
    return str(folder / "params.npz")


def _write_saelens_folder(folder: Path, p: dict, apply_b_dec_to_input: bool, log_threshold: bool) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    weights = {k: torch.from_numpy(v) for k, v in p.items()}
    if log_threshold:
        weights["log_threshold"] = torch.log(weights.pop("threshold"))
    save_file(weights, str(folder / "sae_weights.safetensors"))
    cfg = {"architecture": "jumprelu", "d_in": 64, "d_sae": 32, "apply_b_dec_to_input": apply_b_dec_to_input,
           "normalize_activations": "none", "metadata": {"hook_name": "blocks.2.hook_resid_post", "model_name": "tiny"}}
    (folder / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("apply_b_dec_to_input,log_threshold", [(False, False), (True, False), (True, True)])
def test_saelens_folders_encode_like_saelens(tmp_path, apply_b_dec_to_input, log_threshold):
    p = random_sae_params(64, 32, seed=5)
    p["b_dec"] = np.random.default_rng(1).normal(size=64).astype(np.float32)  # make b_dec matter
    _write_saelens_folder(tmp_path / "sae", p, apply_b_dec_to_input, log_threshold)
    sae = load_sae(str(tmp_path / "sae"))
    x = np.random.default_rng(2).normal(size=(20, 64)).astype(np.float32)
    x_in = x - p["b_dec"] if apply_b_dec_to_input else x
    pre = x_in @ p["W_enc"] + p["b_enc"]
    expected = pre * (pre > p["threshold"])
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).numpy(), expected, rtol=1e-4, atol=1e-5)
    assert sae.cfg.hook_name == "blocks.2.hook_resid_post" and sae.cfg.model_name == "tiny"


def test_missing_files_and_unusable_folders_get_clear_errors(tmp_path):
    with pytest.raises(SAELoadError, match="neither an existing file or folder"):
        load_sae(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAELoadError, match="holds neither params.npz nor cfg.json"):
        load_sae(str(tmp_path / "empty"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(SAELoadError, match="Could not read"):
        load_sae(str(tmp_path / "bad.npz"), site="0-res")
    np.savez(tmp_path / "partial.npz", W_enc=np.zeros((4, 8), np.float32))
    with pytest.raises(SAELoadError, match="lacks W_dec, b_enc, b_dec, threshold"):
        load_sae(str(tmp_path / "partial.npz"), site="0-res")


def test_an_sae_whose_width_does_not_match_its_site_is_rejected(tiny_gemma2, tmp_path):
    sae = load_sae(_npz(tmp_path, d_in=2304, d_sae=8), site="1-res")
    with pytest.raises(SAEShapeError, match=r"d_in=2304, but site blocks.1.hook_resid_post of model .* has width 64"):
        FeatureEncoder(tiny_gemma2, {"big": sae})
    att = load_sae(_npz(tmp_path / "att", d_in=64, d_sae=8), site="1-att")
    with pytest.raises(SAEShapeError, match="has width 96"):
        FeatureEncoder(tiny_gemma2, {"att": att})


def test_a_wide_sae_is_held_once_in_memory(tmp_path):
    """Loading must not copy the weights twice: peak RSS grows by about the file size, not 2x."""
    d_in, d_sae = 256, 131072  # 2 x 128 MiB of weights
    rng = np.random.default_rng(0)
    params = {"W_enc": rng.standard_normal((d_in, d_sae), dtype=np.float32),
              "W_dec": rng.standard_normal((d_sae, d_in), dtype=np.float32),
              "b_enc": np.zeros(d_sae, np.float32), "b_dec": np.zeros(d_in, np.float32),
              "threshold": np.zeros(d_sae, np.float32)}
    np.savez(tmp_path / "params.npz", **params)
    del params
    size = (tmp_path / "params.npz").stat().st_size
    script = textwrap.dedent(f"""
        import re, torch
        from featurescope.sae_loading import load_sae
        def kib(field):
            return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark after the imports
        before = kib("VmRSS")
        sae = load_sae({str(tmp_path / 'params.npz')!r}, site="0-res")
        print((kib("VmHWM") - before) * 1024)
    """)
    grown = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.split()[-1])
    assert size * 0.9 < grown < size * 1.3, (grown, size)


def test_sae_shape_gives_site_and_size_like_load_sae_without_reading_the_weights(tmp_path, fake_gemma_scope):
    from featurescope.sae_loading import SAEShape, sae_shape

    hub = "google/gemma-scope-2b-pt-res/layer_1/width_16k/canonical"
    assert sae_shape(hub) == SAEShape("blocks.1.hook_resid_post", 64, 32)
    layout = tmp_path / "gemma-scope-2b-pt-att" / "layer_4" / "width_16k" / "average_l0_9"
    layout.mkdir(parents=True)
    np.savez(layout / "params.npz", b_dec=np.zeros(48, np.float32), threshold=np.zeros(4096, np.float32))  # no weights
    assert sae_shape(str(layout)) == SAEShape("blocks.4.attn.hook_z", 48, 4096)
    with pytest.raises(SAELoadError, match="lacks W_enc"):
        load_sae(str(layout))
    _write_saelens_folder(tmp_path / "saelens", random_sae_params(64, 32), False, False)
    (tmp_path / "saelens" / "sae_weights.safetensors").unlink()
    assert sae_shape(str(tmp_path / "saelens")) == SAEShape("blocks.2.hook_resid_post", 64, 32)
    with pytest.raises(SAELoadError, match="reads blocks.4.attn.hook_z, not blocks.4.hook_resid_post"):
        sae_shape(str(layout), site="4-res")
