"""Which of a scheme's two halves a pair goes to: by a hash of its *query* (docs/method.md §6.6).

Owns: :data:`HALVES_RULE` (recorded in every scheme file that keeps halves),
:func:`pair_cluster` (the query id of a pair id) and :func:`pair_half`, and
what :meth:`fastnig.neurons.scheme.Scheme.load` does with the rule a file
records (:func:`halves_kept`).  Must not: sum anything (the half sums are
:class:`~fastnig.neurons.scheme.Scheme`'s) or estimate stability
(:mod:`fastnig.neurons.stability`).

The pairs of one query share that query's effect on every neuron; were they
spread over both halves, the halves would share it too and agree more than
two samples of other queries would.  So a whole query goes to one half: the
half of a pair is the lowest bit of the 8-byte BLAKE2b hash of its query id,
the part of the pair id before the first tab (the study's pair ids are
``"<query id>\\t<doc id>"``, :func:`fastnig.study.attribution_job.pair_id`);
an id without a tab is a cluster of its own.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

HALVES_RULE = "blake2b-8(query id = pair id up to its first tab) & 1"
"""How a pair is assigned to half 0 or 1 (saved with the half sums, checked on load)."""

OLD_HALVES_RULES = ("blake2b-8(pair id) & 1",)
"""Rules of earlier fastnig versions: such a file loads without its halves (no stability estimate)."""


def pair_cluster(pair_id) -> str:
    """The cluster of a pair: its query id, i.e. ``pair_id`` up to its first tab (the whole id without one)."""
    return str(pair_id).split("\t", 1)[0]


def pair_half(pair_id) -> int:
    """Half (0 or 1) of the pair ``pair_id``: the lowest bit of the 8-byte BLAKE2b hash of its query id.

    Depends on the query id only, so every pair of a query is in the same
    half, and the halves are the same whatever the order, chunking, sharding
    or resume point of a run: merges keep them exact.
    """
    digest = hashlib.blake2b(pair_cluster(pair_id).encode("utf-8"), digest_size=8).digest()
    return digest[-1] & 1


def halves_kept(rule, json_path: Path) -> bool:
    """Whether a scheme file that records ``rule`` (its ``"halves"`` entry) keeps usable half sums.

    ``None`` (saved before halves existed) or a rule of :data:`OLD_HALVES_RULES`
    (halves by pair, not by query): False, the scheme loads without halves
    and gives no stability estimate.  Any other rule than :data:`HALVES_RULE`
    (a newer fastnig): ``ValueError``.
    """
    if rule is None or rule in OLD_HALVES_RULES:
        return False
    if rule != HALVES_RULE:
        raise ValueError(f"scheme {json_path} assigns pairs to halves by {rule!r}, not {HALVES_RULE!r}; "
                         "re-create it (or read it with the fastnig that wrote it)")
    return True
