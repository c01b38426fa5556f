"""The Jinja filters of every page: shares, numbers and counts with useful precision, a feature's links
grouped for its side column (token texts with visible whitespace come from app/token_html.py)."""

from __future__ import annotations

import itertools
import math
from operator import itemgetter
from typing import Any

LINK_GROUPS = (("upstream", "Upstream"), ("downstream", "Downstream"), ("alongside", "Same site"))


def percent(share: float | None) -> str:
    """A share of tokens as a percentage with useful precision at every scale (0.0032%, 0.41%, 12.5%)."""
    if share is None or (isinstance(share, float) and math.isnan(share)):
        return "–"
    pct = share * 100
    if pct == 0:
        return "0%"
    if pct >= 1:
        return f"{pct:.1f}%"
    if pct >= 0.01:
        return f"{pct:.2f}%"
    return f"{pct:.2g}%"


def number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}"


def count(value: int | None) -> str:
    return "–" if value is None else f"{value:,}"


def link_groups(links: dict[str, Any]) -> list[tuple[str, str, list[tuple[str, list[dict[str, Any]]]]]]:
    """A feature's cross-layer links (views/feature.py: feature_links) as templates/_links.html lists them: per
    group that has links, (group, title, runs), a run being the consecutive links into one SAE, (sae_id, links)."""
    return [(group, title, [(sae_id, list(run)) for sae_id, run in itertools.groupby(links[group], itemgetter("sae_id"))])
            for group, title in LINK_GROUPS if links[group]]
