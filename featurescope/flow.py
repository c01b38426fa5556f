"""Where a hook site sits in the model's forward pass, for following features from layer to layer.
Torch-free, so the explorer can import it.

    flow_key(12, "res") -> (12, 2)     # after (12, "att") -> (12, 0) and (12, "mlp") -> (12, 1)
    direction((6, "res"), (12, "res")) -> "down"

Within one decoder layer the attention heads' output (hook_z) comes first, then the MLP output, then the
residual stream after the layer, so sites sort by (layer, FLOW_ORDER[kind]).
"""

from __future__ import annotations

FLOW_ORDER = {"att": 0, "mlp": 1, "res": 2}
UP, DOWN, SAME = "up", "down", "same"  # the other site is earlier / later / at the same point


def flow_key(layer: int, kind: str) -> tuple[int, int]:
    return layer, FLOW_ORDER[kind]


def direction(mine: tuple[int, str], other: tuple[int, str]) -> str:
    """Where `other` (layer, kind) lies relative to `mine`: UP (earlier), DOWN (later) or SAME site."""
    a, b = flow_key(*mine), flow_key(*other)
    return UP if b < a else DOWN if b > a else SAME


def neighbour_layers(layers: list[int], layer: int) -> set[int]:
    """The layer itself and the previous and next layers among `layers` (those that have an SAE)."""
    below = [x for x in layers if x < layer]
    above = [x for x in layers if x > layer]
    return {layer} | ({max(below)} if below else set()) | ({min(above)} if above else set())
