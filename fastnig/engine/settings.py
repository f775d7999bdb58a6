"""How NIG is computed, as one validated, frozen object.

Owns: :class:`AttributionSettings` — every setting of :func:`fastnig.attribute`
that is not the model, the pairs or the target, validated once on
construction, and :meth:`AttributionSettings.record`, the dict a result keeps
(``Attributions.settings``, a scheme's ``settings``) and a resume compares.
The CLI, configs and the study build one of these; a new setting is one field
here (plus its test).

Must not: run a model or know about datasets, schemes or files.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..common import check_int, check_number
from .encoding import BASELINES
from .quadrature import DEFAULT_RULE, DEFAULT_STEPS, NODES, check_rule
from .scoring import OUTPUTS

DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
"""Names a config or the CLI may give for :attr:`AttributionSettings.dtype`."""


def _weights_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@dataclass(frozen=True)
class AttributionSettings:
    """Settings of one attribution (docs/method.md §2-5); invalid values raise ``ValueError`` / ``TypeError``.

    Attributes:
        baseline: ``"pad"`` (default), ``"pad-query"``, ``"zero"`` or ``"zero-query"`` (docs/method.md §3).
        steps: N, the number of path intervals (N + 1 points are evaluated;
            default 32: with ``richardson`` as accurate as the trapezoid rule at
            N = 100 on the demo model, docs/accuracy.md), or ``"auto"``: per
            pair, N = 16, 32, ... doubling up to ``max_steps`` until |delta| <=
            ``tolerance`` · max(|F(x) - F(x')|, 0.01) and, with
            ``rule="richardson"``, also the estimated relative L1 error of the
            pair's top 1 % neurons (by |NIG|) is <= ``tolerance``
            (:func:`fastnig.engine.quadrature.auto_converged`; an asymptotic
            estimate, not a bound: a transition narrower than two steps can
            stop a pair too early); each level is a
            fresh run, so a pair's result equals a fixed-``steps`` run at its
            final N (``Attributions.steps_used``).
        rule: ``"richardson"`` (default), ``"trapezoid"``, ``"left"`` (= Captum
            LayerConductance, ``riemann_trapezoid``).  ``"richardson"``: R_N =
            (4 T_N - T_{N/2}) / 3 from the trapezoid sums over all N + 1 points
            and over the even ones, both accumulated in the same pass (needs
            uniform nodes and an even N, or an even ``max_steps`` with
            ``steps="auto"``); also fills ``Attributions.error_estimate``.
        nodes: ``"uniform"`` (default) or ``"chebyshev"`` path positions
            (:func:`fastnig.engine.quadrature.path_nodes`).
        tolerance, max_steps: the stopping rule of ``steps="auto"`` (default 0.05, 256).
        output: ``"probability"`` (default) or ``"logit"``: what F is (docs/method.md §2).
        max_length: tokens of the pair encoding; ``None`` = the tokenizer's
            ``model_max_length`` (a CrossEncoder's ``max_length``), else 512;
            never more than the model's position embeddings allow.
        step_batch: path points per pair in one forward (bounds memory; the
            result does not depend on it beyond float rounding); ``None`` or
            ``"auto"`` (default) = sized from free memory
            (:func:`fastnig.engine.memory.auto_step_batch`); an integer = at most
            that many (``steps + 1`` = all at once).  A chunk that runs out of
            memory is undone and redone with half as many points.
        pair_batch: pairs sharing one forward (padded to the longest).
        layers: Linear module names to attribute; ``None`` = every encoder Linear.
        include_pooler: with ``layers=None``, also attribute the pooler.
        dtype: compute dtype under autocast (e.g. ``torch.bfloat16`` or
            ``"bfloat16"``); ``None`` = the model's own dtype (float32, or a
            bf16 / fp16 model's: the path is then in that dtype too).  F and
            the accumulation stay float32.  With float16 (autocast or weights),
            which has no loss scaling of its own, each path point's backward is
            seeded with a power of two that brings dF/dz near 1, undone exactly
            in float32 before accumulation, so that gradients do not underflow
            for saturated pairs.  A dtype above the weights' precision (float32
            on a bf16 model) is refused: autocast cannot raise precision.
        first_token_cut: run the last layer past self-attention on the first
            token only where the head reads just that token (exact, faster;
            :func:`fastnig.engine.first_token.first_token_only`).
        last_token_cut: for decoder rankers (``yes_no``, ``last_token_classifier``),
            run the last layer's attention output projection and MLP on the
            scored (last real) token only (exact, faster;
            :func:`fastnig.engine.last_token.last_token_only`).
        segments: also split each neuron's NIG by the segment of the token it
            flows through (query, passage, special) into ``Attributions.segment_scores``.
        heads: also attribute every attention head (the conductance of the attention context,
            the output projection's input, summed over the head's dimensions; docs/method.md §12)
            into ``Attributions.head_scores`` (``head_segment_scores`` with ``segments``).
        include_vocabulary: also attribute SPLADE's vocabulary projection, whose output
            units are the vocabulary's terms (``ranker="splade"`` only; off by default:
            ``[points, tokens, vocab]`` outputs, covered by the memory model).  Two-tower
            rankers' ``segments`` are the towers: query tower, document tower (docs/rankers.md).
    """

    baseline: str = "pad"
    steps: Union[int, str] = DEFAULT_STEPS
    rule: str = DEFAULT_RULE
    nodes: str = "uniform"
    tolerance: float = 0.05
    max_steps: int = 256
    output: str = "probability"
    max_length: Optional[int] = None
    step_batch: Union[int, str, None] = None
    pair_batch: int = 1
    layers: Optional[Tuple[str, ...]] = None
    include_pooler: bool = False
    dtype: Optional[torch.dtype] = None
    first_token_cut: bool = True
    last_token_cut: bool = True
    segments: bool = False
    heads: bool = False
    include_vocabulary: bool = False

    def __post_init__(self) -> None:
        if self.nodes not in NODES:
            raise ValueError(f"nodes must be one of {NODES}, got {self.nodes!r}")
        if self.steps == "auto":
            check_int("max_steps", self.max_steps, 1)
            check_number("tolerance", self.tolerance, positive=True, hint=" (relative convergence delta)")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        check_rule(self.rule, self.steps, self.nodes, self.max_steps)
        steps = self.max_steps if self.steps == "auto" else self.steps
        check_int("steps", steps, 1, " (path intervals) or 'auto'")
        if self.step_batch not in (None, "auto") and not (isinstance(self.step_batch, int)
                                                          and not isinstance(self.step_batch, bool)
                                                          and self.step_batch >= 1):
            raise ValueError(f"step_batch must be None / 'auto' (sized from free memory) or an integer >= 1 "
                             f"(path points per forward; {steps + 1} = all at once), got {self.step_batch!r}")
        check_int("pair_batch", self.pair_batch, 1)
        if self.max_length is not None:
            check_int("max_length", self.max_length, 4, " (tokens)")
        for name in ("include_pooler", "first_token_cut", "last_token_cut", "segments", "heads",
                     "include_vocabulary"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.layers is not None:
            if isinstance(self.layers, str):
                raise TypeError(f"layers must be a list of module names, got the string {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {self.dtype!r}")
            object.__setattr__(self, "dtype", DTYPES[self.dtype])
        elif self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"dtype must be None, a torch.dtype or a name such as 'bfloat16', got {self.dtype!r}")

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        """The setting names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> "AttributionSettings":
        """Settings from a mapping (a config section, CLI options); an unknown key is a ``ValueError``
        that lists the known ones."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown attribution setting(s) {unknown}; known: {list(cls.names())}")
        return cls(**values)

    def replace(self, **changes) -> "AttributionSettings":
        """A copy with ``changes`` applied (validated again); unknown names as in :meth:`from_mapping`."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise TypeError(f"unknown attribution setting(s) {unknown}; known: {list(self.names())}")
        return dataclasses.replace(self, **changes)

    def record(self, model: nn.Module, *, target: str, max_length: int) -> Dict[str, object]:
        """What a result records of how it was computed (``Attributions.settings``, a scheme's ``settings``).

        ``max_length`` is the resolved one (:func:`fastnig.engine.model.resolve_max_length`).
        The settings that do not change the result beyond float rounding (``step_batch``,
        ``pair_batch``, ``first_token_cut``, ``last_token_cut``) and the selection of layers (a scheme's
        neurons) are not in it; ``tolerance`` / ``max_steps`` only with ``steps="auto"``,
        ``segments`` only when on, so that records compare as before they existed.
        """
        record = {
            "model": getattr(getattr(model, "config", None), "name_or_path", "") or "",
            "target": target, "output": self.output, "baseline": self.baseline, "steps": self.steps,
            "rule": self.rule, "nodes": self.nodes, "max_length": max_length,
            "dtype": str(self.dtype or _weights_dtype(model)).replace("torch.", ""),
        }
        if self.steps == "auto":
            record.update(tolerance=float(self.tolerance), max_steps=self.max_steps)
        if self.segments:
            record["segments"] = True
        if self.heads:
            record["heads"] = True
        return record
