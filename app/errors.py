"""Errors the data layer raises and the web layer turns into 404/422 pages and JSON errors.
They carry the nearest valid choices as data; app/main.py's handlers turn those into links."""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class NotFound(Exception):
    """An unknown model, SAE, feature index or run of an SAE. `choices` are ids of the same kind worth offering;
    `valid_range` is (first, last) for feature indices."""

    def __init__(self, kind: str, missing: str, message: str, *, model_id: str | None = None, sae_id: str | None = None,
                 choices: Sequence[str | int] = (), valid_range: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.kind, self.missing, self.message = kind, missing, message
        self.model_id, self.sae_id = model_id, sae_id
        self.choices, self.valid_range = list(choices), valid_range


class InvalidParameter(Exception):
    """A query parameter that passed type checks but makes no sense (e.g. min_density > max_density)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name, self.message = name, message


def nearest_names(missing: str, names: Sequence[str], limit: int = 5) -> list[str]:
    """Close matches first; with few names, all of them (a short list is a better offer than nothing)."""
    close = difflib.get_close_matches(missing, names, n=limit, cutoff=0.5)
    if len(names) <= limit:
        return close + [n for n in sorted(names) if n not in close]
    return close
