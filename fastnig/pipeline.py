"""Jobs that chain the stages: dataset -> pairs -> agreement filter -> NIG -> scheme file.

:func:`attribute_dataset` is what ``fastnig attribute`` runs.  It saves the
scheme (atomically, see :mod:`fastnig.schemes`) after every chunk of pairs;
started again on the same output it loads what is there, checks that it was
made with the same model, dataset, label and settings, and attributes only
the pairs it does not hold yet.  Because a scheme's sums are exact whatever
the order and grouping of pairs, a resumed run ends with exactly the scheme an
uninterrupted one writes.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence, Union

from .attribution import TARGETS, attribute, attribution_settings
from .data import filter_agreeing, load_collection, sample_pairs
from .schemes import Scheme, neuron_universe


def pair_id(pair) -> str:
    """Stable id of a :class:`fastnig.data.LabelledPair` inside a scheme."""
    return f"{pair.query_id}\t{pair.doc_id}"


def attribute_dataset(model, tokenizer, dataset, *, label: Union[int, str], num_pairs: int, out: Union[str, Path],
                      seed: int = 0, negatives: str = "judged", relevance_threshold: int = 1,
                      agreement_filter: bool = True, chunk_pairs: int = 8, steps: int = 100,
                      rule: str = "trapezoid", nodes: str = "uniform", baseline: str = "pad",
                      output: str = "probability",
                      max_length: int = 512, step_batch: Optional[int] = None, pair_batch: int = 1,
                      layers: Optional[Sequence[str]] = None, include_pooler: bool = False, dtype=None,
                      device=None, progress: bool = True) -> Scheme:
    """Attribute ``num_pairs`` pairs of one label of a dataset into a scheme file.

    Args:
        model, tokenizer: the cross-encoder and its fast tokenizer.
        dataset: a :class:`fastnig.data.Collection` or a spec for
            :func:`fastnig.data.load_collection`.
        label: 1 / ``"relevant"`` (scheme P_x) or 0 / ``"non-relevant"`` (N_x).
        num_pairs: pairs sampled (deterministically from ``seed``) before the
            agreement filter; the scheme holds those that agree.
        out: scheme path (``runs/P_nf`` writes ``runs/P_nf.json`` + tensors).
        negatives: see :func:`fastnig.data.sample_pairs`.
        agreement_filter: keep only pairs whose prediction agrees (SPEC §6).
        chunk_pairs: pairs attributed between two saves (what a kill can lose).
        steps, rule, nodes, baseline, output, max_length, step_batch, pair_batch,
        layers, include_pooler, dtype, device: as in :func:`fastnig.attribute`.
        progress: a progress bar (pairs done, pairs/s, ETA).

    Returns:
        The saved :class:`fastnig.Scheme`.
    """
    from tqdm.auto import tqdm

    if isinstance(chunk_pairs, bool) or not isinstance(chunk_pairs, int) or chunk_pairs < 1:
        raise ValueError(f"chunk_pairs must be an integer >= 1, got {chunk_pairs!r}")
    collection = load_collection(dataset) if isinstance(dataset, (str, Path)) else dataset
    pairs = sample_pairs(collection, label=label, num_pairs=num_pairs, seed=seed,
                         relevance_threshold=relevance_threshold, negatives=negatives)
    target = TARGETS[0] if pairs and pairs[0].label == 1 else TARGETS[1]
    if device is not None:
        model.to(device)
    settings = attribution_settings(model, target=target, output=output, baseline=baseline, steps=steps,
                                    rule=rule, max_length=max_length, dtype=dtype, nodes=nodes)
    sampling = {"seed": seed, "num_pairs": num_pairs, "negatives": negatives,
                "relevance_threshold": relevance_threshold, "agreement_filter": agreement_filter}
    out = Path(out)
    if Scheme.exists(out):
        scheme = Scheme.load(out)
        expected = Scheme.empty(neuron_universe(model, layers, include_pooler),
                                {"model": settings["model"], "dataset": collection.name, "label": target,
                                 "settings": settings})
        scheme.check_compatible(expected, op="resume")
        if scheme.extra.get("sampling") not in (None, sampling):
            raise ValueError(f"resume: {out} was sampled with {scheme.extra.get('sampling')}, not {sampling}; "
                             "use another output path or the same sampling options")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        scheme = Scheme.empty(neuron_universe(model, layers, include_pooler),
                              {"model": settings["model"], "dataset": collection.name, "label": target,
                               "settings": settings, "extra": {"sampling": sampling}})
    seen = scheme.seen_ids
    todo = [p for p in pairs if pair_id(p) not in seen]
    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), unit="pair", desc=f"NIG {scheme.name}",
               disable=not progress, dynamic_ncols=True)
    if todo and agreement_filter:
        kept, _report = filter_agreeing(model, tokenizer, todo, max_length=max_length, progress=False)
        kept_ids = {pair_id(p) for p in kept}
        dropped = [pair_id(p) for p in todo if pair_id(p) not in kept_ids]
        if dropped:
            scheme.mark_dropped(dropped)
            scheme.save(out)
            bar.update(len(dropped))
        todo = kept
    started = time.perf_counter()
    attributed = 0
    for start in range(0, len(todo), chunk_pairs):
        chunk = todo[start:start + chunk_pairs]
        result = attribute(model, [p.text_pair for p in chunk], tokenizer=tokenizer, target=target,
                           baseline=baseline, steps=steps, rule=rule, nodes=nodes, layers=layers,
                           include_pooler=include_pooler,
                           step_batch=step_batch, pair_batch=pair_batch, max_length=max_length, output=output,
                           dtype=dtype, progress=False)
        scheme.add(result, [pair_id(p) for p in chunk])
        scheme.save(out)
        attributed += len(chunk)
        bar.update(len(chunk))
        bar.set_postfix(pairs_per_s=f"{attributed / (time.perf_counter() - started):.2f}")
    bar.close()
    if not Scheme.exists(out):  # nothing to attribute (every pair dropped) still leaves a file
        scheme.save(out)
    return scheme
