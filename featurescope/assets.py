"""Where the package data lies: the templates, static files and Alembic migrations that the repository
keeps in its top-level folders and a wheel installs inside the featurescope package."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def asset_dir(name: str) -> Path:
    """The folder of `featurescope.<name>` ('templates', 'static', 'migrations'), installed or editable."""
    spec = importlib.util.find_spec(f"featurescope.{name}")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"FeatureScope's {name}/ folder is missing from this installation.")
    return Path(next(iter(spec.submodule_search_locations)))
