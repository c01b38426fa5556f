"""The synthetic Gemma-2-shaped release (bench/synthetic_release.py): a random Gemma 2 with the real layer
count, and SAEs in the exact Gemma Scope layout that the project's loaders and release patterns read, with
thresholds that give the L0 they are named for."""

import numpy as np
import pytest

from bench.synthetic_release import GEMMA2_2B_LAYERS, measured_l0, random_contexts, write_synthetic_release
from featurescope.encoder import FeatureEncoder
from featurescope.sae import PARAM_NAMES
from featurescope.sae_loading import load_sae
from featurescope.sae_sources import expand_sae_sources
from featurescope.site_names import Site

WIDTH, TARGETS, LAYERS = 256, (50, 80), (0, 2)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic-release")
    return root, write_synthetic_release(root, width=WIDTH, d_model=64, layers=list(LAYERS), target_l0s=TARGETS,
                                         log=lambda *_: None)


@pytest.fixture(scope="module")
def lm(release):
    from featurescope.models import load_model

    return load_model(str(release[1].model), device="cpu")


def test_the_model_is_a_gemma_2_with_gemma_2_2bs_layer_count_loaded_with_eager_attention(lm):
    assert lm.config.model_type == "gemma2" and lm.n_layers == GEMMA2_2B_LAYERS == 26
    assert lm.model.config._attn_implementation == "eager"
    assert lm.tokenize("ab") == [lm.bos_token_id, *lm.tokenize("ab", prepend_bos=False)] and lm.bos_token_id == 2


def test_every_sae_is_a_params_npz_in_the_gemma_scope_layout_with_its_keys_and_shapes(release, lm):
    root, written = release[0], release[1].saes
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("gemma-scope-*/**/*") if p.is_file())
    assert files == sorted(f"gemma-scope-2b-pt-{kind}/layer_{layer}/width_{WIDTH}/average_l0_{l0}/params.npz"
                           for kind in ("res", "mlp", "att") for layer in LAYERS for l0 in TARGETS)
    att_d_in = lm.config.num_attention_heads * lm.config.head_dim
    assert att_d_in != lm.d_model  # like gemma-2-2b (2048 vs 2304), so a mix-up of the two cannot pass
    for site, folders in written.items():
        d_in = att_d_in if site.kind == "att" else lm.d_model
        for folder in folders:
            with np.load(folder / "params.npz") as npz:
                assert sorted(npz.files) == sorted(PARAM_NAMES)
                shapes = {name: npz[name].shape for name in npz.files}
                assert {npz[name].dtype for name in npz.files} == {np.dtype("float32")}
                assert (npz["threshold"] > 0).all()
            assert shapes == {"W_enc": (d_in, WIDTH), "W_dec": (WIDTH, d_in), "b_enc": (WIDTH,), "b_dec": (d_in,),
                              "threshold": (WIDTH,)}


def test_the_saes_load_with_their_site_from_the_path_and_fit_the_model(release, lm):
    written = release[1].saes
    saes = {f"{site.short_name}-{i}": load_sae(str(folder)) for site, folders in written.items()
            for i, folder in enumerate(folders)}
    assert {name: sae.cfg.hook_name for name, sae in saes.items()} == {
        f"{layer}-{kind}-{i}": Site(layer, kind).hook_name for layer in LAYERS for kind in ("res", "mlp", "att")
        for i in range(len(TARGETS))}
    FeatureEncoder(lm, saes)  # checks each SAE's d_in against its site's width


def test_measured_l0_on_unseen_contexts_is_near_the_target_it_is_named_for(release, lm):
    written = release[1].saes
    contexts = random_contexts(lm, 16, 64, seed=12345)  # not the calibration contexts
    targets = {str(folder): target for folders in written.values() for folder, target in zip(folders, TARGETS)}
    l0s = measured_l0(lm, {name: load_sae(name) for name in targets}, contexts)
    assert len(l0s) == len(LAYERS) * 3 * len(TARGETS)
    for name, l0 in l0s.items():
        assert 0.8 * targets[name] <= l0 <= 1.25 * targets[name], (name, l0)


def test_release_patterns_find_the_synthetic_saes_in_forward_pass_order(release):
    root, written = release[0], release[1].saes
    every = expand_sae_sources([f"{root}/gemma-scope-2b-pt-*/layer_*/width_{WIDTH}/average_l0_*"])
    assert every == [str(folder) for site in sorted(written, key=lambda s: (s.layer, ("att", "mlp", "res").index(s.kind)))
                     for folder in written[site]]
    canonical = expand_sae_sources([f"{root}/gemma-scope-2b-pt-res/layer_*/width_{WIDTH}/canonical"])
    assert canonical == [str(root / f"gemma-scope-2b-pt-res/layer_{layer}/width_{WIDTH}/average_l0_80") for layer in LAYERS]
