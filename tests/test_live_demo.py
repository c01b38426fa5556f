"""The demo's own stack end to end: SmolLM2 with SAEs trained by the demo recipe at the demo's four
sites (narrower and on a short budget: values, not quality, are under test), a real precompute run, and the server's
live encoder, which must give every SAE's stored activations back for the same contexts (stored from the
training pass's activations, as the demo does)."""

from __future__ import annotations

from dataclasses import replace

import duckdb
import numpy as np
import pytest

from featurescope.app import Settings, create_app
from featurescope.app.live import LiveService
from featurescope.training import DEMO_CONFIG, ActivationStream, default_contexts, train_saes
from featurescope.precompute.job import PrecomputeConfig, run_precompute


@pytest.mark.slow
def test_live_encoding_equals_precompute_for_every_demo_sae(smollm2, tmp_path):
    from fastapi.testclient import TestClient

    cfg = replace(DEMO_CONFIG, d_sae=256, corpus_tokens=8192, held_out_contexts=4, train_tokens=8192, buffer_tokens=8192,
                  batch_size=2048, lr_warmup_steps=1, sparsity_warmup_steps=2, checkpoint_every=0, progress=False)
    # as the demo runs it: the precompute encodes the training pass's activations of the same contexts
    stream = ActivationStream(smollm2, default_contexts(smollm2, cfg)[0], cfg)
    folders = train_saes(smollm2, cfg, tmp_path / "saes", stream=stream)
    assert stream.site_activations() is not None
    run = PrecomputeConfig(model="smollm2-135m", saes=[str(f) for f in folders.values()], max_tokens=cfg.corpus_tokens,
                           sample="spread", context_len=128, batch_size=8, top_k=4, n_intervals=2,
                           examples_per_interval=1, device="cpu", data_dir=str(tmp_path / "data"), progress=False)
    published = run_precompute(run, lm=smollm2, log=lambda *_: None, site_acts=stream.site_activations())
    con = duckdb.connect(str(published), read_only=True)
    sae_ids = [r[0] for r in con.execute("SELECT id FROM saes ORDER BY layer").fetchall()]
    rows = con.execute("SELECT e.sae_id, e.feature, e.positions, e.acts, c.token_ids, c.starts_document FROM examples e "
                       "JOIN contexts c USING (run_id, context_id) WHERE e.kind = 'top' AND e.rank = 0 "
                       "ORDER BY e.sae_id, e.max_act DESC").fetchall()
    con.close()
    assert sae_ids == ["6-res-256", "12-res-256", "18-res-256", "24-res-256"]

    settings = Settings(data_dir=tmp_path / "data", device="cpu")
    app = create_app(settings, LiveService(settings, preloaded={"smollm2-135m": smollm2}))
    with TestClient(app) as client:
        for sae_id in sae_ids:
            mine = [r for r in rows if r[0] == sae_id][:4]
            assert mine, f"{sae_id} stored no examples"
            for _, feature, positions, acts, token_ids, starts_document in mine:
                body = client.get("/smollm2-135m/-/encode.json", params={
                    "ids": ",".join(map(str, token_ids)), "saes": [sae_id], "feature": f"{sae_id}:{feature}",
                    "mid_document": int(not starts_document)}).json()
                (layer,) = body["layers"]
                # BOS, EOS, attention-sink outliers and a mid-document context's warm-up never count
                counted = np.array(layer["counted"])
                stored = np.zeros(len(token_ids))
                stored[list(positions)] = acts
                live = np.array(body["highlight"]["acts"])
                # fp32 throughout, but a context alone and inside the training pass's batch take different GEMM blockings
                # through up to 24 layers: CI's CPU measured 3.6e-5 relative on a 50.6 activation. A wrong
                # position, SAE or site is off by whole units.
                np.testing.assert_allclose(live[counted], stored[counted], rtol=2e-4, atol=1e-4)
                assert not stored[~counted].any()
