"""The feature page's test box: one feature's activation on every token of a text, from the live encoder."""

from __future__ import annotations

from featurescope.app.catalog import ModelInfo, SAEInfo
from featurescope.app.live import EncodeResult
from featurescope.app.stored import token_texts
from featurescope.app.twin_models import FeatureTestView
from featurescope.app.views.encode import live_feature


def feature_test_view(model: ModelInfo, sae: SAEInfo, index: int, text: str, result: EncodeResult) -> FeatureTestView:
    """One feature's activation on every token of the test box's text."""
    vocab = token_texts(model)
    enc = result.saes[sae.id]
    acts = enc.columns.get(index, [0.0] * len(result.token_ids))
    row = live_feature(sae, index, max((a for a, c in zip(acts, enc.counted) if c), default=0.0))
    return {"model_id": model.id, "sae_id": sae.id, "index": index, "text": text, "max_act": row["max_act"],
            "activation": row["activation"], "relative": row["relative"],
            "tokens": [{"pos": i, "token_id": t, "text": vocab[t], "activation": a, "counted": c}
                       for i, (t, a, c) in enumerate(zip(result.token_ids, acts, enc.counted))],
            "timing": {"queue_ms": result.queue_ms, "model_ms": result.model_ms, "batch_size": result.batch_size}}

