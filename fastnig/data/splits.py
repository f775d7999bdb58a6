"""Seeded train / held-out splits of a collection's queries.

Owns: :func:`split_queries` (which queries a model may be trained on and
which stay held out) and the dataset-spec suffixes ``@train`` / ``@heldout``
that select one part (``"cranfield@heldout"``): the offline demo trains its
model on ``cranfield@train`` and evaluates pruning on ``cranfield@heldout``,
so no query it was trained on is scored.  Must not: read files or sample
pairs.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from ..common import sample_key

#: Parts a spec suffix can select.
SPLITS = ("train", "heldout")
#: The split every ``@train`` / ``@heldout`` spec uses (and the demo model's default).
DEFAULT_TEST_FRACTION = 0.3
DEFAULT_SPLIT_SEED = 0


def split_queries(collection, test_fraction: float = DEFAULT_TEST_FRACTION,
                  seed: int = DEFAULT_SPLIT_SEED) -> Tuple[List[str], List[str]]:
    """A seeded train / held-out split of the queries that have a text and a relevant judgment.

    Each query gets a pseudo-random rank from a hash of (seed, query id); the
    first ``round(test_fraction · n)`` are held out.  The split depends on the
    seed and the qrels only (not on dict order or platform).  Queries without
    a relevant judgment are in neither part.

    Returns:
        ``(train_ids, test_ids)``, each sorted in the collection's query order.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction!r}")
    queries = collection.queries()
    judged = [q for q, docs in collection.qrels().items() if queries.get(q) and any(g > 0 for g in docs.values())]
    order = sorted(judged, key=lambda q: (sample_key(seed, "split", q), q))
    held = set(order[:round(test_fraction * len(order))])
    position = {q: i for i, q in enumerate(queries)}
    ranked = sorted(judged, key=lambda q: position.get(q, len(position)))
    return [q for q in ranked if q not in held], [q for q in ranked if q in held]


def split_suffix(spec: str) -> Tuple[str, Optional[str]]:
    """``"cranfield@heldout"`` -> ``("cranfield", "heldout")``; a spec without such a suffix -> ``(spec, None)``."""
    base, at, part = spec.rpartition("@")
    if at and base and part in SPLITS:
        return base, part
    return spec, None
