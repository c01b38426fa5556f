"""A detector's page: its features (linked to their pages), the sets it was fitted on and its held-out AUROC,
and, given a prompt, its live score per token and for the whole prompt, with the features that fired."""

from __future__ import annotations

from typing import Any

import numpy as np

from featurescope.app.catalog import ModelInfo
from featurescope.app.contrast import detector_scores, token_scores
from featurescope.app.detectors import detector_features
from featurescope.app.live import EncodeResult
from featurescope.app.stored import feature_briefs, token_texts
from featurescope.app.twin_models import DetectorApplied, DetectorView
from featurescope.app.urls import Urls


def detector_view(model: ModelInfo, doc: dict[str, Any], urls: Urls, applied: DetectorApplied | None = None) -> DetectorView:
    rows = []
    for f in detector_features(doc):
        sae = model.saes.get(f.sae_id)
        label = (feature_briefs(sae).labels[f.index] or "") if sae is not None and f.index < sae.d_sae else ""
        rows.append({"sae_id": f.sae_id, "layer": sae.layer if sae is not None else -1, "index": f.index,
                     "threshold": f.threshold, "weight": f.weight, "auroc": f.auroc, "label": label,
                     "url": urls.feature(model.id, f.sae_id, f.index)})
    return {"detector": doc, "features": rows, "applied": applied, "url": urls.detector(model.id, doc["name"])}


def applied_view(model: ModelInfo, doc: dict[str, Any], text: str, result: EncodeResult) -> DetectorApplied:
    """The detector on one prompt encoded with pool=doc["pool"] and its features' columns."""
    features = detector_features(doc)
    pooled = {(f.sae_id, f.index): np.array([result.saes[f.sae_id].pooled[f.index]]) for f in features}
    acts = {(f.sae_id, f.index): np.array(result.saes[f.sae_id].columns[f.index]) for f in features}
    counted = {s: np.array(result.saes[s].counted, dtype=bool) for s in {f.sae_id for f in features}}
    score = float(detector_scores(features, pooled)[0])
    per_token = token_scores(features, acts, counted)
    vocab = token_texts(model)
    first = next(iter(counted.values()))
    tokens = [{"pos": i, "token_id": t, "text": vocab[t], "counted": bool(first[i]), "score": float(per_token[i]),
               "fired": [f"{f.sae_id}:{f.index}" for f in features
                         if counted[f.sae_id][i] and acts[(f.sae_id, f.index)][i] > f.threshold]}
              for i, t in enumerate(result.token_ids)]
    labels = doc["sets"]["a"]["label"], doc["sets"]["b"]["label"]
    return {"text": text, "score": score, "max_score": float(sum(f.weight for f in features if f.weight > 0)),
            "predicted": labels[0] if score > 0 else labels[1],
            "features": [{"sae_id": f.sae_id, "index": f.index, "pooled": float(pooled[(f.sae_id, f.index)][0]),
                          "threshold": f.threshold, "weight": f.weight,
                          "fired": bool(pooled[(f.sae_id, f.index)][0] > f.threshold)} for f in features],
            "tokens": tokens}
