"""Automatic feature labels, used until language-model explanations exist.

A label says what a feature fires on and what it promotes: its most frequent peak tokens (the token at
the maximum of each top example) and its top promoted logit tokens (from W_dec @ W_U), e.g.

    auto_label([" Paris", " Paris", " Rome"], [" France", " Italy"])  ->  'Paris, Rome → France, Italy'

Pure functions on token display strings, so the precompute writer (which stores the label in
features.label with label_kind = LABEL_KIND_AUTO) and the server (for rows written without one)
produce the same text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

LABEL_KIND_AUTO = "auto"

# Whitespace-only tokens would vanish from a label once stripped; name them instead.
_WHITESPACE_NAMES = {"\n": "↵", "\t": "⇥", " ": "␣", "\r": "↵"}


def token_for_label(token: str) -> str:
    """A token as it reads inside a label: surrounding whitespace dropped, whitespace-only tokens shown
    as symbols (newline ↵, tab ⇥, space ␣), inner whitespace collapsed to one space."""
    stripped = " ".join(token.split())
    if stripped:
        return stripped
    return "".join(_WHITESPACE_NAMES.get(ch, "␣") for ch in token[:3]) or "∅"


def most_frequent(tokens: Iterable[str], n: int) -> list[str]:
    """The n most frequent distinct label forms of tokens; ties keep first-seen order."""
    counts = Counter(token_for_label(t) for t in tokens)
    return [form for form, _ in counts.most_common(n)]


def auto_label(peak_tokens: Sequence[str], promoted_tokens: Sequence[str],
               n_peak: int = 3, n_promoted: int = 3) -> str:
    """Label from a feature's peak tokens (one per top example, strongest example first, repeats count)
    and its promoted tokens (strongest first). Either list may be empty (a dead feature has no peaks);
    both empty gives ''."""
    fires_on = most_frequent(peak_tokens, n_peak)
    promotes = []
    for form in (token_for_label(t) for t in promoted_tokens):
        if form not in promotes:
            promotes.append(form)
        if len(promotes) == n_promoted:
            break
    if fires_on and promotes:
        return f"{', '.join(fires_on)} → {', '.join(promotes)}"
    if fires_on:
        return ", ".join(fires_on)
    if promotes:
        return f"→ {', '.join(promotes)}"
    return ""
