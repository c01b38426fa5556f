"""Streaming per-feature statistics of one SAE over a corpus, as tensor ops over all features at once.

    stats = FeatureStats(d_sae=16384, context_len=128, device="cuda")
    for ids, context_ids, content_mask in batches:           # content_mask: False at BOS/EOS/pad
        stats.update(encoder(ids)["20-res-16k"], context_ids, content_mask)
        torch.save(stats.state_dict(), ckpt)                  # resume: FeatureStats.from_state_dict(...)
    result = stats.finalize()                                 # plain dict of CPU tensors for the DB writer

What it keeps, per feature f (memory depends on d_sae and the settings, never on the corpus size):
- the top-k contexts by their max activation, with the max position and the per-token activations;
- the number of firing content tokens (act > 0), the max, and an exact fixed-point sum (-> mean);
- a fine histogram of non-zero activations: FINE_BINS equal sub-bins over [0, R_f), where R_f is the
  smallest power of two strictly above the running max. When the max crosses R_f, R_f doubles and
  sub-bins merge pairwise, which is exact, so the state never depends on batch order or splits;
- interval candidates: over the same [0, R_f) split into UNITS equal units, the `examples_per_interval`
  contexts with the lowest pseudo-random priority hash(context id, feature) among the contexts whose
  max falls in that unit. Bottom-s by a fixed priority is a uniform sample without replacement, and
  the bottom-s of a union is the bottom-s of the bottom-s sets: doubling and `merge` stay exact.

`finalize` groups sub-bins into the 50 displayed histogram bins and units into the `n_intervals`
equal-width intervals over [0, max]; interval edges sit on unit boundaries (within R_f/UNITS <= max/32
of linspace(0, max, n+1)) and are returned as they are, so labels, shares and samples agree exactly.

Per-token activations are always stored for the top-k contexts ([d_sae, k, T] float32, gathered only
when a context enters). For interval samples there are two options:
- default (bounded, small memory): not kept. Every unit may end up supplying a sample, so that would be
  UNITS * examples_per_interval rows per feature (160 KB per feature at T=128, ~8x the rest of the
  state). The writer re-encodes the contexts in `example_context_ids(result)` with the same encoder and
  calls `fill_example_acts` on each batch. On a small corpus nearly every context is some feature's
  sample (measured: all 896 of 896 contexts at 4096 features), so this is a second encoder pass.
- keep_interval_acts=True: kept on the device and returned as "interval_token_acts", no second pass,
  for ~30% more update() time and the memory above (see `expected_memory_bytes`).

Peak co-activations (coact_width=P > 0, for the cross-layer links of precompute/links.py): update() then
takes, per position, P (feature id, activation) pairs of other SAEs (their strongest features at that
token), and each top-k slot keeps the pairs of its max position, [d_sae, k, P]. They are gathered only
when a context enters the top-k, like the per-token acts, so the links need no second pass.

finalize() returns (F = d_sae, k = top_k, n = n_intervals, s = examples_per_interval, T = context_len;
every tensor on the CPU; "empty" rows hold context id -1, position -1, activation 0):
    n_tokens, n_contexts      int: content tokens and contexts seen
    n_firing [F] int64        content tokens with act > 0;  density [F] float64 = n_firing / n_tokens
    max_act [F] float32;  mean_act [F] float64 (over firing tokens; exact to 2**-21 per activation)
    hist_counts [F, hist_bins=50] int64, hist_bin_width [F] float32: bin i holds acts in [i*w, (i+1)*w); the
        bins cover [0, max] and at most ~10% beyond it (trailing bins may be empty); w = 0 if dead
    top_ctx [F, k] int64, top_act [F, k] float32, top_pos [F, k] int32, top_token_acts [F, k, T] float32:
        strongest first (ties: lower context id); token acts are 0 at special positions
    interval_lo / interval_hi [F, n] float32: interval i holds context maxima / activations in [lo, hi)
    interval_count [F, n] int64 firing tokens in it;  interval_share [F, n] float64 = count / n_firing
    interval_ctx [F, n, s] int64, interval_act [F, n, s] float32, interval_pos [F, n, s] int32: a uniform
        sample of the contexts whose max lies in the interval, strongest first
    interval_token_acts [F, n, s, T] float32: only with keep_interval_acts=True
    top_coact_ids [F, k, P] int32, top_coact_acts [F, k, P] float32: only with coact_width=P > 0, the
        pairs passed to update() at each top example's max position (0 for empty slots)

Tie-breaks are deterministic (equal max activation: lower context id first; equal values within a
context: first position), so results are identical for any batch size, order of batches or split.
Context ids must be unique, in [0, 2**32).
"""

from __future__ import annotations

import torch

FINE_BITS = 10
FINE_BINS = 1 << FINE_BITS  # histogram sub-bins over [0, R_f); a power of two so v * FINE_BINS / R_f is exact
UNIT_BITS = 6
UNITS = 1 << UNIT_BITS  # interval-sampling units over [0, R_f)
SUM_FRAC_BITS = 20  # the sum of activations is kept in int64 fixed point (integer addition is associative)
EMPTY_EXP = -(1 << 20)  # range exponent of a feature that never fired
PRIME = 2_147_483_647  # 2**31 - 1: hash arithmetic stays below 2**63 on every device
INT64_MAX = torch.iinfo(torch.int64).max
LOW32 = 0xFFFFFFFF
MAX_TOKENS = 2**31 - 1  # per FeatureStats: fine_hist counts are int32 (half the memory of int64)

OPTION_DEFAULTS = {"keep_interval_acts": False, "coact_width": 0}  # settings added after the first checkpoints
STATE_TENSORS = ("n_tokens", "n_contexts", "max", "sum_fixed", "fine_hist", "top_key", "top_pos", "top_acts",
                 "cand_prio", "cand_val", "cand_pos")


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
                 keep_interval_acts: bool = False, coact_width: int = 0, device: str | torch.device = "cpu"):
        if not 1 <= n_intervals <= UNITS // 2:
            raise ValueError(f"n_intervals must be in [1, {UNITS // 2}], got {n_intervals}.")
        if not 1 <= hist_bins <= FINE_BINS // 2:
            raise ValueError(f"hist_bins must be in [1, {FINE_BINS // 2}], got {hist_bins}.")
        if min(d_sae, context_len, top_k, examples_per_interval) < 1:
            raise ValueError("d_sae, context_len, top_k and examples_per_interval must be positive.")
        self.d_sae, self.context_len, self.top_k = d_sae, context_len, top_k
        self.n_intervals, self.examples_per_interval, self.hist_bins = n_intervals, examples_per_interval, hist_bins
        self.seed, self.keep_interval_acts, self.coact_width = seed, keep_interval_acts, coact_width
        self.device = torch.device(device)
        F, k, s, dev = d_sae, top_k, examples_per_interval, self.device
        self.n_tokens = torch.zeros((), dtype=torch.int64, device=dev)  # content tokens seen
        self.n_contexts = torch.zeros((), dtype=torch.int64, device=dev)
        self.max = torch.zeros(F, device=dev)
        self.sum_fixed = torch.zeros(F, dtype=torch.int64, device=dev)  # sum of round(act * 2**SUM_FRAC_BITS)
        self.fine_hist = torch.zeros(F, FINE_BINS, dtype=torch.int32, device=dev)
        # Top-k as unordered slots: key = float bits of the max << 32 | (2**32 - 1 - context id); -1 = empty.
        self.top_key = torch.full((F, k), -1, dtype=torch.int64, device=dev)
        self.top_pos = torch.zeros(F, k, dtype=torch.int32, device=dev)
        self.top_acts = torch.zeros(F, k, context_len, device=dev)
        # Interval candidates per (feature, unit) in unordered slots: priority = hash << 32 | context id,
        # INT64_MAX = empty.
        self.cand_prio = torch.full((F, UNITS, s), INT64_MAX, dtype=torch.int64, device=dev)
        self.cand_val = torch.zeros(F, UNITS, s, device=dev)
        self.cand_pos = torch.zeros(F, UNITS, s, dtype=torch.int32, device=dev)
        # Optional per-token acts of every candidate: no second pass, UNITS * s * T floats per feature.
        self.cand_acts = torch.zeros(F, UNITS, s, context_len, device=dev) if keep_interval_acts else None
        # Optional other SAEs' (feature, act) pairs at each top slot's max position: [F, k, coact_width].
        self.top_coact_ids = torch.zeros(F, k, coact_width, dtype=torch.int32, device=dev)
        self.top_coact_acts = torch.zeros(F, k, coact_width, device=dev)

    # ---------------------------------------------------------------- streaming

    @torch.no_grad()
    def update(self, acts: torch.Tensor, context_ids: torch.Tensor, content_mask: torch.Tensor,
               coacts: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add one batch: acts [B, T, d_sae], context_ids [B] (unique, never seen before), content_mask [B, T]
        (False at BOS/EOS/pad: those positions never count). `acts` is only read. With coact_width = P,
        coacts = (ids [B, T, P] int, acts [B, T, P] float): what a top slot keeps of its max position."""
        B, T, F = acts.shape
        if F != self.d_sae or T > self.context_len:
            raise ValueError(f"acts has shape {tuple(acts.shape)}; expected [B, <= {self.context_len}, {self.d_sae}].")
        if tuple(context_ids.shape) != (B,) or tuple(content_mask.shape) != (B, T):
            raise ValueError("context_ids must be [B] and content_mask [B, T] for acts [B, T, d_sae].")
        if self.coact_width and (coacts is None or any(tuple(c.shape) != (B, T, self.coact_width) for c in coacts)):
            raise ValueError(f"coacts must be two [B, T, {self.coact_width}] tensors (ids, acts) for coact_width {self.coact_width}.")
        acts = acts.to(self.device, torch.float32)
        context_ids = context_ids.to(self.device, torch.int64)
        content_mask = content_mask.to(self.device, torch.bool)
        if bool(((context_ids < 0) | (context_ids > LOW32)).any()):
            raise ValueError("context ids must lie in [0, 2**32).")
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

        self._merge_top(p_f, p_b, p_val, p_pos, p_ctx, acts, content_mask, coacts)
        unit = (p_val * _pow2(UNIT_BITS - exp).index_select(0, p_f)).long()
        self._insert_candidates(p_f, unit, self._priority(p_ctx, p_f), p_val, p_pos.int(),
                                lambda sel: self._rows(acts, content_mask, p_b.index_select(0, sel),
                                                       p_f.index_select(0, sel)))

    def _rows(self, acts, content_mask, b, f) -> torch.Tensor:
        rows = token_acts(acts, content_mask, b, f)  # [n, T]
        return torch.nn.functional.pad(rows, (0, self.context_len - rows.shape[1]))  # [n, context_len]

    def _check_capacity(self, more_tokens: int) -> None:
        if int(self.n_tokens) + more_tokens > MAX_TOKENS:  # int32 histogram counts must not wrap
            raise OverflowError(f"FeatureStats counts at most {MAX_TOKENS} tokens (int32 histogram counts; "
                                "the fixed-point sums then stay exact for mean activations below 4096).")

    def _priority(self, ctx: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        return (priority_hash(ctx, feat, self.seed) << 32) | ctx

    def _merge_top(self, p_f, p_b, p_val, p_pos, p_ctx, acts, content_mask, coacts=None) -> None:
        """Merge the batch's firing pairs into the top-k slots; gather per-token acts only for entrants."""
        key = (p_val.view(torch.int32).long() << 32) | (LOW32 - p_ctx)
        enters = (key > self.top_key.amin(1).index_select(0, p_f)).nonzero().squeeze(1)
        if enters.numel() == 0:
            return
        p_f, p_b, key, p_pos = (x.index_select(0, enters) for x in (p_f, p_b, key, p_pos))
        feats, local = torch.unique(p_f, return_inverse=True)  # [H] features with entrants
        B, H, k = acts.shape[0], feats.numel(), self.top_k
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
        pos_of = torch.zeros(H, B, dtype=torch.int32, device=self.device)
        pos_of[local, p_b] = p_pos.int()
        in_pos = pos_of.view(-1).index_select(0, src)
        self.top_pos.view(-1).index_copy_(0, slot, in_pos)
        rows = self._rows(acts, content_mask, in_b, feats.index_select(0, in_h))
        self.top_acts.view(-1, self.context_len).index_copy_(0, slot, rows)
        if self.coact_width:
            at = in_b * acts.shape[1] + in_pos.long()  # (context, max position) of each admitted newcomer
            for mine, theirs in ((self.top_coact_ids, coacts[0]), (self.top_coact_acts, coacts[1])):
                mine.view(-1, self.coact_width).index_copy_(
                    0, slot, theirs.to(self.device, mine.dtype).reshape(-1, self.coact_width).index_select(0, at))

    def _insert_candidates(self, feat, unit, prio, val, pos, rows_of=None) -> None:
        """Merge (feature, unit, priority, value, position) entries into the bottom-s sets of their cells.
        A cell's s slots are unordered (finalize sorts); a newcomer takes the slot of an evicted entry, so
        nothing else moves. With keep_interval_acts, rows_of(entry indices) gives per-token acts [n, T]."""
        s = self.examples_per_interval
        cell = feat * UNITS + unit
        cells_prio = self.cand_prio.view(-1, s)
        fits = (prio < cells_prio.index_select(0, cell).amax(1)).nonzero().squeeze(1)  # beats the cell's worst
        if fits.numel() == 0:
            return
        cell, prio = cell.index_select(0, fits), prio.index_select(0, fits)
        order = prio.argsort()
        order = order[cell[order].argsort(stable=True)]  # grouped by cell, ascending priority inside
        cell, prio, entry = cell[order], prio[order], fits[order]
        cells, counts = torch.unique_consecutive(cell, return_counts=True)  # [m] touched cells
        group = torch.repeat_interleave(torch.arange(cells.numel(), device=self.device), counts)
        rank = torch.arange(cell.numel(), device=self.device) - (counts.cumsum(0) - counts)[group]
        top = (rank < s).nonzero().squeeze(1)  # only a cell's s best newcomers can enter
        new_prio = torch.full((cells.numel(), s), INT64_MAX, dtype=torch.int64, device=self.device)
        new_entry = torch.zeros(cells.numel(), s, dtype=torch.int64, device=self.device)
        new_prio[group[top], rank[top]] = prio.index_select(0, top)
        new_entry[group[top], rank[top]] = entry.index_select(0, top)
        both = torch.cat([cells_prio.index_select(0, cells), new_prio], 1)  # [m, 2s]
        chosen = torch.zeros_like(both, dtype=torch.bool)
        chosen.scatter_(1, both.topk(s, 1, largest=False, sorted=False).indices, True)
        # Pair evicted slots with admitted newcomers in order; a padding newcomer (INT64_MAX) only ever
        # displaces an empty slot, and such pairs are dropped.
        out_c, out_slot = (~chosen[:, :s]).nonzero(as_tuple=True)
        in_c, in_j = chosen[:, s:].nonzero(as_tuple=True)
        incoming = new_prio[in_c, in_j]
        real = (incoming != INT64_MAX).nonzero().squeeze(1)
        slot = cells.index_select(0, out_c.index_select(0, real)) * s + out_slot.index_select(0, real)
        src = new_entry[in_c, in_j].index_select(0, real)  # entry index of each admitted newcomer
        self.cand_prio.view(-1).index_copy_(0, slot, incoming.index_select(0, real))
        self.cand_val.view(-1).index_copy_(0, slot, val.index_select(0, src))
        self.cand_pos.view(-1).index_copy_(0, slot, pos.index_select(0, src))
        if self.cand_acts is not None:
            self.cand_acts.view(-1, self.context_len).index_copy_(0, slot, rows_of(src))

    def _rescale(self, old_exp: torch.Tensor, exp: torch.Tensor) -> None:
        """Re-express histogram and candidates of features whose range R_f grew from 2**old_exp to 2**exp."""
        grown = ((exp != old_exp) & (old_exp != EMPTY_EXP)).nonzero().squeeze(1)  # never-fired: nothing to move
        if grown.numel() == 0:
            return
        shift = (exp - old_exp)[grown]
        hist = self.fine_hist[grown]  # [g, FINE_BINS]
        target = torch.arange(FINE_BINS, device=self.device) >> shift.clamp(max=FINE_BITS)[:, None]
        self.fine_hist[grown] = torch.zeros_like(hist).scatter_add_(1, target, hist)
        prio = self.cand_prio[grown]  # [g, UNITS, s]
        g, unit, slot = (prio != INT64_MAX).nonzero(as_tuple=True)
        val, pos, prio = self.cand_val[grown][g, unit, slot], self.cand_pos[grown][g, unit, slot], prio[g, unit, slot]
        rows = self.cand_acts[grown][g, unit, slot] if self.cand_acts is not None else None  # [n, T]
        self.cand_prio[grown] = INT64_MAX
        self._insert_candidates(grown[g], unit >> shift.clamp(max=UNIT_BITS)[g], prio, val, pos,
                                lambda sel: rows.index_select(0, sel))

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
        g, unit, slot = (theirs.cand_prio != INT64_MAX).nonzero(as_tuple=True)
        rows = theirs.cand_acts[g, unit, slot] if self.cand_acts is not None else None  # [n, T]
        self._insert_candidates(g, unit, theirs.cand_prio[g, unit, slot], theirs.cand_val[g, unit, slot],
                                theirs.cand_pos[g, unit, slot], lambda sel: rows.index_select(0, sel))
        keys = torch.cat([self.top_key, theirs.top_key], 1)  # [F, 2k]
        pick = keys.topk(self.top_k, 1).indices
        self.top_key = keys.gather(1, pick)
        self.top_pos = torch.cat([self.top_pos, theirs.top_pos], 1).gather(1, pick)
        acts = torch.cat([self.top_acts, theirs.top_acts], 1)  # [F, 2k, T]
        self.top_acts = acts.gather(1, pick[:, :, None].expand(-1, -1, self.context_len)).contiguous()
        for name in ("top_coact_ids", "top_coact_acts"):
            both = torch.cat([getattr(self, name), getattr(theirs, name)], 1)  # [F, 2k, P]
            setattr(self, name, both.gather(1, pick[:, :, None].expand(-1, -1, self.coact_width)).contiguous())

    def _settings(self) -> dict:
        return dict(d_sae=self.d_sae, context_len=self.context_len, top_k=self.top_k, n_intervals=self.n_intervals,
                    examples_per_interval=self.examples_per_interval, hist_bins=self.hist_bins, seed=self.seed,
                    keep_interval_acts=self.keep_interval_acts, coact_width=self.coact_width)

    def state_dict(self) -> dict:
        """Settings and a copy of the state tensors (on their device); torch.save it for a checkpoint."""
        return {"settings": self._settings(), **{name: getattr(self, name).clone() for name in self._state_names()}}

    def _state_names(self) -> tuple[str, ...]:
        return (STATE_TENSORS + (("cand_acts",) if self.keep_interval_acts else ())
                + (("top_coact_ids", "top_coact_acts") if self.coact_width else ()))

    def load_state_dict(self, state: dict) -> None:
        settings = {**OPTION_DEFAULTS, **state["settings"]}  # checkpoints from before the options
        if settings != self._settings():
            raise ValueError(f"Checkpoint settings {settings} differ from {self._settings()}.")
        for name in self._state_names():
            mine = getattr(self, name)
            if state[name].shape != mine.shape or state[name].dtype != mine.dtype:
                raise ValueError(f"Checkpoint tensor {name} has {state[name].dtype}{tuple(state[name].shape)}, "
                                 f"expected {mine.dtype}{tuple(mine.shape)}.")
            setattr(self, name, state[name].to(self.device).clone())

    @classmethod
    def from_state_dict(cls, state: dict, device: str | torch.device = "cpu") -> FeatureStats:
        stats = cls(**{**OPTION_DEFAULTS, **state["settings"]}, device=device)
        stats.load_state_dict(state)
        return stats

    # ---------------------------------------------------------------- results

    @torch.no_grad()
    def finalize(self) -> dict[str, torch.Tensor | int]:
        """The statistics as a plain dict of CPU tensors, fields as in the module docstring. The state is
        unchanged: streaming may go on after it."""
        exp = range_exponent(self.max)
        n_firing = self.fine_hist.sum(1, dtype=torch.int64)  # [F]
        cum = torch.nn.functional.pad(self.fine_hist.cumsum(1, dtype=torch.int64), (1, 0))  # [F, FINE_BINS + 1]
        out: dict[str, torch.Tensor | int] = {
            "n_tokens": int(self.n_tokens), "n_contexts": int(self.n_contexts),
            "n_firing": n_firing,
            "density": n_firing.double() / max(int(self.n_tokens), 1),
            "max_act": self.max.clone(),
            "mean_act": self.sum_fixed.double() / float(1 << SUM_FRAC_BITS) / n_firing.clamp(min=1),
        }
        out.update(self._histogram(exp, cum))
        out.update(self._top_examples())
        out.update(self._intervals(exp, cum, n_firing))
        return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in out.items()}

    def _histogram(self, exp, cum) -> dict[str, torch.Tensor]:
        nb = self.hist_bins
        top_sub = (self.max * _pow2(FINE_BITS - exp)).long()  # sub-bin holding the max, in [S/2, S)
        width = (top_sub + nb) // nb  # sub-bins per displayed bin: ceil((top_sub + 1) / nb)
        edges = torch.arange(nb + 1, device=self.device) * width[:, None]  # [F, nb + 1] in sub-bins
        counts = cum.gather(1, edges.clamp(max=FINE_BINS)).diff(1)  # [F, nb]
        fired = self.max > 0
        return {"hist_counts": counts,
                "hist_bin_width": torch.where(fired, width.float() * _pow2(exp - FINE_BITS), 0.0)}

    def _top_examples(self) -> dict[str, torch.Tensor]:
        key, order = self.top_key.sort(1, descending=True)  # [F, k]
        found = key >= 0
        ctx = torch.where(found, LOW32 - (key & LOW32), -1)
        act = torch.where(found, (key >> 32).int().view(torch.float32), 0.0)
        pos = torch.where(found, self.top_pos.gather(1, order), -1)
        token_acts = self.top_acts.gather(1, order[:, :, None].expand(-1, -1, self.context_len))  # [F, k, T]
        out = {"top_ctx": ctx, "top_act": act, "top_pos": pos, "top_token_acts": token_acts}
        if self.coact_width:
            by_slot = order[:, :, None].expand(-1, -1, self.coact_width)
            out["top_coact_ids"] = self.top_coact_ids.gather(1, by_slot)  # [F, k, P]
            out["top_coact_acts"] = torch.where(found[:, :, None], self.top_coact_acts.gather(1, by_slot), 0.0)
        return out

    def _intervals(self, exp, cum, n_firing) -> dict[str, torch.Tensor]:
        n, s, F = self.n_intervals, self.examples_per_interval, self.d_sae
        fired = self.max > 0
        max_units = self.max.double() * _pow2(UNIT_BITS - exp)  # max in units of R_f / UNITS, in [C/2, C)
        # Unit boundary nearest to each of linspace(0, max, n + 1); the last one is the first above the max.
        edges = torch.floor(max_units[:, None] * torch.arange(n + 1, device=self.device) / n + 0.5).long()
        edges[:, n] = max_units.long() + 1  # [F, n + 1], strictly increasing since max/n >= 6.4 units
        count = cum.gather(1, edges * (FINE_BINS // UNITS)).diff(1)  # [F, n] firing tokens per interval
        scale = _pow2(exp - UNIT_BITS)[:, None]
        lo = torch.where(fired[:, None], edges[:, :-1] * scale, 0.0)
        hi = torch.where(fired[:, None], edges[:, 1:] * scale, 0.0)
        # Interval of each unit, then the bottom-s priorities of each interval among its units' candidates.
        unit_iv = (torch.arange(UNITS, device=self.device)[None, :, None] >= edges[:, None, 1:n]).sum(2)  # [F, C]
        prio = self.cand_prio.view(F, UNITS * s)
        iv = torch.where(prio == INT64_MAX, n, unit_iv.repeat_interleave(s, 1))  # empty -> n (dropped)
        order = prio.argsort(1)
        order = order.gather(1, iv.gather(1, order).argsort(dim=1, stable=True))  # by interval, then priority
        iv_sorted = iv.gather(1, order)
        per_iv = torch.zeros(F, n + 1, dtype=torch.int64, device=self.device).scatter_add_(1, iv, torch.ones_like(iv))
        rank = torch.arange(UNITS * s, device=self.device) - (per_iv.cumsum(1) - per_iv).gather(1, iv_sorted)
        f_i, j = ((rank < s) & (iv_sorted < n)).nonzero(as_tuple=True)
        src, dst_iv, dst_rank = order[f_i, j], iv_sorted[f_i, j], rank[f_i, j]
        ctx = torch.full((F, n, s), -1, dtype=torch.int64, device=self.device)
        act = torch.zeros(F, n, s, device=self.device)
        pos = torch.full((F, n, s), -1, dtype=torch.int32, device=self.device)
        ctx[f_i, dst_iv, dst_rank] = prio[f_i, src] & LOW32
        act[f_i, dst_iv, dst_rank] = self.cand_val.view(F, -1)[f_i, src]
        pos[f_i, dst_iv, dst_rank] = self.cand_pos.view(F, -1)[f_i, src]
        act, by_act = act.sort(dim=2, descending=True, stable=True)  # strongest first within an interval
        out = {"interval_lo": lo, "interval_hi": hi, "interval_count": count,
               "interval_share": count.double() / n_firing.clamp(min=1)[:, None],
               "interval_ctx": ctx.gather(2, by_act), "interval_act": act, "interval_pos": pos.gather(2, by_act)}
        if self.cand_acts is not None:
            T = self.context_len
            rows = torch.zeros(F, n, s, T, device=self.device)
            rows[f_i, dst_iv, dst_rank] = self.cand_acts.view(F, -1, T)[f_i, src]
            out["interval_token_acts"] = rows.gather(2, by_act[..., None].expand(-1, -1, -1, T))  # [F, n, s, T]
        return out


def token_acts(acts: torch.Tensor, content_mask: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """acts[b, :, f] * content_mask[b] for index vectors b, f: [n, T]. Gathered position by position
    ([T, n] through index_select), which is ~3x faster on CPU than advanced indexing's strided rows."""
    B, T, F = acts.shape
    where = (b * (T * F) + f)[None, :] + torch.arange(T, device=acts.device)[:, None] * F  # [T, n]
    rows = acts.reshape(-1).index_select(0, where.view(-1)).view(T, -1)  # [T, n]
    rows *= content_mask.T.index_select(1, b)
    return rows.T.contiguous()  # [n, T]


def example_context_ids(result: dict) -> torch.Tensor:
    """Sorted unique context ids of the interval samples: what the writer re-encodes for their per-token acts."""
    ctx = result["interval_ctx"]
    return torch.unique(ctx[ctx >= 0])


@torch.no_grad()
def fill_example_acts(example_ctx: torch.Tensor, context_ids: torch.Tensor, acts: torch.Tensor,
                      content_mask: torch.Tensor, out: torch.Tensor) -> None:
    """Copy per-token acts of one re-encoded batch into `out` wherever an example names one of its contexts.

    example_ctx [F, ...] context ids (-1 = none), e.g. result["interval_ctx"] [F, n, s];
    context_ids [B], acts [B, T, F], content_mask [B, T]; out [F, ..., T_out >= T] float32, filled in place
    (special positions written as 0, like the top-k per-token acts).
    """
    F, T = acts.shape[2], acts.shape[1]
    wanted = example_ctx.reshape(F, -1).to(acts.device)  # [F, m]
    sorted_ids, order = context_ids.to(acts.device).sort()
    where = torch.searchsorted(sorted_ids, wanted).clamp(max=sorted_ids.numel() - 1)
    f, j = ((sorted_ids[where] == wanted) & (wanted >= 0)).nonzero(as_tuple=True)
    b = order[where[f, j]]
    rows = token_acts(acts, content_mask.to(acts.device), b, f).to(out.device)  # [hits, T]
    out.view(F, -1, out.shape[-1])[f.to(out.device), j.to(out.device), :T] = rows


def expected_memory_bytes(d_sae: int, context_len: int, top_k: int = 20, examples_per_interval: int = 5,
                          keep_interval_acts: bool = False, coact_width: int = 0) -> int:
    """State size of one FeatureStats, to plan how many SAEs fit on a device at once."""
    per_feature = (4 + 8 + 4 * FINE_BINS + top_k * (8 + 4 + 4 * context_len + 8 * coact_width)
                   + UNITS * examples_per_interval * (8 + 4 + 4 + (4 * context_len if keep_interval_acts else 0)))
    return d_sae * per_feature
