"""Detectors: a named handful of features with thresholds and weights, saved from a contrast run, and the
small writable store that keeps them.

A detector is a small JSON document (what `/{model}/-/detectors/{name}.json` answers and what
`featurescope detect` reads):

    {"version": 1, "name": "python-code", "model_id": "smollm2-135m", "sae_ids": ["12-res"], "pool": "max",
     "features": [{"sae_id": "12-res", "index": 431, "threshold": 0.8, "weight": 0.94, "auroc": 0.97}, ...],
     "sets": {"a": {"label": "code", "size": 100, "train": 80, "held_out": 20}, "b": {...}},
     "held_out": {"a": [3, 9, ...], "b": [...]},     # the prompts (by position in their set) the fit never saw
     "held_out_auroc": 0.99, "train_auroc": 1.0, "created": "2025-01-01T12:00:00+00:00"}

The store is one SQLite file beside the published runs (`DATA_DIR/detectors.sqlite`), never a published run
file: those are read-only and replaced whole by each publication. SQLite lets several server processes and
the CLI read and write it at once.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from featurescope.app.contrast import DetectorFeature

STORE_NAME = "detectors.sqlite"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION = 1


class DetectorError(Exception):
    """A bad detector name or document, a name already taken, or a store that cannot be written."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param, self.message = param, message


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise DetectorError("name", f"A detector name is 1 to 64 lowercase letters, digits, '-' or '_', starting with a "
                                    f"letter or digit (got {name!r}).")
    return name


def detector_document(name: str, model_id: str, pool: str, features: list[DetectorFeature], sets: Mapping[str, Any],
                      held_out: Mapping[str, list[int]], held_out_auroc: float, train_auroc: float) -> dict[str, Any]:
    return {"version": VERSION, "name": check_name(name), "model_id": model_id,
            "sae_ids": list(dict.fromkeys(f.sae_id for f in features)), "pool": pool,
            "features": [asdict(f) for f in features], "sets": dict(sets), "held_out": dict(held_out),
            "held_out_auroc": held_out_auroc, "train_auroc": train_auroc,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def detector_features(doc: Mapping[str, Any]) -> list[DetectorFeature]:
    """The features of a detector document, checked."""
    try:
        features = [DetectorFeature(str(f["sae_id"]), int(f["index"]), float(f["threshold"]), float(f["weight"]),
                                    float(f["auroc"])) for f in doc["features"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise DetectorError("detector", f"Not a FeatureScope detector document: {exc!r} in its features.") from None
    if not features:
        raise DetectorError("detector", "The detector has no features.")
    return features


def read_detector_file(path: Path) -> dict[str, Any]:
    """A detector document saved as JSON (the detector page's JSON twin answers it under "detector")."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DetectorError("detector", f"Cannot read detector {path}: {exc}") from None
    doc = doc.get("detector", doc) if isinstance(doc, dict) else doc
    if not isinstance(doc, dict) or doc.get("version") != VERSION or "model_id" not in doc:
        raise DetectorError("detector", f"{path} is not a FeatureScope detector document (version {VERSION}).")
    detector_features(doc)
    return doc


class DetectorStore:
    """Detectors by (model id, name) in one SQLite file, created on first write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10)
        conn.execute("CREATE TABLE IF NOT EXISTS detectors (model_id TEXT NOT NULL, name TEXT NOT NULL, "
                     "created TEXT NOT NULL, doc TEXT NOT NULL, PRIMARY KEY (model_id, name))")
        return conn

    def save(self, doc: Mapping[str, Any]) -> None:
        """Store a new detector; a name already taken for the model is refused (a shared link never changes)."""
        try:
            with self._connect() as conn:
                conn.execute("INSERT INTO detectors VALUES (?, ?, ?, ?)",
                             [doc["model_id"], doc["name"], doc["created"], json.dumps(doc)])
        except sqlite3.IntegrityError:
            raise DetectorError("name", f"Model {doc['model_id']} already has a detector named {doc['name']!r}: "
                                        "choose another name.") from None
        except sqlite3.OperationalError as exc:
            raise DetectorError("name", f"The detector store {self.path} cannot be written: {exc}.") from None

    def get(self, model_id: str, name: str) -> dict[str, Any] | None:
        rows = self._read("SELECT doc FROM detectors WHERE model_id = ? AND name = ?", [model_id, name])
        return json.loads(rows[0][0]) if rows else None

    def find(self, name: str) -> list[dict[str, Any]]:
        """Detectors of that name, whatever their model (the CLI's lookup)."""
        return [json.loads(doc) for (doc,) in self._read("SELECT doc FROM detectors WHERE name = ?", [name])]

    def names(self, model_id: str) -> list[dict[str, Any]]:
        """The model's detectors, newest first, without their held-out indices."""
        docs = [json.loads(doc) for (doc,) in
                self._read("SELECT doc FROM detectors WHERE model_id = ? ORDER BY created DESC, name", [model_id])]
        return [{"name": d["name"], "created": d["created"], "n_features": len(d["features"]), "pool": d["pool"],
                 "held_out_auroc": d["held_out_auroc"], "labels": [d["sets"]["a"]["label"], d["sets"]["b"]["label"]]}
                for d in docs]

    def _read(self, sql: str, params: list[Any]) -> list[tuple]:
        if not self.path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError:
            return []  # created but no table yet
        finally:
            conn.close()
