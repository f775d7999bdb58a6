"""Per-token conductance of a few neurons on one pair: what the explorer shades over the text.

Owns: :func:`token_conductance`, a targeted attribution of selected neurons
that keeps the token axis: for neuron j of a Linear with output y[t, j] at
token t, its NIG on a pair is Σ_t Σ_steps ĝ[t, j] · Δy[t, j] along the path
from the baseline to the input (docs/method.md §5); this returns each token's
term, so the terms sum over tokens to the neuron's NIG (tests/test_explorer.py
checks it against :func:`fastnig.attribute` within 1e-4 relative).

It reuses the engine's public pieces (pair encoding and baselines, path
nodes, the target function, the pure-PyTorch reference of the conductance
op with one "segment" per token, Richardson extrapolation) and runs its own
forward + backward over the path, with forward hooks on the Linears of the
selected neurons only; it does not call the engine's fused op or its
first-token cut (which is exact, so the per-token terms are the same).  One
pair at a time, ``chunk`` path points per forward.

Must not: accumulate schemes (that is :mod:`fastnig.neurons.scheme`) or run
over many pairs (the explorer calls it for a scheme's exemplar pairs only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from ..engine.encoding import baseline_embeddings
from ..engine.kernels import accumulate_conductance_ref
from ..engine.model import frozen_eval
from ..engine.quadrature import kernel_rule, path_nodes, richardson, uses_coarse
from ..engine.rankers import bind_ranker
from ..engine.scoring import target_function
from ..engine.settings import AttributionSettings


@dataclass
class TokenView:
    """One pair's tokens and the per-token conductance of the selected neurons.

    Attributes:
        tokens: the ``T`` tokens the model saw (``[CLS] query [SEP] passage [SEP]``).
        segments: ``T`` segment ids (0 query, 1 passage, 2 special; :data:`SEGMENTS`).
        values: module -> ``[T, len(units)]`` float64 per-token conductance of ``units[module]``
            (units in the order asked); summed over tokens, each column is the neuron's NIG.
        units: module -> the unit indices asked for.
        f_input, f_baseline: F at the input and at the baseline.
    """

    tokens: List[str]
    segments: List[int]
    values: Dict[str, torch.Tensor]
    units: Dict[str, List[int]]
    f_input: float
    f_baseline: float

    def nig(self, module: str, unit: int) -> float:
        """The neuron's NIG on this pair: its per-token terms summed."""
        return float(self.values[module][:, self.units[module].index(unit)].sum())


def token_conductance(model, tokenizer, pair: Tuple[str, str], neurons: Mapping[str, Sequence[int]], *,
                      settings: AttributionSettings, target: str = "relevant", chunk: int = 16,
                      ranker=None) -> TokenView:
    """Per-token conductance of the neurons ``neurons`` (module -> unit indices) on one (query, passage).

    ``settings`` as the scheme's attribution (baseline, steps, rule, nodes,
    output, max_length; ``steps="auto"`` uses ``max_steps``); ``target``
    ``"relevant"`` or ``"non-relevant"``.  Runs under ``torch.no_grad`` for
    the parameters (only the path gets gradients).  ``ranker``: as for
    :func:`fastnig.attribute` (the pair's layout and F; ``None``: from the model's class).
    A one-token output (the pooler, monoT5's decoder step) is shown on the first token.
    """
    if target not in ("relevant", "non-relevant"):
        raise ValueError(f"target must be 'relevant' or 'non-relevant', got {target!r}")
    modules = dict(model.named_modules())
    missing = [m for m in neurons if m not in modules]
    if missing:
        raise ValueError(f"the model has no module(s) {missing[:3]}")
    units = {m: [int(u) for u in us] for m, us in neurons.items()}
    steps = settings.max_steps if settings.steps == "auto" else int(settings.steps)
    bound = bind_ranker(ranker, model, tokenizer)
    enc = bound.encode([tuple(pair)], bound.max_length(settings.max_length), settings.baseline)
    device = next(model.parameters()).device
    embeddings = bound.embeddings
    alphas = path_nodes(steps, settings.nodes)
    with torch.no_grad():
        x_in, x_base = baseline_embeddings(embeddings, enc, settings.baseline, bound.pad_id)
    exact = torch.promote_types(x_in.dtype, torch.float32)
    x_in, x_base = x_in.to(exact), x_base.to(exact)
    relevant = torch.tensor([target == "relevant"], device=device)
    mask = enc.attention_mask.to(device)
    types = enc.token_type_ids.to(device) if enc.token_type_ids is not None else None
    acts: Dict[str, List[torch.Tensor]] = {m: [] for m in units}
    grads: Dict[str, List[torch.Tensor]] = {m: [] for m in units}
    f_values = []
    with frozen_eval(model):
        for start in range(0, steps + 1, chunk):
            alpha = alphas[start:start + chunk].to(device=device, dtype=exact)
            path = (x_base + alpha.view(-1, 1, 1) * (x_in - x_base)).to(x_in.dtype).requires_grad_(True)
            outputs: Dict[str, torch.Tensor] = {}
            handles = [modules[m].register_forward_hook(lambda mod, inp, out, m=m: outputs.__setitem__(m, out))
                       for m in units]
            try:
                logits = bound.logits(path, mask.expand(len(alpha), -1),
                                      types.expand(len(alpha), -1) if types is not None else None, cut=False)
                f = target_function(logits, relevant.expand(len(alpha)), settings.output)
            finally:
                for h in handles:
                    h.remove()
            names = list(outputs)
            g = torch.autograd.grad(f.sum(), [outputs[m] for m in names], allow_unused=True)
            for m, grad in zip(names, g):
                a = outputs[m].detach()
                grad = torch.zeros_like(a) if grad is None else grad
                if a.dim() == 2:  # [points, features] (a pooler): one "token"
                    a, grad = a.unsqueeze(1), grad.unsqueeze(1)
                acts[m].append(a[..., units[m]].double().cpu())
                grads[m].append(grad[..., units[m]].double().cpu())
            f_values.append(f.detach().double().cpu())
    T = int(enc.lengths[0])
    values = {}
    rule, coarse = kernel_rule(settings.rule), uses_coarse(settings.rule)
    for m in units:
        a4, g4 = torch.cat(acts[m]).unsqueeze(0), torch.cat(grads[m]).unsqueeze(0)  # [1, S, T', k]
        tokens = a4.shape[2]
        lengths = torch.tensor([min(T, tokens)])
        per_token = torch.arange(tokens).unsqueeze(0)  # each token its own segment
        out = torch.zeros(1, tokens, len(units[m]), dtype=torch.float64)
        coarse_out = torch.zeros_like(out) if coarse else None
        accumulate_conductance_ref(a4, g4, lengths, out, None, rule, segments=per_token, coarse_out=coarse_out)
        result = richardson(out, coarse_out) if coarse else out
        full = torch.zeros(T, len(units[m]), dtype=torch.float64)
        full[:min(T, tokens)] = result[0, :min(T, tokens)]
        values[m] = full
    f_all = torch.cat(f_values)
    ids = enc.input_ids[0, :T].tolist()
    return TokenView(tokens=tokenizer.convert_ids_to_tokens(ids), segments=enc.segments[0, :T].tolist(),
                     values=values, units=units, f_input=float(f_all[-1]), f_baseline=float(f_all[0]))


