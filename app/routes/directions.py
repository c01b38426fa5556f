"""A feature's weights as files, for steering or probing elsewhere: its decoder row and encoder column
(float32 [d_in]) and its threshold as .npy, or all of them (with the encoder bias) as one JSON object.

    /{model}/{sae}/{index}/-/decoder.npy   /-/encoder.npy   /-/threshold.npy   /-/vectors.json

The weights come from the SAE the live encoder serves (its source as the precompute run recorded it), so
these need live encoding; a --no-live server answers 503 saying so.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from featurescope.app.catalog import check_index
from featurescope.app.deps import CatalogDep, RendererDep, SettingsDep
from featurescope.app.urls import APP_PREFIX

router = APIRouter(tags=["features"])

PARTS = ("decoder", "encoder", "threshold")


def _vectors(request: Request, catalog: CatalogDep, settings: SettingsDep, model_id: str, sae_id: str, index: int) -> dict:
    model, sae = catalog.model(model_id), catalog.sae(model_id, sae_id)
    check_index(sae, index)
    return request.app.state.live.model(model).feature_vectors(sae, index, settings.live_timeout_seconds)


@router.get("/{model_id}/{sae_id}/{index}" + APP_PREFIX + "/vectors.json", include_in_schema=False)
def vectors_json(request: Request, model_id: str, sae_id: str, index: int, catalog: CatalogDep, settings: SettingsDep,
                 render: RendererDep) -> Response:
    v = _vectors(request, catalog, settings, model_id, sae_id, index)
    return render.json({"model_id": model_id, "sae_id": sae_id, "index": index, "d_in": int(v["decoder"].shape[0]),
                        "decoder": v["decoder"].tolist(), "encoder": v["encoder"].tolist(),
                        "threshold": v["threshold"], "b_enc": v["b_enc"]})


@router.get("/{model_id}/{sae_id}/{index}" + APP_PREFIX + "/{part}.npy", include_in_schema=False)
def vector_npy(request: Request, model_id: str, sae_id: str, index: int, part: Literal["decoder", "encoder", "threshold"],
               catalog: CatalogDep, settings: SettingsDep) -> Response:
    v = _vectors(request, catalog, settings, model_id, sae_id, index)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(v[part], dtype=np.float32))
    filename = f"{model_id}-{sae_id}-{index}-{part}.npy".replace("/", "_").replace('"', "_")
    return Response(buffer.getvalue(), media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})
