"""Server-side histograms as inline SVG, readable without JavaScript; every bar carries its exact range
and count as an SVG <title> tooltip. `histogram()` draws the bars and `Chart.svg()` the rest: every text
they draw goes through markupsafe.escape (what Jinja's autoescape calls); everything else is a formatted
number. A chart has ~50 bars, and drawing them through a template loop cost more than the page's database
queries; they are drawn in the loop that computes them (a feature page draws two charts per request).

    activation_histogram(feature["activation_histogram"]) -> Chart
    logit_histogram(feature["logits"]["histogram"])         -> Chart
    density_histogram(sae_view_data["density_histogram"])   -> Chart
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from markupsafe import Markup, escape

WIDTH, HEIGHT = 560, 170
LEFT, RIGHT, TOP, BOTTOM = 44, 10, 10, 34
SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


class Tick(NamedTuple):
    x: float
    label: str


@dataclass(frozen=True)
class Chart:
    title: str
    x_label: str
    y_label: str
    bars: Markup = Markup()  # the <rect>s, drawn by histogram()
    x_ticks: list[Tick] = field(default_factory=list)
    y_max: str = ""
    empty: str = ""  # shown instead of bars when there is nothing to draw
    width: int = WIDTH
    height: int = HEIGHT
    plot_left: int = LEFT
    plot_right: int = WIDTH - RIGHT
    plot_top: int = TOP
    plot_bottom: int = HEIGHT - BOTTOM
    marker_x: float | None = None  # e.g. the zero line of the logit histogram
    summary: str = ""  # one sentence for screen readers and the SVG's <desc>
    kind: str = ""  # CSS class: activation | logit | density

    def svg(self) -> Markup:
        if self.empty:
            return Markup('<p class="chart-empty">{}</p>').format(self.empty)
        e = escape
        out = [f'<svg viewBox="0 0 {self.width} {self.height}" role="img" aria-label="{e(self.summary)}" '
               f'preserveAspectRatio="xMidYMid meet"><desc>{e(self.summary)}</desc>',
               f'<line class="axis" x1="{self.plot_left}" y1="{self.plot_bottom}" x2="{self.plot_right}" y2="{self.plot_bottom}"/>',
               f'<text class="ylab" x="{self.plot_left - 6}" y="{self.plot_top + 8}" text-anchor="end">{e(self.y_max)}</text>',
               f'<text class="ylab" x="{self.plot_left - 6}" y="{self.plot_bottom}" text-anchor="end">0</text>']
        out.append(self.bars)
        if self.marker_x is not None:
            out.append(f'<line class="marker" x1="{self.marker_x:g}" y1="{self.plot_top}" x2="{self.marker_x:g}" y2="{self.plot_bottom}"/>')
        for t in self.x_ticks:
            out.append(f'<line class="tick" x1="{t.x:g}" y1="{self.plot_bottom}" x2="{t.x:g}" y2="{self.plot_bottom + 4}"/>'
                       f'<text class="xlab" x="{t.x:g}" y="{self.plot_bottom + 16}" text-anchor="middle">{e(t.label)}</text>')
        out.append(f'<text class="axis-title" x="{(self.plot_left + self.plot_right) / 2:g}" y="{self.height - 3}" '
                   f'text-anchor="middle">{e(self.x_label)}</text></svg>')
        return Markup("".join(out))


def histogram(counts: Sequence[int], lo: float, hi: float, *, title: str, x_label: str, y_label: str,
              fmt: Callable[[float], str], ticks: Sequence[float], tick_fmt: Callable[[float], str] | None = None,
              accent: Callable[[float, float], bool] | None = None, marker: float | None = None, empty: str = "",
              kind: str = "") -> Chart:
    """Bars for equal-width bins covering [lo, hi)."""
    total = sum(counts)
    if not counts or total == 0 or hi <= lo:
        return Chart(title, x_label, y_label, empty=empty or "Nothing to plot.", kind=kind)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    peak, step = max(counts), (hi - lo) / len(counts)

    def x_of(value: float) -> float:
        return round(LEFT + (value - lo) / (hi - lo) * plot_w, 2)

    edges = [lo + i * step for i in range(len(counts) + 1)]
    shown = [escape(fmt(edge)) for edge in edges]
    width, unit = f"{max(round(plot_w / len(counts) - 1, 2), 0.5):g}", escape(y_label)
    bars = []
    for i, count in enumerate(counts):
        height = round(count / peak * plot_h, 2)
        css = "bar accent" if accent and accent(edges[i], edges[i + 1]) else "bar"
        bars.append(f'<rect class="{css}" x="{x_of(edges[i]):g}" y="{round(TOP + plot_h - height, 2):g}" width="{width}" '
                    f'height="{height:g}"><title>[{shown[i]}, {shown[i + 1]}): {count:,} {unit}</title></rect>')
    tick_fmt = tick_fmt or fmt
    x_ticks = [Tick(x_of(t), tick_fmt(t)) for t in ticks if lo <= t <= hi]
    summary = f"{title}: {total:,} in {len(counts)} bins from {fmt(lo)} to {fmt(hi)}; the tallest bin holds {peak:,}."
    return Chart(title, x_label, y_label, Markup("".join(bars)), x_ticks, f"{peak:,}",
                 marker_x=x_of(marker) if marker is not None and lo <= marker <= hi else None, summary=summary, kind=kind)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round-numbered ticks (1, 2 or 5 times a power of ten apart) spanning [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def short_number(value: float) -> str:
    return f"{value:.3g}" if value else "0"


def activation_histogram(hist: dict, intervals: Sequence[dict] = ()) -> Chart:
    """Non-zero activations: bin i covers [i * bin_width, (i + 1) * bin_width)."""
    counts, width = hist["counts"], hist["bin_width"] or 0.0
    hi = width * len(counts)
    return histogram(counts, 0.0, hi, title="Activation histogram", x_label="activation (firing tokens only)",
                     y_label="tokens", fmt=short_number, ticks=nice_ticks(0.0, hi),
                     empty="This feature never fired in the run, so it has no activations to plot.", kind="activation")


def logit_histogram(hist: dict) -> Chart:
    """The feature's direct effect on every vocabulary logit (W_dec[i] @ W_U), in equal-width bins."""
    lo, hi = hist["lo"], hist["hi"]
    if lo is None or hi is None:
        return Chart("Logit effect over the vocabulary", "logit change", "tokens", empty="No logit effect was computed.",
                     kind="logit")
    return histogram(hist["counts"], lo, hi, title="Logit effect over the vocabulary", x_label="logit change per unit of activation",
                     y_label="tokens", fmt=short_number, ticks=nice_ticks(lo, hi), accent=lambda a, b: a >= 0,
                     marker=0.0, empty="No logit effect was computed.", kind="logit")


def density_histogram(hist: dict) -> Chart:
    """Features per bin of log10(density); dead features are counted apart (log10(0) has no bin)."""
    counts, lo = hist["counts"], hist["log10_lo"]
    hi = lo + hist["bin_width_log10"] * len(counts)
    decades = [float(d) for d in range(math.ceil(lo), math.floor(hi) + 1)]
    dead = hist["dead"]
    title = "Feature density" + (f" ({dead:,} dead features not shown)" if dead else "")
    return histogram(counts, lo, hi, title=title, x_label="share of tokens a feature fires on (log scale)",
                     y_label="features", fmt=lambda v: f"{10 ** v:.2g}", ticks=decades,
                     tick_fmt=lambda v: "1" if v == 0 else "10" + str(int(v)).translate(SUPERSCRIPT),
                     accent=lambda a, b: a >= -1, empty="No feature fired in this run.", kind="density")
