"""Streaming per-feature statistics of one SAE over a corpus, as tensor ops over all features at once.

    stats = FeatureStats(d_sae=16384, context_len=128, device="cuda")
    for ids, context_ids, content_mask in batches:           # content_mask: False at BOS/EOS/pad
        stats.update(encoder(ids)["20-res-16k"], context_ids, content_mask)
        torch.save(stats.state_dict(), ckpt)                  # resume: FeatureStats.from_state_dict(...)
    result = stats.finalize()                                 # plain dict of CPU tensors
    # then precompute/examples.py re-encodes the few contexts `result` names for their per-token acts

The state is small and bounded: STATE_BYTES_PER_FEATURE(k, s) = 12 + 4 * FINE_BINS + 10 k + 4 * UNITS * s
bytes per feature, 2,004 at the defaults (top_k 20, 5 samples per interval), whatever the corpus size,
context length or number of neighbouring SAEs. Per feature f it keeps:
- the top-k contexts by their max activation: one int64 key (the max's float bits, then the context id)
  and the max position (int16). Their per-token activations are not kept: the job re-encodes the contexts
  they name at the end (precompute/examples.py), which costs one encoder pass over those contexts only;
- the number of firing content tokens (act > 0, in the histogram), the max, and an exact fixed-point sum;
- a fine histogram of non-zero activations: FINE_BINS equal sub-bins over [0, R_f), where R_f is the
  smallest power of two strictly above the running max. When the max crosses R_f, R_f doubles and
  sub-bins merge pairwise, which is exact, so the state never depends on batch order or splits;
- interval candidates: over the same [0, R_f) split into UNITS equal units, the `examples_per_interval`
  contexts with the lowest pseudo-random priority hash(context id, feature) among the contexts whose
  max falls in that unit; only the context id is kept (int32), the priority is recomputed from it. Bottom-s
  by a fixed priority is a uniform sample without replacement, and the bottom-s of a union is the
  bottom-s of the bottom-s sets: doubling and `merge` stay exact.

`finalize` groups sub-bins into at most 50 displayed histogram bins and units into the `n_intervals`
equal-width intervals over [0, max]; interval edges sit on unit boundaries (within R_f/UNITS/2 <= max/64
of linspace(0, max, n+1)) and are returned as they are, so labels, shares and samples agree exactly.

finalize() returns (F = d_sae, k = top_k, n = n_intervals, s = examples_per_interval; every tensor on the
CPU; "empty" rows hold context id -1, position -1, activation 0):
    n_tokens, n_contexts      int: content tokens and contexts seen
    n_firing [F] int64        content tokens with act > 0;  density [F] float64 = n_firing / n_tokens
    max_act [F] float32;  mean_act [F] float64 (over firing tokens; exact to 2**-21 per activation)
    hist_counts [F, hist_bins] int64, hist_bin_width [F] float32, hist_n_bins [F] int64: bin i holds acts
        in [i*w, (i+1)*w); the first hist_n_bins bins cover [0, max] (the max lies in the last of them),
        later ones are empty; w = 0 and hist_n_bins = 0 if dead
    top_ctx [F, k] int64, top_act [F, k] float32, top_pos [F, k] int32: strongest first (ties: lower
        context id, then the first position)
    interval_lo / interval_hi [F, n] float32: interval i holds context maxima / activations in [lo, hi)
    interval_count [F, n] int64 firing tokens in it;  interval_share [F, n] float64 = count / n_firing
    interval_ctx [F, n, s] int64: a uniform sample of the contexts whose max lies in the interval, in
        priority order (their max activation and position come from the re-encoding, which also orders them)

Tie-breaks are deterministic (equal max activation: lower context id first; equal values within a
context: first position), so results are identical for any batch size, order of batches or split.
Context ids must be unique, in [0, 2**31 - 1).
"""

from __future__ import annotations

import torch

FINE_BITS = 7
FINE_BINS = 1 << FINE_BITS  # histogram sub-bins over [0, R_f); a power of two so v * FINE_BINS / R_f is exact
UNIT_BITS = 6
UNITS = 1 << UNIT_BITS  # interval-sampling units over [0, R_f)
SUM_FRAC_BITS = 20  # the sum of activations is kept in int64 fixed point (integer addition is associative)
EMPTY_EXP = -(1 << 20)  # range exponent of a feature that never fired
PRIME = 2_147_483_647  # 2**31 - 1: hash arithmetic stays below 2**63 on every device
INT64_MAX = torch.iinfo(torch.int64).max
LOW32 = 0xFFFFFFFF
MAX_CONTEXT_ID = 2**31 - 2  # context ids are kept as int32 (-1 = empty slot)
MAX_CONTEXT_LEN = 2**15 - 1  # positions are kept as int16
MAX_TOKENS = 2**31 - 1  # per FeatureStats: fine_hist counts are int32
STATE_TENSORS = ("n_tokens", "n_contexts", "max", "sum_fixed", "fine_hist", "top_key", "top_pos", "cand_ctx")


def state_bytes_per_feature(top_k: int = 20, examples_per_interval: int = 5) -> int:
    """Bytes of streaming state per feature: max, sum, histogram, top-k keys + positions, candidates."""
    return 4 + 8 + 4 * FINE_BINS + top_k * (8 + 2) + UNITS * examples_per_interval * 4


def expected_memory_bytes(d_sae: int, top_k: int = 20, examples_per_interval: int = 5) -> int:
    """State size of one FeatureStats (what the group planner budgets; the scalars are left out)."""
    return d_sae * state_bytes_per_feature(top_k, examples_per_interval)


def priority_hash(context_ids: torch.Tensor, features: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Pseudo-random int64 in [0, 2**31 - 1) for each (context, feature) pair, exact on any device."""
    x = (context_ids % PRIME + 1) * 1540483477 % PRIME
    x = (x + (features + 1) * 668265263 % PRIME + (seed % PRIME) * 374761393 % PRIME) % PRIME
    for mult in (73244475, 2246822507 % PRIME, 3266489917 % PRIME):
        x = (x ^ (x >> 15)) * mult % PRIME
    return x


def positive_candidates(flat: torch.Tensor, group: int = 16) -> torch.Tensor:
    """Flat indices of a superset of the positive entries of a sparse 1-D tensor (every non-zero entry of
    each column below that holds a positive one), in no particular order.

    torch.nonzero is a scalar loop on CPU (~4 ns per element); a max over `group` rows is vectorised
    (~0.5 ns), so find the columns of the [group, numel / group] view holding a positive entry first and
    run nonzero on those columns only: 2.5x faster at 16k features and L0 70, 1.3x at 4k."""
    if flat.numel() % group or flat.numel() == 0:
        return flat.nonzero().squeeze(1)
    grid = flat.view(group, -1)  # [G, L]: column j holds entries j, j + L, j + 2L, ...
    cols = (grid.amax(0) > 0).nonzero().squeeze(1)  # [nc]
    if cols.numel() == 0:
        return cols
    hit = grid.index_select(1, cols).reshape(-1).nonzero().squeeze(1)  # into [G, nc]
    row = torch.div(hit, cols.numel(), rounding_mode="trunc")
    return row * grid.shape[1] + cols.index_select(0, hit - row * cols.numel())


def range_exponent(max_act: torch.Tensor) -> torch.Tensor:
    """e with 2**e the smallest power of two strictly above max_act; EMPTY_EXP where max_act <= 0."""
    e = torch.frexp(max_act).exponent.to(torch.int64)  # max = m * 2**e with m in [0.5, 1)
    return torch.where(max_act > 0, e, torch.full_like(e, EMPTY_EXP))


def _pow2(exp: torch.Tensor) -> torch.Tensor:
    """2.0**exp as float32, exact (exp is clamped to float32's normal range)."""
    return ((exp.clamp(-126, 127) + 127) << 23).int().view(torch.float32)  # IEEE bits: no pow() rounding


class FeatureStats:
    """Streaming statistics of one SAE's d_sae features. All state lives in tensors on `device`."""

    def __init__(self, d_sae: int, context_len: int, top_k: int = 20, n_intervals: int = 5,
                 examples_per_interval: int = 5, hist_bins: int = 50, seed: int = 0,
                 device: str | torch.device = "cpu"):
        if not 1 <= n_intervals <= UNITS // 2:
            raise ValueError(f"n_intervals must be in [1, {UNITS // 2}], got {n_intervals}.")
        if not 1 <= hist_bins <= FINE_BINS // 2:
            raise ValueError(f"hist_bins must be in [1, {FINE_BINS // 2}], got {hist_bins}.")
        if min(d_sae, context_len, top_k, examples_per_interval) < 1:
            raise ValueError("d_sae, context_len, top_k and examples_per_interval must be positive.")
        if context_len > MAX_CONTEXT_LEN:
            raise ValueError(f"context_len must be at most {MAX_CONTEXT_LEN}, got {context_len}.")
        self.d_sae, self.context_len, self.top_k = d_sae, context_len, top_k
        self.n_intervals, self.examples_per_interval, self.hist_bins = n_intervals, examples_per_interval, hist_bins
        self.seed = seed
        self.device = torch.device(device)
        F, k, s, dev = d_sae, top_k, examples_per_interval, self.device
        self.n_tokens = torch.zeros((), dtype=torch.int64, device=dev)  # content tokens seen
        self.n_contexts = torch.zeros((), dtype=torch.int64, device=dev)
        self.max = torch.zeros(F, device=dev)
        self.sum_fixed = torch.zeros(F, dtype=torch.int64, device=dev)  # sum of round(act * 2**SUM_FRAC_BITS)
        self.fine_hist = torch.zeros(F, FINE_BINS, dtype=torch.int32, device=dev)
        # Top-k as unordered slots: key = float bits of the max << 32 | (2**32 - 1 - context id); -1 = empty.
        self.top_key = torch.full((F, k), -1, dtype=torch.int64, device=dev)
        self.top_pos = torch.zeros(F, k, dtype=torch.int16, device=dev)
        # Interval candidates per (feature, unit) in unordered slots: context ids, -1 = empty.
        self.cand_ctx = torch.full((F, UNITS, s), -1, dtype=torch.int32, device=dev)

    # ---------------------------------------------------------------- streaming

    @torch.no_grad()
    def update(self, acts: torch.Tensor, context_ids: torch.Tensor, content_mask: torch.Tensor) -> None:
        """Add one batch: acts [B, T, d_sae], context_ids [B] (unique, never seen before), content_mask [B, T]
        (False at BOS/EOS/pad: those positions never count). `acts` is only read."""
        B, T, F = acts.shape
        if F != self.d_sae or T > self.context_len:
            raise ValueError(f"acts has shape {tuple(acts.shape)}; expected [B, <= {self.context_len}, {self.d_sae}].")
        if tuple(context_ids.shape) != (B,) or tuple(content_mask.shape) != (B, T):
            raise ValueError("context_ids must be [B] and content_mask [B, T] for acts [B, T, d_sae].")
        acts = acts.to(self.device, torch.float32)
        context_ids = context_ids.to(self.device, torch.int64)
        content_mask = content_mask.to(self.device, torch.bool)
        if bool(((context_ids < 0) | (context_ids > MAX_CONTEXT_ID)).any()):
            raise ValueError(f"context ids must lie in [0, {MAX_CONTEXT_ID}].")
        self._check_capacity(B * T)

        flat = acts.reshape(-1)
        idx = positive_candidates(flat)  # [N] flat indices into [B, T, F]: every positive entry, maybe a few more
        bt = torch.div(idx, F, rounding_mode="trunc")  # (context, position)
        feat = idx - bt * F
        b = torch.div(bt, T, rounding_mode="trunc")
        t = bt - b * T
        # Entries at special positions (or negative) get value 0 and weight 0 instead of being compacted away.
        val = flat.index_select(0, idx)
        keep = (val > 0) & content_mask.reshape(-1).index_select(0, bt)
        val = torch.where(keep, val, 0.0)
        cell = b * F + feat  # (context, feature) pair

        # Per (context, feature): max over positions and its first position.
        cmax = torch.zeros(B * F, device=self.device).scatter_reduce_(0, cell, val, "amax")
        at_max = (val == cmax.index_select(0, cell)) & keep
        cpos = torch.full((B * F,), T, dtype=torch.int64, device=self.device)
        cpos.scatter_reduce_(0, cell, torch.where(at_max, t, T), "amin")
        pair = cmax.nonzero().squeeze(1)  # [M] firing (context, feature) pairs, context-major
        p_b = torch.div(pair, F, rounding_mode="trunc")
        p_f = pair - p_b * F
        p_val, p_pos, p_ctx = cmax.index_select(0, pair), cpos.index_select(0, pair), context_ids.index_select(0, p_b)

        old_exp = range_exponent(self.max)
        self.max = torch.maximum(self.max, cmax.view(B, F).amax(0))
        exp = range_exponent(self.max)
        self._rescale(old_exp, exp)

        sub = (val * _pow2(FINE_BITS - exp).index_select(0, feat)).long()  # exact: power-of-two scale, val < R_f
        self.fine_hist.view(-1).index_add_(0, feat * FINE_BINS + sub, keep.int())
        self.sum_fixed.index_add_(0, feat, torch.round(val * float(1 << SUM_FRAC_BITS)).long())
        self.n_tokens += content_mask.sum()
        self.n_contexts += B

        self._merge_top(p_f, p_b, p_val, p_pos, p_ctx, B)
        unit = (p_val * _pow2(UNIT_BITS - exp).index_select(0, p_f)).long()
        self._insert_candidates(p_f, unit, p_ctx)

    def _check_capacity(self, more_tokens: int) -> None:
        if int(self.n_tokens) + more_tokens > MAX_TOKENS:  # int32 histogram counts must not wrap
            raise OverflowError(f"FeatureStats counts at most {MAX_TOKENS} tokens (int32 histogram counts; "
                                "the fixed-point sums then stay exact for mean activations below 4096).")

    def _priority(self, ctx: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """Sampling priority of context ctx for feature feat (int64, unique per context); INT64_MAX where ctx < 0."""
        prio = (priority_hash(ctx, feat, self.seed) << 32) | ctx.clamp(min=0)
        return torch.where(ctx >= 0, prio, INT64_MAX)

    def _merge_top(self, p_f, p_b, p_val, p_pos, p_ctx, B: int) -> None:
        """Merge the batch's firing (context, feature) pairs into the top-k slots."""
        key = (p_val.view(torch.int32).long() << 32) | (LOW32 - p_ctx)
        enters = (key > self.top_key.amin(1).index_select(0, p_f)).nonzero().squeeze(1)
        if enters.numel() == 0:
            return
        p_f, p_b, key, p_pos = (x.index_select(0, enters) for x in (p_f, p_b, key, p_pos))
        feats, local = torch.unique(p_f, return_inverse=True)  # [H] features with entrants
        H, k = feats.numel(), self.top_k
        new_key = torch.full((H, B), -2, dtype=torch.int64, device=self.device)  # -2 < empty slot (-1)
        new_key[local, p_b] = key
        both = torch.cat([self.top_key[feats], new_key], 1)  # [H, k + B]
        chosen = torch.zeros_like(both, dtype=torch.bool)
        chosen.scatter_(1, both.topk(k, 1, sorted=False).indices, True)
        # Each feature frees as many old slots as it admits newcomers: pair them in order.
        out_h, out_slot = (~chosen[:, :k]).nonzero(as_tuple=True)
        in_h, in_b = chosen[:, k:].nonzero(as_tuple=True)
        slot = feats.index_select(0, out_h) * k + out_slot  # into [F * k]
        src = in_h * B + in_b  # into [H * B]
        self.top_key.view(-1).index_copy_(0, slot, new_key.view(-1).index_select(0, src))
        pos_of = torch.zeros(H, B, dtype=torch.int16, device=self.device)
        pos_of[local, p_b] = p_pos.to(torch.int16)
        self.top_pos.view(-1).index_copy_(0, slot, pos_of.view(-1).index_select(0, src))

    def _insert_candidates(self, feat: torch.Tensor, unit: torch.Tensor, ctx: torch.Tensor) -> None:
        """Merge (feature, unit, context) entries into the bottom-s sets of their cells. A cell's s slots are
        unordered (finalize sorts); a newcomer takes the slot of an evicted entry, so nothing else moves."""
        s = self.examples_per_interval
        cell = feat * UNITS + unit
        prio = self._priority(ctx, feat)
        cells_ctx = self.cand_ctx.view(-1, s)
        worst = self._priority(cells_ctx.index_select(0, cell).long(), feat[:, None]).amax(1)
        fits = (prio < worst).nonzero().squeeze(1)  # beats the cell's worst
        if fits.numel() == 0:
            return
        cell, prio, feat = cell.index_select(0, fits), prio.index_select(0, fits), feat.index_select(0, fits)
        order = prio.argsort()
        order = order[cell[order].argsort(stable=True)]  # grouped by cell, ascending priority inside
        cell, prio, feat = cell[order], prio[order], feat[order]
        cells, counts = torch.unique_consecutive(cell, return_counts=True)  # [m] touched cells
        group = torch.repeat_interleave(torch.arange(cells.numel(), device=self.device), counts)
        rank = torch.arange(cell.numel(), device=self.device) - (counts.cumsum(0) - counts)[group]
        top = (rank < s).nonzero().squeeze(1)  # only a cell's s best newcomers can enter
        new_prio = torch.full((cells.numel(), s), INT64_MAX, dtype=torch.int64, device=self.device)
        new_prio[group[top], rank[top]] = prio.index_select(0, top)
        cell_feat = torch.div(cells, UNITS, rounding_mode="trunc")
        held = self._priority(cells_ctx.index_select(0, cells).long(), cell_feat[:, None])  # [m, s]
        both = torch.cat([held, new_prio], 1)  # [m, 2s]
        chosen = torch.zeros_like(both, dtype=torch.bool)
        chosen.scatter_(1, both.topk(s, 1, largest=False, sorted=False).indices, True)
        # Pair evicted slots with admitted newcomers in order; a padding newcomer (INT64_MAX) only ever
        # displaces an empty slot, and such pairs are dropped.
        out_c, out_slot = (~chosen[:, :s]).nonzero(as_tuple=True)
        in_c, in_j = chosen[:, s:].nonzero(as_tuple=True)
        incoming = new_prio[in_c, in_j]
        real = (incoming != INT64_MAX).nonzero().squeeze(1)
        slot = cells.index_select(0, out_c.index_select(0, real)) * s + out_slot.index_select(0, real)
        self.cand_ctx.view(-1).index_copy_(0, slot, (incoming.index_select(0, real) & LOW32).int())

    def _rescale(self, old_exp: torch.Tensor, exp: torch.Tensor) -> None:
        """Re-express histogram and candidates of features whose range R_f grew from 2**old_exp to 2**exp."""
        grown = ((exp != old_exp) & (old_exp != EMPTY_EXP)).nonzero().squeeze(1)  # never-fired: nothing to move
        if grown.numel() == 0:
            return
        shift = (exp - old_exp)[grown]
        hist = self.fine_hist[grown]  # [g, FINE_BINS]
        target = torch.arange(FINE_BINS, device=self.device) >> shift.clamp(max=FINE_BITS)[:, None]
        self.fine_hist[grown] = torch.zeros_like(hist).scatter_add_(1, target, hist)
        held = self.cand_ctx[grown]  # [g, UNITS, s]
        g, unit, slot = (held >= 0).nonzero(as_tuple=True)
        ctx = held[g, unit, slot].long()
        self.cand_ctx[grown] = -1
        self._insert_candidates(grown[g], unit >> shift.clamp(max=UNIT_BITS)[g], ctx)

    # ---------------------------------------------------------------- merge and checkpoints

    @torch.no_grad()
    def merge(self, other: FeatureStats) -> None:
        """Add another state over disjoint contexts: afterwards self equals one run over both corpora."""
        if self._settings() != other._settings():
            raise ValueError(f"Cannot merge statistics with different settings: {self._settings()} vs "
                             f"{other._settings()}.")
        self._check_capacity(int(other.n_tokens))
        exp = range_exponent(torch.maximum(self.max, other.max.to(self.device)))
        theirs = FeatureStats(**self._settings(), device=self.device)
        theirs.load_state_dict(other.state_dict())
        self._rescale(range_exponent(self.max), exp)
        theirs._rescale(range_exponent(theirs.max), exp)
        self.max = torch.maximum(self.max, theirs.max)
        self.n_tokens += theirs.n_tokens
        self.n_contexts += theirs.n_contexts
        self.sum_fixed += theirs.sum_fixed
        self.fine_hist += theirs.fine_hist
        g, unit, slot = (theirs.cand_ctx >= 0).nonzero(as_tuple=True)
        self._insert_candidates(g, unit, theirs.cand_ctx[g, unit, slot].long())
        keys = torch.cat([self.top_key, theirs.top_key], 1)  # [F, 2k]
        pick = keys.topk(self.top_k, 1).indices
        self.top_key = keys.gather(1, pick)
        self.top_pos = torch.cat([self.top_pos, theirs.top_pos], 1).gather(1, pick)

    def _settings(self) -> dict:
        return dict(d_sae=self.d_sae, context_len=self.context_len, top_k=self.top_k, n_intervals=self.n_intervals,
                    examples_per_interval=self.examples_per_interval, hist_bins=self.hist_bins, seed=self.seed)

    def state_dict(self, copy: bool = True) -> dict:
        """Settings and a copy of the state tensors (on their device); torch.save it for a checkpoint.
        copy=False hands out the tensors themselves, for a save that must not double the memory."""
        return {"settings": self._settings(),
                **{name: getattr(self, name).clone() if copy else getattr(self, name) for name in STATE_TENSORS}}

    def load_state_dict(self, state: dict) -> None:
        if state["settings"] != self._settings():
            raise ValueError(f"Checkpoint settings {state['settings']} differ from {self._settings()}.")
        for name in STATE_TENSORS:
            mine = getattr(self, name)
            if name not in state or state[name].shape != mine.shape or state[name].dtype != mine.dtype:
                found = f"{state[name].dtype}{tuple(state[name].shape)}" if name in state else "nothing"
                raise ValueError(f"Checkpoint tensor {name} has {found}, expected {mine.dtype}{tuple(mine.shape)}.")
            setattr(self, name, state[name].to(self.device).clone())

    @classmethod
    def from_state_dict(cls, state: dict, device: str | torch.device = "cpu") -> FeatureStats:
        stats = cls(**state["settings"], device=device)
        stats.load_state_dict(state)
        return stats

    def nbytes(self) -> int:
        """Bytes held by the state tensors."""
        return sum(getattr(self, name).nbytes for name in STATE_TENSORS)

    # ---------------------------------------------------------------- results

    @torch.no_grad()
    def finalize(self, chunk: int = 1 << 16) -> dict[str, torch.Tensor | int]:
        """The statistics as a plain dict of CPU tensors, fields as in the module docstring. The state is
        unchanged: streaming may go on after it. Works through `chunk` features at a time, so the
        temporaries stay bounded (~1 KB per feature of the chunk) whatever d_sae is."""
        parts = [self._finalize_features(slice(start, min(start + chunk, self.d_sae)))
                 for start in range(0, self.d_sae, chunk)]
        out: dict[str, torch.Tensor | int] = {"n_tokens": int(self.n_tokens), "n_contexts": int(self.n_contexts)}
        out.update({key: torch.cat([part[key] for part in parts]) for key in parts[0]})
        return out

    def _finalize_features(self, rows: slice) -> dict[str, torch.Tensor]:
        max_act, hist = self.max[rows], self.fine_hist[rows]
        exp = range_exponent(max_act)
        n_firing = hist.sum(1, dtype=torch.int64)  # [f]
        cum = torch.nn.functional.pad(hist.cumsum(1, dtype=torch.int64), (1, 0))  # [f, FINE_BINS + 1]
        out = {"n_firing": n_firing, "density": n_firing.double() / max(int(self.n_tokens), 1),
               "max_act": max_act.clone(),
               "mean_act": self.sum_fixed[rows].double() / float(1 << SUM_FRAC_BITS) / n_firing.clamp(min=1)}
        out.update(self._histogram(max_act, exp, cum))
        out.update(self._top_examples(rows))
        out.update(self._intervals(rows, max_act, exp, cum, n_firing))
        return {k: v.cpu() for k, v in out.items()}

    def _histogram(self, max_act, exp, cum) -> dict[str, torch.Tensor]:
        nb = self.hist_bins
        top_sub = (max_act * _pow2(FINE_BITS - exp)).long()  # sub-bin holding the max, in [S/2, S)
        width = (top_sub + nb) // nb  # sub-bins per displayed bin: ceil((top_sub + 1) / nb)
        edges = torch.arange(nb + 1, device=self.device) * width[:, None]  # [F, nb + 1] in sub-bins
        counts = cum.gather(1, edges.clamp(max=FINE_BINS)).diff(1)  # [F, nb]
        fired = max_act > 0
        return {"hist_counts": counts,
                "hist_bin_width": torch.where(fired, width.float() * _pow2(exp - FINE_BITS), 0.0),
                "hist_n_bins": torch.where(fired, top_sub // width + 1, 0)}

    def _top_examples(self, rows: slice) -> dict[str, torch.Tensor]:
        key, order = self.top_key[rows].sort(1, descending=True)  # [F, k]
        found = key >= 0
        ctx = torch.where(found, LOW32 - (key & LOW32), -1)
        act = torch.where(found, (key >> 32).int().view(torch.float32), 0.0)
        pos = torch.where(found, self.top_pos[rows].gather(1, order).int(), -1)
        return {"top_ctx": ctx, "top_act": act, "top_pos": pos}

    def _intervals(self, rows: slice, max_act, exp, cum, n_firing) -> dict[str, torch.Tensor]:
        n, s, F = self.n_intervals, self.examples_per_interval, max_act.shape[0]
        fired = max_act > 0
        max_units = max_act.double() * _pow2(UNIT_BITS - exp)  # max in units of R_f / UNITS, in [C/2, C)
        # Unit boundary nearest to each of linspace(0, max, n + 1); the last one is the first above the max.
        edges = torch.floor(max_units[:, None] * torch.arange(n + 1, device=self.device) / n + 0.5).long()
        edges[:, n] = max_units.long() + 1  # [F, n + 1], strictly increasing since max/n >= 6.4 units
        count = cum.gather(1, edges * (FINE_BINS // UNITS)).diff(1)  # [F, n] firing tokens per interval
        scale = _pow2(exp - UNIT_BITS)[:, None]
        lo = torch.where(fired[:, None], edges[:, :-1] * scale, 0.0)
        hi = torch.where(fired[:, None], edges[:, 1:] * scale, 0.0)
        # Interval of each unit, then the bottom-s priorities of each interval among its units' candidates.
        unit_iv = (torch.arange(UNITS, device=self.device)[None, :, None] >= edges[:, None, 1:n]).sum(2)  # [F, C]
        features = torch.arange(rows.start, rows.stop, device=self.device)[:, None]
        prio = self._priority(self.cand_ctx[rows].reshape(F, UNITS * s).long(), features)
        iv = torch.where(prio == INT64_MAX, n, unit_iv.repeat_interleave(s, 1))  # empty -> n (dropped)
        order = prio.argsort(1)
        order = order.gather(1, iv.gather(1, order).argsort(dim=1, stable=True))  # by interval, then priority
        iv_sorted = iv.gather(1, order)
        per_iv = torch.zeros(F, n + 1, dtype=torch.int64, device=self.device).scatter_add_(1, iv, torch.ones_like(iv))
        rank = torch.arange(UNITS * s, device=self.device) - (per_iv.cumsum(1) - per_iv).gather(1, iv_sorted)
        f_i, j = ((rank < s) & (iv_sorted < n)).nonzero(as_tuple=True)
        src, dst_iv, dst_rank = order[f_i, j], iv_sorted[f_i, j], rank[f_i, j]
        ctx = torch.full((F, n, s), -1, dtype=torch.int64, device=self.device)
        ctx[f_i, dst_iv, dst_rank] = prio[f_i, src] & LOW32
        return {"interval_lo": lo, "interval_hi": hi, "interval_count": count,
                "interval_share": count.double() / n_firing.clamp(min=1)[:, None], "interval_ctx": ctx}
