"""Jobs that chain the stages.

* :func:`attribute_dataset` (``fastnig attribute``): dataset -> pairs ->
  agreement filter -> NIG -> scheme file, resumable;
* :func:`run_study` (``fastnig run CONFIG``): the whole study of the paper
  from one configuration (:func:`load_config`), stage by stage
  (:func:`stage_attribution`, :func:`stage_analysis`, :func:`stage_pruning`,
  then :func:`fastnig.report.write_report`), resumable and sharded over
  torchrun ranks (:class:`Ranks`).

:func:`attribute_dataset` is what ``fastnig attribute`` runs.  It saves the
scheme (atomically, see :mod:`fastnig.schemes`) after every chunk of pairs;
started again on the same output it loads what is there, checks that it was
made with the same model, dataset, label and settings, and attributes only
the pairs it does not hold yet.  Because a scheme's sums are exact whatever
the order and grouping of pairs, a resumed run ends with exactly the scheme an
uninterrupted one writes.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

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
                      device=None, progress: bool = True, dataset_name: Optional[str] = None,
                      shard: Tuple[int, int] = (0, 1)) -> Scheme:
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
        dataset_name: the scheme's dataset name (default: the collection's name).
        shard: ``(rank, world)``: attribute only the pairs ``rank::world`` of
            the sample (one torchrun process each; merge the shards with
            :meth:`Scheme.merge`, which is exact).

    Returns:
        The saved :class:`fastnig.Scheme`.
    """
    from tqdm.auto import tqdm

    if isinstance(chunk_pairs, bool) or not isinstance(chunk_pairs, int) or chunk_pairs < 1:
        raise ValueError(f"chunk_pairs must be an integer >= 1, got {chunk_pairs!r}")
    collection = load_collection(dataset) if isinstance(dataset, (str, Path)) else dataset
    pairs = sample_pairs(collection, label=label, num_pairs=num_pairs, seed=seed,
                         relevance_threshold=relevance_threshold, negatives=negatives)
    rank, world = shard
    dataset_name = dataset_name or collection.name
    target = TARGETS[0] if pairs and pairs[0].label == 1 else TARGETS[1]
    pairs = pairs[rank::world]
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


# =============================================================== the study
# `fastnig run CONFIG`: every stage of the paper, each skipped when its output
# exists with the same settings, sharded over torchrun ranks when launched so.

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
REQUIRED = object()
SECTIONS: Dict[str, Dict[str, Any]] = {
    "run": {"name": None, "model": REQUIRED, "output": REQUIRED, "device": None, "cache_dir": None,
            "ir_datasets_files": {}, "attribution": REQUIRED, "analysis": {}, "pruning": {}},
    "attribution": {"datasets": REQUIRED, "in_domain": [], "labels": ["relevant", "non-relevant"], "pairs": 100,
                    "seed": 0, "negatives": "judged", "relevance_threshold": 1, "agreement_filter": True,
                    "steps": 100, "rule": "trapezoid", "nodes": "uniform", "baseline": "pad",
                    "output": "probability", "max_length": 512, "step_batch": None, "pair_batch": 1,
                    "chunk_pairs": 8},
    "analysis": {"levels": [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10], "exclude": [], "layer_percent": 1.0,
                 "baseline_pairs": 0, "by": "value"},
    "pruning": {"levels": [0.01, 0.1, 1], "sets": [], "validation": {}, "queries": 100, "depth": 20,
                "repetitions": 50, "seed": 0, "batch_size": 32, "max_length": None, "by": "value"},
}
log = logging.getLogger("fastnig.run")


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the problem."""


def _section(raw: Any, name: str) -> Dict[str, Any]:
    allowed = SECTIONS[name]
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config section {name!r} must be a mapping of keys to values, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in config section {name!r}; allowed: {sorted(allowed)}")
    out = {}
    for key, default in allowed.items():
        if key in raw:
            out[key] = raw[key]
        elif default is REQUIRED:
            raise ConfigError(f"config section {name!r} needs the key {key!r}")
        else:
            out[key] = copy.deepcopy(default)
    return out


def _read_config_file(source: Union[str, Path]) -> Tuple[Dict[str, Any], Path]:
    path = Path(source)
    if not path.exists() and not path.suffix:
        packaged = CONFIG_DIR / f"{source}.yaml"
        if packaged.exists():
            path = packaged
        else:
            names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise ConfigError(f"config {str(source)!r} is neither a file nor a packaged config ({names})")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib
            raw = tomllib.loads(text)
        else:
            import yaml
            raw = yaml.safe_load(text)
    except Exception as exc:  # a syntax error: one line, with the parser's position
        raise ConfigError(f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping (model, output, attribution, ...)")
    return dict(raw), path


def shared_data_dir() -> Optional[Path]:
    """Where offline test collections live: $FASTNIG_DATA, else a ``shared/data`` near here."""
    if os.environ.get("FASTNIG_DATA"):
        return Path(os.environ["FASTNIG_DATA"])
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        for candidate in (base / "shared" / "data", base.parent / "shared" / "data"):
            if candidate.is_dir():
                return candidate
    return None


def _substitute(value: str) -> str:
    """``${data}`` -> :func:`shared_data_dir`; ``${ENV}`` -> the environment variable."""
    def repl(m):
        key = m.group(1)
        if key == "data":
            found = shared_data_dir()
            if found is None:
                raise ConfigError("the config uses ${data} but no data folder was found: set FASTNIG_DATA to the "
                                  "folder holding the collections (e.g. shared/data)")
            return str(found)
        if key not in os.environ:
            raise ConfigError(f"the config uses ${{{key}}} but the environment variable {key} is not set")
        return os.environ[key]
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", repl, value)


@dataclass
class RunConfig:
    """A validated ``fastnig run`` configuration (see ``fastnig/configs/*.yaml``)."""

    name: str
    model: str
    output: Path
    device: Optional[str]
    cache_dir: Path
    attribution: Dict[str, Any]
    analysis: Dict[str, Any]
    pruning: Dict[str, Any]
    ir_datasets_files: Dict[str, str] = field(default_factory=dict)
    source: Optional[Path] = None

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "model": self.model, "output": str(self.output), "device": self.device,
                "ir_datasets_files": self.ir_datasets_files, "attribution": self.attribution,
                "analysis": self.analysis, "pruning": self.pruning}


def load_config(source: Union[str, Path, Mapping[str, Any]], *, model: Optional[str] = None,
                datasets: Optional[Mapping[str, str]] = None, output: Optional[Union[str, Path]] = None) -> RunConfig:
    """Read and check a run configuration (YAML/TOML file, packaged name, or dict).

    Checks keys, types and set expressions; datasets and the model are
    checked by :func:`preflight`.  ``model``, ``datasets`` (name -> spec,
    added or replacing, attribution or validation) and ``output`` override the file.
    """
    from .attribution import BASELINES, NODES, OUTPUTS, RULES, TARGETS
    from .set_expressions import check as check_expression

    if isinstance(source, Mapping):
        raw, path = dict(source), None
    else:
        raw, path = _read_config_file(source)
    top = _section(raw, "run")
    att = _section(top["attribution"], "attribution")
    ana = _section(top["analysis"], "analysis")
    pru = _section(top["pruning"], "pruning")
    if model:
        top["model"] = model
    if output:
        top["output"] = str(output)
    if not isinstance(att["datasets"], Mapping) or not att["datasets"]:
        raise ConfigError("attribution.datasets must map names to dataset specs, e.g. {ms: ms, nf: nf}")
    att["datasets"] = {str(k): str(v) for k, v in att["datasets"].items()}
    validation = {}
    for vname, spec in (pru["validation"] or {}).items():
        if isinstance(spec, str):
            spec = {"dataset": spec}
        if not isinstance(spec, Mapping) or "dataset" not in spec or set(spec) - {"dataset", "group"}:
            raise ConfigError(f"pruning.validation.{vname} must be a dataset spec or {{dataset: SPEC, group: NAME}}")
        validation[str(vname)] = {"dataset": str(spec["dataset"]), "group": str(spec.get("group", vname))}
    pru["validation"] = validation
    for name, spec in (datasets or {}).items():
        if name in validation:
            validation[name]["dataset"] = spec
        else:
            att["datasets"][name] = spec
    att["datasets"] = {k: _substitute(v) for k, v in att["datasets"].items()}
    for v in validation.values():
        v["dataset"] = _substitute(v["dataset"])

    def choice(section, key, allowed):
        value = section[key]
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")

    choice(att, "rule", RULES)
    choice(att, "nodes", NODES)
    choice(att, "baseline", BASELINES)
    choice(att, "output", OUTPUTS)
    choice(att, "negatives", ("judged", "unjudged"))
    for label in att["labels"]:
        if label not in TARGETS:
            raise ConfigError(f"attribution.labels: {label!r} is not one of {list(TARGETS)}")
    for key in ("pairs", "chunk_pairs", "pair_batch", "max_length"):
        if isinstance(att[key], bool) or not isinstance(att[key], int) or att[key] < 1:
            raise ConfigError(f"attribution.{key} must be a positive integer, got {att[key]!r}")
    if att["steps"] != "auto" and (isinstance(att["steps"], bool) or not isinstance(att["steps"], int)
                                   or att["steps"] < 1):
        raise ConfigError(f"attribution.steps must be a positive integer or 'auto', got {att['steps']!r}")
    unknown_id = [d for d in att["in_domain"] if d not in att["datasets"]]
    if unknown_id:
        raise ConfigError(f"attribution.in_domain names {unknown_id}, which are not attribution datasets "
                          f"{list(att['datasets'])}")
    unknown_ex = [d for d in ana["exclude"] if d not in att["datasets"]]
    if unknown_ex:
        raise ConfigError(f"analysis.exclude names {unknown_ex}, which are not attribution datasets")
    for key, section in (("analysis.levels", ana["levels"]), ("pruning.levels", pru["levels"])):
        if not section or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 100
                              for x in section):
            raise ConfigError(f"{key} must be a non-empty list of percentages in (0, 100], got {section!r}")
    for key in ("queries", "repetitions", "batch_size"):
        if isinstance(pru[key], bool) or not isinstance(pru[key], int) or pru[key] < 1:
            raise ConfigError(f"pruning.{key} must be a positive integer, got {pru[key]!r}")
    if pru["sets"] and not pru["validation"]:
        raise ConfigError("pruning.sets is given but pruning.validation names no dataset to rerank")
    labels = {d: list(att["labels"]) for d in att["datasets"]}
    pru["sets"] = [str(s) for s in pru["sets"]]
    for expression in pru["sets"]:
        try:
            check_expression(expression, list(att["datasets"]), labels)
        except ValueError as exc:
            raise ConfigError(f"pruning.sets: {exc}") from None
    cache = Path(top["cache_dir"] or os.environ.get("FASTNIG_CACHE") or Path.home() / ".cache" / "fastnig")
    files = top["ir_datasets_files"] or {}
    if not isinstance(files, Mapping):
        raise ConfigError("ir_datasets_files must map paths under IR_DATASETS_HOME to local files")
    files = {str(k): _substitute(str(v)) for k, v in files.items()}
    for target, source_file in files.items():
        if not Path(source_file).is_file():
            raise ConfigError(f"ir_datasets_files: {source_file} (for {target}) does not exist")
    return RunConfig(name=str(top["name"] or (path.stem if path else "run")), model=str(top["model"]),
                     output=Path(top["output"]), device=top["device"], cache_dir=cache, attribution=att,
                     analysis=ana, pruning=pru, ir_datasets_files=files, source=path)


def place_ir_datasets_files(files: Mapping[str, str]) -> None:
    """Copy local archives where ir_datasets looks for them (``$IR_DATASETS_HOME``, default ~/.ir_datasets).

    This is how a collection whose download is unreachable (no network) is
    still read through its real ir_datasets id, e.g. ``cranfield/cran.tar.gz``.
    """
    import shutil

    home = Path(os.environ.get("IR_DATASETS_HOME") or Path.home() / ".ir_datasets")
    for target, source_file in files.items():
        dest = home / target
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
            shutil.copyfile(source_file, tmp)
            os.replace(tmp, dest)


def _settings_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------- distribution
@dataclass
class Ranks:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def gather(self, obj) -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_(self, tensor):
        """In-place sum over ranks (exact when every element has one non-zero contributor)."""
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(tensor)
        return tensor


def init_ranks() -> Ranks:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return Ranks(dist.get_rank(), dist.get_world_size(), local)


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
    from .models import OFFLINE_DEMO, load_cross_encoder, offline_demo_model

    if cfg.model in ("demo", OFFLINE_DEMO):  # MiniLM-L6 fine-tuned on Cranfield, cached
        return offline_demo_model(cfg.cache_dir / "models", device=device)
    return load_cross_encoder(cfg.model, device=device)


def preflight(cfg: RunConfig, ranks: Optional[Ranks] = None) -> Study:
    """Open every dataset and the model before any work: a bad one stops here with one message."""
    import torch

    from .data import load_collection
    from .models import ModelUnavailable

    ranks = ranks or Ranks()
    place_ir_datasets_files(cfg.ir_datasets_files)
    collections, validation = {}, {}
    for name, spec in cfg.attribution["datasets"].items():
        collections[name] = _open_dataset(load_collection, spec, f"attribution dataset {name!r}")
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
        for label in att["labels"]:
            if label == "non-relevant" and att["negatives"] == "judged" and not collection.has_nonrelevant:
                log.info("%s has no non-relevant judgments: no N_%s (SPEC §6)", name, name)
                continue
            path = _scheme_path(cfg.output, name, label)
            kwargs = dict(label=label, num_pairs=att["pairs"], seed=att["seed"], negatives=att["negatives"],
                          relevance_threshold=att["relevance_threshold"], agreement_filter=att["agreement_filter"],
                          chunk_pairs=att["chunk_pairs"], steps=att["steps"], rule=att["rule"], nodes=att["nodes"],
                          baseline=att["baseline"], output=att["output"], max_length=att["max_length"],
                          step_batch=att["step_batch"], pair_batch=att["pair_batch"], dataset_name=name,
                          progress=progress and ranks.is_main)
            before = Scheme.load(path).count if Scheme.exists(path) else 0
            if ranks.world == 1:
                scheme = attribute_dataset(study.model, study.tokenizer, collection, out=path, **kwargs)
            else:
                shard_path = path.with_name(f"{path.name}.rank{ranks.rank}-of-{ranks.world}")
                complete = Scheme.exists(path) and _is_complete(Scheme.load(path), collection, kwargs)
                if not complete:
                    part = attribute_dataset(study.model, study.tokenizer, collection, out=shard_path,
                                             shard=(ranks.rank, ranks.world), **kwargs)
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


def _is_complete(scheme: Scheme, collection, kwargs) -> bool:
    pairs = sample_pairs(collection, label=kwargs["label"], num_pairs=kwargs["num_pairs"], seed=kwargs["seed"],
                         relevance_threshold=kwargs["relevance_threshold"], negatives=kwargs["negatives"])
    return {pair_id(p) for p in pairs} <= scheme.seen_ids


def _stamp_path(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.json"


def _stage_done(out: Path, stage: str, key: str) -> bool:
    path = _stamp_path(out, stage)
    return path.exists() and json.loads(path.read_text()).get("key") == key


def _mark_done(out: Path, stage: str, key: str) -> None:
    _write_atomic(_stamp_path(out, stage), json.dumps({"key": key}))


def stage_analysis(study: Study, schemes: Mapping[Tuple[str, str], Scheme]) -> Path:
    """Figures 2, 3, 5 and Table 1 into ``<output>/analysis`` (rank 0)."""
    from .analysis import analyze, baseline_differences, baseline_table

    cfg = study.config
    folder = cfg.output / "analysis"
    key = _settings_hash(cfg.analysis, cfg.attribution, {f"{d}/{l}": s.count for (d, l), s in schemes.items()})
    if study.ranks.is_main and not _stage_done(cfg.output, "analysis", key):
        started = time.perf_counter()
        in_domain = cfg.attribution["in_domain"][0] if cfg.attribution["in_domain"] else ""
        analyze(list(schemes.values()), folder, levels=cfg.analysis["levels"], in_domain=in_domain,
                exclude=cfg.analysis["exclude"], by=cfg.analysis["by"], layer_percent=cfg.analysis["layer_percent"])
        if cfg.analysis["baseline_pairs"]:
            name = in_domain or next(iter(study.collections))
            half = max(cfg.analysis["baseline_pairs"] // 2, 1)
            pairs = sample_pairs(study.collections[name], label=1, num_pairs=half, seed=cfg.attribution["seed"])
            try:
                pairs += sample_pairs(study.collections[name], label=0, num_pairs=half, seed=cfg.attribution["seed"],
                                      negatives=cfg.attribution["negatives"])
            except ValueError:
                log.info("Table 1: %s has no non-relevant pairs; relevant pairs only", name)
            diffs = baseline_differences(study.model, study.tokenizer, [p.text_pair for p in pairs],
                                         max_length=cfg.attribution["max_length"])
            baseline_table(diffs, folder)
        study.timings["analysis_s"] = time.perf_counter() - started
        _mark_done(cfg.output, "analysis", key)
    study.ranks.barrier()
    return folder


def _sharded_benchmark(study: Study, candidates, progress: bool = True):
    """A PruningBenchmark whose scoring is split over the ranks (batches rank::world, summed back)."""
    import numpy as np
    import torch

    from .pruning import EncodedCandidates, PruningBenchmark, score_candidates

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
    from .pruning import PruningTable, build_candidates, module_counts, table_row
    from .set_expressions import evaluate

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
                _write_atomic(path, json.dumps(row))
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
        _write_atomic(cfg.output / "config.json", json.dumps(cfg.as_dict(), indent=2, default=str))
    try:
        log.info("run %s: model %s, %d attribution datasets, %d validation datasets, %d process(es)", cfg.name,
                 cfg.model, len(study.collections), len(study.validation), ranks.world)
        schemes = stage_attribution(study, progress)
        stage_analysis(study, schemes)
        stage_pruning(study, schemes, progress)
        report = cfg.output / "report.md"
        if ranks.is_main:
            from .report import write_report

            timings_path = cfg.output / "timings.json"
            previous = json.loads(timings_path.read_text()) if timings_path.exists() else {}
            merged = {**previous.get("timings", {}), **study.timings}
            throughput = {**previous.get("throughput", {}), **study.throughput}
            _write_atomic(timings_path, json.dumps({"timings": merged, "throughput": throughput}, indent=2))
            settings = {**cfg.as_dict(), "processes": ranks.world}
            report = write_report(cfg.output, settings, merged, throughput)["md"]
            log.info("report: %s", report)
        ranks.barrier()
        return report
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
