"""Jobs that chain the stages.

Owns: the ``fastnig attribute`` job (:func:`attribute_dataset`) and the
stages of ``fastnig run`` (preflight, attribution, analysis, pruning,
report) with their resume stamps.  Must not: parse configs
(:mod:`fastnig.study.config`), hold torchrun plumbing (:mod:`fastnig.study.distributed`),
or compute anything a lower stage owns.

* :func:`attribute_dataset` (``fastnig attribute``): dataset -> pairs ->
  agreement filter -> NIG -> scheme file, resumable;
* :func:`run_study` (``fastnig run CONFIG``): the whole study of the paper
  from one configuration (:func:`load_config`), stage by stage
  (:func:`stage_attribution`, :func:`stage_analysis`, :func:`stage_pruning`,
  then :func:`fastnig.report.write_report`), resumable and sharded over
  torchrun ranks (:class:`Ranks`).

:func:`attribute_dataset` is what ``fastnig attribute`` runs.  It saves the
scheme (atomically, see :mod:`fastnig.neurons.scheme`) after every chunk of pairs;
started again on the same output it loads what is there, checks that it was
made with the same model, dataset, label and settings, and attributes only
the pairs it does not hold yet.  Because a scheme's sums are exact whatever
the order and grouping of pairs, a resumed run ends with exactly the scheme an
uninterrupted one writes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ..analysis.neuron_analyses import analyze
from ..evaluation.table1 import baseline_differences, table1_pairs
from ..analysis.table1 import baseline_table
from ..engine.attribute import attribute, attribution_settings
from ..common import check_int, write_atomic
from .config import ConfigError, RunConfig, load_config, place_ir_datasets_files
from ..engine.scoring import TARGETS
from ..engine.model import move_model, resolve_max_length, unwrap
from ..data import count_labels, filter_agreeing, label_mapping, load_collection, sample_pairs
from .distributed import Ranks, init_ranks
from ..training.demo_model import OFFLINE_DEMO, demo_model_quality, offline_demo_model
from ..engine.loading import ModelUnavailable
from ..training.demo_model import load_cross_encoder
from ..evaluation.pruning import PruningBenchmark, module_counts, table_row
from ..engine.quadrature import DEFAULT_RULE, DEFAULT_STEPS
from ..evaluation.table4 import PruningTable
from ..report.document import write_report
from ..evaluation.reranking import EncodedCandidates, bm25_run, build_candidates, score_candidates
from ..neurons.scheme import Scheme
from ..neurons.sets import neuron_universe
from ..neurons.stability import StopRule
from ..neurons.expressions import evaluate


def pair_id(pair) -> str:
    """Stable id of a :class:`fastnig.data.LabelledPair` inside a scheme."""
    return f"{pair.query_id}\t{pair.doc_id}"


def bm25_ranker(collection, cache_dir: Optional[Union[str, Path]] = None):
    """``ranker(queries, k)`` for ``negatives="bm25"``: the BM25 top ``k`` doc ids of each query
    (:func:`fastnig.evaluation.reranking.bm25_run`, index cached in ``cache_dir``)."""
    def ranker(queries, k):
        return {q: [d for d, _ in docs] for q, docs in bm25_run(collection, queries, k=k, cache_dir=cache_dir,
                                                                progress=False).items()}
    return ranker


def _sampling_record(seed, num_pairs, negatives, relevance_threshold, agreement_filter, relevant, nonrelevant):
    """What a scheme records of its sampling (a resume must match it); the label mapping only when it is not
    the former default (relevant >= threshold, non-relevant = grade 0), so older schemes still resume."""
    record = {"seed": seed, "num_pairs": num_pairs, "negatives": negatives,
              "relevance_threshold": relevance_threshold, "agreement_filter": agreement_filter}
    if relevant is not None or nonrelevant is not None or relevance_threshold != 1:
        record.update(label_mapping(relevant, nonrelevant, relevance_threshold).as_dict())
    return record


def attribute_dataset(model, tokenizer, dataset, *, label: Union[int, str], num_pairs: int, out: Union[str, Path],
                      seed: int = 0, negatives: str = "judged", relevance_threshold: int = 1,
                      relevant: Optional[Sequence[int]] = None, nonrelevant: Optional[Sequence[int]] = None,
                      bm25_cache_dir: Optional[Union[str, Path]] = None, agreement_filter: bool = True,
                      chunk_pairs: int = 8, steps: int = DEFAULT_STEPS,
                      rule: str = DEFAULT_RULE, nodes: str = "uniform", baseline: str = "pad",
                      output: str = "probability",
                      max_length: Optional[int] = None, step_batch: Optional[int] = None, pair_batch: int = 1,
                      layers: Optional[Sequence[str]] = None, include_pooler: bool = False, dtype=None,
                      segments: bool = False, device=None, progress: bool = True, dataset_name: Optional[str] = None,
                      shard: Tuple[int, int] = (0, 1), stop_when=None,
                      combine: Optional[Callable[[Scheme], Scheme]] = None) -> Scheme:
    """Attribute ``num_pairs`` pairs of one label of a dataset into a scheme file.

    Args:
        model, tokenizer: the cross-encoder and its fast tokenizer.
        dataset: a :class:`fastnig.data.Collection` or a spec for
            :func:`fastnig.data.load_collection`.
        label: 1 / ``"relevant"`` (scheme P_x) or 0 / ``"non-relevant"`` (N_x).
        num_pairs: pairs sampled (deterministically from ``seed``) before the
            agreement filter; the scheme holds those that agree.
        out: scheme path (``runs/P_nf`` writes ``runs/P_nf.json`` + tensors).
        negatives, relevance_threshold, relevant, nonrelevant: which pairs
            are relevant / non-relevant and where negatives come from, see
            :func:`fastnig.data.sample_pairs` (``"bm25"`` ranks with
            :func:`bm25_ranker`, its index cached in ``bm25_cache_dir``).
        agreement_filter: keep only pairs whose prediction agrees (docs/method.md §6).
        chunk_pairs: pairs attributed between two saves (what a kill can lose).
        steps, rule, nodes, baseline, output, max_length, step_batch, pair_batch,
        layers, include_pooler, dtype, segments, device: as in :func:`fastnig.attribute`
            (``segments=True``: the scheme keeps per-segment sums, :mod:`fastnig.neurons.segment_shares`).
        progress: a progress bar (pairs done, pairs/s, ETA).
        dataset_name: the scheme's dataset name (default: the collection's name).
        shard: ``(rank, world)``: attribute only the pairs ``rank::world`` of
            the sample (one torchrun process each; merge the shards with
            :meth:`Scheme.merge`, which is exact).
        stop_when: early stopping (docs/method.md §6.6): ``None`` (attribute
            all ``num_pairs``), or a :class:`fastnig.neurons.stability.StopRule` /
            mapping ``{level, overlap[, by, first_round]}``: pairs are then
            attributed in rounds (first_round, doubling, up to ``num_pairs``
            sampled pairs) and attribution stops after the first round whose
            scheme's top ``level`` % set is estimated to keep at least
            ``overlap`` of its neurons if the pairs were doubled.  The pairs
            are the first ones of the same draw, so a scheme stopped after
            ``r`` sampled pairs equals a run with ``num_pairs=r`` and no rule.
            ``extra["stopping"]`` records the rule, the sampled pairs used,
            the reason attribution stopped and each check.
        combine: with ``shard`` and ``stop_when``: called on this shard's
            scheme at every round end, on every rank, to return the scheme of
            all shards (gather + merge); the rule is checked on it.

    Returns:
        The saved :class:`fastnig.Scheme`.
    """
    check_int("chunk_pairs", chunk_pairs, 1)
    model, tokenizer = unwrap(model, tokenizer)
    max_length = resolve_max_length(model, tokenizer, max_length)
    collection = load_collection(dataset) if isinstance(dataset, (str, Path)) else dataset
    ranker = bm25_ranker(collection, bm25_cache_dir) if negatives == "bm25" else None
    pairs = sample_pairs(collection, label=label, num_pairs=num_pairs, seed=seed,
                         relevance_threshold=relevance_threshold, negatives=negatives, relevant=relevant,
                         nonrelevant=nonrelevant, ranker=ranker)
    rank, world = shard
    stop_rule = StopRule.parse(stop_when)
    dataset_name = dataset_name or collection.name
    target = TARGETS[0] if pairs and pairs[0].label == 1 else TARGETS[1]
    drawn = pairs
    move_model(model, device)
    settings = attribution_settings(model, target=target, output=output, baseline=baseline, steps=steps,
                                    rule=rule, max_length=max_length, dtype=dtype, nodes=nodes, segments=segments)
    sampling = _sampling_record(seed, num_pairs, negatives, relevance_threshold, agreement_filter, relevant,
                                nonrelevant)
    if stop_rule is not None:
        sampling["stop_when"] = stop_rule.as_dict()
    out = Path(out)
    if Scheme.exists(out):
        scheme = Scheme.load(out)
        expected = Scheme.empty(neuron_universe(model, layers, include_pooler),
                                {"model": settings["model"], "dataset": dataset_name, "label": target,
                                 "settings": settings})
        scheme.check_compatible(expected, op="resume")
        if scheme.extra.get("sampling") not in (None, sampling):
            raise ValueError(f"resume: {out} was sampled with {scheme.extra.get('sampling')}, not {sampling}; "
                             "use another output path or the same sampling options")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        scheme = Scheme.empty(neuron_universe(model, layers, include_pooler),
                              {"model": settings["model"], "dataset": dataset_name, "label": target,
                               "settings": settings, "extra": {"sampling": sampling}})
    mine = [p for i, p in enumerate(drawn) if i % world == rank]
    seen = scheme.seen_ids
    bar = tqdm(total=len(mine), initial=sum(pair_id(p) in seen for p in mine), unit="pair",
               desc=f"NIG {scheme.name}", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    attributed = 0

    def attribute_round(todo) -> None:
        nonlocal attributed
        if todo and agreement_filter:
            kept, _report = filter_agreeing(model, tokenizer, todo, max_length=max_length, progress=False)
            kept_ids = {pair_id(p) for p in kept}
            dropped = [pair_id(p) for p in todo if pair_id(p) not in kept_ids]
            if dropped:
                scheme.mark_dropped(dropped)
                scheme.save(out)
                bar.update(len(dropped))
            todo = kept
        for start in range(0, len(todo), chunk_pairs):
            chunk = todo[start:start + chunk_pairs]
            result = attribute(model, [p.text_pair for p in chunk], tokenizer=tokenizer, target=target,
                               baseline=baseline, steps=steps, rule=rule, nodes=nodes, layers=layers,
                               include_pooler=include_pooler,
                               step_batch=step_batch, pair_batch=pair_batch, max_length=max_length, output=output,
                               dtype=dtype, segments=segments, progress=False)
            scheme.add(result, [pair_id(p) for p in chunk])
            scheme.save(out)
            attributed += len(chunk)
            bar.update(len(chunk))
            bar.set_postfix(pairs_per_s=f"{attributed / (time.perf_counter() - started):.2f}")

    # Rounds end after these many sampled pairs; the rule is checked at each end but the last.
    ends = stop_rule.round_ends(len(drawn)) if stop_rule is not None and drawn else [len(drawn)]
    checks = list((scheme.extra.get("stopping") or {}).get("checks", [])) if stop_rule is not None else []
    begin, reason, end = 0, None, len(drawn)
    for end in ends:
        attribute_round([p for i, p in enumerate(drawn[begin:end], begin)
                         if i % world == rank and pair_id(p) not in scheme.seen_ids])
        begin = end
        if stop_rule is None or end == len(drawn):
            continue
        whole = combine(scheme) if combine is not None else scheme
        seen_all = whole.seen_ids
        if any(pair_id(p) in seen_all for p in drawn[end:]):
            continue  # resumed: the run that went past this round end checked the rule there and went on
        holds, estimate = stop_rule.check(whole)
        checks = [c for c in checks if c["pairs_sampled"] < end] + [
            {"pairs_sampled": end, "pairs_used": whole.count,
             "estimate": None if estimate != estimate else estimate}]  # NaN (not available) as null
        scheme.extra["stopping"] = {**scheme.extra.get("stopping", {}), "checks": checks}
        if holds:
            reason = "stable"
            break
    bar.close()
    if reason is None:
        reason = "max pairs" if len(drawn) >= num_pairs else "all pairs drawn"
    record = {"rule": stop_rule.as_dict() if stop_rule is not None else None, "max_pairs": num_pairs,
              "pairs_sampled": end, "reason": reason}
    if stop_rule is not None:
        record["checks"] = checks
    if scheme.extra.get("stopping") != record or not Scheme.exists(out):
        scheme.extra["stopping"] = record  # (a run where every pair was dropped still leaves a file)
        scheme.save(out)
    return scheme


# =============================================================== the study
# `fastnig run CONFIG`: every stage of the paper, each skipped when its output
# exists with the same settings, sharded over torchrun ranks when launched so.

log = logging.getLogger("fastnig.run")


def _settings_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ stages
@dataclass
class Study:
    """Everything a run needs, resolved by :func:`preflight` before any work."""

    config: RunConfig
    model: Any
    tokenizer: Any
    collections: Dict[str, Any]
    validation: Dict[str, Any]
    ranks: Ranks
    timings: Dict[str, float] = field(default_factory=dict)
    throughput: Dict[str, float] = field(default_factory=dict)


def _load_model(cfg: RunConfig, device: str):
    if cfg.model in ("demo", OFFLINE_DEMO):  # MiniLM-L6 fine-tuned on Cranfield, cached
        return offline_demo_model(cfg.cache_dir / "models", device=device)
    return load_cross_encoder(cfg.model, device=device)


def stage_model_quality(study: Study) -> Optional[Path]:
    """The offline demo model only: its held-out nDCG@10 beside BM25's and a random order's, into
    ``<output>/model_quality.json`` (:func:`fastnig.training.demo_model.demo_model_quality`; rank 0, once per model)."""
    cfg = study.config
    if cfg.model not in ("demo", OFFLINE_DEMO) or not study.ranks.is_main:
        return None
    path = cfg.output / "model_quality.json"
    folder = str(getattr(study.model.config, "name_or_path", ""))
    max_length = cfg.pruning["max_length"] or cfg.attribution["max_length"]
    if path.exists():
        done = json.loads(path.read_text())
        if done.get("model") == folder and done.get("max_length") == max_length:
            return path
    started = time.perf_counter()
    quality = demo_model_quality(study.model, study.tokenizer, max_length=max_length,
                                 bm25_cache_dir=cfg.cache_dir / "bm25")
    write_atomic(path, json.dumps(quality, indent=1))
    study.timings["model_quality_s"] = time.perf_counter() - started
    log.info("demo model, %d held-out queries: nDCG@10 %.3f (BM25 %.3f, random order %.3f)",
             quality["queries"], quality["ndcg"], quality["bm25_ndcg"], quality["random_ndcg"])
    return path


def preflight(cfg: RunConfig, ranks: Optional[Ranks] = None) -> Study:
    """Open every dataset and the model before any work: a bad one stops here with one message."""
    ranks = ranks or Ranks()
    place_ir_datasets_files(cfg.ir_datasets_files)
    collections, validation = {}, {}
    for name, entry in cfg.attribution["datasets"].items():
        collections[name] = _open_dataset(load_collection, entry["dataset"], f"attribution dataset {name!r}")
    for name, v in cfg.pruning["validation"].items():
        validation[name] = _open_dataset(load_collection, v["dataset"], f"validation dataset {name!r}")
    device = cfg.device or (f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        model, tokenizer = _load_model(cfg, device)
    except ModelUnavailable as exc:
        raise ConfigError(f"model: {exc}") from None
    return Study(cfg, model, tokenizer, collections, validation, ranks)


def _open_dataset(load, spec: str, what: str):
    try:
        return load(spec)
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"{what} ({spec}): {exc}") from None


def _scheme_path(out: Path, name: str, label: str) -> Path:
    return out / "schemes" / f"{'P' if label == 'relevant' else 'N'}_{name}"


def stage_attribution(study: Study, progress: bool = True) -> Dict[Tuple[str, str], Scheme]:
    """One scheme per (dataset, label); resumable; sharded over ranks and merged exactly."""
    cfg, ranks = study.config, study.ranks
    att = cfg.attribution
    schemes: Dict[Tuple[str, str], Scheme] = {}
    started, pairs_done = time.perf_counter(), 0
    for name, collection in study.collections.items():
        entry = att["datasets"][name]
        mapping = label_mapping(entry["relevant"], entry["nonrelevant"], att["relevance_threshold"])
        for label in att["labels"]:
            if (label == "non-relevant" and entry["negatives"] == "judged"
                    and not count_labels(collection, mapping)["non-relevant"]):
                log.info("%s has no non-relevant judgments (%s): no N_%s (docs/method.md §6)", name,
                         mapping.describe(), name)
                continue
            path = _scheme_path(cfg.output, name, label)
            kwargs = dict(label=label, num_pairs=att["pairs"], seed=att["seed"], negatives=entry["negatives"],
                          relevance_threshold=att["relevance_threshold"], relevant=entry["relevant"],
                          nonrelevant=entry["nonrelevant"], bm25_cache_dir=cfg.cache_dir / "bm25",
                          agreement_filter=att["agreement_filter"],
                          chunk_pairs=att["chunk_pairs"], steps=att["steps"], rule=att["rule"], nodes=att["nodes"],
                          baseline=att["baseline"], output=att["output"], max_length=att["max_length"],
                          step_batch=att["step_batch"], pair_batch=att["pair_batch"], segments=att["segments"],
                          dataset_name=name,
                          progress=progress and ranks.is_main, stop_when=att.get("stop_when"))
            before = Scheme.load(path).count if Scheme.exists(path) else 0
            if ranks.world == 1:
                scheme = attribute_dataset(study.model, study.tokenizer, collection, out=path, **kwargs)
            else:
                shard_path = path.with_name(f"{path.name}.rank{ranks.rank}-of-{ranks.world}")
                complete = Scheme.exists(path) and _is_complete(Scheme.load(path), collection, kwargs)
                if not complete:
                    part = attribute_dataset(study.model, study.tokenizer, collection, out=shard_path,
                                             shard=(ranks.rank, ranks.world), combine=_merged_over(ranks),
                                             **kwargs)
                    parts = ranks.gather(part)
                    if ranks.is_main:
                        merged = parts[0]
                        for other in parts[1:]:
                            merged = merged.merge(other)
                        merged.save(path)
                    ranks.barrier()
                scheme = Scheme.load(path)
            pairs_done += scheme.count - before
            schemes[(name, label)] = scheme
            log.info("%s: %d pairs, %d dropped by the agreement filter", scheme.name, scheme.count,
                     scheme.num_dropped)
    if pairs_done:  # a resumed run with nothing left to do keeps the timing of the run that did the work
        elapsed = time.perf_counter() - started
        study.timings["attribution_s"] = elapsed
        study.throughput["attribution_pairs_per_s"] = pairs_done / elapsed
    return schemes


def _merged_over(ranks: Ranks) -> Callable[[Scheme], Scheme]:
    """``combine`` for :func:`attribute_dataset`: every rank's shard, gathered and merged (on every rank)."""
    def combine(part: Scheme) -> Scheme:
        parts = ranks.gather(part)
        merged = parts[0]
        for other in parts[1:]:
            merged = merged.merge(other)
        return merged
    return combine


def _is_complete(scheme: Scheme, collection, kwargs) -> bool:
    stopping = scheme.extra.get("stopping") or {}
    rule = StopRule.parse(kwargs.get("stop_when"))
    if (rule is not None and stopping.get("reason") == "stable" and stopping.get("rule") == rule.as_dict()
            and stopping.get("max_pairs") == kwargs["num_pairs"]):
        return True  # stopped early by the same rule: its later pairs are not wanted
    ranker = bm25_ranker(collection, kwargs["bm25_cache_dir"]) if kwargs["negatives"] == "bm25" else None
    pairs = sample_pairs(collection, label=kwargs["label"], num_pairs=kwargs["num_pairs"], seed=kwargs["seed"],
                         relevance_threshold=kwargs["relevance_threshold"], negatives=kwargs["negatives"],
                         relevant=kwargs["relevant"], nonrelevant=kwargs["nonrelevant"], ranker=ranker)
    return {pair_id(p) for p in pairs} <= scheme.seen_ids


def _stamp_path(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.json"


def _stage_done(out: Path, stage: str, key: str) -> bool:
    path = _stamp_path(out, stage)
    return path.exists() and json.loads(path.read_text()).get("key") == key


def _mark_done(out: Path, stage: str, key: str) -> None:
    write_atomic(_stamp_path(out, stage), json.dumps({"key": key}))


def stage_analysis(study: Study, schemes: Mapping[Tuple[str, str], Scheme]) -> Path:
    """Figures 2a–d, 3, 4a/4b, 5 and Table 1 into ``<output>/analysis`` (rank 0).

    Table 1 (docs/method.md §3): ``analysis.baseline_pairs`` relevant pairs of
    the in-domain dataset that the model judges relevant (:func:`table1_pairs`).
    Figure 5 profiles the pruned sets of the config (``pruning.sets``).
    """
    cfg = study.config
    folder = cfg.output / "analysis"
    key = _settings_hash(cfg.analysis, cfg.attribution, cfg.pruning["sets"],
                         {f"{d}/{l}": s.count for (d, l), s in schemes.items()})
    if study.ranks.is_main and not _stage_done(cfg.output, "analysis", key):
        started = time.perf_counter()
        in_domain = cfg.attribution["in_domain"][0] if cfg.attribution["in_domain"] else ""
        analyze(list(schemes.values()), folder, levels=cfg.analysis["levels"], in_domain=in_domain,
                exclude=cfg.analysis["exclude"], by=cfg.analysis["by"], layer_percent=cfg.analysis["layer_percent"],
                profile=cfg.pruning["sets"] or None)
        if cfg.analysis["baseline_pairs"]:
            name = in_domain or next(iter(study.collections))
            entry = cfg.attribution["datasets"][name]
            pairs, info = table1_pairs(study.model, study.tokenizer, study.collections[name],
                                       cfg.analysis["baseline_pairs"], seed=cfg.attribution["seed"],
                                       relevant=entry["relevant"], nonrelevant=entry["nonrelevant"],
                                       relevance_threshold=cfg.attribution["relevance_threshold"],
                                       max_length=cfg.attribution["max_length"])
            log.info("Table 1: %d agreeing relevant pairs of %s (%d drawn)", info["agreeing"], name, info["drawn"])
            if pairs:
                diffs = baseline_differences(study.model, study.tokenizer, [p.text_pair for p in pairs],
                                             max_length=cfg.attribution["max_length"])
                baseline_table(diffs, folder, pairs=len(pairs), dataset=name)
        study.timings["analysis_s"] = time.perf_counter() - started
        _mark_done(cfg.output, "analysis", key)
    study.ranks.barrier()
    return folder


def _sharded_benchmark(study: Study, candidates, progress: bool = True):
    """A PruningBenchmark whose scoring is split over the ranks (batches rank::world, summed back)."""
    ranks = study.ranks
    cfg = study.config
    max_length = cfg.pruning["max_length"] or cfg.attribution["max_length"]

    class ShardedBenchmark(PruningBenchmark):
        def score(self, desc: str) -> np.ndarray:
            mine = EncodedCandidates(self.encoded.batches[ranks.rank::ranks.world],
                                     self.encoded.rows[ranks.rank::ranks.world], self.encoded.num_pairs)
            scores = torch.from_numpy(score_candidates(self.model, mine, self.progress and ranks.is_main, desc=desc,
                                                       partial=True))
            return ranks.sum_(scores).numpy()

    return ShardedBenchmark(study.model, study.tokenizer, candidates, cfg.pruning["batch_size"], max_length,
                            progress=progress and ranks.is_main)


def stage_pruning(study: Study, schemes: Mapping[Tuple[str, str], Scheme], progress: bool = True):
    """Table 4: every set x level x validation dataset, with its random baseline; rows cached for resume."""
    cfg, ranks = study.config, study.ranks
    pru = cfg.pruning
    if not pru["sets"]:
        return None
    folder = cfg.output / "pruning"
    started = time.perf_counter()
    in_domain = cfg.attribution["in_domain"]
    sets = {expr: {level: evaluate(expr, schemes, level, in_domain=in_domain, by=pru["by"], name=expr)
                   for level in pru["levels"]} for expr in pru["sets"]}
    rows, computed = [], 0
    for vname, collection in study.validation.items():
        keys = {}
        for expr, by_level in sets.items():
            for level, nset in by_level.items():
                keys[(expr, level)] = _settings_hash(vname, cfg.pruning["validation"][vname], expr, level,
                                                     sorted((m, i.tolist()) for m, i in nset.by_module().items()),
                                                     pru["repetitions"], pru["seed"], pru["queries"], pru["depth"],
                                                     cfg.model, cfg.attribution["max_length"], pru["max_length"])
        cached = {k: folder / "rows" / f"{h}.json" for k, h in keys.items()}
        if all(p.exists() for p in cached.values()):
            rows += [json.loads(p.read_text()) for p in cached.values()]
            continue
        candidates = build_candidates(collection, num_queries=pru["queries"], seed=pru["seed"], depth=pru["depth"],
                                      cache_dir=cfg.cache_dir / "bm25", progress=progress and ranks.is_main)
        candidates.name = vname
        bench = _sharded_benchmark(study, candidates, progress)
        random_cache: Dict[Tuple, Any] = {}
        for (expr, level), path in cached.items():
            if path.exists():
                rows.append(json.loads(path.read_text()))
                continue
            nset = sets[expr][level]
            signature = tuple(module_counts(nset).items())
            if signature not in random_cache:
                random_cache[signature] = bench.random_baseline(nset, pru["repetitions"], pru["seed"])
            row = table_row(bench, expr, level, bench.evaluate(nset), random_cache[signature],
                            group=cfg.pruning["validation"][vname]["group"], dataset=vname)
            if ranks.is_main:
                write_atomic(path, json.dumps(row))
            rows.append(row)
            computed += 1
            log.info("pruned %s @ %s%% on %s: drop %.2f%% (random %.2f%%)", expr, level, vname,
                     row["drop_percent"], row["random_drop_mean"])
    table = PruningTable(rows)
    if ranks.is_main:
        table.write(folder)
    ranks.barrier()
    if computed:
        study.timings["pruning_s"] = time.perf_counter() - started
    return table


def run_study(config: Union[RunConfig, str, Path], *, progress: bool = True, model: Optional[str] = None,
              datasets: Optional[Mapping[str, str]] = None, output: Optional[Union[str, Path]] = None) -> Path:
    """Run every stage of a configuration; returns the report's path.

    Restarted after a kill, it redoes only unfinished work: schemes resume
    pair by pair, analyses are skipped when their stamp matches, and pruning
    rows are cached one by one.
    """
    ranks = init_ranks()
    cfg = config if isinstance(config, RunConfig) else load_config(config, model=model, datasets=datasets,
                                                                     output=output)
    study = preflight(cfg, ranks)
    cfg.output.mkdir(parents=True, exist_ok=True)
    handler = None
    if ranks.is_main:
        handler = logging.FileHandler(cfg.output / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        write_atomic(cfg.output / "config.json", json.dumps(cfg.as_dict(), indent=2, default=str))
    try:
        log.info("run %s: model %s, %d attribution datasets, %d validation datasets, %d process(es)", cfg.name,
                 cfg.model, len(study.collections), len(study.validation), ranks.world)
        schemes = stage_attribution(study, progress)
        stage_analysis(study, schemes)
        stage_pruning(study, schemes, progress)
        stage_model_quality(study)
        report = cfg.output / "report.md"
        if ranks.is_main:
            timings_path = cfg.output / "timings.json"
            previous = json.loads(timings_path.read_text()) if timings_path.exists() else {}
            merged = {**previous.get("timings", {}), **study.timings}
            throughput = {**previous.get("throughput", {}), **study.throughput}
            write_atomic(timings_path, json.dumps({"timings": merged, "throughput": throughput}, indent=2))
            settings = {**cfg.as_dict(), "processes": ranks.world}
            report = write_report(cfg.output, settings, merged, throughput)["md"]
            log.info("report: %s", report)
        ranks.barrier()
        return report
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
