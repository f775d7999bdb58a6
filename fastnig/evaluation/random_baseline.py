"""The random baseline of Table 4: as many random repetitions as the verdict needs (docs/method.md §8).

Owns: the repetition rule (:class:`RepetitionRule`: a fixed number, or
rounds stopped when the random mean is known well enough), the store of
random-set results shared by every row of a dataset and kept on disk for
resume (:class:`RandomRuns`: one per-query nDCG array per (per-module
counts, seed, repetition)), and the loop that draws random sets round by
round (:func:`run_random_baseline`).

Deterministic by construction: repetition ``r`` is :func:`random_like`'s set
``(seed, r)`` whatever the rule, the rule is checked only at fixed counts
(:meth:`RepetitionRule.checkpoints`) and reads only the first ``n`` results,
so a stopped row equals the first ``n`` repetitions of a fixed run, and a
resumed or sharded run (same results, bit for bit) stops at the same ``n``.

Must not: change a model or score candidates itself (it asks a
:class:`fastnig.evaluation.pruning.PruningBenchmark`), lay out the table.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from ..common import is_int, optional_import, write_atomic

DEFAULT_REPETITIONS = 50
STOP_KEYS = ("half_width", "margin", "confidence", "min", "round")
DEFAULT_STOP = {"half_width": 0.25, "margin": 1.0, "confidence": 0.99, "min": 5, "round": 5}
"""The default ``stop_when`` (units: nDCG points = 100 x nDCG@k).  ``confidence`` 0.99 per check, not 0.95: the
rule looks up to 10 times, and on the demo's validation (docs/pruning.md) a 0.95 interval stopped at 5 missed the
50-repetition mean in 1 of 12 rows."""

Signature = Tuple[Tuple[str, int], ...]
"""A set's per-module counts, ``((module, count), ...)`` in model order: what a random set matches."""


@dataclass(frozen=True)
class RepetitionRule:
    """How many random sets a Table 4 row draws.

    Fixed (``adaptive=False``): exactly ``max``.  Adaptive: repetitions are
    drawn in rounds; after ``min``, ``min + round``, ... (never past ``max``)
    the row stops when, with ``m`` the mean pruned nDCG@k of its random sets and
    ``h`` the half-width of its Student-t ``confidence`` interval (nDCG points,
    100 x nDCG), either

    * ``h <= half_width`` (the random mean is stated to that precision), or
    * the set's own pruned nDCG lies outside ``[m - h, m + h]`` by at least
      ``margin`` points (``"decided"``: the set hurts more / less than random), or
    * the whole interval lies within ``margin`` points of the set's pruned nDCG,
      ``|s - m| + h <= margin`` (``"equivalent"``: the set hurts as much as
      random, to within the margin — the comparison is decided the other way,
      and more random sets would only narrow an interval that already says so).

    ``half_width`` or ``margin`` may be ``None`` (that criterion is off; ``margin``
    governs both comparison criteria).
    """

    max: int = DEFAULT_REPETITIONS
    adaptive: bool = False
    half_width: Optional[float] = DEFAULT_STOP["half_width"]
    margin: Optional[float] = DEFAULT_STOP["margin"]
    confidence: float = DEFAULT_STOP["confidence"]
    min: int = DEFAULT_STOP["min"]
    round: int = DEFAULT_STOP["round"]

    def __post_init__(self):
        where = "pruning.repetitions"
        if not is_int(self.max) or self.max < 1:
            raise ValueError(f"{where}.max must be a positive integer (random sets per row, the paper: 50), "
                             f"got {self.max!r}")
        if not self.adaptive:
            return
        for key in ("min", "round"):
            value = getattr(self, key)
            if not is_int(value) or value < (2 if key == "min" else 1):
                raise ValueError(f"{where}.stop_when.{key} must be an integer >= {2 if key == 'min' else 1}, "
                                 f"got {value!r}")
        for key in ("half_width", "margin"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
                                      or (key == "half_width" and value == 0)):
                raise ValueError(f"{where}.stop_when.{key} must be a number of nDCG points "
                                 f"({'> 0' if key == 'half_width' else '>= 0'}) or null (off), got {value!r}")
        if self.half_width is None and self.margin is None:
            raise ValueError(f"{where}.stop_when: half_width and margin are both off; the row could never stop "
                             "early (give one, or a plain number of repetitions)")
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)) \
                or not 0 < self.confidence < 1:
            raise ValueError(f"{where}.stop_when.confidence must be in (0, 1), e.g. 0.99, got {self.confidence!r}")

    # ------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, value: Any) -> "RepetitionRule":
        """``N`` (fixed) or ``{max: N, stop_when: {half_width, margin, confidence, min, round}}``.

        ``{max: N}`` alone is fixed; ``stop_when: {}`` takes :data:`DEFAULT_STOP`.
        ``ValueError`` names the key (``pruning.repetitions...``) and the fix.
        """
        if isinstance(value, RepetitionRule):
            return value
        if is_int(value):
            return cls(max=int(value))
        if not isinstance(value, Mapping):
            raise ValueError(f"pruning.repetitions must be a positive integer or {{max: 50, stop_when: "
                             f"{{half_width: 0.25, margin: 1.0}}}}, got {value!r}")
        unknown = sorted(set(value) - {"max", "stop_when"})
        if unknown:
            raise ValueError(f"pruning.repetitions: unknown key(s) {unknown}; allowed: max, stop_when")
        stop = value.get("stop_when")
        if stop is None:
            return cls(max=value.get("max", DEFAULT_REPETITIONS))
        if not isinstance(stop, Mapping):
            raise ValueError(f"pruning.repetitions.stop_when must be a mapping with keys among {list(STOP_KEYS)}, "
                             f"got {stop!r}")
        unknown = sorted(set(stop) - set(STOP_KEYS))
        if unknown:
            raise ValueError(f"pruning.repetitions.stop_when: unknown key(s) {unknown}; allowed: {list(STOP_KEYS)}")
        settings = {**DEFAULT_STOP, **dict(stop)}
        rule = cls(max=value.get("max", DEFAULT_REPETITIONS), adaptive=True, **settings)
        if rule.min > rule.max:
            raise ValueError(f"pruning.repetitions.stop_when.min ({rule.min}) is above max ({rule.max}); "
                             "lower min or raise max")
        return rule

    def as_dict(self) -> Dict[str, Any]:
        """The config form (what :meth:`parse` reads back)."""
        if not self.adaptive:
            return {"max": self.max}
        return {"max": self.max, "stop_when": {k: getattr(self, k) for k in STOP_KEYS}}

    # -------------------------------------------------------------- rule
    def checkpoints(self) -> List[int]:
        """Repetition counts after which the rule is checked: ``min, min + round, ..., max`` (fixed: ``[max]``)."""
        if not self.adaptive:
            return [self.max]
        ends = list(range(min(self.min, self.max), self.max, self.round))
        return ends + [self.max]

    def half_width_of(self, points: np.ndarray) -> float:
        """Half-width of the ``confidence`` t-interval of the mean of ``points`` (``[n]``; ``inf`` for n < 2)."""
        n = int(np.size(points))
        if n < 2:
            return math.inf
        t = optional_import("scipy.stats", "for the random baseline's interval").t.ppf(0.5 + self.confidence / 2,
                                                                                       n - 1)
        return float(t * np.std(points, ddof=1) / math.sqrt(n))

    def stop_reason(self, random_points: np.ndarray, set_points: Optional[float]) -> Optional[str]:
        """Why to stop after these repetitions, or ``None`` to draw another round.

        Args:
            random_points: ``[n]`` mean pruned nDCG@k of each random set, in nDCG points (x 100).
            set_points: the set's own mean pruned nDCG@k in points (``None``: no comparison criterion).
        Returns:
            ``"precise"``, ``"decided"``, ``"equivalent"``, ``"max"`` (fixed rules: ``"fixed"``) or ``None``.
        """
        n = int(np.size(random_points))
        if not self.adaptive:
            return "fixed" if n >= self.max else None
        if n >= self.max:
            return "max"
        if n < self.min:
            return None
        h = self.half_width_of(random_points)
        if self.half_width is not None and h <= self.half_width:
            return "precise"
        if self.margin is not None and set_points is not None and not math.isnan(set_points):
            gap = abs(set_points - float(np.mean(random_points)))
            if gap >= h + self.margin:
                return "decided"
            if gap + h <= self.margin:
                return "equivalent"
        return None


# ------------------------------------------------------------------ the store
class RandomRuns:
    """Per-query nDCG@k of random sets, one entry per (per-module counts, seed, repetition), for one dataset.

    Shared by every row of the dataset (rows whose sets have identical
    per-module counts draw identical random sets).  With ``folder``, every
    entry is also written there (one small JSON file, atomically) and the
    entries already there are read at construction, so a resumed run redoes
    no repetition; ``identity`` (the dataset, its candidates and the model
    settings) is part of every file name, so another configuration never
    reads them.  ``write=False`` (ranks other than the main one) reads but
    never writes.
    """

    def __init__(self, folder: Union[str, Path, None] = None, identity: Any = None, write: bool = True):
        self.folder = Path(folder) if folder is not None else None
        self.identity = json.dumps(identity, sort_keys=True, default=str)
        self.write = write
        self._runs: Dict[str, np.ndarray] = {}
        self.computed = 0
        if self.folder is not None and self.folder.is_dir():
            for path in sorted(self.folder.glob("*.json")):
                try:
                    entry = json.loads(path.read_text())
                    if entry.get("identity") == self.identity:
                        self._runs[path.stem] = np.asarray(entry["ndcg"], dtype=np.float64)
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # a damaged entry is recomputed

    def key(self, signature: Signature, seed: int, repetition: int) -> str:
        text = json.dumps([self.identity, [list(s) for s in signature], seed, repetition])
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def __len__(self) -> int:
        return len(self._runs)

    def get_or_compute(self, signature: Signature, seed: int, repetition: int,
                       compute: Callable[[], np.ndarray]) -> np.ndarray:
        """The ``[num_queries]`` nDCG@k of repetition ``repetition``, computed (and stored) if not yet known."""
        key = self.key(signature, seed, repetition)
        if key not in self._runs:
            ndcg = np.asarray(compute(), dtype=np.float64)
            self._runs[key] = ndcg
            self.computed += 1
            if self.folder is not None and self.write:
                write_atomic(self.folder / f"{key}.json",
                             json.dumps({"identity": self.identity, "ndcg": ndcg.tolist()}))
        return self._runs[key]


def run_random_baseline(per_query: Callable[[int], np.ndarray], rule: RepetitionRule,
                        set_points: Optional[float] = None) -> Tuple[List[np.ndarray], str]:
    """Draw repetitions ``0, 1, ...`` until ``rule`` stops.

    Args:
        per_query: repetition ``r`` -> ``[num_queries]`` nDCG@k of its random set.
        rule: the repetition rule.
        set_points: the set's mean pruned nDCG@k in nDCG points (x 100), for the "decided" criterion.
    Returns:
        ``(results, reason)``: the per-query arrays of the first ``n`` repetitions and why it stopped.
    """
    results: List[np.ndarray] = []
    for end in rule.checkpoints():
        while len(results) < end:
            results.append(per_query(len(results)))
        reason = rule.stop_reason(np.array([100.0 * r.mean() for r in results]), set_points)
        if reason is not None:
            return results, reason
    return results, "max"  # not reached: the last checkpoint is max
