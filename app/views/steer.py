"""The steering page: the model's default continuation of a prompt beside the one with features steered,
with each generated token's log-probability and probability (its underline's strength)."""

from __future__ import annotations

import math
from typing import Any

from featurescope.app.catalog import ModelInfo, SAEInfo
from featurescope.app.live import SteerResult
from featurescope.app.stored import TokenTexts, token_texts
from featurescope.app.twin_models import Continuation, SteerView
from featurescope.app.views.encode import live_feature


def steer_view(model: ModelInfo, features: list[tuple[SAEInfo, int, float]], text: str, n_tokens: int,
               temperature: float, seed: int, result: SteerResult | None, limits: dict[str, Any]) -> SteerView:
    vocab = token_texts(model)
    return {
        "model_id": model.id, "text": text, "n_tokens": n_tokens, "temperature": temperature, "seed": seed,
        "features": [dict(live_feature(sae, index, 0.0), strength=strength) for sae, index, strength in features],
        "prompt_tokens": [vocab[t] for t in result.prompt_ids] if result else [],
        "default": _continuation(result.default, vocab) if result else None,
        "steered": _continuation(result.steered, vocab) if result else None,
        "timing": {"model_ms": result.model_ms} if result else None,
        "limits": limits,
    }


def _continuation(generated: Any, vocab: TokenTexts) -> Continuation:
    tokens = [{"token_id": t, "text": vocab[t], "logprob": lp, "probability": math.exp(lp)}
              for t, lp in zip(generated.token_ids, generated.logprobs)]
    return {"text": "".join(vocab[t] for t in generated.token_ids), "tokens": tokens,
            "mean_logprob": sum(generated.logprobs) / max(len(generated.logprobs), 1)}
