"""Contrastive search and detectors, the maths only (numpy; no web, no torch): which features separate two
sets of prompts, and a small detector fitted from the best of them.

Each prompt is one number per feature: its activation pooled over the prompt's counted tokens (max or mean;
featurescope/positions.py says which tokens count, the precompute's rule). For every feature the two sets'
pooled values give
  - AUROC: P(a > b) + P(a = b) / 2 for a prompt a of set A and b of set B (Mann-Whitney U / (n_a n_b));
    1 fires only on A, 0 only on B, 0.5 no separation;
  - the difference of means, mean_A - mean_B, and how many prompts of each set it fired on at all.
Features are ranked by separation, max(AUROC, 1 - AUROC), then by |difference of means|; a feature that fired
on no prompt of either set is left out.

A detector is the top k features of the ranking on a training split, each with a threshold (on the pooled
activation, chosen for balanced accuracy on that split) and a weight 2 AUROC - 1 (signed: positive for a
feature of set A). A prompt's score is the sum of the weights of the features above their threshold; a
token's score is the same sum over the features above their threshold at that token. Its AUROC is measured
on the held-out split, which the fit never saw.

    scores = score_features(pooled_a, pooled_b)             # [n_a, F], [n_b, F] -> FeatureScores
    rows = rank({"12-res": scores}, top=20)                  # across SAEs, best first
    train, held = split(len(prompts_a)), ...
    fit = fit_detector({"12-res": a}, {"12-res": b}, k=5)   # DetectorFeature list
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

POOLS = ("max", "mean")
HELD_OUT_SHARE = 0.2
SPLIT_SEED = 0
_BLOCK = 4096  # features ranked at once: bounds the [n_a + n_b, block] rank matrices


@dataclass(frozen=True)
class FeatureScores:
    """Per feature of one SAE (arrays of length F)."""

    auroc: np.ndarray
    mean_a: np.ndarray
    mean_b: np.ndarray
    fired_a: np.ndarray  # prompts of A whose pooled activation is > 0
    fired_b: np.ndarray
    n_a: int
    n_b: int

    @property
    def diff(self) -> np.ndarray:
        return self.mean_a - self.mean_b

    @property
    def separation(self) -> np.ndarray:
        return np.maximum(self.auroc, 1.0 - self.auroc)


@dataclass(frozen=True)
class Ranked:
    """One feature of the ranking."""

    sae_id: str
    index: int
    auroc: float
    diff: float
    mean_a: float
    mean_b: float
    fired_a: int
    fired_b: int
    n_a: int
    n_b: int

    @property
    def direction(self) -> str:
        """The set it fires more on: 'a' or 'b'."""
        return "a" if self.auroc >= 0.5 else "b"

    @property
    def separation(self) -> float:
        return max(self.auroc, 1.0 - self.auroc)


@dataclass(frozen=True)
class DetectorFeature:
    sae_id: str
    index: int
    threshold: float  # on the pooled activation (and, per token, on the token's activation)
    weight: float  # 2 AUROC - 1 on the training split: > 0 for a feature of set A
    auroc: float  # on the training split


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..N down each column of x [N, F], ties sharing their average rank."""
    n = x.shape[0]
    order = np.argsort(x, axis=0, kind="stable")
    s = np.take_along_axis(x, order, axis=0)
    pos = np.arange(n)[:, None]
    starts = np.ones_like(s, dtype=bool)
    starts[1:] = s[1:] != s[:-1]
    ends = np.ones_like(s, dtype=bool)
    ends[:-1] = s[1:] != s[:-1]
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=0)
    last = np.flip(np.minimum.accumulate(np.flip(np.where(ends, pos, n), axis=0), axis=0), axis=0)
    ranks = np.empty_like(s, dtype=np.float64)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=0)
    return ranks


def auroc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """AUROC of every column: a [n_a, F] (positives) against b [n_b, F]; ties count half."""
    n_a, n_b = a.shape[0], b.shape[0]
    if n_a == 0 or n_b == 0:
        raise ValueError("AUROC needs at least one prompt in each set.")
    out = np.empty(a.shape[1], dtype=np.float64)
    for start in range(0, a.shape[1], _BLOCK):
        both = np.concatenate([a[:, start:start + _BLOCK], b[:, start:start + _BLOCK]]).astype(np.float64)
        rank_sum = average_ranks(both)[:n_a].sum(axis=0)
        out[start:start + _BLOCK] = (rank_sum - n_a * (n_a + 1) / 2.0) / (n_a * n_b)
    return out


def score_features(a: np.ndarray, b: np.ndarray) -> FeatureScores:
    """Pooled activations a [n_a, F] of set A and b [n_b, F] of set B -> each feature's scores."""
    return FeatureScores(auroc(a, b), a.mean(axis=0, dtype=np.float64), b.mean(axis=0, dtype=np.float64),
                         (a > 0).sum(axis=0), (b > 0).sum(axis=0), a.shape[0], b.shape[0])


def rank(scores: Mapping[str, FeatureScores], top: int) -> list[Ranked]:
    """The `top` best-separating features over all the SAEs given, best first; ties broken by |difference
    of means|, then by the SAEs' order and the feature index."""
    candidates = []
    for order, (sae_id, s) in enumerate(scores.items()):
        fired = np.flatnonzero((s.fired_a + s.fired_b) > 0)
        # The best `top` of each SAE are enough to find the best `top` of all.
        key = np.lexsort((fired, -np.abs(s.diff[fired]), -s.separation[fired]))[:top]
        candidates += [(-float(s.separation[i]), -abs(float(s.diff[i])), order, int(i), sae_id) for i in fired[key]]
    candidates.sort()
    out = []
    for _, _, _, i, sae_id in candidates[:top]:
        s = scores[sae_id]
        out.append(Ranked(sae_id, i, float(s.auroc[i]), float(s.diff[i]), float(s.mean_a[i]), float(s.mean_b[i]),
                          int(s.fired_a[i]), int(s.fired_b[i]), s.n_a, s.n_b))
    return out


def split(n: int, share: float = HELD_OUT_SHARE, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(training, held-out) prompt indices of a set of n: a seeded `share` held out, at least one each."""
    if n < 2:
        raise ValueError("A detector needs at least 2 prompts per set: one to fit on, one to test on.")
    held = min(n - 1, max(1, round(share * n)))
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[held:]), sorted(int(i) for i in perm[:held])


def best_threshold(pos: np.ndarray, neg: np.ndarray) -> float:
    """The threshold t on a pooled activation for which 'fires (> t)' best tells pos from neg prompts
    (balanced accuracy); midway between neighbouring values seen, so a value a hair off does not flip."""
    values = np.unique(np.concatenate([pos, neg]))
    cuts = (values[:-1] + values[1:]) / 2.0 if len(values) > 1 else values
    tpr = (pos[None, :] > cuts[:, None]).mean(axis=1)
    fpr = (neg[None, :] > cuts[:, None]).mean(axis=1)
    return float(cuts[int(np.argmax(tpr - fpr))])


def fit_detector(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], k: int) -> list[DetectorFeature]:
    """The top k features separating a[sae] [n_a, F] from b[sae] [n_b, F] (the training split), with thresholds
    and weights."""
    ranked = rank({sae_id: score_features(a[sae_id], b[sae_id]) for sae_id in a}, top=k)
    out = []
    for r in ranked:
        pos, neg = a[r.sae_id][:, r.index], b[r.sae_id][:, r.index]
        if r.direction == "b":
            pos, neg = neg, pos
        out.append(DetectorFeature(r.sae_id, r.index, best_threshold(pos, neg), 2.0 * r.auroc - 1.0, r.auroc))
    return out


def detector_scores(features: Sequence[DetectorFeature], pooled: Mapping[tuple[str, int], np.ndarray]) -> np.ndarray:
    """Per-prompt scores [n]: pooled[(sae_id, index)] [n] is each detector feature's pooled activation."""
    n = len(next(iter(pooled.values()))) if pooled else 0
    score = np.zeros(n, dtype=np.float64)
    for f in features:
        score += f.weight * (np.asarray(pooled[(f.sae_id, f.index)]) > f.threshold)
    return score


def token_scores(features: Sequence[DetectorFeature], acts: Mapping[tuple[str, int], np.ndarray],
                 counted: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-token scores [seq]: the weights of the features above their threshold at each counted token."""
    seq = len(next(iter(counted.values())))
    score = np.zeros(seq, dtype=np.float64)
    for f in features:
        score += f.weight * ((np.asarray(acts[(f.sae_id, f.index)]) > f.threshold) & np.asarray(counted[f.sae_id]))
    return score

