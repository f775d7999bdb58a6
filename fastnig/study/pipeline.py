"""The stages of ``fastnig run CONFIG``, chained, resumable and sharded.

Owns: :func:`run_study` — the whole study of the paper from one
configuration (:func:`fastnig.study.config.load_config`), stage by stage
(:func:`stage_model_quality`, :func:`stage_attribution`,
:func:`stage_analysis`, :func:`stage_pruning`, with ``attribution.heads`` the
head stages of :mod:`fastnig.study.head_stages`, then
:func:`fastnig.report.document.write_report`), each skipped when its output
exists with the same settings (resume stamps), sharded over torchrun ranks
(:class:`fastnig.study.distributed.Ranks`).  Must not: parse configs
(:mod:`fastnig.study.config`), hold torchrun plumbing
(:mod:`fastnig.study.distributed`), run one attribution job
(:mod:`fastnig.study.attribution_job`) or compute anything a lower layer owns.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ..analysis.neuron_analyses import analyze
from ..analysis.table1 import baseline_table
from ..common import write_atomic
from ..data import count_labels, label_mapping, load_collection, sample_pairs
from ..engine.loading import ModelUnavailable
from ..engine.rankers import bind_ranker
from ..evaluation.pruning import PruningBenchmark, table_row
from ..evaluation.random_baseline import RandomRuns
from ..evaluation.reranking import EncodedCandidates, build_candidates, score_candidates
from ..evaluation.table1 import baseline_differences, table1_pairs
from ..evaluation.table4 import PruningTable
from ..neurons.expressions import evaluate
from ..neurons.scheme import Scheme
from ..neurons.stability import StopRule
from ..report.document import write_report
from ..report.run_folder import run_lock
from ..training.demo_model import OFFLINE_DEMO, demo_model_quality, load_ranker, offline_demo_model
from .attribution_job import attribute_dataset, bm25_ranker, pair_id
from .config import ConfigError, RunConfig, load_config, place_ir_datasets_files
from .distributed import Ranks, init_ranks
from .explore import explore_run
from .head_stages import head_scheme_path, stage_head_ablation, stage_head_analysis
from .stamps import mark_done as _mark_done
from .stamps import settings_hash as _settings_hash
from .stamps import stage_done as _stage_done

# =============================================================== the study
# `fastnig run CONFIG`: every stage of the paper, each skipped when its output
# exists with the same settings, sharded over torchrun ranks when launched so.

log = logging.getLogger("fastnig.run")


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
    ranker: Any = None  # the ranker bound to the model (fastnig.engine.rankers.BoundRanker)
    timings: Dict[str, float] = field(default_factory=dict)
    throughput: Dict[str, float] = field(default_factory=dict)
    head_schemes: Dict[Tuple[str, str], Scheme] = field(default_factory=dict)  # attribution.heads: (dataset, label)
    benchmarks: Dict[str, PruningBenchmark] = field(default_factory=dict)  # validation dataset + settings -> reranking


def _load_model(cfg: RunConfig, device: str):
    if cfg.model in ("demo", OFFLINE_DEMO):  # MiniLM-L6 fine-tuned on Cranfield, cached
        return offline_demo_model(cfg.cache_dir / "models", device=device)
    return load_ranker(cfg.model, device=device)


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
    try:
        ranker = bind_ranker(cfg.ranker_object, model, tokenizer)
    except (TypeError, ValueError) as exc:  # UnsupportedModel, answer words not in the vocabulary
        raise ConfigError(f"ranker: {exc}") from None
    return Study(cfg, model, tokenizer, collections, validation, ranks, ranker)


def _open_dataset(load, spec: str, what: str):
    try:
        return load(spec)
    except (ValueError, TypeError, OSError) as exc:
        raise ConfigError(f"{what} ({spec}): {exc}") from None


def _scheme_path(out: Path, name: str, label: str) -> Path:
    return out / "schemes" / f"{'P' if label == 'relevant' else 'N'}_{name}"


def stage_attribution(study: Study, progress: bool = True) -> Dict[Tuple[str, str], Scheme]:
    """One scheme per (dataset, label); resumable; sharded over ranks and merged exactly.  With
    ``attribution.heads`` the same jobs fill a head scheme per (dataset, label) beside it
    (:func:`fastnig.study.head_stages.head_scheme_path`, into ``study.head_schemes``)."""
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
            heads_path = head_scheme_path(cfg.output, name, label) if cfg.heads_on else None
            kwargs = dict(label=label, num_pairs=att["pairs"], seed=att["seed"], negatives=entry["negatives"],
                          relevance_threshold=att["relevance_threshold"], relevant=entry["relevant"],
                          nonrelevant=entry["nonrelevant"], bm25_cache_dir=cfg.cache_dir / "bm25",
                          agreement_filter=att["agreement_filter"], chunk_pairs=att["chunk_pairs"],
                          settings=cfg.attribution_settings, dataset_name=name,
                          progress=progress and ranks.is_main, stop_when=att.get("stop_when"), ranker=study.ranker)
            before = {p: Scheme.load(p).count if Scheme.exists(p) else 0 for p in (path, heads_path) if p}
            if ranks.world == 1:
                scheme = attribute_dataset(study.model, study.tokenizer, collection, out=path, heads_out=heads_path,
                                           **kwargs)
            else:
                shard = f".rank{ranks.rank}-of-{ranks.world}"
                complete = all(Scheme.exists(p) and _is_complete(Scheme.load(p), collection, kwargs)
                               for p in (heads_path, path) if p is not None)
                if not complete:
                    part = attribute_dataset(study.model, study.tokenizer, collection,
                                             out=path.with_name(path.name + shard),
                                             heads_out=heads_path and heads_path.with_name(heads_path.name + shard),
                                             shard=(ranks.rank, ranks.world), combine=_merged_over(ranks),
                                             **kwargs)
                    if heads_path is not None:  # saved first, as a job saves its two schemes
                        merged_heads = _merged_over(ranks)(Scheme.load(heads_path.with_name(heads_path.name + shard)))
                        if ranks.is_main:
                            merged_heads.save(heads_path)
                    merged = _merged_over(ranks)(part)
                    if ranks.is_main:
                        merged.save(path)
                    ranks.barrier()
                scheme = Scheme.load(path)
            attributed = scheme.count - before[path]
            if heads_path is not None:
                study.head_schemes[(name, label)] = Scheme.load(heads_path)
                attributed = max(attributed, study.head_schemes[(name, label)].count - before[heads_path])
            pairs_done += attributed
            if scheme.count == 0 and scheme.num_dropped:
                raise ConfigError(f"attribution: the agreement filter dropped all {scheme.num_dropped} pairs of "
                                  f"{scheme.name}: the model disagrees with every one of them, so there is nothing to "
                                  "average; check the model and its ranker (template, answer words), draw more "
                                  "pairs, or set attribution.agreement_filter: false")
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
                                       max_length=cfg.attribution["max_length"], ranker=study.ranker)
            log.info("Table 1: %d agreeing relevant pairs of %s (%d drawn)", info["agreeing"], name, info["drawn"])
            if pairs:
                diffs = baseline_differences(study.model, study.tokenizer, [p.text_pair for p in pairs],
                                             max_length=cfg.attribution["max_length"], ranker=study.ranker)
                baseline_table(diffs, folder, pairs=len(pairs), dataset=name)
        study.timings["analysis_s"] = time.perf_counter() - started
        _mark_done(cfg.output, "analysis", key)
    study.ranks.barrier()
    return folder


def _sharded_benchmark(study: Study, candidates, progress: bool = True, runs: Optional[RandomRuns] = None):
    """A PruningBenchmark whose scoring is split over the ranks (batches rank::world, summed back)."""
    ranks = study.ranks
    cfg = study.config
    max_length = cfg.pruning["max_length"] or cfg.attribution["max_length"]

    class ShardedBenchmark(PruningBenchmark):
        def score(self, desc: str) -> np.ndarray:
            mine = EncodedCandidates(self.encoded.batches[ranks.rank::ranks.world],
                                     self.encoded.rows[ranks.rank::ranks.world], self.encoded.num_pairs,
                                     self.encoded.ranker)
            scores = torch.from_numpy(score_candidates(self.model, mine, self.progress and ranks.is_main, desc=desc,
                                                       partial=True))
            return ranks.sum_(scores).numpy()

    return ShardedBenchmark(study.model, study.tokenizer, candidates, cfg.pruning["batch_size"], max_length,
                            progress=progress and ranks.is_main, dtype=cfg.pruning["dtype"],
                            prefix=cfg.pruning["prefix_reuse"], runs=runs, ranker=study.ranker)


def benchmark(study: Study, vname: str, progress: bool = True) -> PruningBenchmark:
    """The reranking of validation dataset ``vname`` (candidates, their encodings, the original model's scores),
    built once per run and shared by the pruning and head-ablation stages; its random pruning runs are stored in
    ``pruning/random/<identity>/``."""
    cfg, pru = study.config, study.config.pruning
    identity = _pruning_identity(cfg, vname)
    key = _settings_hash(*identity, pru["batch_size"], pru["prefix_reuse"])  # a changed config: a new reranking
    if key not in study.benchmarks:
        runs = RandomRuns(cfg.output / "pruning" / "random" / _settings_hash(*identity), identity,
                          write=study.ranks.is_main)
        candidates = build_candidates(study.validation[vname], num_queries=pru["queries"], seed=pru["seed"],
                                      depth=pru["depth"], cache_dir=cfg.cache_dir / "bm25",
                                      progress=progress and study.ranks.is_main)
        candidates.name = vname
        study.benchmarks[key] = _sharded_benchmark(study, candidates, progress, runs)
    return study.benchmarks[key]


def _pruning_identity(cfg: RunConfig, vname: str) -> list:
    """What a validation dataset's reranking depends on besides the set: its rows' and random runs' key.
    (The dtype enters only when it is not float32, so that earlier fp32 runs keep their keys.)"""
    pru = cfg.pruning
    identity = [vname, pru["validation"][vname], pru["seed"], pru["queries"], pru["depth"], cfg.model,
                cfg.attribution["max_length"], pru["max_length"]]
    return identity + ([pru["dtype"]] if pru["dtype"] != "float32" else [])


def stage_pruning(study: Study, schemes: Mapping[Tuple[str, str], Scheme], progress: bool = True):
    """Table 4: every set x level x validation dataset, with its random baseline; rows cached for resume,
    random runs too (``pruning/random/<dataset>/``: a resumed row redraws none and stops at the same count)."""
    cfg, ranks = study.config, study.ranks
    pru = cfg.pruning
    if not pru["sets"]:
        return None
    folder = cfg.output / "pruning"
    started = time.perf_counter()
    in_domain = cfg.attribution["in_domain"]
    sets = {expr: {level: evaluate(expr, schemes, level, in_domain=in_domain, by=pru["by"], name=expr)
                   for level in pru["levels"]} for expr in pru["sets"]}
    rows, computed, work = [], 0, {}
    for vname in study.validation:
        identity = _pruning_identity(cfg, vname)
        keys = {}
        for expr, by_level in sets.items():
            for level, nset in by_level.items():
                keys[(expr, level)] = _settings_hash(
                    *identity[:2], expr, level, sorted((m, i.tolist()) for m, i in nset.by_module().items()),
                    pru["repetitions"], *identity[2:])
        cached = {k: folder / "rows" / f"{h}.json" for k, h in keys.items()}
        if all(p.exists() for p in cached.values()):
            rows += [json.loads(p.read_text()) for p in cached.values()]
            continue
        bench = benchmark(study, vname, progress)
        runs = bench.runs
        bench.prepare([sets[k[0]][k[1]] for k, p in cached.items() if not p.exists()], pru["repetitions"])
        reps = {}
        for (expr, level), path in cached.items():
            if path.exists():
                rows.append(json.loads(path.read_text()))
                continue
            nset = sets[expr][level]
            result = bench.evaluate(nset)
            rand = bench.random_baseline(nset, pru["repetitions"], pru["seed"], result)
            row = table_row(bench, expr, level, result, rand, group=cfg.pruning["validation"][vname]["group"],
                            dataset=vname)
            if ranks.is_main:
                write_atomic(path, json.dumps(row))
            rows.append(row)
            reps[f"{expr} @ {level}%"] = [rand.repetitions, rand.stopped]
            computed += 1
            log.info("pruned %s @ %s%% on %s: drop %.2f%% (random %.2f%%, %d repetitions, %s)", expr, level, vname,
                     row["drop_percent"], row["random_drop_mean"], rand.repetitions, rand.stopped)
        work[vname] = {"rerankings_by_start_layer": {str(k): v for k, v in sorted(bench.forwards.items())},
                       "random_runs_computed": runs.computed, "random_runs_stored": len(runs),
                       "prefix_boundaries": bench.prefix.boundaries, "repetitions": reps}
    table = PruningTable(rows)
    if ranks.is_main:
        table.write(folder)
        if work:
            write_atomic(folder / "work.json", json.dumps(work, indent=1))
    ranks.barrier()
    if computed:
        study.timings["pruning_s"] = time.perf_counter() - started
    return table


def thread_counts() -> Dict[str, Any]:
    """The thread counts this process computes with (torch's, and the variables that set them): float sums,
    and so near-tied rankings, can depend on them."""
    return {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS")}


def _threads_record(ranks: Ranks) -> Dict[str, Any]:
    """:func:`thread_counts` of every rank (a collective call): one value per key where the ranks agree,
    else the list of the ranks' values, and the number of processes."""
    per_rank = ranks.gather(thread_counts())
    record: Dict[str, Any] = {"processes": ranks.world}
    for key in per_rank[0]:
        values = [counts[key] for counts in per_rank]
        record[key] = values[0] if all(v == values[0] for v in values) else values
    return record


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
    study = preflight(cfg, ranks)  # checks only: nothing is written before the lock
    with run_lock(cfg.output) if ranks.is_main else nullcontext():  # one run per folder
        return _run_stages(cfg, study, ranks, progress)


def _run_stages(cfg: RunConfig, study: Study, ranks: Ranks, progress: bool) -> Path:
    """The stages of :func:`run_study` after its preflight, with the run's log file."""
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
        if cfg.heads_on:
            stage_head_analysis(study, study.head_schemes)
            stage_head_ablation(study, study.head_schemes, lambda vname: benchmark(study, vname, progress),
                                lambda vname: _pruning_identity(cfg, vname))
        stage_model_quality(study)
        report = cfg.output / "report.md"
        threads = _threads_record(ranks)
        if ranks.is_main:
            timings_path = cfg.output / "timings.json"
            previous = json.loads(timings_path.read_text()) if timings_path.exists() else {}
            merged = {**previous.get("timings", {}), **study.timings}
            throughput = {**previous.get("throughput", {}), **study.throughput}
            # the thread counts of every invocation that worked on this folder, each once (a resumed run
            # with other counts shows both: its numbers may differ in the last bits from a run with one)
            runs_threads = [t for t in previous.get("threads", []) if isinstance(t, dict)]
            if threads not in runs_threads:
                runs_threads.append(threads)
            write_atomic(timings_path, json.dumps({"timings": merged, "throughput": throughput,
                                                   "threads": runs_threads}, indent=2))
            settings = {**cfg.as_dict(), "processes": ranks.world, "threads": runs_threads}
            # explorer.html, which the report links
            explore_run(cfg.output, model=study.model, tokenizer=study.tokenizer, ranker=study.ranker)
            report = write_report(cfg.output, settings, merged, throughput)["md"]
            log.info("report: %s", report)
        ranks.barrier()
        return report
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
