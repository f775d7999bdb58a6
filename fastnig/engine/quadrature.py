"""Quadrature of the path integral: nodes, rules, Richardson extrapolation, error estimate, auto stopping.

Owns: the rules :func:`fastnig.attribute` accepts (:data:`RULES`) and which
rule the fused op runs for each (:func:`kernel_rule`), the path nodes
(:func:`path_nodes`) and the levels of ``steps="auto"``, the checks that a
rule fits its nodes and steps (:func:`check_rule`), the Richardson
combination R_N = (4 T_N - T_{N/2}) / 3 (:func:`richardson`), the per-neuron
error estimate |T_N - T_{N/2}| / 3 (:func:`error_estimate`: an asymptotic
estimate of T_N's error, not a bound) and the stopping
test of ``steps="auto"`` (:func:`auto_converged`).  Must not: run a model,
hold hooks, chunks or carries (:mod:`fastnig.engine.attribute`), know about
schemes or files.

``richardson`` (docs/method.md §5): the trapezoid sum's error on uniform nodes
has only even powers of the step h = 1/N, T_N = I + c h² + O(h⁴), so
combining T_N with T_{N/2}, the trapezoid sum over the even-indexed points
0, 2, ..., N of the same path, cancels the h² term.  The fused op
accumulates both sums from one read of every point (``coarse_out``), so the
rule costs the same N + 1 forward + backward passes as ``trapezoid``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Union

import torch

RULES = ("left", "trapezoid", "richardson")
# the defaults of fastnig.attribute, `fastnig attribute` and run configs (bench/accuracy/steps_accuracy.py:
# richardson N = 32 is as accurate on the neurons as trapezoid N = 100 with a third of the points)
DEFAULT_RULE = "richardson"
DEFAULT_STEPS = 32
NODES = ("uniform", "chebyshev")
AUTO_START_STEPS = 16
# steps="auto" with rule="richardson": the neurons whose relative error is
# estimated per pair are its AUTO_TOP_PERCENT % largest |NIG| (of all attributed neurons)
AUTO_TOP_PERCENT = 1.0
# floor of |F(x) - F(x')| in the tolerances of steps="auto" (pairs where F hardly moves)
AUTO_MOVED_FLOOR = 0.01


def path_nodes(steps: int, nodes: str = "uniform") -> torch.Tensor:
    """The N + 1 path positions 0 = α_0 < ... < α_N = 1, float64 ``[steps + 1]``.

    ``uniform``: α_k = k / N.  ``chebyshev``: Chebyshev–Lobatto nodes
    α_k = (1 - cos(π k / N)) / 2, denser near both ends of the path, where
    the baseline's and the input's saturated regions meet the transition.
    """
    k = torch.arange(steps + 1, dtype=torch.float64)
    if nodes == "uniform":
        alphas = k / steps
    elif nodes == "chebyshev":
        alphas = (1 - torch.cos(math.pi * k / steps)) / 2
    else:
        raise ValueError(f"nodes must be one of {NODES}, got {nodes!r}")
    alphas[0], alphas[-1] = 0.0, 1.0
    return alphas


def auto_step_levels(max_steps: int) -> List[int]:
    """Refinement levels of ``steps="auto"``: 16, 32, ... doubling, ending at ``max_steps``."""
    levels = [min(AUTO_START_STEPS, max_steps)]
    while levels[-1] < max_steps:
        levels.append(min(levels[-1] * 2, max_steps))
    return levels


def check_rule(rule: str, steps: Union[int, str], nodes: str, max_steps: Optional[int] = None) -> None:
    """``ValueError`` naming the argument and the fix when ``rule`` does not fit the nodes or N.

    ``richardson`` needs uniform nodes (the error expansion in even powers of
    the step holds for equal steps) and an even N (T_{N/2} sums every other
    point): ``steps`` even, or with ``steps="auto"`` ``max_steps`` even (every
    level 16, 32, ..., ``max_steps`` is then even; not checked when ``None``).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule != "richardson":
        return
    if nodes != "uniform":
        raise ValueError(f"rule='richardson' needs nodes='uniform' (its error cancellation holds for equal steps), "
                         f"got nodes={nodes!r}: use nodes='uniform', or rule='trapezoid' with {nodes} nodes")
    name, n = ("max_steps", max_steps) if steps == "auto" else ("steps", steps)
    if isinstance(n, int) and not isinstance(n, bool) and n % 2:
        raise ValueError(f"rule='richardson' needs an even number of path intervals (the half-step sum uses every "
                         f"other point), got {name}={n}: use {name}={n + 1}, or rule='trapezoid'")


def kernel_rule(rule: str) -> str:
    """The rule the fused op accumulates for ``rule`` (``richardson``: the trapezoid, plus its half-step sum)."""
    return "trapezoid" if rule == "richardson" else rule


def uses_coarse(rule: str) -> bool:
    """Whether ``rule`` needs the half-step trapezoid sum T_{N/2} (the op's ``coarse_out``)."""
    return rule == "richardson"


def richardson(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """R_N = (4 T_N - T_{N/2}) / 3, elementwise, any shape (e.g. ``[P, features]``)."""
    return (4 * fine - coarse) / 3


def error_estimate(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """|T_N - T_{N/2}| / 3, elementwise: the estimated error of the trapezoid sum T_N.

    From T_N - I ≈ c h² and T_{N/2} - I ≈ 4 c h², T_N - T_{N/2} ≈ -3 c h².
    An estimate, not a bound: it holds when h is small against the scale on which
    the integrand changes; a transition narrower than 2h can leave T_N ≈ T_{N/2}
    while both are wrong.  R_N's error is of higher order (h⁴ for smooth paths), so
    where the asymptotics hold it is smaller than this estimate.
    """
    return (fine - coarse).abs() / 3


def relative_delta(delta: torch.Tensor, f_input: torch.Tensor, f_baseline: torch.Tensor,
                   floor: float = 0.0) -> torch.Tensor:
    """|delta| / max(|F(x) - F(x')|, floor): the integration error relative to what is attributed."""
    return delta.abs() / (f_input - f_baseline).abs().clamp_min(floor)


def top_error(scores: Dict[str, torch.Tensor], errors: Dict[str, torch.Tensor],
              percent: float = AUTO_TOP_PERCENT) -> torch.Tensor:
    """``[P]``: per pair, the estimated relative L1 error of its ``percent`` % neurons of largest |score|,
    Σ_top errors / Σ_top |scores|.

    ``scores`` and ``errors``: module name -> ``[P, features]``; the top set is
    taken over all modules together (at least one neuron); the denominator is kept above 0.
    """
    names = list(scores)
    values = torch.cat([scores[n].double() for n in names], dim=1).abs()
    errs = torch.cat([errors[n].double() for n in names], dim=1)
    k = max(1, round(percent / 100 * values.shape[1]))
    top, index = values.topk(k, dim=1)
    return errs.gather(1, index).sum(dim=1) / top.sum(dim=1).clamp_min(torch.finfo(torch.float64).tiny)


def auto_converged(delta: torch.Tensor, f_input: torch.Tensor, f_baseline: torch.Tensor, tolerance: float,
                   neuron_error: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[P]`` bool: the stopping test of ``steps="auto"`` at one level.

    One tolerance, two relative errors: |delta| <= tolerance · max(|F(x) - F(x')|, 0.01)
    (the input side) and, when ``neuron_error`` (``[P]``, :func:`top_error` of the
    level: the top neurons' estimated relative L1 error) is given, also
    neuron_error <= tolerance.  Both are estimates of the error, not bounds
    (:func:`error_estimate`).
    """
    done = relative_delta(delta, f_input, f_baseline, floor=AUTO_MOVED_FLOOR) <= tolerance
    if neuron_error is not None:
        done &= neuron_error <= tolerance
    return done
