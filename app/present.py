"""HTML presentation of token sequences: which tokens of an example to show, how whitespace is made
visible, and how strongly each token is highlighted. Pure Python; the templates only loop and escape.

A token's highlight intensity is its activation divided by the feature's maximum activation, so top
examples and interval samples share one scale; the exact value is the token's hover title.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from app.data import TokenTexts

ContextMode = Literal["snippet", "full"]
SNIPPET_BEFORE, SNIPPET_AFTER = 12, 4  # tokens shown around an example's maximum in snippet mode
_MARKS = str.maketrans({" ": "·", "\n": "↵", "\t": "⇥", "\r": "↵"})


@dataclass(frozen=True, slots=True)
class ShownToken:
    css: str  # "lead" (one leading space, drawn as a faint dot), "ws", "nl", "special", "peak"
    text: str
    alpha: float  # 0..1 highlight intensity; 0 = not firing
    title: str  # exact activation, empty when the token does not fire


@dataclass(frozen=True)
class ShownExample:
    tokens: list[ShownToken]
    max_act: float
    max_pos: int
    context_id: int
    cut_left: bool
    cut_right: bool


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


def display_forms(vocab: TokenTexts, special_ids: tuple[int, ...]) -> list[tuple[str, str]]:
    """display_form of every token of a vocabulary, computed once per loaded vocabulary."""
    forms = vocab.derived.get("display_forms")
    if forms is None:
        special = set(special_ids)
        forms = [display_form(t, i in special) for i, t in enumerate(vocab.texts)]
        vocab.derived["display_forms"] = forms
    return forms


def show_example(example: dict[str, Any], feature_max: float, mode: ContextMode,
                 forms: list[tuple[str, str]]) -> ShownExample:
    token_ids, max_pos = example["token_ids"], example["max_pos"]
    if mode == "snippet":
        start, stop = max(0, max_pos - SNIPPET_BEFORE), min(len(token_ids), max_pos + SNIPPET_AFTER + 1)
    else:
        start, stop = 0, len(token_ids)
    acts = dict(zip(example["positions"], example["acts"]))
    scale = 1.0 / feature_max if feature_max > 0 else 0.0
    shown = []
    for pos in range(start, stop):
        token_id = token_ids[pos]
        css, text = forms[token_id] if 0 <= token_id < len(forms) else ("special", f"<unk {token_id}>")
        act = acts.get(pos, 0.0)
        if pos == max_pos:
            css = f"{css} peak" if css else "peak"
        if act > 0:
            shown.append(ShownToken(css, text, round(min(act * scale, 1.0), 2), f"{act:.6g}"))
        else:
            shown.append(ShownToken(css, text, 0.0, ""))
    return ShownExample(shown, example["max_act"], max_pos, example["context_id"], start > 0, stop < len(token_ids))


def show_examples(feature: dict[str, Any], mode: ContextMode, forms: list[tuple[str, str]]) -> dict[str, Any]:
    """Top examples and interval samples of a feature_view, ready for templates/_examples.html."""
    feature_max = feature["max_act"] or 0.0
    return {
        "top": [show_example(e, feature_max, mode, forms) for e in feature["top_examples"]],
        "intervals": [dict(interval, shown=[show_example(e, feature_max, mode, forms) for e in interval["examples"]])
                      for interval in reversed(feature["intervals"])],
    }
