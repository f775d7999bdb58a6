"""``fastnig explore RUN`` and :func:`fastnig.explore`: a run's schemes as one neuron-explorer HTML file.

Owns: choosing the neurons whose exemplar pairs the page shows (each
scheme's top ``top`` neurons by |mean NIG|, and any named with ``neurons``),
finding those pairs' text (the run's collections), computing their per-token
conductance (:func:`fastnig.analysis.token_conductance.token_conductance`,
one targeted attribution per pair, for the chosen neurons only) and handing
everything to :mod:`fastnig.report.explorer`, which writes the page.
Must not: lay out the page (:mod:`fastnig.report.explorer`) or attribute
whole datasets (:mod:`fastnig.study.attribution_job`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ..analysis.token_conductance import token_conductance
from ..data import load_collection
from ..engine.rankers import ranker_from_spec
from ..engine.settings import AttributionSettings
from ..neurons.fusion import fuse, fuse_all
from ..neurons.scheme import FUSED_LABEL, Scheme
from ..report.explorer import explorer_data, run_facts, token_payload, write_explorer
from ..report.run_folder import NotARunFolder, read_run_config, run_in_domain
from ..training.demo_model import OFFLINE_DEMO, load_ranker, offline_demo_model

log = logging.getLogger("fastnig.explore")

DEFAULT_TOP = 10
HINT = "fastnig explore RUN --neuron {neuron} adds its exemplars (the page then computes nothing itself)."
TextOf = Callable[[Scheme, Sequence[str]], Dict[str, Tuple[str, str]]]
"""(scheme, pair ids) -> {pair id: (query, passage)} (ids whose text cannot be found left out)."""


def _settings_of(scheme: Scheme) -> AttributionSettings:
    """The attribution settings a scheme records (the fields :meth:`AttributionSettings.record` writes)."""
    record = scheme.settings
    keep = {k: record[k] for k in ("output", "baseline", "steps", "rule", "nodes", "max_length", "tolerance",
                                   "max_steps") if k in record}
    return AttributionSettings(**keep)


def parse_neuron(text: str, sizes: Mapping[str, int]) -> Tuple[str, int]:
    """``"MODULE:UNIT"`` -> (module, unit), checked against ``sizes``; ``ValueError`` naming what is wrong."""
    module, _, unit = str(text).rpartition(":")
    if not module or not unit.isdigit():
        raise ValueError(f"neuron {text!r}: write MODULE:UNIT, e.g. bert.encoder.layer.3.intermediate.dense:17")
    if module not in sizes:
        close = [m for m in sizes if m.endswith(module) or module in m][:3]
        raise ValueError(f"neuron {text!r}: the model has no attributed module {module!r}"
                         + (f" (did you mean {close}?)" if close else ""))
    if int(unit) >= sizes[module]:
        raise ValueError(f"neuron {text!r}: {module} has {sizes[module]} units (0..{sizes[module] - 1})")
    return module, int(unit)


def chosen_neurons(schemes: Sequence[Scheme], top: int, neurons: Sequence[str] = ()) -> List[int]:
    """Flat indices (model order) of the neurons whose exemplars the page shows: each scheme's first
    ``top`` by |mean| (fusions included), then ``neurons`` (``"MODULE:UNIT"``), each once."""
    sizes = schemes[0].sizes
    offsets, at = {}, 0
    for m, n in sizes.items():
        offsets[m], at = at, at + n
    chosen: Dict[int, None] = {}
    for s in schemes:
        for i in s.ranking("abs")[:top]:
            chosen[int(i)] = None
    for text in neurons:
        module, unit = parse_neuron(text, sizes)
        chosen[offsets[module] + unit] = None
    return list(chosen)


def explore(schemes: Sequence[Scheme], path: Union[str, Path], *, model=None, tokenizer=None,
            text_of: Optional[TextOf] = None, top: int = DEFAULT_TOP, neurons: Sequence[str] = (),
            title: str = "fastnig", levels: Sequence[float] = (0.1, 0.5, 1, 5), default_level: float = 1,
            facts: Optional[List[Dict[str, str]]] = None, fused: bool = True, progress: bool = False,
            ranker=None) -> Path:
    """Write a neuron explorer (one self-contained HTML file) for ``schemes``; returns its path.

    Args:
        schemes: pair schemes (P_x, N_x) of one model; with ``fused`` their fusions F_x (when a dataset
            has both labels) and F_A are added.  Fusions given are kept as they are.
        path: the HTML file to write (e.g. ``runs/demo/explorer.html``).
        model, tokenizer: the schemes' cross-encoder, for the per-token view of the exemplar pairs;
            without them (or without ``text_of``) the page shows no exemplars.
        text_of: ``(scheme, pair ids) -> {pair id: (query, passage)}``; :func:`explore_run` reads the run's
            collections.
        top: per scheme, the ``top`` neurons of largest |mean NIG| get their exemplars in the page;
            ``neurons``: more, as ``"MODULE:UNIT"``.
        title, levels, default_level, facts: the page's title, its top-X % levels, and the run's facts
            (:func:`fastnig.report.explorer.run_facts`).
        ranker: the model's ranker (as for :func:`fastnig.attribute`; ``None``: from its class).
    """
    schemes = list(schemes)
    if not schemes:
        raise ValueError("explore: no schemes given")
    if fused:
        schemes = with_fusions(schemes)
    exemplars: Dict[int, List[Dict[str, Any]]] = {}
    pairs: List[Dict[str, Any]] = []
    if model is not None and tokenizer is not None and text_of is not None:
        exemplars, pairs = _exemplar_views(schemes, chosen_neurons(schemes, top, neurons), model, tokenizer,
                                           text_of, progress, ranker)
    data = explorer_data(schemes, title=title, levels=levels, default_level=default_level, exemplars=exemplars,
                         pairs=pairs, facts=facts, hint=HINT)
    return write_explorer(path, data)


def with_fusions(schemes: List[Scheme]) -> List[Scheme]:
    """``schemes`` and their fusions: F_x for each dataset with both labels, and F_A (of every pair scheme)."""
    pair_schemes = [s for s in schemes if s.label != FUSED_LABEL and s.count]
    out = list(schemes)
    names = {s.name for s in schemes}
    for s in pair_schemes:
        other = [o for o in pair_schemes if o.dataset == s.dataset and o.label != s.label]
        if s.label == "relevant" and other and f"F_{s.name[2:]}" not in names:
            out.append(fuse(s, other[0]))
    if len(pair_schemes) > 1 and "F_A" not in names:
        out.append(fuse_all(pair_schemes))
    return out


def _exemplar_views(schemes: Sequence[Scheme], chosen: Sequence[int], model, tokenizer, text_of: TextOf,
                    progress: bool, ranker=None) -> Tuple[Dict[int, List[Dict[str, Any]]], List[Dict[str, Any]]]:
    """The exemplars of the chosen neurons in every pair scheme, with their per-token conductance:
    one :func:`token_conductance` per (scheme, pair), for the chosen neurons that have it as exemplar."""
    sizes = schemes[0].sizes
    where = []  # flat index -> (module, unit)
    for m, n in sizes.items():
        where.extend((m, u) for u in range(n))
    wanted: Dict[Tuple[int, str], List[Tuple[int, float]]] = {}  # (scheme, pair id) -> [(neuron, NIG)]
    for k, s in enumerate(schemes):
        if s.exemplars is None:
            continue
        for i in chosen:
            module, unit = where[i]
            for pid, value in s.exemplars.of(module, unit, s.pair_ids):
                wanted.setdefault((k, pid), []).append((i, value))
    exemplars: Dict[int, List[Dict[str, Any]]] = {}
    pairs: List[Dict[str, Any]] = []
    pair_index: Dict[Tuple[str, str], int] = {}
    texts = {k: text_of(schemes[k], sorted({pid for k_, pid in wanted if k_ == k})) for k in {k for k, _ in wanted}}
    for n_done, ((k, pid), items) in enumerate(sorted(wanted.items())):
        scheme = schemes[k]
        text = texts[k].get(pid)
        if text is None:
            continue
        by_module: Dict[str, List[int]] = {}
        for i, _ in items:
            by_module.setdefault(where[i][0], []).append(where[i][1])
        try:
            view = token_conductance(model, tokenizer, text, by_module, settings=_settings_of(scheme),
                                     target=scheme.label, ranker=ranker)
        except (ValueError, TypeError, RuntimeError, KeyError) as exc:  # a model family it does not handle
            log.warning("explorer: no per-token view of the exemplars (%s: %s); the page shows the rest",
                        type(exc).__name__, exc)
            return {}, []
        key = (scheme.dataset, pid)
        if key not in pair_index:
            pair_index[key] = len(pairs)
            pairs.append({"id": pid, "dataset": scheme.dataset, "query": text[0], "passage": text[1],
                          "tokens": view.tokens, "segments": view.segments})
        for i, value in items:
            module, unit = where[i]
            terms = view.values[module][:, view.units[module].index(unit)]
            payload, scale = token_payload(terms.tolist())
            exemplars.setdefault(i, []).append({"scheme": k, "pair": pair_index[key], "value": value,
                                                "sum": float(terms.sum()), "tokens": payload, "scale": scale})
        if progress and n_done % 20 == 0:
            log.info("explorer: %d of %d exemplar pairs", n_done + 1, len(wanted))
    for items in exemplars.values():
        items.sort(key=lambda e: (e["scheme"], -abs(e["value"])))
    return exemplars, pairs


def run_schemes(run_dir: Path) -> List[Scheme]:
    """The schemes of a run folder (``schemes/*.json``; a multi-process run's shards ``*.rankR-of-W`` are
    left out: their merge is the scheme), in name order (P before N per dataset)."""
    folder = run_dir / "schemes"
    files = sorted(f for f in folder.glob("*.json") if ".rank" not in f.name) if folder.is_dir() else []
    if not files:
        raise NotARunFolder(f"{run_dir} has no schemes (schemes/*.json): its attribution stage has not run yet")
    schemes = [Scheme.load(f) for f in files]
    return sorted(schemes, key=lambda s: (s.dataset, s.label != "relevant"))


def _collection_text(datasets: Mapping[str, Any]) -> TextOf:
    """``text_of`` reading the run's attribution collections (``datasets``: name -> spec, or ``{"dataset":
    spec}`` as in config.json; pair id = ``query id<TAB>doc id``)."""
    cache: Dict[str, Any] = {}

    def text_of(scheme: Scheme, pair_ids: Sequence[str]) -> Dict[str, Tuple[str, str]]:
        entry = datasets.get(scheme.dataset)
        spec = entry.get("dataset") if isinstance(entry, Mapping) else entry
        if not spec:
            return {}
        if spec not in cache:
            cache[spec] = load_collection(spec)
        collection = cache[spec]
        ids = [pid.split("\t", 1) for pid in pair_ids if "\t" in pid]
        queries, passages = collection.queries(), collection.doc_texts([d for _, d in ids])
        return {f"{q}\t{d}": (queries[q], passages[d]) for q, d in ids if q in queries and d in passages}
    return text_of


def explore_run(run_dir: Union[str, Path], out: Optional[Union[str, Path]] = None, *, top: int = DEFAULT_TOP,
                neurons: Sequence[str] = (), exemplars: bool = True, model=None, tokenizer=None,
                device: str = "cpu", progress: bool = False, ranker=None) -> Path:
    """Write ``RUN/explorer.html`` (or ``out``) for a finished (or partly finished) run folder.

    Reads the run's schemes and config; loads its model (or uses ``model`` / ``tokenizer``) and its
    collections for the exemplar pairs' per-token view (``exemplars=False``: no model, no exemplars),
    scored by ``ranker`` (``None``: the config's ``ranker`` entry, else from the model's class).

    Raises:
        NotARunFolder: ``run_dir`` is not a run folder, or has no schemes yet.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    schemes = run_schemes(run_dir)
    analysis = config.get("analysis", {})
    levels = analysis.get("levels") or [0.1, 0.5, 1, 5]
    default = analysis.get("layer_percent", 1)
    text_of = None
    if exemplars:
        text_of = _collection_text(config["attribution"].get("datasets") or {})
        if model is None:
            name = str(config.get("model") or "")
            if name in ("demo", OFFLINE_DEMO):
                cache = Path(config.get("cache_dir") or os.environ.get("FASTNIG_CACHE")
                             or Path.home() / ".cache" / "fastnig")
                model, tokenizer = offline_demo_model(cache / "models", device=device)
            else:
                model, tokenizer = load_ranker(name, device=device)
    if ranker is None:
        ranker = ranker_from_spec(config.get("ranker"))
    title = str(config.get("name") or run_dir.name)
    in_domain = run_in_domain(config)
    log.info("explorer of %s (in-domain %s): %d schemes", run_dir, in_domain, len(schemes))
    return explore(schemes, out or run_dir / "explorer.html", model=model, tokenizer=tokenizer, text_of=text_of,
                   top=top, neurons=neurons, title=title, levels=levels, default_level=default,
                   facts=run_facts(run_dir), progress=progress, ranker=ranker)


def explorer_summary(path: Path) -> str:
    """One line: the file and its size."""
    return f"{path} ({path.stat().st_size / 1e6:.2f} MB)"

