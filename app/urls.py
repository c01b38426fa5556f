"""Every URL the explorer links to, built in one place (templates and routes never glue paths by hand).

    urls.feature("gemma-2-2b", "20-res-16k", 12345)               -> /gemma-2-2b/20-res-16k/12345
    urls.feature("gemma-2-2b", "20-res-16k", 12345, fmt="json")   -> /gemma-2-2b/20-res-16k/12345.json
    urls.sae("gemma-2-2b", "20-res-16k", sort="density", desc=1)  -> /gemma-2-2b/20-res-16k?sort=density&desc=1
    urls.lineage("gemma-2-2b", "20-res-16k", 12345, breadth=2)    -> /gemma-2-2b/20-res-16k/12345/-/lineage?breadth=2
    urls.encode("gemma-2-2b", text="Paris")                       -> /gemma-2-2b/-/encode?text=Paris
    urls.feature("gemma-2-2b", "20-res-16k", 12345, run="3f2a9c")  -> /gemma-2-2b/20-res-16k/12345?run=3f2a9c

An SAE precomputed over several corpora has one run each; `run=` (a run id) picks one, and a page that
names its run passes it to every link it builds (None, the default, is the newest run).

Model and SAE ids are data, so the app's own pages live under /-/ (at the top, or below the model, SAE or
feature they are about) where no id can collide with them: an SAE may be called "encode".
"""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import quote, urlencode

from featurescope.app.settings import Settings

APP_PREFIX = "/-"
LOCAL_HTMX_PATH = f"{APP_PREFIX}/static/htmx.min.js"


@functools.lru_cache(maxsize=4096)  # a feature page links ~30 times to a handful of model and SAE ids
def _segment(value: str | int) -> str:
    return quote(str(value), safe="")


def _with(path: str, fmt: str | None, params: dict[str, Any]) -> str:
    if fmt:
        path = f"{path}.{fmt}"
    if not params:
        return path
    query = urlencode({k: v for k, v in params.items() if v is not None and v != "" and v != []}, doseq=True)
    return f"{path}?{query}" if query else path


class Urls:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def home(self, fmt: str | None = None) -> str:
        return "/.json" if fmt == "json" else "/"

    def model(self, model_id: str, fmt: str | None = None) -> str:
        return _with(f"/{_segment(model_id)}", fmt, {})

    def sae(self, model_id: str, sae_id: str, fmt: str | None = None, **params: Any) -> str:
        return _with(f"/{_segment(model_id)}/{_segment(sae_id)}", fmt, params)

    def feature(self, model_id: str, sae_id: str, index: int, fmt: str | None = None, **params: Any) -> str:
        return _with(f"/{_segment(model_id)}/{_segment(sae_id)}/{int(index)}", fmt, params)

    def feature_test(self, model_id: str, sae_id: str, index: int, fmt: str | None = None, **params: Any) -> str:
        return _with(f"/{_segment(model_id)}/{_segment(sae_id)}/{int(index)}{APP_PREFIX}/test", fmt, params)

    def encode(self, model_id: str, fmt: str | None = None, **params: Any) -> str:
        """/{model}/-/encode?text=...; list values (saes=[...]) repeat the parameter."""
        return _with(f"/{_segment(model_id)}{APP_PREFIX}/encode", fmt, params)

    def explanations(self, model_id: str, fmt: str | None = None, **params: Any) -> str:
        """/{model}/-/explanations?q=...: search the explanations of every SAE of the model."""
        return _with(f"/{_segment(model_id)}{APP_PREFIX}/explanations", fmt, params)

    def steer(self, model_id: str, fmt: str | None = None, **params: Any) -> str:
        return _with(f"/{_segment(model_id)}{APP_PREFIX}/steer", fmt, params)

    def lineage(self, model_id: str, sae_id: str, index: int, fmt: str | None = None, **params: Any) -> str:
        """/{model}/{sae}/{index}/-/lineage: the feature's strongest links through every layer with an SAE."""
        return _with(f"/{_segment(model_id)}/{_segment(sae_id)}/{int(index)}{APP_PREFIX}/lineage", fmt, params)

    def contrast(self, model_id: str, fmt: str | None = None) -> str:
        """/{model}/-/contrast: which features separate two sets of prompts."""
        return _with(f"/{_segment(model_id)}{APP_PREFIX}/contrast", fmt, {})

    def contrast_run(self, model_id: str, run_id: str, fmt: str | None = None, **params: Any) -> str:
        return _with(f"/{_segment(model_id)}{APP_PREFIX}/contrast/{_segment(run_id)}", fmt, params)

    def contrast_cancel(self, model_id: str, run_id: str) -> str:
        return f"/{_segment(model_id)}{APP_PREFIX}/contrast/{_segment(run_id)}/cancel"

    def contrast_detector(self, model_id: str, run_id: str, fmt: str | None = None) -> str:
        """POST: save a detector from the run."""
        return _with(f"/{_segment(model_id)}{APP_PREFIX}/contrast/{_segment(run_id)}/detector", fmt, {})

    def detector(self, model_id: str, name: str, fmt: str | None = None, **params: Any) -> str:
        """/{model}/-/detectors/{name}: a saved detector; ?text=... applies it live."""
        return _with(f"/{_segment(model_id)}{APP_PREFIX}/detectors/{_segment(name)}", fmt, params)

    def feature_vector(self, model_id: str, sae_id: str, index: int, part: str, fmt: str = "npy") -> str:
        """/{model}/{sae}/{index}/-/decoder.npy (or encoder.npy, threshold.npy, vectors.json): the feature's weights."""
        return f"/{_segment(model_id)}/{_segment(sae_id)}/{int(index)}{APP_PREFIX}/{part}.{fmt}"

    def random_feature(self, model_id: str, sae_id: str, **params: Any) -> str:
        return _with(f"/{_segment(model_id)}/{_segment(sae_id)}{APP_PREFIX}/random", None, params)

    def jump(self, model_id: str, sae_id: str, **params: Any) -> str:
        return _with(f"/{_segment(model_id)}/{_segment(sae_id)}{APP_PREFIX}/jump", None, params)

    def static(self, name: str) -> str:
        return f"{APP_PREFIX}/static/{name}"

    def htmx(self) -> str:
        return LOCAL_HTMX_PATH if self.settings.local_htmx is not None else self.settings.htmx_url

    def health(self) -> str:
        return f"{APP_PREFIX}/health"

    def docs(self) -> str:
        return f"{APP_PREFIX}/docs"

    def openapi(self) -> str:
        return f"{APP_PREFIX}/openapi.json"
