"""Groups of SAEs that share one model pass, under a memory budget. Torch-free (only
`default_memory_budget` asks torch how much a GPU has free).

    saes = [SAESpec("0-res-16k", Site(0, "res"), d_in=2304, d_sae=16384), ...]
    plan = plan_groups(saes, state_bytes=lambda s: s.weight_bytes + expected_memory_bytes(s.d_sae),
                       budget_bytes=default_memory_budget("cuda"), pass_bytes=activations_per_batch)
    print(describe_plan(plan))
    for group in plan.groups:    # one model pass each, stopped after group.last_layer
        ...

The SAEs are taken in forward-pass order (featurescope/flow.py: layer, then att, mlp, res) and cut into
consecutive runs, each as long as the budget allows. Cutting a fixed order greedily gives the fewest groups
that keep that order, and keeping neighbouring layers together means a pass for the shallow layers stops
early and most cross-layer neighbours share a pass. The plan depends only on its inputs: the same SAEs and
budget give the same groups (a resumed job must plan with the budget it started with).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from featurescope.errors import FeatureScopeError
from featurescope.flow import flow_key
from featurescope.memory import format_bytes, free_memory_bytes, sae_weight_bytes
from featurescope.site_names import Site

DEFAULT_BUDGET_SHARE = 0.5  # of the device's free memory: the rest stays for the model, the allocator, other work
BUDGET_FLAG = "--memory-budget"


class PlanError(FeatureScopeError, ValueError):
    """SAEs that cannot be planned under the budget; the message names the SAE and the flag to change."""


@dataclass(frozen=True)
class SAESpec:
    """What the planner needs to know of an SAE, without its weights."""
    name: str  # its id in the run, e.g. "20-res-16k"
    site: Site
    d_in: int
    d_sae: int

    @property
    def weight_bytes(self) -> int:
        """float32 W_enc, W_dec, b_enc, threshold, b_dec."""
        return sae_weight_bytes(self.d_in, self.d_sae)


@dataclass(frozen=True)
class SAEGroup:
    saes: tuple[SAESpec, ...]  # in forward-pass order
    state_bytes: int  # the summed state of its SAEs

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.saes]

    @property
    def first_layer(self) -> int:
        return self.saes[0].site.layer

    @property
    def last_layer(self) -> int:
        """The deepest layer any of its SAEs reads: the group's pass stops right after it."""
        return self.saes[-1].site.layer

    @property
    def n_features(self) -> int:
        return sum(s.d_sae for s in self.saes)


@dataclass(frozen=True)
class Plan:
    groups: tuple[SAEGroup, ...]  # in the order they run
    budget_bytes: int
    pass_bytes: int  # the model pass's own memory, counted once beside each group's state

    @property
    def peak_bytes(self) -> int:
        """The most any one pass is expected to hold: its group's state plus the model pass."""
        return max(g.state_bytes for g in self.groups) + self.pass_bytes

    @property
    def layers_run(self) -> int:
        """Decoder layers run per batch of contexts over all passes (one pass for all SAEs: deepest layer + 1)."""
        return sum(g.last_layer + 1 for g in self.groups)


def plan_groups(saes: Sequence[SAESpec], state_bytes: Callable[[SAESpec], int], budget_bytes: int,
                pass_bytes: int = 0) -> Plan:
    """Cut the SAEs, in forward-pass order, into the fewest consecutive groups whose state plus one model
    pass (`pass_bytes`) fits `budget_bytes`. `state_bytes(sae)`: the bytes that SAE holds while its group runs."""
    if not saes:
        raise PlanError("No SAEs to plan: pass at least one --sae.")
    names = [s.name for s in saes]
    if len(set(names)) != len(names):
        raise PlanError(f"SAE ids must be distinct to plan groups; got {sorted({n for n in names if names.count(n) > 1})} twice.")
    room = budget_bytes - pass_bytes
    if room <= 0:
        raise PlanError(f"The memory budget {format_bytes(budget_bytes)} does not cover one model pass "
                        f"({format_bytes(pass_bytes)}): raise it with {BUDGET_FLAG}.")
    groups: list[SAEGroup] = []
    current: list[SAESpec] = []
    used = 0
    for sae in sorted(saes, key=lambda s: flow_key(s.site.layer, s.site.kind)):
        need = state_bytes(sae)
        if need > room:
            raise PlanError(_too_big(sae, need, budget_bytes, pass_bytes))
        if current and used + need > room:
            groups.append(SAEGroup(tuple(current), used))
            current, used = [], 0
        current.append(sae)
        used += need
    groups.append(SAEGroup(tuple(current), used))
    return Plan(tuple(groups), budget_bytes, pass_bytes)


def _too_big(sae: SAESpec, need: int, budget_bytes: int, pass_bytes: int) -> str:
    besides = f" besides the model pass's {format_bytes(pass_bytes)}" if pass_bytes else ""
    return (f"SAE {sae.name} ({sae.site.short_name}, {sae.d_sae:,} features) needs {format_bytes(need)} of state{besides}, "
            f"more than the memory budget of {format_bytes(budget_bytes)}: raise it with {BUDGET_FLAG} "
            f"{_round_up_gib(need + pass_bytes)}GB (or run this SAE on a device with more memory).")


def _round_up_gib(n: int) -> int:
    return -(-n // (1 << 30))


def default_memory_budget(device: str = "auto", share: float = DEFAULT_BUDGET_SHARE) -> int:
    """A safe share of what `device` has free now (call it after the model is loaded)."""
    return int(free_memory_bytes(device) * share)


def describe_plan(plan: Plan) -> str:
    """The plan as a short table, for the job to print before it starts."""
    n_saes = sum(len(g.saes) for g in plan.groups)
    n_features = sum(g.n_features for g in plan.groups)
    passes = f"{len(plan.groups)} model pass{'es' if len(plan.groups) > 1 else ''}"
    lines = [f"{passes} for {n_saes} SAEs ({n_features:,} features), memory budget {format_bytes(plan.budget_bytes)} "
             f"(model pass {format_bytes(plan.pass_bytes)}):",
             f"{'group':>5}  {'SAEs':>4}  {'features':>10}  {'sites':<24}  {'stops after':>11}  {'memory':>10}"]
    for i, g in enumerate(plan.groups, 1):
        sites = g.saes[0].site.short_name + (f" .. {g.saes[-1].site.short_name}" if len(g.saes) > 1 else "")
        lines.append(f"{i:>5}  {len(g.saes):>4}  {g.n_features:>10,}  {sites:<24}  {'layer ' + str(g.last_layer):>11}  "
                     f"{format_bytes(g.state_bytes + plan.pass_bytes):>10}")
    deepest = max(g.last_layer for g in plan.groups) + 1
    lines.append(f"Decoder layers run per batch: {plan.layers_run} ({plan.layers_run / deepest:.2f}x one pass for all SAEs); "
                 f"peak {format_bytes(plan.peak_bytes)}.")
    return "\n".join(lines)
