"""The contrast page: its form (which SAEs, pools and limits), and a run's progress and ranking, per SAE and
across layers, each row with its per-prompt activations (the strip)."""

from __future__ import annotations

from featurescope.app.catalog import ModelInfo
from featurescope.app.contrast import POOLS, Ranked, rank
from featurescope.app.contrast_runs import ContrastRun
from featurescope.app.prompt_sets import MAX_UPLOAD_BYTES
from featurescope.app.settings import Settings
from featurescope.app.stored import feature_briefs
from featurescope.app.twin_models import ContrastFormView, ContrastRow, ContrastRunView, DetectorBrief
from featurescope.app.urls import Urls

DEFAULT_TOP = 20
MAX_TOP = 200


def contrast_form_view(model: ModelInfo, settings: Settings, detectors: list[DetectorBrief]) -> ContrastFormView:
    return {"model_id": model.id, "live": bool(settings.live),
            "saes": [{"id": s.id, "site": s.site, "layer": s.layer, "d_sae": s.d_sae} for s in model.saes.values()],
            "pools": list(POOLS),
            "limits": {"max_prompts": settings.max_contrast_prompts, "max_upload_bytes": MAX_UPLOAD_BYTES,
                       "max_prompt_tokens": settings.max_prompt_tokens},
            "detectors": detectors}


def contrast_run_view(model: ModelInfo, run: ContrastRun, top: int, urls: Urls) -> ContrastRunView:
    request = run.request
    done = run.state == "done"
    per_sae = []
    for sae in request.saes if done else []:
        rows = rank({sae.id: run.scores[sae.id]}, top=top)
        per_sae.append({"sae_id": sae.id, "layer": sae.layer, "site": sae.site, "rows": [_row(model, run, r, urls) for r in rows]})
    return {"model_id": model.id, "run_id": run.id, "state": run.state, "done": run.done, "total": run.total,
            "error": run.error, "seconds": run.seconds, "pool": request.pool, "labels": list(request.labels),
            "sizes": [len(request.a), len(request.b)], "saes": [s.id for s in request.saes], "top": top,
            "across": [_row(model, run, r, urls) for r in rank(run.scores, top=top)] if done else [],
            "per_sae": per_sae,
            "urls": {"run": urls.contrast_run(model.id, run.id), "cancel": urls.contrast_cancel(model.id, run.id),
                     "detector": urls.contrast_detector(model.id, run.id)}}


def _row(model: ModelInfo, run: ContrastRun, r: Ranked, urls: Urls) -> ContrastRow:
    sae = model.saes[r.sae_id]
    brief = feature_briefs(sae)
    return {"sae_id": r.sae_id, "layer": sae.layer, "index": r.index, "label": brief.labels[r.index] or "",
            "density": float(brief.density[r.index]), "auroc": r.auroc, "separation": r.separation,
            "direction": r.direction, "diff": r.diff, "mean_a": r.mean_a, "mean_b": r.mean_b, "fired_a": r.fired_a,
            "fired_b": r.fired_b, "n_a": r.n_a, "n_b": r.n_b, "url": urls.feature(model.id, r.sae_id, r.index),
            "strip_a": run.pooled["a"][r.sae_id][:, r.index].tolist(),
            "strip_b": run.pooled["b"][r.sae_id][:, r.index].tolist()}
