"""The explorer's one configuration object. `featurescope serve` builds it from its options; tests build it
directly (create_app(Settings(data_dir=...))). Nothing here is read at import time."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

HTMX_VERSION = "2.0.11"
HTMX_CDN_URL = f"https://unpkg.com/htmx.org@{HTMX_VERSION}/dist/htmx.min.js"
# Subresource integrity of that exact file (npm's htmx.org 2.0.11 dist/htmx.min.js, which unpkg serves as is).
HTMX_CDN_INTEGRITY = "sha384-2OatzQy1H+Zd/IIrjr1TcuDGqLXeHhbooAyJY1KdQMKnr4LZ22k31GBLdYKHmVjg"
# Where `npm install htmx.org@2` (scripts/install_test_tools.sh, run in the project folder) puts the local copy:
# relative to the folder the server starts in.
DEFAULT_LOCAL_HTMX = Path("node_modules") / "htmx.org" / "dist" / "htmx.min.js"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")  # published databases are data_dir/db/*.duckdb
    host: str = "127.0.0.1"
    port: int = 8000
    htmx_url: str = HTMX_CDN_URL
    # When set, this file is served at /-/static/htmx.min.js and pages load htmx from there instead of htmx_url.
    local_htmx: Path | None = None
    rescan_seconds: float = 1.0  # how often, at most, a request re-lists data_dir/db for new publications
    page_size: int = 50  # rows of the SAE page's feature table
    workers: int = 1  # server processes; each opens the databases read-only on its own
    # Live encoding (app/live.py): the models and SAEs of the published runs, loaded by the server itself.
    live: bool = True
    load_models: str = "first-use"  # "startup": load every model and SAE in the background when serving starts
    device: str = "auto"
    dtype: str | None = None  # None: the dtype the precompute run used, so live values equal stored ones
    max_prompt_tokens: int = 512  # BOS included
    max_batch: int = 16  # requests that share one forward pass
    max_queue: int = 64  # requests waiting per model before the server answers 503
    max_wait_seconds: float = 10.0  # admit a request only when the work ahead plus its own should be done within this
    max_steer_jobs: int = 4  # steering jobs waiting per model (they hold the model longest)
    max_new_tokens: int = 64  # steering: tokens generated per continuation
    live_timeout_seconds: float = 300.0  # a request gives up waiting (model load included) after this

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
