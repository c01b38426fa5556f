"""Hook sites capture exactly what Gemma Scope's SAEs read, and the forward pass stops early."""

import pytest
import torch

from featurescope.sites import Site, SiteError, capture_sites, hook_point, parse_site, site_width


def _ids(lm, text="The capital of France is Paris. def add(a, b): return a + b"):
    return torch.tensor([lm.tokenize(text), lm.tokenize(text[::-1])[: len(lm.tokenize(text))]])


@pytest.mark.parametrize("name,site", [
    ("blocks.20.hook_resid_post", Site(20, "res")),
    ("20-res", Site(20, "res")),
    ("blocks.3.hook_mlp_out", Site(3, "mlp")),
    ("3-mlp", Site(3, "mlp")),
    ("blocks.0.attn.hook_z", Site(0, "att")),
    ("0-att", Site(0, "att")),
])
def test_both_spellings_of_a_site_parse_to_the_same_site(name, site):
    assert parse_site(name) == site
    assert parse_site(site.hook_name) == parse_site(site.short_name) == site


@pytest.mark.parametrize("bad", ["blocks.20.hook_resid_pre", "20-resid", "layer_20", "", "blocks.x.hook_mlp_out"])
def test_unknown_site_names_raise_a_clear_error(bad):
    with pytest.raises(SiteError, match="Unknown site"):
        parse_site(bad)


def test_layer_out_of_range_names_the_valid_range(tiny_gemma2):
    with pytest.raises(SiteError, match=r"has 4 layers \(0 to 3\)"):
        capture_sites(tiny_gemma2, _ids(tiny_gemma2), ["7-res"])


@pytest.mark.parametrize("model", ["tiny_gemma2", "tiny_llama"])
def test_residual_site_equals_the_models_own_hidden_states(model, request):
    lm = request.getfixturevalue(model)
    ids = _ids(lm)
    hidden = lm.model(ids, output_hidden_states=True).hidden_states  # [embeddings, after layer 0, ...]
    acts = capture_sites(lm, ids, ["0-res", "2-res"])
    torch.testing.assert_close(acts[Site(0, "res")], hidden[1], rtol=0, atol=0)
    torch.testing.assert_close(acts[Site(2, "res")], hidden[3], rtol=0, atol=0)


def test_gemma2_mlp_site_is_after_the_post_feedforward_norm_and_att_site_is_before_o_proj(tiny_gemma2):
    """Rebuild block L from its parts: resid_post = resid_pre + post_attn_norm(o_proj(z)) + mlp_out."""
    lm, L = tiny_gemma2, 2
    ids = _ids(lm)
    hidden = lm.model(ids, output_hidden_states=True).hidden_states
    acts = capture_sites(lm, ids, [f"{L}-att", f"{L}-mlp"])
    z, mlp_out = acts[Site(L, "att")], acts[Site(L, "mlp")]
    layer = lm.layers[L]
    with torch.no_grad():
        resid_mid = hidden[L] + layer.post_attention_layernorm(layer.self_attn.o_proj(z))
        expected_mlp_out = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(resid_mid)))
    torch.testing.assert_close(mlp_out, expected_mlp_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resid_mid + mlp_out, hidden[L + 1], rtol=1e-5, atol=1e-5)
    assert z.shape[-1] == 4 * 24 == site_width(lm, Site(L, "att"))  # n_heads * head_dim, not d_model


def test_llama_mlp_site_is_the_mlp_output_and_att_site_is_before_o_proj(tiny_llama):
    lm, L = tiny_llama, 1
    ids = _ids(lm)
    hidden = lm.model(ids, output_hidden_states=True).hidden_states
    acts = capture_sites(lm, ids, [f"{L}-att", f"{L}-mlp"])
    layer = lm.layers[L]
    with torch.no_grad():
        resid_mid = hidden[L] + layer.self_attn.o_proj(acts[Site(L, "att")])
        expected = layer.mlp(layer.post_attention_layernorm(resid_mid))
    torch.testing.assert_close(acts[Site(L, "mlp")], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resid_mid + expected, hidden[L + 1], rtol=1e-5, atol=1e-5)


def test_gemma2_loads_with_eager_attention_so_soft_capping_applies(tiny_gemma2):
    assert tiny_gemma2.model.config._attn_implementation == "eager"
    assert tiny_gemma2.model.config.attn_logit_softcapping == 50.0


def test_forward_pass_stops_after_the_deepest_requested_layer(tiny_gemma2):
    lm = tiny_gemma2
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(lm.layers)]
    try:
        capture_sites(lm, _ids(lm), ["0-mlp", "1-res", "1-att"])
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]


def test_many_sites_in_one_pass_equal_one_site_per_pass(tiny_gemma2):
    lm = tiny_gemma2
    ids = _ids(lm)
    names = ["0-res", "1-mlp", "2-att", "3-res", "3-mlp"]
    together = capture_sites(lm, ids, names)
    for name in names:
        alone = capture_sites(lm, ids, [name])
        torch.testing.assert_close(together[parse_site(name)], alone[parse_site(name)], rtol=0, atol=0)


def test_decoder_layers_that_return_tuples_are_handled(tiny_llama):
    """Older transformers return (hidden, ...) from a decoder layer; the hooks unwrap it."""
    lm = tiny_llama
    ids = _ids(lm)
    expected = capture_sites(lm, ids, ["1-res"])[Site(1, "res")]
    module, where = hook_point(lm, Site(1, "res"))
    assert where == "output"
    original_forward = module.forward
    module.forward = lambda *a, **k: (original_forward(*a, **k), None)
    try:
        got = capture_sites(lm, ids, ["1-res"])[Site(1, "res")]
    finally:
        del module.forward
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
