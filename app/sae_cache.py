"""The live encoder's SAEs under a memory budget (`featurescope serve --sae-memory-budget 4GB`): loaded on
first use, the least recently used evicted to make room, never one that a running request holds.

    cache = SAECache(budget_bytes=4 << 30, device="cuda")   # None: a share of the device's free memory
    with cache.lease(model_id, [sae_info, ...], load) as saes:   # {sae id: SAE}, loaded (load(info)) if need be
        ...                                                    # held: no other request can evict them
    # released: they stay loaded, most recently used last, until room is needed

An SAE costs its float32 weights (featurescope/memory.py: sae_weight_bytes, the count precompute plans with).
A lease of SAEs whose weights together exceed the budget raises OverBudget (the server's 422) at once; one
that fits waits while the room it needs is held by other requests, then evicts the least recently used SAEs
that nobody holds. Room is reserved before an SAE loads and loading happens outside the lock, so a slow
load blocks only the requests that need that SAE. A lease takes all of its SAEs at once, or none while it
waits, so two requests can never each hold part of what the other needs. Thread-safe; torch-free (the
caller's `load` makes the SAE and puts it on the device).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from featurescope.app.catalog import SAEInfo
from featurescope.flow import flow_key
from featurescope.memory import format_bytes, free_memory_bytes, sae_weight_bytes

ALL_SAES_UP_TO = 8  # a run with at most this many SAEs encodes with all of them by default (when they fit)
DEFAULT_LAYER_STEP = 4  # otherwise the residual SAEs of every 4th layer
DEFAULT_BUDGET_SHARE = 0.5  # of the device's free memory once the model is loaded: the rest is for activations
BUDGET_FLAG = "--sae-memory-budget"

Key = tuple[str, str, str]  # (model id, SAE id, source)


class OverBudget(Exception):
    """SAEs that together need more memory than the server's SAE budget: 422 naming the budget."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def sae_bytes(info: SAEInfo) -> int:
    """What one SAE costs the budget: its float32 weights."""
    return sae_weight_bytes(info.d_in, info.d_sae)


def default_saes(saes: Sequence[SAEInfo], budget_bytes: int | None) -> list[SAEInfo]:
    """The SAEs the encode page uses when its URL names none, and the ones start-up loads: all of a small run's
    (at most ALL_SAES_UP_TO) when they fit the budget; else one residual SAE (the narrowest) of every 4th layer
    that has one (every 4th layer of any site when none is residual), in forward-pass order, as many as fit.
    budget_bytes None: no budget (live encoding is off)."""
    ordered = sorted(saes, key=lambda s: (flow_key(s.layer, s.site_kind), s.d_sae, s.id))
    fits = lambda chosen: budget_bytes is None or sum(sae_bytes(s) for s in chosen) <= budget_bytes  # noqa: E731
    if len(ordered) <= ALL_SAES_UP_TO and fits(ordered):
        return ordered
    pool = [s for s in ordered if s.site_kind == "res"] or ordered
    per_layer: dict[int, SAEInfo] = {}
    for sae in sorted(pool, key=lambda s: (s.d_sae, flow_key(s.layer, s.site_kind), s.id)):
        per_layer.setdefault(sae.layer, sae)
    chosen: list[SAEInfo] = []
    for layer in sorted(per_layer)[::DEFAULT_LAYER_STEP]:
        if not fits(chosen + [per_layer[layer]]):
            break
        chosen.append(per_layer[layer])
    return chosen


@dataclass(eq=False)
class _Entry:
    nbytes: int
    sae: Any = None  # None while it loads
    error: Exception | None = None  # its load failed (the entry is already out of the cache)
    holders: int = 0  # leases holding it now


class Lease:
    """SAEs held for one request: `saes` ({id: SAE}) stay loaded until `release()` (or the end of `with`)."""

    def __init__(self, cache: SAECache, entries: list[_Entry], saes: dict[str, Any]) -> None:
        self._cache, self._entries, self.saes = cache, entries, saes

    def release(self) -> None:
        entries, self._entries = self._entries, []
        self._cache._release(entries)

    def __enter__(self) -> dict[str, Any]:
        return self.saes

    def __exit__(self, *exc: object) -> None:
        self.release()


class SAECache:
    """The loaded SAEs of one server, least recently used first, under one budget (all models together)."""

    def __init__(self, budget_bytes: int | None, device: str = "auto", share: float = DEFAULT_BUDGET_SHARE) -> None:
        self._budget, self._device, self._share = budget_bytes, device, share
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._changed = threading.Condition()

    @property
    def budget_bytes(self) -> int:
        """The budget; by default `share` of the device's free memory, measured once, when first needed."""
        with self._changed:
            if self._budget is None:
                self._budget = int(free_memory_bytes(self._device) * self._share)
            return self._budget

    @property
    def used_bytes(self) -> int:
        """Weights loaded or loading now."""
        with self._changed:
            return sum(e.nbytes for e in self._entries.values())

    def resident(self) -> list[Key]:
        """The SAEs loaded (or loading) now, least recently used first."""
        with self._changed:
            return list(self._entries)

    def check(self, saes: Sequence[SAEInfo]) -> None:
        """Raise OverBudget if these SAEs cannot be held together under the budget."""
        unique = list({(s.model_id, s.id, s.source): s for s in saes}.values())
        need, budget = sum(sae_bytes(s) for s in unique), self.budget_bytes
        if need > budget:
            each = ", ".join(f"{s.id} {format_bytes(sae_bytes(s))}" for s in unique)
            raise OverBudget(f"The SAEs asked for need {format_bytes(need)} of weights together ({each}), more than this "
                             f"server's SAE memory budget of {format_bytes(budget)} (featurescope serve {BUDGET_FLAG}): "
                             "choose fewer or narrower SAEs.")

    def lease(self, model_id: str, saes: Sequence[SAEInfo], load: Callable[[SAEInfo], Any]) -> Lease:
        """Hold these SAEs of `model_id`, loading the missing ones with `load(info)`; waits while the room they
        need is held by other leases. Raises OverBudget, or the first load's error (nothing is held then)."""
        self.check(saes)
        wanted = {(model_id, s.id, s.source): s for s in saes}
        with self._changed:
            while not self._make_room(wanted):
                self._changed.wait()
            mine = {key: self._hold(key, wanted[key]) for key in wanted}
        loading = [key for key, (_, fresh) in mine.items() if fresh]
        for key in loading:
            self._load(key, mine[key][0], wanted[key], load)
        entries = [entry for entry, _ in mine.values()]
        with self._changed:
            while any(e.sae is None and e.error is None for e in entries):
                self._changed.wait()  # another lease is loading it
        failed = next((e.error for e in entries if e.error is not None), None)
        if failed is not None:
            self._release(entries)
            raise failed
        return Lease(self, entries, {wanted[key].id: entry.sae for key, (entry, _) in mine.items()})

    # -- under the lock
    def _make_room(self, wanted: dict[Key, SAEInfo]) -> bool:
        """Evict the least recently used free SAEs until the missing ones fit; False (nothing evicted) if they
        cannot fit before other leases let go."""
        need = sum(sae_bytes(info) for key, info in wanted.items() if key not in self._entries)
        room = self._budget - sum(e.nbytes for e in self._entries.values())
        if need <= room:
            return True
        free = [key for key, e in self._entries.items() if e.holders == 0 and e.sae is not None and key not in wanted]
        if room + sum(self._entries[key].nbytes for key in free) < need:
            return False
        for key in free:
            if room >= need:
                break
            room += self._entries.pop(key).nbytes
        return True

    def _hold(self, key: Key, info: SAEInfo) -> tuple[_Entry, bool]:
        """The entry of `key`, held once more and marked most recently used; fresh: this lease must load it."""
        entry = self._entries.get(key)
        fresh = entry is None
        if fresh:
            entry = self._entries[key] = _Entry(sae_bytes(info))
        entry.holders += 1
        self._entries.move_to_end(key)
        return entry, fresh

    # -- outside the lock
    def _load(self, key: Key, entry: _Entry, info: SAEInfo, load: Callable[[SAEInfo], Any]) -> None:
        try:
            sae, error = load(info), None
        except Exception as exc:  # noqa: BLE001 - every request waiting for this SAE gets the reason
            sae, error = None, exc
        with self._changed:
            entry.sae, entry.error = sae, error
            if error is not None and self._entries.get(key) is entry:
                del self._entries[key]  # the next request tries again
            self._changed.notify_all()

    def _release(self, entries: list[_Entry]) -> None:
        with self._changed:
            for entry in entries:
                entry.holders -= 1
            self._changed.notify_all()
