"""How stable is a scheme's top-X % set?  The split-half estimate and the early-stopping rule.

Owns: the stability estimate of a scheme's top-X % set (:func:`stability`,
:func:`stability_estimates`), computed from the two half sums a
:class:`~fastnig.neurons.scheme.Scheme` keeps (pairs split by query), and the
early-stopping rule of ``attribution.pairs: {max: ..., stop_when: {level:
..., overlap: ...}}`` (:class:`StopRule`: when to check, and whether a scheme
may stop).

Must not: attribute pairs or draw them (:mod:`fastnig.study.pipeline`), or define
how halves are assigned (:mod:`fastnig.neurons.halves`) and summed
(:mod:`fastnig.neurons.scheme`).

**The estimate** (docs/method.md §6.6).  A scheme of n pairs keeps, besides
its sum, the exact sums of two halves (pair -> half by a hash of its query
id, so that the pairs of one query are in one half; n_0 + n_1 = n).  Let
S_k(v) be the top-k set of a vector of means (ties as
:meth:`Scheme.ranking`), m the scheme's mean and m_h the mean of half h.
The observed loss of half h is

    u_h = 1 - |S_k(m_h) ∩ S_k(m)| / k,

the fraction of the top set of n_h pairs that is no longer in the top set
once the other half's pairs are added.  Under a local noise model — each
neuron's mean over a nested sample of a pairs is its true mean plus noise of
variance σ_y² / a (pairs drawn independently, central limit), and the true
means are spread smoothly around the top-k threshold — the fraction of a
top set lost between nested samples of a < b pairs is proportional to the
standard deviation of the change of the means, i.e. to sqrt(1/a - 1/b).
Calibrating that constant on each half gives the predicted loss from n to
n' pairs,

    û(n -> n') = mean_h [ u_h / sqrt(1/n_h - 1/n) ] · sqrt(1/n - 1/n'),

and the estimate Ô(n -> n') = 1 - û, clipped to [0, 1].  For n' = 2n and
equal halves, û = (u_0 + u_1) / 2 / sqrt(2): the split-half loss shrunk by a
Spearman–Brown-like factor 1/sqrt(2); for n' -> ∞ (the top set of the whole
population of pairs), Ô = 1 - (u_0 + u_1) / 2.  The model holds when few
neurons cross the threshold (Ô near 1, the region the stopping rule acts
in); where the top set is mostly noise it is optimistic (pure noise at
1 %: ≈ 0.5 where the truth is ≈ 0.3), but far below any useful threshold.
Because the halves are split by query, the calibration also sees how much
the set depends on *which* queries were drawn: where the pairs of a query
share a strong query effect, the estimate is below the overlap of a doubled
draw from the same queries (conservative), and it is the stability of the
set against new queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..common import check_int, is_int
from .scheme import RANK_BY, Scheme
from .sets import top_count

__all__ = ["MIN_HALF_PAIRS", "StopRule", "stability", "stability_estimates", "top_indices", "top_overlap"]

MIN_HALF_PAIRS = 2
"""Fewest pairs per half for an estimate (below: not available, NaN)."""


def top_indices(values, k: int, by: str = "value") -> np.ndarray:
    """The ``k`` flat indices of the largest ``values`` (``by="abs"``: of |values|).

    Ties go to the lower index (model order), exactly as :meth:`Scheme.ranking`.
    """
    if by not in RANK_BY:
        raise ValueError(f"by must be one of {RANK_BY}, got {by!r}")
    values = np.asarray(values, dtype=np.float64)
    key = values if by == "value" else np.abs(values)
    return np.lexsort((np.arange(values.size), -key))[:k]


def top_overlap(a, b, k: int, by: str = "value") -> float:
    """|top_k(a) ∩ top_k(b)| / k (NaN when k = 0)."""
    if k == 0:
        return float("nan")
    return float(np.intersect1d(top_indices(a, k, by), top_indices(b, k, by), assume_unique=True).size) / k


def _check_factor(factor) -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"factor must be a number > 1 (the estimate is for factor × the pairs held; "
                         f"math.inf = the set of all pairs), got {factor!r}")
    return float(factor)


def stability_estimates(scheme: Scheme, levels: Sequence[float], *, by: str = "value",
                        factor: float = 2.0) -> Dict[float, float]:
    """``{level: estimate}``: :func:`stability` at each level, sharing the rankings.

    Every estimate is NaN when the scheme keeps no halves (a fusion, or a
    file saved before halves existed) or a half holds fewer than
    :data:`MIN_HALF_PAIRS` pairs; a level whose top set is empty gives NaN.
    """
    if not isinstance(scheme, Scheme):
        raise TypeError(f"scheme must be a fastnig Scheme, got {type(scheme).__name__}")
    factor = _check_factor(factor)
    if by not in RANK_BY:
        raise ValueError(f"by must be one of {RANK_BY}, got {by!r}")
    levels = [float(x) for x in levels]
    counts = scheme.half_counts() if scheme.has_halves else (0, 0)
    halves = scheme.half_means() if min(counts) >= MIN_HALF_PAIRS else None
    if halves is None:
        return {level: float("nan") for level in levels}
    n = scheme.count
    full_order = scheme.ranking(by)
    half_orders = [top_indices(h.numpy(), h.numel(), by) for h in halves]
    scale_next = math.sqrt(1.0 / n - (0.0 if math.isinf(factor) else 1.0 / (factor * n)))
    out = {}
    for level in levels:
        k = top_count(level, scheme.total_neurons)
        if k == 0:
            out[level] = float("nan")
            continue
        full_top = full_order[:k]
        loss = 0.0
        for order, n_h in zip(half_orders, counts):
            u_h = 1.0 - np.intersect1d(order[:k], full_top, assume_unique=True).size / k
            loss += u_h / math.sqrt(1.0 / n_h - 1.0 / n)
        out[level] = min(1.0, max(0.0, 1.0 - loss / 2 * scale_next))
    return out


def stability(scheme: Scheme, level: float, *, by: str = "value", factor: float = 2.0) -> float:
    """Estimated fraction of the top ``level`` % set that stays at ``factor`` × the pairs.

    The split-half estimate of the module docstring (docs/method.md §6.6):
    ``factor=2`` (default) answers "how much of the set would survive if we
    doubled the pairs?"; ``factor=math.inf``, "how much of it is in the set
    of all pairs?".  NaN when not available (see :func:`stability_estimates`).
    """
    return stability_estimates(scheme, [level], by=by, factor=factor)[float(level)]


@dataclass(frozen=True)
class StopRule:
    """Stop attributing a scheme once its top ``level`` % set is stable at ``confirm`` round ends in a row.

    Pairs are attributed in rounds that end after ``first_round``,
    2 · ``first_round``, 4 · ``first_round``, ... sampled pairs (and at the
    maximum).  At each round end but the last, the criterion is that
    :func:`stability` of the top ``level`` % set (ranked ``by``), for twice
    the pairs, is at least ``overlap`` — doubling the pairs (the next round)
    is expected to keep at least that fraction of the set.  Attribution stops
    at the first round end where the criterion holds *and* held at the
    ``confirm - 1`` round ends before it (:meth:`check`); an estimate that is
    not available (NaN) never holds.

    Why not stop at the first round end where it holds: the estimate is a
    noisy statistic, coarse at small top sets (each half's overlap moves in
    steps of 1/k: ~0.05 at k = 21, the top 0.1 % of MiniLM), and checking it
    after every round and stopping at the first pass selects the round ends
    where the noise pushed it up — the estimate at the stopping time is
    biased upward.  Asking for ``confirm`` (default 2) consecutive passes
    means one lucky round end never stops a run; the confirming check sees
    twice the pairs, half of them new.  ``confirm=1`` is the former rule.

    Attributes:
        level: percent of all neurons, in (0, 100].
        overlap: fraction in (0, 1].
        by: ``"value"`` or ``"abs"`` (as :meth:`Scheme.top`).
        first_round: sampled pairs in the first round (>= 2 · MIN_HALF_PAIRS).
        confirm: consecutive round ends at which the criterion must hold (>= 1).
    """

    level: float
    overlap: float
    by: str = "value"
    first_round: int = 16
    confirm: int = 2

    KEYS = ("level", "overlap", "by", "first_round", "confirm")

    def __post_init__(self):
        for key, value, low, high in (("level", self.level, 0, 100), ("overlap", self.overlap, 0, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise ValueError(f"stop_when.{key} must be a number in ({low}, {high}], got {value!r}")
        if self.by not in RANK_BY:
            raise ValueError(f"stop_when.by must be one of {RANK_BY}, got {self.by!r}")
        if not is_int(self.first_round) or self.first_round < 2 * MIN_HALF_PAIRS:
            raise ValueError(f"stop_when.first_round must be an integer >= {2 * MIN_HALF_PAIRS}, "
                             f"got {self.first_round!r}")
        if not is_int(self.confirm) or self.confirm < 1:
            raise ValueError(f"stop_when.confirm must be an integer >= 1 (round ends in a row at which the "
                             f"estimate must reach the overlap), got {self.confirm!r}")

    @classmethod
    def parse(cls, spec) -> Optional["StopRule"]:
        """A rule from ``None`` (no early stopping), a :class:`StopRule` or a mapping with :attr:`KEYS`."""
        if spec is None or isinstance(spec, StopRule):
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(f"stop_when must be a mapping such as {{level: 1, overlap: 0.95}}, got {spec!r}")
        unknown = sorted(set(spec) - set(cls.KEYS))
        missing = [k for k in ("level", "overlap") if k not in spec]
        if unknown or missing:
            raise ValueError(f"stop_when needs level and overlap (optional: by, first_round, confirm); "
                             f"unknown {unknown}, missing {missing}")
        return cls(**{k: spec[k] for k in cls.KEYS if k in spec})

    def as_dict(self) -> Dict[str, object]:
        return {"level": self.level, "overlap": self.overlap, "by": self.by, "first_round": self.first_round,
                "confirm": self.confirm}

    def round_ends(self, max_pairs: int) -> List[int]:
        """Sampled-pair counts after which the rule is checked: first_round · 2^i, then ``max_pairs``."""
        check_int("max_pairs", max_pairs, 1)
        ends, end = [], self.first_round
        while end < max_pairs:
            ends.append(end)
            end *= 2
        return ends + [max_pairs]

    def holds(self, estimate: Optional[float]) -> bool:
        """Whether one estimate meets the criterion (``None`` / NaN = not available: no)."""
        return estimate is not None and not math.isnan(estimate) and estimate >= self.overlap

    def check(self, scheme: Scheme, previous: Sequence[Optional[float]] = ()) -> Tuple[bool, float]:
        """``(stop, estimate)`` for this scheme now.

        ``previous``: the estimates at the round ends before this one, oldest
        first (``None`` / NaN where not available or not checked).  ``stop``
        when this estimate and the last ``confirm - 1`` of ``previous`` all
        meet the criterion (:meth:`holds`).
        """
        estimate = stability(scheme, self.level, by=self.by, factor=2.0)
        need = self.confirm - 1
        earlier = list(previous)[-need:] if need else []
        stop = self.holds(estimate) and len(earlier) == need and all(self.holds(e) for e in earlier)
        return stop, estimate
