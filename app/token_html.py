"""Tokens as HTML: how whitespace is made visible, which tokens of an example to show, and how strongly each
token is highlighted. Every highlighted token on every page is built by `token_html` (feature examples, the
test box, the encode page's prompt), so the rule is one: intensity = activation x scale, capped at 1, with
scale = 1 / the feature's largest activation in the corpus (`highlight_scale`), so top examples, interval
samples and live text share one scale; the exact value is the token's hover title.

Tokens are built here rather than in Jinja (a feature page holds ~45 example rows and hundreds of spans, and
the template loop cost more than the database): each vocabulary entry's text goes through markupsafe.escape,
the function Jinja's autoescape calls, once when the vocabulary is loaded; titles and attributes given by a
template are escaped (or already Markup); the other values are CSS class names from this module, integers and
formatted floats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from markupsafe import Markup, escape

from featurescope.app.filters import number
from featurescope.app.stored import TokenTexts

ContextMode = Literal["snippet", "full"]
SNIPPET_BEFORE, SNIPPET_AFTER = 12, 4  # tokens shown around an example's maximum in snippet mode
LEFT_OUT = "left out of statistics (BOS, EOS, a warm-up position or a norm outlier)"
WARMUP = "warm-up: this context starts mid-document, so its first tokens after BOS do not count"
_UNKNOWN = '<span class="t special">&lt;unk {}&gt;</span>'  # a token id outside the vocabulary
_MARKS = str.maketrans({" ": "·", "\n": "↵", "\t": "⇥", "\r": "↵"})


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


def highlight_scale(feature_max: float | None, acts: Sequence[float] = ()) -> float:
    """What an activation is multiplied by for its highlight: 1 / the feature's largest activation in the
    corpus, or, for a feature that never fired there, 1 / the largest one given."""
    top = feature_max if feature_max and feature_max > 0 else max([*acts, 1e-9])
    return 1.0 / top


def token_html(forms: TokenForms, token_id: int, act: float = 0.0, scale: float = 0.0, *, extra: str = "",
               title: str | None = None, tag: str = "span", attrs: Markup = Markup()) -> Markup:
    """One token: its visible text, shaded by act x scale when it fires, its activation (or `title`) as its
    hover text. `extra` adds CSS classes; `attrs` are finished attributes, Markup from a template's macro
    (a link), never a plain string."""
    if attrs and not isinstance(attrs, Markup):
        raise TypeError("token_html attrs must be Markup, built by a template")
    if not 0 <= token_id < len(forms.css):
        return Markup(_UNKNOWN.format(int(token_id)))
    style = f' style="--a:{min(act * scale, 1.0):.2f}"' if act > 0 else ""
    if title is None:
        tip = f' title="{act:.6g}"' if act > 0 else ""
    else:
        tip = f' title="{escape(title)}"'
    css = " ".join(c for c in ("t", forms.css[token_id], extra) if c)
    more = f" {attrs}" if attrs else ""
    return Markup(f'<{tag} class="{css}"{style}{tip}{more}>{forms.text[token_id]}</{tag}>')


def live_token(forms: TokenForms, token_id: int, act: float | None, counted: bool, scale: float, *, extra: str = "",
               title: str | None = None, tag: str = "span", attrs: Markup = Markup()) -> Markup:
    """A token of a live prompt with one feature's activation on it (None: no feature chosen, `title` is its
    hover text then). A token left out of statistics (BOS, EOS, a norm outlier) is never shaded, and says so."""
    if act is None:
        return token_html(forms, token_id, extra=extra, title=title, tag=tag, attrs=attrs)
    if not counted:
        left_out = LEFT_OUT + (f": activation {act:.6g}" if act > 0 else "")
        return token_html(forms, token_id, extra=f"{extra} excluded".strip(), title=left_out, tag=tag, attrs=attrs)
    return token_html(forms, token_id, act, scale, extra=extra, tag=tag, attrs=attrs)


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
    for pos in range(max(start, 1), min(stop, example.get("warmup", 0) + 1)):  # encoded, not counted: no activation stored
        parts[pos - start] = token_html(forms, token_ids[pos], extra="warmup", title=WARMUP)
    for pos, act in acts.items():
        if act > 0 and start <= pos < stop and pos != max_pos:
            parts[pos - start] = token_html(forms, token_ids[pos], act, scale)
    if start <= max_pos < stop:
        parts[max_pos - start] = token_html(forms, token_ids[max_pos], acts.get(max_pos, 0.0), scale, extra="peak")
    before = '<span class="ctx"><span class="cut">…</span>' if start > 0 else '<span class="ctx">'
    after = '<span class="cut">…</span></span>' if stop < len(token_ids) else "</span>"
    return before + "".join(parts) + after


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
