"""HTML presentation of token sequences: which tokens of an example to show, how whitespace is made
visible, and how strongly each token is highlighted.

A token's highlight intensity is its activation divided by the feature's maximum activation, so top
examples and interval samples share one scale; the exact value is the token's hover title.

Token spans are the one piece of HTML built outside Jinja (a feature page holds hundreds of them, and
the template loop cost more than the database): each vocabulary entry's text goes through
markupsafe.escape, the function Jinja's autoescape calls, once when the vocabulary is loaded; the
only other values in a span are CSS class names from this module and formatted floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from markupsafe import Markup, escape

from app.data import TokenTexts

ContextMode = Literal["snippet", "full"]
SNIPPET_BEFORE, SNIPPET_AFTER = 12, 4  # tokens shown around an example's maximum in snippet mode
_MARKS = str.maketrans({" ": "·", "\n": "↵", "\t": "⇥", "\r": "↵"})


@dataclass(frozen=True)
class ShownExample:
    html: Markup  # the token spans
    max_act: float
    max_pos: int
    context_id: int


@dataclass(frozen=True)
class TokenForms:
    """Per vocabulary entry: CSS classes and escaped visible text, plus the finished span for the common
    case of a token that does not fire."""
    css: list[str]
    text: list[str]  # already escaped
    quiet: list[str]


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


def show_example(example: dict[str, Any], feature_max: float, mode: ContextMode, forms: TokenForms) -> ShownExample:
    token_ids, max_pos = example["token_ids"], example["max_pos"]
    if mode == "snippet":
        start, stop = max(0, max_pos - SNIPPET_BEFORE), min(len(token_ids), max_pos + SNIPPET_AFTER + 1)
    else:
        start, stop = 0, len(token_ids)
    acts = dict(zip(example["positions"], example["acts"]))
    scale = 1.0 / feature_max if feature_max > 0 else 0.0
    n_forms = len(forms.quiet)
    parts = ['<span class="ctx">']
    if start > 0:
        parts.append('<span class="cut">…</span>')
    for pos in range(start, stop):
        token_id = token_ids[pos]
        if not 0 <= token_id < n_forms:
            parts.append(f'<span class="t special">&lt;unk {int(token_id)}&gt;</span>')
            continue
        act = acts.get(pos, 0.0)
        if act <= 0 and pos != max_pos:
            parts.append(forms.quiet[token_id])
            continue
        css = forms.css[token_id] + (" peak" if pos == max_pos else "")
        style = f' style="--a:{min(act * scale, 1.0):.2f}" title="{act:.6g}"' if act > 0 else ""
        parts.append(f'<span class="t {css}"{style}>{forms.text[token_id]}</span>')
    if stop < len(token_ids):
        parts.append('<span class="cut">…</span>')
    parts.append("</span>")
    return ShownExample(Markup("".join(parts)), example["max_act"], max_pos, example["context_id"])


def show_examples(feature: dict[str, Any], mode: ContextMode, forms: TokenForms) -> dict[str, Any]:
    """Top examples and interval samples of a feature_view, ready for templates/_examples.html."""
    feature_max = feature["max_act"] or 0.0
    return {
        "top": [show_example(e, feature_max, mode, forms) for e in feature["top_examples"]],
        "intervals": [dict(interval, shown=[show_example(e, feature_max, mode, forms) for e in interval["examples"]])
                      for interval in reversed(feature["intervals"])],
    }
