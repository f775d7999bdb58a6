"""The study's head stages (``attribution.heads: true``): head analysis and head ablation.

Owns: where a run keeps its head schemes (:func:`head_scheme_path`: ``<output>/heads/schemes/P_x``, filled by
the attribution stage beside the neuron schemes), :func:`stage_head_analysis` (per head scheme the layer × head
heat map, ``analysis/heads/heads_<P|N>_<x>.csv`` / ``.png``, and the top-X % head sets with their
intersections, ``analysis/heads/head_sets.csv``) and :func:`stage_head_ablation` (for every ``heads.sets``
expression x ``heads.levels`` level x pruning validation dataset: the top heads ablated vs
``heads.repetitions`` random sets of as many heads, ``heads/head_ablation.csv``; rows cached one by one in
``heads/rows/`` for resume).  Both are skipped when done with the same settings and run on every rank
(scoring is sharded by the benchmark; files are written by rank 0).

Must not: attribute (:mod:`fastnig.study.attribution_job`), build rerankings (the pipeline hands over its
shared :class:`fastnig.evaluation.pruning.PruningBenchmark`), or compute what a lower layer owns.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Tuple

from ..analysis.head_heatmap import head_set_rows, write_head_heatmap
from ..analysis.writers import write_csv
from ..common import write_atomic
from ..neurons.expressions import evaluate
from ..neurons.head_schemes import head_label
from ..neurons.scheme import Scheme
from .stamps import mark_done, settings_hash, stage_done

log = logging.getLogger("fastnig.run")

HEAD_ABLATION_COLUMNS = ("set", "level_percent", "dataset", "group", "heads", "head_list", "num_queries",
                         "ndcg_original", "ndcg_top_ablated", "drop_top_percent", "p_top", "drop_random_mean_percent",
                         "drop_random_std_percent", "repetitions", "ndcg_random_ablated", "p_top_vs_random",
                         "significant_vs_random")
"""The columns of ``heads/head_ablation.csv`` (the last twelve are
:meth:`fastnig.evaluation.head_ablation.HeadAblation.row`'s)."""


def head_scheme_path(out: Path, name: str, label: str) -> Path:
    """The head scheme of dataset ``name`` and ``label`` in a run folder (outside ``schemes/``, which holds
    neuron schemes only)."""
    return Path(out) / "heads" / "schemes" / f"{'P' if label == 'relevant' else 'N'}_{name}"


def _heatmap_name(dataset: str, label: str) -> str:
    return f"heads_{'P' if label == 'relevant' else 'N'}_{dataset}"


def stage_head_analysis(study, head_schemes: Mapping[Tuple[str, str], Scheme]) -> Path:
    """The heat map of every head scheme and the top-X % head sets at ``heads.levels`` into
    ``<output>/analysis/heads`` (rank 0; skipped when stamped with the same settings and pair counts)."""
    cfg = study.config
    folder = cfg.output / "analysis" / "heads"
    key = settings_hash(cfg.heads["levels"], cfg.heads["by"], cfg.attribution,
                        {f"{d}/{l}": s.count for (d, l), s in head_schemes.items()})
    if study.ranks.is_main and not stage_done(cfg.output, "head_analysis", key):
        started = time.perf_counter()
        usable = {k: s for k, s in head_schemes.items() if s.count}
        for (dataset, label), scheme in usable.items():
            write_head_heatmap(scheme, folder, _heatmap_name(dataset, label))
        write_csv(head_set_rows(usable, cfg.heads["levels"], cfg.heads["by"]), folder / "head_sets.csv")
        study.timings["head_analysis_s"] = time.perf_counter() - started
        mark_done(cfg.output, "head_analysis", key)
    study.ranks.barrier()
    return folder


def _csv_text(rows, columns) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def stage_head_ablation(study, head_schemes: Mapping[Tuple[str, str], Scheme], benchmark: Callable,
                        identity: Callable[[str], list]) -> Optional[Path]:
    """``heads/head_ablation.csv``: every ``heads.sets`` expression (over the head schemes) x level x validation
    dataset, top heads vs random heads (:func:`fastnig.evaluation.head_ablation.evaluate_head_ablation`).

    ``benchmark(vname)``: the run's shared reranking of a validation dataset (the original model's scores are
    computed once for pruning and heads); ``identity(vname)``: what that reranking depends on (part of each
    row's cache key).  Random sets of the same size are reranked once per dataset.  ``None`` without sets."""
    from ..evaluation.head_ablation import evaluate_head_ablation  # scipy, only when the stage runs

    cfg, ranks, hea = study.config, study.ranks, study.config.heads
    if not hea["sets"]:
        return None
    folder = cfg.output / "heads"
    started, computed, rows = time.perf_counter(), 0, []
    sets = {(expr, level): evaluate(expr, head_schemes, level, in_domain=cfg.attribution["in_domain"],
                                    by=hea["by"], name=expr) for expr in hea["sets"] for level in hea["levels"]}
    for vname in study.validation:
        random_runs: dict = {}
        for (expr, level), members in sets.items():
            heads = members.neurons()
            key = settings_hash("head ablation", *identity(vname), expr, level, heads, hea["repetitions"],
                                hea["seed"])
            path = folder / "rows" / f"{key}.json"
            if path.exists():
                rows.append(json.loads(path.read_text()))
                continue
            row = {"set": expr, "level_percent": float(level), "dataset": vname,
                   "group": cfg.pruning["validation"][vname]["group"], "heads": len(heads),
                   "head_list": " ".join(head_label(m, h) for m, h in heads)}
            bench = benchmark(vname)
            row["num_queries"] = len(bench.qids)
            if heads:
                result = evaluate_head_ablation(bench, heads, hea["repetitions"], hea["seed"], random_runs)
                row.update({k: v for k, v in result.row().items() if k not in ("dataset", "heads")})
                log.info("heads %s @ %s%% on %s: %d heads ablated, drop %.2f%% (random %.2f%% ± %.2f%%, p vs random "
                         "%.3g)", expr, level, vname, len(heads), row["drop_top_percent"],
                         row["drop_random_mean_percent"], row["drop_random_std_percent"], row["p_top_vs_random"])
            else:
                log.info("heads %s @ %s%% on %s: no head in the set, nothing ablated", expr, level, vname)
            if ranks.is_main:
                write_atomic(path, json.dumps(row))
            rows.append(row)
            computed += 1
    if ranks.is_main:
        write_atomic(folder / "head_ablation.csv", _csv_text(rows, HEAD_ABLATION_COLUMNS))
    ranks.barrier()
    if computed:
        study.timings["head_ablation_s"] = time.perf_counter() - started
    return folder / "head_ablation.csv"


__all__ = ("HEAD_ABLATION_COLUMNS", "head_scheme_path", "stage_head_ablation", "stage_head_analysis")
