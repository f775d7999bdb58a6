"""``fastnig circuit RUN --scheme P_ms --top 10``: the circuit of a run's scheme, as JSON and a figure.

Owns: reading what a circuit needs from a run folder — the scheme (by name),
its first ``pairs`` kept pairs' text (the run's collections), the run's
model — and writing ``RUN/circuits/<scheme>.json`` and ``.png``.  The graph
itself is :func:`fastnig.analysis.circuit.circuit`.
Must not: compute attributions itself or lay out figures.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

from ..analysis.circuit import circuit, top_heads, top_units
from ..data import load_collection
from ..engine.settings import AttributionSettings
from ..neurons.scheme import Scheme
from ..report.run_folder import NotARunFolder, read_run_config
from ..training.demo_model import OFFLINE_DEMO, load_cross_encoder, offline_demo_model
from .explore import run_schemes

log = logging.getLogger("fastnig.circuit")

DEFAULT_TOP = 10
DEFAULT_PAIRS = 8
_SETTING_KEYS = ("output", "baseline", "steps", "rule", "nodes", "max_length", "tolerance", "max_steps")


def pair_texts(config: Mapping, scheme: Scheme, pair_ids: Sequence[str]) -> Dict[str, Tuple[str, str]]:
    """``{pair id: (query, passage)}`` from the run's attribution collection of the scheme's dataset
    (pair id = ``query id<TAB>doc id``; ids not found are left out)."""
    entry = (config.get("attribution", {}).get("datasets") or {}).get(scheme.dataset)
    spec = entry.get("dataset") if isinstance(entry, Mapping) else entry
    if not spec:
        return {}
    collection = load_collection(spec)
    ids = [pid.split("\t", 1) for pid in pair_ids if "\t" in pid]
    queries, passages = collection.queries(), collection.doc_texts([d for _, d in ids])
    return {f"{q}\t{d}": (queries[q], passages[d]) for q, d in ids if q in queries and d in passages}


def run_model(config: Mapping, device: str):
    """The run's model and tokenizer (``"demo"``: the offline demo model from the run's cache)."""
    name = str(config.get("model") or "")
    if name in ("demo", OFFLINE_DEMO):
        cache = Path(config.get("cache_dir") or os.environ.get("FASTNIG_CACHE") or Path.home() / ".cache" / "fastnig")
        return offline_demo_model(cache / "models", device=device)
    return load_cross_encoder(name, device=device)


def circuit_run(run_dir: Union[str, Path], scheme: str, *, top: int = DEFAULT_TOP, pairs: int = DEFAULT_PAIRS,
                out: Optional[Union[str, Path]] = None, device: str = "cpu", model=None, tokenizer=None,
                progress: bool = False) -> Tuple[Path, Path]:
    """Write the circuit of ``scheme``'s top ``top`` neurons and top ``top`` heads (mean over its first ``pairs``
    kept pairs); returns the JSON and PNG paths.  ``NotARunFolder`` for a folder, scheme or pair text missing."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    schemes = {s.name: s for s in run_schemes(run_dir)}
    if scheme not in schemes:
        raise NotARunFolder(f"{run_dir} has no scheme {scheme!r}; it has {sorted(schemes)}")
    chosen = schemes[scheme]
    ids = chosen.pair_ids[:max(1, pairs)]
    text = pair_texts(config, chosen, ids)
    texts = [text[i] for i in ids if i in text]
    if not texts:
        raise NotARunFolder(f"the pairs of {scheme} were not found in the run's collections")
    if model is None:
        model, tokenizer = run_model(config, device)
    settings = AttributionSettings(**{k: chosen.settings[k] for k in _SETTING_KEYS if k in chosen.settings})
    label = chosen.label if chosen.label in ("relevant", "non-relevant") else "relevant"
    neurons = top_units(chosen, top)
    heads = top_heads(model, tokenizer, texts, top, label=label, settings=settings, progress=progress)
    means = chosen.mean
    scores = {u: float(means[u.name][u.index]) for u in neurons}
    log.info("circuit of %s: %d neurons, %d heads, %d pairs", scheme, len(neurons), len(heads), len(texts))
    graph = circuit(model, tokenizer, texts, neurons + heads, settings=settings, scores=scores, progress=progress)
    graph.meta.update(scheme=scheme, run=str(run_dir), top=top)
    folder = Path(out) if out is not None else run_dir / "circuits"
    return graph.save(folder / f"{scheme}.json"), graph.figure(folder / f"{scheme}.png", f"circuit of {scheme}")
