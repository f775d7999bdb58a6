"""Exemplar pairs of a scheme: per neuron, the k pairs where its |NIG| is largest.

Owns: :class:`Exemplars`, kept by :class:`fastnig.neurons.scheme.Scheme`
while it accumulates (its :meth:`~Exemplars.add` on every ``Scheme.add``,
:meth:`~Exemplars.merge` on ``Scheme.merge``, :meth:`~Exemplars.pack` /
:meth:`~Exemplars.unpack` on save and load) and read by the neuron explorer
(``fastnig explore``).  Per neuron it holds ``k`` slots: an index into the
scheme's ``pair_ids`` and that pair's NIG (float32, as summed).

The selection is a total order, so the result does not depend on how the
pairs were grouped: |NIG| descending, ties by pair id (as str) ascending.
The top k of a union is the top k of the two top-k lists, so a resumed,
sharded or early-stopped scheme keeps exactly the exemplars of one run over
the same pairs (tests/test_explorer.py).

Must not: know what a scheme's other fields mean, or lay out files (it hands
tensors and a JSON entry to the scheme, which saves them).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..common import CorruptFile

DEFAULT_K = 5
EMPTY = -1  # a slot with no pair yet (fewer than k pairs)


class Exemplars:
    """Per module, ``index [k, n]`` int64 (into the scheme's ``pair_ids``; -1 = empty) and
    ``value [k, n]`` float32 NIG, slot 0 the largest |NIG|."""

    def __init__(self, sizes: Mapping[str, int], k: int = DEFAULT_K):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"exemplars: k must be an int >= 1, got {k!r}")
        self.k = k
        self.index: Dict[str, torch.Tensor] = {m: torch.full((k, n), EMPTY, dtype=torch.long) for m, n in sizes.items()}
        self.value: Dict[str, torch.Tensor] = {m: torch.zeros((k, n), dtype=torch.float32) for m, n in sizes.items()}

    def add(self, scores: Mapping[str, torch.Tensor], pair_ids: Sequence[str], first: int) -> "Exemplars":
        """A new :class:`Exemplars` with ``P`` more pairs: ``scores[m]`` ``[P, n]``, the pairs at
        positions ``first .. first + P - 1`` of ``pair_ids`` (the scheme's ids after the add)."""
        out = Exemplars({}, self.k)
        rank = _id_ranks(pair_ids)
        for m, old_index in self.index.items():
            values = scores[m].detach().cpu().float()
            P = values.shape[0]
            new_index = torch.arange(first, first + P, dtype=torch.long)[:, None].expand(P, values.shape[1])
            out.index[m], out.value[m] = _top(torch.cat([old_index, new_index]),
                                              torch.cat([self.value[m], values]), rank, self.k)
        return out

    def merge(self, other: "Exemplars", offset: int, pair_ids: Sequence[str]) -> "Exemplars":
        """The exemplars of both: ``other``'s indices are shifted by ``offset`` (its pairs follow
        this one's in ``pair_ids``, the merged scheme's ids).  ``k``: the smaller of the two."""
        k = min(self.k, other.k)
        out = Exemplars({}, k)
        rank = _id_ranks(pair_ids)
        for m in self.index:
            shifted = torch.where(other.index[m] >= 0, other.index[m] + offset, other.index[m])
            out.index[m], out.value[m] = _top(torch.cat([self.index[m], shifted]),
                                              torch.cat([self.value[m], other.value[m]]), rank, k)
        return out

    def of(self, module: str, unit: int, pair_ids: Sequence[str]) -> List[Tuple[str, float]]:
        """``[(pair id, NIG), ...]`` of one neuron, largest |NIG| first (empty slots left out)."""
        return [(pair_ids[int(i)], float(v)) for i, v in zip(self.index[module][:, unit], self.value[module][:, unit])
                if int(i) >= 0]

    def pack(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
        """``(tensors, JSON entry)`` for a scheme's save."""
        tensors = {}
        for m in self.index:
            tensors[f"exemplar_index/{m}"] = self.index[m].to(torch.int32)
            tensors[f"exemplar_value/{m}"] = self.value[m]
        return tensors, {"k": self.k, "order": "abs desc, pair id asc"}

    @classmethod
    def unpack(cls, entry: Optional[Mapping], tensors: Mapping[str, torch.Tensor], sizes: Mapping[str, int],
               num_pairs: int, expect) -> Optional["Exemplars"]:
        """The exemplars saved with a scheme, or None for a file without them.  ``expect(key, shape)``
        returns a checked tensor (:func:`fastnig.neurons.scheme_storage.expect_tensor`)."""
        if not entry:
            return None
        k = int(entry["k"])
        out = cls({}, k)
        for m, n in sizes.items():
            index = expect(f"exemplar_index/{m}", (k, n)).long()
            if index.numel() and (int(index.max()) >= num_pairs or int(index.min()) < EMPTY):
                raise CorruptFile(f"exemplar_index/{m} points past the scheme's {num_pairs} pairs")
            out.index[m], out.value[m] = index, expect(f"exemplar_value/{m}", (k, n)).float()
        return out

    def same_as(self, other: "Exemplars", pair_ids: Sequence[str], other_ids: Sequence[str]) -> bool:
        """True when both hold the same (pair id, value) in every slot of every neuron."""
        if self.k != other.k or list(self.index) != list(other.index):
            return False
        for m in self.index:
            a = _ids_of(self.index[m], pair_ids)
            b = _ids_of(other.index[m], other_ids)
            if not (np.array_equal(a, b) and torch.equal(self.value[m], other.value[m])):
                return False
        return True


def _ids_of(index: torch.Tensor, pair_ids: Sequence[str]) -> np.ndarray:
    ids = np.array(list(pair_ids) + [""], dtype=object)  # -1 -> ""
    return ids[index.numpy()]


def _id_ranks(pair_ids: Sequence[str]) -> torch.Tensor:
    """``[len(pair_ids) + 1]``: each index's position in the sorted ids (the last entry, for -1, sorts last)."""
    order = sorted(range(len(pair_ids)), key=lambda i: pair_ids[i])
    rank = torch.empty(len(pair_ids) + 1, dtype=torch.long)
    rank[torch.tensor(order, dtype=torch.long)] = torch.arange(len(pair_ids), dtype=torch.long)
    rank[-1] = len(pair_ids)
    return rank


def _top(index: torch.Tensor, value: torch.Tensor, rank: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` rows of ``[c, n]`` candidates per column: filled before empty, |value|
    descending, pair id (``rank[index]``) ascending."""
    empty = index < 0
    magnitude = torch.where(empty, torch.full_like(value, -1.0), value.abs()).numpy().astype(np.float64)
    id_rank = rank[index].numpy()  # index -1 reads rank[-1]: after every real pair
    order = np.lexsort((id_rank, -magnitude), axis=0)[:k]
    order_t = torch.from_numpy(order)
    picked_index = torch.gather(index, 0, order_t)
    picked_value = torch.gather(value, 0, order_t)
    if picked_index.shape[0] < k:  # fewer candidates than slots
        pad = k - picked_index.shape[0]
        picked_index = torch.cat([picked_index, torch.full((pad, index.shape[1]), EMPTY, dtype=torch.long)])
        picked_value = torch.cat([picked_value, torch.zeros((pad, index.shape[1]), dtype=torch.float32)])
    picked_value = torch.where(picked_index < 0, torch.zeros_like(picked_value), picked_value)
    return picked_index.contiguous(), picked_value.contiguous()
