"""Exact, order-independent sums of float32 values (the per-neuron sums of a scheme).

Owns: the summation bins (:data:`BIN_EXPONENTS`), how values are cut into
them (:func:`split_into_bins`), how bins are read back as one float64 sum
(:func:`bins_value`), and the most pairs a sum can hold (:data:`MAX_PAIRS`).

Must not: import any fastnig module, know what the values mean (neurons,
pairs, schemes) or how bins are stored on disk.

Float addition is not associative, so a plain float64 running sum of the
float32 NIG values would depend on how pairs were split into runs.  Each
float32 value is instead cut exactly into pieces aligned on fixed 32-bit
"bins" of the binary exponent (2^96, 2^64, ..., 2^-160); within a bin every
piece is an integer multiple of the bin's unit below 2^32 units, so float64
sums of up to 2^21 pieces per bin are exact whatever the order.  The
per-neuron sum is then read once, bins from smallest to largest: the same
bits for any split, merge order or resume point.  The price is 9 float64 per
neuron (16 MB for BERT-large) and at most 2,097,152 pairs per scheme.
"""
from __future__ import annotations

import math

import torch

# Each bin holds multiples of 2^e below 2^(e+32); together they cover every
# finite float32, subnormals included (2^-149 >= 2^-160).
BIN_EXPONENTS = (96, 64, 32, 0, -32, -64, -96, -128, -160)
"""Exponents of the exact-summation bins, largest first."""
MAX_PAIRS = 2 ** 21
"""Most pairs a scheme can hold with exact sums (53 - 32 bits of headroom)."""


def zero_bins(n: int) -> torch.Tensor:
    """``[B, n]`` float64 bins of an empty sum."""
    return torch.zeros((len(BIN_EXPONENTS), n), dtype=torch.float64)


def split_into_bins(values: torch.Tensor) -> torch.Tensor:
    """Exact per-column sums of float32 ``values [P, n]``, as bins ``[B, n]`` float64.

    Every value is cut into pieces ``q_b`` that are multiples of ``2^e_b``
    below ``2^(e_b+32)``; all operations are exact in float64 (power-of-two
    scaling, truncation, subtraction of a prefix of the bits), and so are
    the column sums of up to 2^21 such pieces.
    """
    rest = values.to(torch.float32).to(torch.float64)
    bins = torch.empty((len(BIN_EXPONENTS), values.shape[1]), dtype=torch.float64)
    for b, e in enumerate(BIN_EXPONENTS):
        unit = math.ldexp(1.0, e)
        piece = torch.trunc(rest / unit) * unit
        rest = rest - piece
        bins[b] = piece.sum(dim=0)
    return bins


def bins_value(bins: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` bins -> ``[n]`` float64 sum, smallest bin first (one fixed rounding order)."""
    total = torch.zeros(bins.shape[1], dtype=torch.float64)
    for b in range(bins.shape[0] - 1, -1, -1):
        total = total + bins[b]
    return total
