"""What a user passes as SAEs expands into concrete sources: --sae repeated, --sae-list files, and release
patterns on the hub (a monkeypatched file listing) or on disk (real folders in the Gemma Scope layout)."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import random_sae_params
from featurescope import sae_sources
from featurescope.sae_sources import SAELoadError, expand_sae_sources, gemma_scope_layout

# A slice of google/gemma-scope-2b-pt-res's listing: layers 0-11, two widths, a few L0 variants each.
HUB_FILES = [".gitattributes", "README.md"] + [
    f"layer_{layer}/width_{width}/average_l0_{l0}/params.npz"
    for layer in range(12) for width in ("16k", "1m") for l0 in (20, 80 + 3 * layer, 112)
]
CANONICAL_L0S = [112, 112, 112, 89, 92, 95, 98, 101, 104, 107, 110, 112]  # of layers 0-11: closest to 100


@pytest.fixture
def hub_listing(monkeypatch):
    asked = []

    def files(repo_id):
        asked.append(repo_id)
        return HUB_FILES if repo_id == "google/gemma-scope-2b-pt-res" else []
    monkeypatch.setattr(sae_sources, "_repo_files", files)
    return asked


@pytest.mark.parametrize("pattern", ["google/gemma-scope-2b-pt-res/layer_*/width_16k/canonical",
                                     "gemma-scope-2b-pt-res-canonical:layer_*/width_16k/canonical",
                                     "gemma-scope-2b-pt-res/layer_*/width_16k/canonical"])
def test_a_canonical_hub_pattern_names_each_layers_variant_closest_to_l0_100_in_layer_order(hub_listing, pattern):
    assert expand_sae_sources([pattern]) == [f"google/gemma-scope-2b-pt-res/layer_{layer}/width_16k/average_l0_{l0}"
                                             for layer, l0 in enumerate(CANONICAL_L0S)]


def test_a_tie_for_canonical_goes_to_the_sparser_variant():
    assert sae_sources.canonical_variant(["average_l0_110", "average_l0_90", "average_l0_300"]) == "average_l0_90"


def test_a_hub_pattern_matches_segment_by_segment(hub_listing):
    assert expand_sae_sources(["google/gemma-scope-2b-pt-res/layer_1?/width_*/average_l0_11*"]) == [
        f"google/gemma-scope-2b-pt-res/layer_{name}" for name in (
            "10/width_16k/average_l0_110", "10/width_16k/average_l0_112", "10/width_1m/average_l0_110",
            "10/width_1m/average_l0_112", "11/width_16k/average_l0_112", "11/width_16k/average_l0_113",
            "11/width_1m/average_l0_112", "11/width_1m/average_l0_113")]
    # '*' does not cross a '/': one segment never matches two
    with pytest.raises(SAELoadError, match="three segments"):
        expand_sae_sources(["google/gemma-scope-2b-pt-res/layer_*/average_l0_*"])
    with pytest.raises(SAELoadError, match="the release cannot be a pattern"):
        expand_sae_sources(["google/gemma-scope-2b-pt-*/layer_*/width_16k/canonical"])


def test_a_hub_pattern_that_matches_nothing_names_the_pattern(hub_listing):
    with pytest.raises(SAELoadError, match=r"Pattern 'google/gemma-scope-2b-pt-res/layer_\*/width_65k/canonical' matches no SAE"):
        expand_sae_sources(["google/gemma-scope-2b-pt-res/layer_*/width_65k/canonical"])
    with pytest.raises(SAELoadError, match="matches no SAE in google/gemma-scope-2b-pt-mlp"):
        expand_sae_sources(["gemma-scope-2b-pt-mlp:layer_*/width_16k/average_l0_*"])


def test_sources_without_a_pattern_pass_through_untouched_without_listing_the_hub(hub_listing):
    given = ["google/gemma-scope-2b-pt-res/layer_3/width_16k/canonical", "gemma-2-2b/20-gemmascope-res-16k", "data/saes/6-res"]
    assert expand_sae_sources(given) == given
    assert hub_listing == []


def write_release(root, kind, layers, widths=("16k",), l0s=(60, 110)):
    for layer in layers:
        for width in widths:
            for l0 in l0s:
                folder = root / f"gemma-scope-2b-pt-{kind}" / f"layer_{layer}" / f"width_{width}" / f"average_l0_{l0}"
                folder.mkdir(parents=True)
                np.savez(folder / "params.npz", **random_sae_params(8, 4))


def test_a_local_pattern_globs_sae_folders_in_forward_pass_order(tmp_path):
    for kind in ("res", "mlp", "att"):
        write_release(tmp_path, kind, layers=(2, 10))
    (tmp_path / "gemma-scope-2b-pt-res" / "layer_2" / "width_16k" / "average_l0_999").mkdir()  # no params.npz
    found = expand_sae_sources([f"{tmp_path}/gemma-scope-2b-pt-*/layer_*/width_16k/average_l0_*"])
    names = [p.removeprefix(str(tmp_path) + "/") for p in found]
    assert names == [f"gemma-scope-2b-pt-{kind}/layer_{layer}/width_16k/average_l0_{l0}"
                     for layer in (2, 10) for kind in ("att", "mlp", "res") for l0 in (60, 110)]


def test_a_local_canonical_segment_picks_each_folders_variant_closest_to_l0_100(tmp_path):
    write_release(tmp_path, "res", layers=(0, 1), l0s=(20, 71, 139))
    base = tmp_path / "gemma-scope-2b-pt-res"
    assert expand_sae_sources([f"{base}/layer_*/width_16k/canonical"]) == [
        f"{base}/layer_{layer}/width_16k/average_l0_71" for layer in (0, 1)]
    assert expand_sae_sources([f"{base}/layer_1/width_16k/canonical"]) == [f"{base}/layer_1/width_16k/average_l0_71"]


def test_a_local_pattern_that_matches_nothing_names_the_pattern(tmp_path):
    write_release(tmp_path, "res", layers=(0,))
    with pytest.raises(SAELoadError, match=r"matches no file or folder"):
        expand_sae_sources([f"{tmp_path}/gemma-scope-2b-pt-res/layer_*/width_65k/average_l0_*"])
    with pytest.raises(SAELoadError, match=r"matches 1 paths, none an SAE folder"):
        expand_sae_sources([f"{tmp_path}/gemma-scope-2b-pt-res/layer_*"])


def test_an_sae_list_file_adds_its_lines_after_the_flags_skipping_comments_blanks_and_repeats(tmp_path, hub_listing):
    write_release(tmp_path, "mlp", layers=(4, 3))
    listing = tmp_path / "saes.txt"
    listing.write_text(f"# the MLP SAEs of layers 3 and 4\n\n  {tmp_path}/gemma-scope-2b-pt-mlp/layer_*/width_16k/average_l0_60  \n"
                       "google/gemma-scope-2b-pt-res/layer_1?/width_1m/canonical  # two 1m SAEs\n"
                       "data/saes/6-res\n")
    assert expand_sae_sources(["data/saes/6-res", "data/saes/12-res"], sae_list=listing) == [
        "data/saes/6-res", "data/saes/12-res",
        f"{tmp_path}/gemma-scope-2b-pt-mlp/layer_3/width_16k/average_l0_60",
        f"{tmp_path}/gemma-scope-2b-pt-mlp/layer_4/width_16k/average_l0_60",
        "google/gemma-scope-2b-pt-res/layer_10/width_1m/average_l0_110",
        "google/gemma-scope-2b-pt-res/layer_11/width_1m/average_l0_112",
    ]


def test_a_missing_sae_list_file_is_a_clear_error(tmp_path):
    with pytest.raises(SAELoadError, match="is not a file"):
        expand_sae_sources([], sae_list=tmp_path / "nope.txt")


def test_the_gemma_scope_layout_of_a_local_folder_gives_its_site_and_model(tmp_path):
    layout = gemma_scope_layout(tmp_path / "gemma-scope-9b-it-att" / "layer_7" / "width_131k" / "average_l0_12")
    assert (layout.site.hook_name, layout.model_name, layout.width) == ("blocks.7.attn.hook_z", "google/gemma-2-9b-it", "131k")
    cached = tmp_path / "models--google--gemma-scope-2b-pt-mlp" / "snapshots" / ("0" * 40) / "layer_3/width_16k/average_l0_50"
    assert gemma_scope_layout(cached).site.short_name == "3-mlp"
    assert gemma_scope_layout(tmp_path / "my-release" / "layer_3" / "width_16k" / "average_l0_50") is None
    assert gemma_scope_layout(tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "average_l0_50") is None


def test_expanding_sources_does_not_import_torch():
    code = "import sys; from featurescope.sae_sources import expand_sae_sources; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_every_match_of_a_local_release_pattern_loads_with_the_site_its_path_names(tmp_path):
    from featurescope.sae_loading import load_sae

    write_release(tmp_path, "att", layers=(5,), l0s=(60,))
    write_release(tmp_path, "res", layers=(5,), l0s=(60,))
    saes = [load_sae(source) for source in expand_sae_sources([f"{tmp_path}/gemma-scope-2b-pt-*/layer_5/width_16k/*"])]
    assert [(s.cfg.hook_name, s.cfg.model_name) for s in saes] == [("blocks.5.attn.hook_z", "google/gemma-2-2b"),
                                                                   ("blocks.5.hook_resid_post", "google/gemma-2-2b")]
    with pytest.raises(SAELoadError, match="reads blocks.5.hook_resid_post, not blocks.5.hook_mlp_out"):
        load_sae(str(tmp_path / "gemma-scope-2b-pt-res/layer_5/width_16k/average_l0_60"), site="5-mlp")
