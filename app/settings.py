"""The explorer's one configuration object. `featurescope serve` builds it from its options; tests build it
directly (create_app(Settings(data_dir=...))). Nothing here is read at import time."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from featurescope.cli_options import setting

HTMX_VERSION = "2.0.11"
HTMX_CDN_URL = f"https://unpkg.com/htmx.org@{HTMX_VERSION}/dist/htmx.min.js"
# Subresource integrity of that exact file (npm's htmx.org 2.0.11 dist/htmx.min.js, which unpkg serves as is).
HTMX_CDN_INTEGRITY = "sha384-2OatzQy1H+Zd/IIrjr1TcuDGqLXeHhbooAyJY1KdQMKnr4LZ22k31GBLdYKHmVjg"
# Where `npm install htmx.org@2` (scripts/install_test_tools.sh, run in the project folder) puts the local copy:
# relative to the folder the server starts in.
DEFAULT_LOCAL_HTMX = Path("node_modules") / "htmx.org" / "dist" / "htmx.min.js"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = setting(Path("data"), "Data dir whose db/*.duckdb files (published precompute runs) are served.")
    host: str = setting("127.0.0.1", "Interface to bind; the default keeps the explorer on this machine.")
    port: int = setting(8000, "TCP port.")
    htmx_url: str = setting(HTMX_CDN_URL, "Where pages load htmx 2 from (default: its CDN).")
    # When set, this file is served at /-/static/htmx.min.js and pages load htmx from there instead of htmx_url.
    local_htmx: Path | None = setting(None, cli=False)  # `serve --local-htmx` or `--htmx-file`
    rescan_seconds: float = setting(1.0, cli=False)  # how often, at most, a request re-lists data_dir/db for new publications
    page_size: int = setting(50, cli=False)  # rows of the SAE page's feature table
    # each opens the databases read-only on its own; `serve` decides the default (app/serving.py: default_workers)
    workers: int = setting(1, "Server processes; each loads its own copy of the models for live encoding [default: 1, "
                           "or one per CPU core (at most 8) with --no-live].", cli_default=None, min=1)
    # Live encoding (app/live.py): the models and SAEs of the published runs, loaded by the server itself.
    live: bool = setting(True, "Live encoding, search and steering (loads each model and its SAEs into the server).")
    load_models: str = setting("first-use", "When the server loads models for live encoding: 'startup' (in the "
                               "background) or 'first-use'.", flags=("--load",), cli_default="startup")
    device: str = setting("auto", "auto, cpu, cuda or mps.")
    dtype: str | None = setting(None, "Model dtype for live encoding (default: the one the precompute run used, so "
                                "live values equal stored ones).")
    sae_memory_budget: int | None = setting(None, "Memory for the SAEs live encoding holds, e.g. 4GB (default: half the "
                                            "device's free memory once the model is loaded, which holds every SAE when "
                                            "they fit); SAEs load on first use and the least recently used make room.")
    max_prompt_tokens: int = setting(512, "Longest prompt live encoding accepts, in tokens (BOS included).", min=2)
    max_batch: int = setting(16, "Concurrent requests that share one forward pass.", min=1)
    max_queue: int = setting(64, "Requests waiting per model before the server answers 503 + Retry-After.", min=1)
    max_wait_seconds: float = setting(10.0, "Admit a live request only when the work queued ahead of it plus its own "
                                      "is expected to be done within this many seconds; otherwise 503 + "
                                      "Retry-After at once.",
                                      flags=("--max-wait",), min=0.0)
    max_steer_jobs: int = setting(4, "Steering jobs (which hold the model longest) waiting per model before the "
                                  "server answers 503 + Retry-After.", min=1)
    max_new_tokens: int = setting(64, "Longest continuation steering generates.", min=1)
    max_contrast_prompts: int = setting(500, "Most prompts per set a contrast run accepts.", min=1)
    live_timeout_seconds: float = setting(300.0, cli=False)  # a request gives up waiting (model load included) after this

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.load_models not in ("startup", "first-use"):
            raise ValueError(f"load_models must be 'startup' or 'first-use', not {self.load_models!r}.")
        if self.local_htmx is not None:
            object.__setattr__(self, "local_htmx", Path(self.local_htmx))
            if not self.local_htmx.is_file():
                raise FileNotFoundError(f"Local htmx file {self.local_htmx} does not exist "
                                        "(bash scripts/install_test_tools.sh puts one in node_modules/).")

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        return cls(**json.loads(text))

    @property
    def db_dir(self) -> Path:
        return self.data_dir / "db"

    @property
    def htmx_integrity(self) -> str | None:
        return HTMX_CDN_INTEGRITY if self.local_htmx is None and self.htmx_url == HTMX_CDN_URL else None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"
