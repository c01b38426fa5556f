"""The demo's first-run estimate: timed samples of each remaining step, scaled to its sizes."""

from dataclasses import replace

from featurescope.time_estimate import demo_estimate
from featurescope.training import DEMO_CONFIG


def test_estimate_names_only_the_steps_that_will_run_and_scales_with_their_sizes(tiny_llama):
    cfg = replace(DEMO_CONFIG, sites=("0-res", "2-res"), d_sae=64, context_len=32, batch_size=256, train_tokens=256 * 10,
                  corpus_tokens=3100, model_batch=4)
    first = demo_estimate(tiny_llama, cfg, train=True, eval_tokens=2000, precompute_tokens=3100, reuse_pass=True)
    assert list(first) == ["model pass", "training", "evaluation", "precompute"] and all(s > 0 for s in first.values())
    later = demo_estimate(tiny_llama, cfg, train=False, eval_tokens=0, precompute_tokens=3100, reuse_pass=False)
    assert list(later) == ["precompute"]
