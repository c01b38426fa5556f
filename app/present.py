"""HTML presentation of token sequences: which tokens of an example to show, how whitespace is made
visible, and how strongly each token is highlighted.

A token's highlight intensity is its activation divided by the feature's maximum activation, so top
examples and interval samples share one scale; the exact value is the token's hover title.

Example rows (their token spans included) are the one piece of HTML built outside Jinja (a feature page
holds ~45 rows and hundreds of spans, and the template loop cost more than the database): each vocabulary
entry's text goes through markupsafe.escape, the function Jinja's autoescape calls, once when the
vocabulary is loaded; the only other values in a row are CSS class names from this module, integers and
formatted floats.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Literal

from markupsafe import Markup, escape

from featurescope.app.data import TokenTexts

ContextMode = Literal["snippet", "full"]
SNIPPET_BEFORE, SNIPPET_AFTER = 12, 4  # tokens shown around an example's maximum in snippet mode
LINK_GROUPS = (("upstream", "Upstream"), ("downstream", "Downstream"), ("alongside", "Same site"))
_UNKNOWN = '<span class="t special">&lt;unk {}&gt;</span>'  # a token id outside the vocabulary
_MARKS = str.maketrans({" ": "·", "\n": "↵", "\t": "⇥", "\r": "↵"})


@dataclass(frozen=True)
class TokenForms:
    """Per vocabulary entry: CSS classes and escaped visible text, plus the finished span for the common
    case of a token that does not fire."""
    css: list[str]
    text: list[str]  # already escaped
    quiet: list[str]


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


def visible(text: str) -> str:
    """Token text with its whitespace drawn: · for a space, ↵ for a newline, ⇥ for a tab."""
    return text.translate(_MARKS) if text else "∅"


def display_form(text: str, special: bool) -> tuple[str, str]:
    """(css classes, visible text) of one token. Whitespace becomes visible marks; a single leading space,
    the commonest case, is drawn by CSS as a faint dot so the word itself stays readable."""
    if special:
        return "special", text
    if text == "":
        return "ws", "∅"
    if text.isspace():
        return ("ws nl" if "\n" in text else "ws"), text.translate(_MARKS)
    css = "nl" if text.endswith("\n") else ""
    if text[0] == " " and not text[1:2].isspace():
        return ("lead " + css).strip(), text[1:].translate(_MARKS)
    return css, text.translate(_MARKS)


def display_forms(vocab: TokenTexts, special_ids: tuple[int, ...]) -> TokenForms:
    """display_form of every token of a vocabulary, escaped, computed once per loaded vocabulary."""
    forms = vocab.derived.get("display_forms")
    if forms is None:
        special = set(special_ids)
        css, text, quiet = [], [], []
        for i, t in enumerate(vocab.texts):
            c, shown = display_form(t, i in special)
            shown = str(escape(shown))
            css.append(c)
            text.append(shown)
            quiet.append(f'<span class="t {c}">{shown}</span>' if c else f'<span class="t">{shown}</span>')
        forms = TokenForms(css, text, quiet)
        vocab.derived["display_forms"] = forms
    return forms


def token_spans(example: dict[str, Any], scale: float, mode: ContextMode, forms: TokenForms) -> str:
    """An example's tokens as spans: snippet mode shows SNIPPET_BEFORE tokens before its maximum and
    SNIPPET_AFTER after it. Most tokens do not fire: their finished span comes from `forms.quiet`, and only
    the few that fire, and the maximum, are built here."""
    token_ids, max_pos = example["token_ids"], example["max_pos"]
    if mode == "snippet":
        start, stop = max(0, max_pos - SNIPPET_BEFORE), min(len(token_ids), max_pos + SNIPPET_AFTER + 1)
    else:
        start, stop = 0, len(token_ids)
    quiet, n_forms = forms.quiet, len(forms.quiet)
    parts = [quiet[t] if 0 <= t < n_forms else _UNKNOWN.format(int(t)) for t in token_ids[start:stop]]
    acts = dict(zip(example["positions"], example["acts"]))
    for pos, act in acts.items():
        if act > 0 and start <= pos < stop and pos != max_pos:
            parts[pos - start] = _firing_span(token_ids[pos], act, scale, "", forms)
    if start <= max_pos < stop:
        parts[max_pos - start] = _firing_span(token_ids[max_pos], acts.get(max_pos, 0.0), scale, " peak", forms)
    before = '<span class="ctx"><span class="cut">…</span>' if start > 0 else '<span class="ctx">'
    after = '<span class="cut">…</span></span>' if stop < len(token_ids) else "</span>"
    return before + "".join(parts) + after


def _firing_span(token_id: int, act: float, scale: float, peak: str, forms: TokenForms) -> str:
    if not 0 <= token_id < len(forms.css):
        return _UNKNOWN.format(int(token_id))
    style = f' style="--a:{min(act * scale, 1.0):.2f}" title="{act:.6g}"' if act > 0 else ""
    return f'<span class="t {forms.css[token_id]}{peak}"{style}>{forms.text[token_id]}</span>'


def example_rows(examples: list[dict[str, Any]], feature_max: float, mode: ContextMode, forms: TokenForms) -> Markup:
    """The <li> rows of templates/_examples.html's example lists: the example's maximum, then its tokens."""
    scale = 1.0 / feature_max if feature_max > 0 else 0.0
    return Markup("".join(
        f'<li class="example"><span class="act" title="maximum activation of this example, at token {e["max_pos"]:d} '
        f'of context {e["context_id"]:d}">{number(e["max_act"], 3)}</span>{token_spans(e, scale, mode, forms)}</li>\n'
        for e in examples))


def show_examples(feature: dict[str, Any], mode: ContextMode, forms: TokenForms) -> dict[str, Any]:
    """Top examples and interval samples of a feature_view as rows for templates/_examples.html: `top`, and
    per interval (highest first) its lo, hi, share and `shown`."""
    feature_max = feature["max_act"] or 0.0
    return {
        "top": example_rows(feature["top_examples"], feature_max, mode, forms),
        "intervals": [dict(interval, shown=example_rows(interval["examples"], feature_max, mode, forms))
                      for interval in reversed(feature["intervals"])],
    }


def link_groups(links: dict[str, Any]) -> list[tuple[str, str, list[tuple[str, list[dict[str, Any]]]]]]:
    """A feature's cross-layer links (data.feature_links) as templates/_links.html lists them: per group that
    has links, (group, title, runs), a run being the consecutive links into one SAE, (sae_id, links)."""
    return [(group, title, [(sae_id, list(run)) for sae_id, run in itertools.groupby(links[group], itemgetter("sae_id"))])
            for group, title in LINK_GROUPS if links[group]]
