"""The ``fastnig run`` configuration: reading, validating and substituting it.

Owns: the sections and defaults of a run configuration (:data:`SECTIONS`),
reading YAML/TOML files or packaged configs (``fastnig/study/configs/*.yaml``),
``${data}`` / ``${ENV}`` substitution, every check a config gets before any
work (:func:`load_config` -> :class:`RunConfig`), the per-dataset label
mapping of attribution datasets (:func:`dataset_entry`), and placing local
archives where ir_datasets looks for them.

Must not: open datasets, load models or run stages (:mod:`fastnig.study.pipeline`).
"""
from __future__ import annotations

import copy
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from ..common import is_int, optional_import
from ..data.sampling import NEGATIVES, known_grades, label_mapping
from ..engine.quadrature import DEFAULT_RULE, DEFAULT_STEPS
from ..engine.rankers import ranker_from_spec
from ..engine.scoring import TARGETS
from ..engine.settings import AttributionSettings
from ..evaluation.pruning import DTYPES as PRUNING_DTYPES
from ..evaluation.random_baseline import RepetitionRule
from ..neurons.expressions import check as check_expression
from ..neurons.scheme import RANK_BY
from ..neurons.stability import StopRule

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
REQUIRED = object()
SECTIONS: Dict[str, Dict[str, Any]] = {
    "run": {"name": None, "model": REQUIRED, "ranker": None, "output": REQUIRED, "device": None, "cache_dir": None,
            "ir_datasets_files": {}, "compare_with": None, "attribution": REQUIRED, "analysis": {}, "pruning": {},
            "heads": {}},
    "attribution": {"datasets": REQUIRED, "in_domain": [], "labels": ["relevant", "non-relevant"], "pairs": 100,
                    "seed": 0, "negatives": "judged", "relevance_threshold": 1, "agreement_filter": True,
                    "steps": DEFAULT_STEPS, "rule": DEFAULT_RULE, "nodes": "uniform", "baseline": "pad",
                    "output": "probability", "max_length": 512, "step_batch": None, "pair_batch": 1,
                    "chunk_pairs": 8, "segments": False},
    # the attribution section also takes any other field of AttributionSettings (e.g. dtype, tolerance)
    "analysis": {"levels": [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10], "exclude": [], "layer_percent": 1.0,
                 "baseline_pairs": 0, "by": "value"},
    "pruning": {"levels": [0.01, 0.1, 1], "sets": [], "validation": {}, "queries": 100, "depth": 20,
                "repetitions": 50, "seed": 0, "batch_size": 32, "max_length": None, "by": "value",
                "dtype": "float32", "prefix_reuse": True},
    # attention heads as units (docs/method.md §12; needs attribution.heads: true): the top-X % head sets at
    # `levels` (analysis) and, for `sets` (expressions over the head schemes), head ablation on pruning's
    # validation datasets: the top heads vs `repetitions` random sets of as many heads
    "heads": {"levels": [10], "sets": [], "repetitions": 3, "seed": 0, "by": "value"},
}


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the problem."""


DATASET_KEYS = ("dataset", "relevant", "nonrelevant", "negatives")
"""Keys of an attribution dataset given as a mapping (see :func:`dataset_entry`)."""


def dataset_entry(name: str, value: Any, negatives: str = "judged", relevance_threshold: int = 1) -> Dict[str, Any]:
    """One attribution dataset of a config, as ``{dataset, relevant, nonrelevant, negatives}``.

    ``value`` is a dataset spec (string) or a mapping ``{dataset: SPEC,
    relevant: [grades], nonrelevant: [grades], negatives: judged|bm25|unjudged}``
    (only ``dataset`` is required).  ``relevant`` / ``nonrelevant`` are
    ``None`` when left out: relevant = grades >= ``relevance_threshold``,
    non-relevant = the judged grades below the lowest relevant one, >= 0
    (:class:`fastnig.data.LabelMapping`); ``negatives`` defaults to the
    section's.

    Raises:
        ConfigError: a bad key or value, with the dataset's name.
    """
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(DATASET_KEYS))
        if unknown:
            raise ConfigError(f"attribution.datasets.{name}: unknown key(s) {unknown}; allowed: {list(DATASET_KEYS)}")
        if not value.get("dataset"):
            raise ConfigError(f"attribution.datasets.{name} needs the key 'dataset' (a dataset spec, e.g. ms)")
        entry = {"dataset": str(value["dataset"]), "relevant": value.get("relevant"),
                 "nonrelevant": value.get("nonrelevant"), "negatives": value.get("negatives") or negatives}
    elif isinstance(value, (str, int)) and str(value).strip():
        entry = {"dataset": str(value), "relevant": None, "nonrelevant": None, "negatives": negatives}
    else:
        raise ConfigError(f"attribution.datasets.{name} must be a dataset spec or a mapping "
                          f"{{dataset: SPEC, relevant: [grades], nonrelevant: [grades], negatives: ...}}, "
                          f"got {value!r}")
    if entry["negatives"] not in NEGATIVES:
        raise ConfigError(f"attribution.datasets.{name}.negatives: {entry['negatives']!r} is not one of "
                          f"{list(NEGATIVES)}")
    try:
        mapping = label_mapping(entry["relevant"], entry["nonrelevant"], relevance_threshold)
    except ValueError as exc:
        raise ConfigError(f"attribution.datasets.{name}: {exc}") from None
    entry.update(mapping.as_dict())
    return entry


def has_nonrelevant(entry: Mapping[str, Any], relevance_threshold: int = 1) -> Optional[bool]:
    """Whether an attribution dataset (a :func:`dataset_entry`) yields non-relevant pairs, without opening it.

    True with BM25 or unjudged negatives; with judged ones, whether some
    grade the dataset's qrels hold (ir_datasets' metadata, see
    :func:`fastnig.data.known_grades`) is non-relevant under its mapping;
    ``None`` when its grades are not known (local data): the qrels decide at run time.
    """
    if entry["negatives"] != "judged":
        return True
    grades = known_grades(entry["dataset"])
    if grades is None:
        return None
    mapping = label_mapping(entry["relevant"], entry["nonrelevant"], relevance_threshold)
    return any(mapping.is_nonrelevant(g) for g in grades)


def attributed_labels(attribution: Mapping[str, Any]) -> Dict[str, list]:
    """Dataset name -> the labels a run will attribute for it (no N_x where the data has no non-relevant pair)."""
    return {name: [label for label in attribution["labels"] if label == "relevant"
                   or has_nonrelevant(entry, attribution["relevance_threshold"]) is not False]
            for name, entry in attribution["datasets"].items()}


def settings_of(attribution: Mapping[str, Any]) -> AttributionSettings:
    """The :class:`AttributionSettings` of an ``attribution`` section; a ``ConfigError`` names a bad key."""
    try:
        return AttributionSettings.from_mapping({k: v for k, v in attribution.items()
                                                 if k in AttributionSettings.names()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"attribution.{exc}") from None


def _section(raw: Any, name: str) -> Dict[str, Any]:
    allowed = SECTIONS[name]
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config section {name!r} must be a mapping of keys to values, got {type(raw).__name__}")
    optional = AttributionSettings.names() if name == "attribution" else ()
    unknown = sorted(set(raw) - set(allowed) - set(optional))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in config section {name!r}; allowed: "
                          f"{sorted(set(allowed) | set(optional))}")
    out = {key: raw[key] for key in optional if key in raw and key not in allowed}
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
    parser = (optional_import("tomllib", "to read TOML configs (Python >= 3.11)") if path.suffix == ".toml"
              else optional_import("yaml", "to read YAML configs"))
    try:
        raw = parser.loads(text) if path.suffix == ".toml" else parser.safe_load(text)
    except Exception as exc:  # a syntax error: one line, with the parser's position
        raise ConfigError(f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: "
                          f"{str(exc).splitlines()[0]}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping (model, output, attribution, ...)")
    return dict(raw), path


def shared_data_dir() -> Optional[Path]:
    """The folder ``${data}`` stands for in configs: $FASTNIG_DATA, else a ``shared/data`` folder beside
    the checkout or the current folder."""
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
                                  "folder holding your collections")
            return str(found)
        if key not in os.environ:
            raise ConfigError(f"the config uses ${{{key}}} but the environment variable {key} is not set")
        return os.environ[key]
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", repl, value)


@dataclass
class RunConfig:
    """A validated ``fastnig run`` configuration (see ``fastnig/study/configs/*.yaml``)."""

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
    compare_with: Optional[Path] = None
    ranker: Optional[Any] = None  # None (auto-detect), a family name or a mapping (see ranker_object)
    heads: Dict[str, Any] = field(default_factory=lambda: copy.deepcopy(SECTIONS["heads"]))

    @property
    def heads_on(self) -> bool:
        """Whether the attribution stage also fills head schemes (``attribution.heads: true``)."""
        return bool(self.attribution.get("heads"))

    @property
    def ranker_object(self):
        """The :class:`fastnig.rankers.Ranker` of the ``ranker`` entry, or ``None`` (auto-detected from the model)."""
        return ranker_from_spec(self.ranker)

    @property
    def attribution_settings(self) -> AttributionSettings:
        """The :class:`AttributionSettings` of the ``attribution`` section."""
        return settings_of(self.attribution)

    def dataset_spec(self, name: str) -> str:
        """The dataset spec of attribution dataset ``name``."""
        return self.attribution["datasets"][name]["dataset"]

    def as_dict(self) -> Dict[str, Any]:
        """The configuration in the form :func:`load_config` reads (``load_config(cfg.as_dict())`` gives it back);
        ``attribution.pairs`` in its config form, ``{max, stop_when}`` when it stops early."""
        attribution = {k: v for k, v in self.attribution.items() if k != "stop_when"}
        if self.attribution.get("stop_when") is not None:
            attribution["pairs"] = {"max": self.attribution["pairs"], "stop_when": self.attribution["stop_when"]}
        out = {"name": self.name, "model": self.model, "output": str(self.output), "device": self.device,
               "ir_datasets_files": self.ir_datasets_files, "attribution": attribution,
               "analysis": self.analysis, "pruning": self.pruning}
        if self.heads_on:
            out["heads"] = self.heads
        if self.compare_with is not None:
            out["compare_with"] = str(self.compare_with)
        if self.ranker is not None:
            out["ranker"] = self.ranker
        return out


def load_config(source: Union[str, Path, Mapping[str, Any]], *, model: Optional[str] = None,
                datasets: Optional[Mapping[str, str]] = None, output: Optional[Union[str, Path]] = None) -> RunConfig:
    """Read and check a run configuration (YAML/TOML file, packaged name, or dict).

    Checks keys, types and set expressions; datasets and the model are
    checked by :func:`preflight`.  ``model``, ``datasets`` (name -> spec,
    added or replacing, attribution or validation) and ``output`` override the file.
    """
    if isinstance(source, Mapping):
        raw, path = dict(source), None
    else:
        raw, path = _read_config_file(source)
    top = _section(raw, "run")
    att = _section(top["attribution"], "attribution")
    ana = _section(top["analysis"], "analysis")
    pru = _section(top["pruning"], "pruning")
    hea = _section(top["heads"] or {}, "heads")
    if model:
        top["model"] = model
    if output:
        top["output"] = str(output)
    if not isinstance(att["datasets"], Mapping) or not att["datasets"]:
        raise ConfigError("attribution.datasets must map names to dataset specs, e.g. {ms: ms, nf: nf}")
    if not is_int(att["relevance_threshold"]) or att["relevance_threshold"] < 1:
        raise ConfigError(f"attribution.relevance_threshold must be an integer >= 1, "
                          f"got {att['relevance_threshold']!r}")
    if att["negatives"] not in NEGATIVES:
        raise ConfigError(f"negatives: {att['negatives']!r} is not one of {list(NEGATIVES)}")
    att["datasets"] = {str(k): dataset_entry(str(k), v, att["negatives"], att["relevance_threshold"])
                       for k, v in att["datasets"].items()}
    validation = {}
    for vname, spec in (pru["validation"] or {}).items():
        if isinstance(spec, str):
            spec = {"dataset": spec}
        if not isinstance(spec, Mapping) or "dataset" not in spec or set(spec) - {"dataset", "group"}:
            raise ConfigError(f"pruning.validation.{vname} must be a dataset spec or {{dataset: SPEC, group: NAME}}")
        validation[str(vname)] = {"dataset": str(spec["dataset"]), "group": str(spec.get("group", vname))}
    pru["validation"] = validation
    for name, spec in (datasets or {}).items():  # an override replaces the whole entry (its labels too)
        if name in validation:
            validation[name]["dataset"] = spec
        else:
            att["datasets"][name] = dataset_entry(name, spec, att["negatives"], att["relevance_threshold"])
    for entry in att["datasets"].values():
        entry["dataset"] = _substitute(entry["dataset"])
    for v in validation.values():
        v["dataset"] = _substitute(v["dataset"])

    def choice(section, key, allowed):
        value = section[key]
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")

    for label in att["labels"]:
        if label not in TARGETS:
            raise ConfigError(f"attribution.labels: {label!r} is not one of {list(TARGETS)}")
    att["pairs"], att["stop_when"] = _pairs_option(att["pairs"])
    for key in ("pairs", "chunk_pairs"):
        if not is_int(att[key]) or att[key] < 1:
            raise ConfigError(f"attribution.{key} must be a positive integer, got {att[key]!r}")
    if att["max_length"] is None:
        raise ConfigError("attribution.max_length must be a positive integer (tokens), got None")
    settings_of(att)  # every AttributionSettings key of the section, validated once
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
    for key in ("queries", "batch_size"):
        if not is_int(pru[key]) or pru[key] < 1:
            raise ConfigError(f"pruning.{key} must be a positive integer, got {pru[key]!r}")
    pru["repetitions"] = _repetitions_option(pru["repetitions"])
    if pru["dtype"] not in PRUNING_DTYPES:
        raise ConfigError(f"pruning.dtype: {pru['dtype']!r} is not one of {list(PRUNING_DTYPES)} (auto = bf16 "
                          "where the device computes it natively)")
    if not isinstance(pru["prefix_reuse"], bool):
        raise ConfigError(f"pruning.prefix_reuse must be true or false, got {pru['prefix_reuse']!r}")
    if pru["sets"] and not pru["validation"]:
        raise ConfigError("pruning.sets is given but pruning.validation names no dataset to rerank")
    labels = attributed_labels(att)
    pru["sets"] = [str(s) for s in pru["sets"]]
    for expression in pru["sets"]:
        try:
            check_expression(expression, list(att["datasets"]), labels)
        except ValueError as exc:
            raise ConfigError(f"pruning.sets: {exc}") from None
    _check_heads(hea, att, labels, pru)
    cache = Path(top["cache_dir"] or os.environ.get("FASTNIG_CACHE") or Path.home() / ".cache" / "fastnig")
    files = top["ir_datasets_files"] or {}
    if not isinstance(files, Mapping):
        raise ConfigError("ir_datasets_files must map paths under IR_DATASETS_HOME to local files")
    files = {str(k): _substitute(str(v)) for k, v in files.items()}
    for target, source_file in files.items():
        if not Path(source_file).is_file():
            raise ConfigError(f"ir_datasets_files: {source_file} (for {target}) does not exist")
    compare_with = top["compare_with"]
    try:
        ranker_from_spec(top["ranker"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if compare_with is not None and (not isinstance(compare_with, str) or not compare_with.strip()):
        raise ConfigError(f"compare_with must be the output folder of another run (a path), got {compare_with!r}")
    return RunConfig(name=str(top["name"] or (path.stem if path else "run")), model=str(top["model"]),
                     output=Path(top["output"]), device=top["device"], cache_dir=cache, attribution=att,
                     analysis=ana, pruning=pru, heads=hea, ir_datasets_files=files, source=path,
                     compare_with=Path(_substitute(compare_with)) if compare_with else None,
                     ranker=dict(top["ranker"]) if isinstance(top["ranker"], Mapping) else top["ranker"])


def _check_heads(hea: Dict[str, Any], att: Mapping[str, Any], labels: Mapping[str, list],
                 pru: Mapping[str, Any]) -> None:
    """The ``heads`` section (in place): levels, sets (expressions over the head schemes, as ``pruning.sets``),
    repetitions, seed, by; each error names its key."""
    if not isinstance(att.get("heads", False), bool):
        raise ConfigError(f"attribution.heads must be true or false, got {att.get('heads')!r}")
    levels = hea["levels"]
    if not isinstance(levels, list) or not levels or any(
            isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x <= 100 for x in levels):
        raise ConfigError(f"heads.levels must be a non-empty list of percentages in (0, 100], got {levels!r}")
    if not isinstance(hea["sets"], list):
        raise ConfigError(f"heads.sets must be a list of set expressions (e.g. [P_cran, N_cran]), got {hea['sets']!r}")
    hea["sets"] = [str(s) for s in hea["sets"]]
    if hea["sets"] and not att.get("heads"):
        raise ConfigError("heads.sets is given but attribution.heads is not true: the head schemes it names are "
                          "made by the attribution stage with attribution.heads: true")
    if hea["sets"] and not pru["validation"]:
        raise ConfigError("heads.sets is given but pruning.validation names no dataset to rerank (head ablation "
                          "reranks pruning's validation datasets)")
    for expression in hea["sets"]:
        try:
            check_expression(expression, list(att["datasets"]), labels)
        except ValueError as exc:
            raise ConfigError(f"heads.sets: {exc}") from None
    for key, low in (("repetitions", 1), ("seed", 0)):
        if not is_int(hea[key]) or hea[key] < low:
            raise ConfigError(f"heads.{key} must be an integer >= {low}, got {hea[key]!r}")
    if hea["by"] not in RANK_BY:
        raise ConfigError(f"heads.by: {hea['by']!r} is not one of {list(RANK_BY)}")


def _pairs_option(value: Any) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """``attribution.pairs``: ``N`` or ``{max: N, stop_when: {level: X, overlap: O}}`` -> ``(N, stop_when)``.

    After :func:`load_config`, ``attribution.pairs`` is the most pairs sampled
    per dataset and label and ``attribution.stop_when`` the early-stopping
    rule (:class:`fastnig.neurons.stability.StopRule` as a dict) or ``None``.
    """
    if not isinstance(value, Mapping):
        return value, None
    unknown = sorted(set(value) - {"max", "stop_when"})
    if unknown or "max" not in value:
        raise ConfigError(f"attribution.pairs must be a positive integer or {{max: N, stop_when: {{level: X, "
                          f"overlap: O}}}}; got {dict(value)!r}")
    try:
        rule = StopRule.parse(value.get("stop_when"))
    except ValueError as exc:
        raise ConfigError(f"attribution.pairs.{exc}") from None
    return value["max"], (rule.as_dict() if rule is not None else None)


def _repetitions_option(value: Any) -> Any:
    """``pruning.repetitions``: ``N`` (fixed; kept as the integer) or ``{max: N, stop_when: {...}}``
    (:class:`fastnig.evaluation.random_baseline.RepetitionRule`; kept in its full form, defaults filled in)."""
    try:
        rule = RepetitionRule.parse(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    return rule.max if not rule.adaptive and is_int(value) else rule.as_dict()


def place_ir_datasets_files(files: Mapping[str, str]) -> None:
    """Copy local archives where ir_datasets looks for them (``$IR_DATASETS_HOME``, default ~/.ir_datasets).

    This is how a collection whose download is unreachable (no network) is
    still read through its real ir_datasets id, e.g. ``cranfield/cran.tar.gz``.
    """
    home = Path(os.environ.get("IR_DATASETS_HOME") or Path.home() / ".ir_datasets")
    for target, source_file in files.items():
        dest = home / target
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
            shutil.copyfile(source_file, tmp)
            os.replace(tmp, dest)
