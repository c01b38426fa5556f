"""The JumpReLU module computes exactly the Gemma Scope formula, in float32."""

import numpy as np
import pytest
import torch

from conftest import random_sae_params
from featurescope.sae import JumpReLUSAE, SAEConfig


def _sae(params):
    d_in, d_sae = params["W_enc"].shape
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, hook_name="blocks.0.hook_resid_post")
    return JumpReLUSAE(cfg, {k: torch.from_numpy(v) for k, v in params.items()})


def _numpy_jumprelu(x, p):
    pre = x @ p["W_enc"] + p["b_enc"]
    acts = pre * (pre > p["threshold"])
    return pre, acts, acts @ p["W_dec"] + p["b_dec"]


def test_encode_decode_match_a_direct_numpy_evaluation():
    p = random_sae_params(16, 48, seed=3, threshold=0.1)
    x = np.random.default_rng(0).normal(size=(5, 7, 16)).astype(np.float32)
    sae = _sae(p)
    _, acts, recon = _numpy_jumprelu(x, p)
    torch.testing.assert_close(sae.encode(torch.from_numpy(x)).numpy(), acts, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae(torch.from_numpy(x)).numpy(), recon, rtol=1e-5, atol=1e-5)
    assert (acts > 0).any() and (acts == 0).any()


def test_values_exactly_at_the_threshold_are_zero_and_just_above_pass_unchanged():
    d = 4
    p = {"W_enc": np.eye(d, dtype=np.float32), "W_dec": np.eye(d, dtype=np.float32),
         "b_enc": np.zeros(d, np.float32), "b_dec": np.zeros(d, np.float32),
         "threshold": np.array([0.5, 0.5, 0.25, 1.0], np.float32)}
    x = np.array([[0.5, np.nextafter(np.float32(0.5), np.float32(1)), -3.0, 2.0]], np.float32)
    acts = _sae(p).encode(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(acts, [[0.0, x[0, 1], 0.0, 2.0]])
    np.testing.assert_array_equal(acts, _numpy_jumprelu(x, p)[1])


def test_math_is_float32_when_the_model_runs_in_bfloat16():
    p = random_sae_params(16, 32, seed=1)
    sae = _sae(p)
    x = torch.randn(3, 16).to(torch.bfloat16)
    acts = sae.encode(x)
    assert acts.dtype == torch.float32 and sae.decode(acts).dtype == torch.float32
    torch.testing.assert_close(acts, sae.encode(x.float()), rtol=0, atol=0)


def test_parameters_with_the_wrong_shape_are_rejected_with_their_names():
    p = random_sae_params(16, 32)
    p["threshold"] = np.zeros(31, np.float32)
    with pytest.raises(ValueError, match=r"threshold has shape \(31,\), expected \(32,\)"):
        _sae(p)
