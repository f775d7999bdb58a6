"""Which data a dataset spec means: :func:`load_collection`, the one entry point.

Owns: the dispatch from a spec (abbreviation, ir_datasets id, local BEIR
folder, ``"trec:..."`` files, BioASQ) to a :class:`Collection`; the options
that apply to each kind and their checks; Cranfield's conversions (query ids
= qrels positions, Cleverdon codes -> gains, the ``source_paper`` policy);
and the "unknown dataset" message with its close matches.

Must not: read files itself (:mod:`.readers` does), talk to the network
(:mod:`.network`), sample pairs, or run a model.
"""
from __future__ import annotations

import contextlib
import difflib
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from ..common import check_number
from .collection import Collection, GradeMap
from .network import OFFLINE_ENV, irds
from .packaged import med_trec_files, place_cranfield
from .readers import TREC_KEYS, load_beir_folder, load_trec_files, parse_trec_spec
from .records import DatasetUnavailable
from .registry import DATASETS
from .splits import DEFAULT_SPLIT_SEED, DEFAULT_TEST_FRACTION, split_queries, split_suffix

BIOASQ_ENV = "FASTNIG_BIOASQ"
_COMMON_OPTIONS = ("offline", "connect_timeout")
_SOURCE_PAPER_POLICIES = ("relevant", "nonrelevant", "drop")


def _check_options(kind: str, options: dict, allowed: Tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed) - set(_COMMON_OPTIONS))
    if unknown:
        raise TypeError(f"load_collection: option(s) {unknown} do not apply to {kind}; "
                        f"its options are {sorted(set(allowed) | set(_COMMON_OPTIONS))}")


def _unknown_spec(spec: str) -> ValueError:
    ids: List[str] = []
    with contextlib.suppress(Exception):
        ids = list(irds().registry)
    close = difflib.get_close_matches(spec, list(DATASETS) + ids, n=3, cutoff=0.6)
    maybe = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(
        f"unknown dataset {spec!r}: not an abbreviation ({', '.join(DATASETS)}), not an ir_datasets id "
        f"(e.g. 'cranfield', 'beir/nfcorpus/test'; see https://ir-datasets.com), and no folder "
        f"{os.path.abspath(os.path.expanduser(spec))} exists for a local BEIR dataset; local TREC files are "
        f"given as 'trec:docs_tsv=...,queries_tsv=...,qrels_trec=...'.{maybe}")


def _cranfield_grades(policy: str) -> GradeMap:
    source_gain = {"relevant": 4, "nonrelevant": 0, "drop": None}[policy]

    def gain(code: int) -> Optional[int]:
        if code == -1:
            return source_gain
        if 1 <= code <= 5:
            return 5 - code  # Cleverdon: 1 = complete answer ... 5 = no interest (-> 0)
        raise ValueError(f"cranfield qrels: unknown relevance code {code} (expected 1-5 or -1)")

    return gain


# ------------------------------------------------------- one loader a kind
def _load_trec(name: str, key: str, options: dict, common: dict) -> Collection:
    _check_options("'trec' datasets", options, TREC_KEYS + ("cache_dir",))
    files = parse_trec_spec(key)
    for k in TREC_KEYS:
        if k in options:
            files[k] = options.pop(k)
    return load_trec_files(name, files, options.pop("cache_dir", None), common)


def _load_bioasq(name: str, options: dict, common: dict) -> Collection:
    _check_options("BioASQ", options, ("split", "cache_dir"))
    folder = Path(os.environ.get(BIOASQ_ENV) or Path(irds().util.home_path()) / "bioasq")
    if not folder.is_dir():
        raise DatasetUnavailable(
            f"Dataset {name!r} (BioASQ) is licensed data that no one can download for you: register at "
            f"http://participants-area.bioasq.org, build its BEIR-format folder (corpus.jsonl, queries.jsonl, "
            f"qrels/test.tsv) with BEIR's BioASQ instructions (https://github.com/beir-cellar/beir), and put "
            f"it at {folder} or point {BIOASQ_ENV} to it (or pass the folder path as the dataset).")
    return load_beir_folder(name, folder, options.pop("split", "test"), options.pop("cache_dir", None),
                            common, what=f"BioASQ folder {str(folder)!r}")


def _load_registered(name: str, key: str, options: dict, common: dict) -> Optional[Collection]:
    """The ir_datasets dataset registered as ``key``, or ``None`` when no such id exists."""
    try:
        dataset = irds().load(key)
    except KeyError:
        return None
    is_cranfield = key == "cranfield"
    if is_cranfield:
        place_cranfield()  # the packaged original, unless ir_datasets already has one
    _check_options(f"{key!r}", options, ("source_paper",) if is_cranfield else ())
    extra: Dict[str, Any] = {}
    if is_cranfield:
        policy = options.pop("source_paper", "relevant")
        if policy not in _SOURCE_PAPER_POLICIES:
            raise ValueError(f"source_paper must be one of {list(_SOURCE_PAPER_POLICIES)}, got {policy!r}")
        extra = dict(grade_map=_cranfield_grades(policy), queries_by_position=True, notes=[
            "query ids = position in cran.qry (the numbering of cranqrel)",
            f"grades = 5 - Cleverdon code; source paper (-1) -> {policy}"
            + (" (gain 4)" if policy == "relevant" else ""),
        ])
    return Collection(name, dataset, source=f"ir_datasets {key!r}", ir_datasets_id=key, **extra, **common)


def _load_med(name: str, options: dict, common: dict) -> Collection:
    _check_options("'med'", options, ("cache_dir",))
    cache_dir = options.pop("cache_dir", None)
    files = med_trec_files(Path(cache_dir) if cache_dir is not None else None)
    collection = load_trec_files(name, files, cache_dir, common)
    collection.source = "MEDLINE (MED), packaged with fastnig"
    return collection


def _load_folder(name: str, key: str, as_path: bool, options: dict, common: dict) -> Collection:
    folder = Path(os.path.expanduser(key))
    looks_like_path = as_path or folder.is_absolute() or key.startswith((".", "~")) \
        or folder.exists() or folder.parent != Path(".") and folder.parent.exists()
    if not looks_like_path:
        raise _unknown_spec(key)
    _check_options("local BEIR folders", options, ("split", "cache_dir"))
    if not folder.exists():
        raise DatasetUnavailable(
            f"Local dataset folder {str(folder.resolve())!r} does not exist. A local dataset is a "
            f"BEIR-format folder holding corpus.jsonl, queries.jsonl and qrels/<split>.tsv: create it "
            f"there, or pass an abbreviation ({', '.join(DATASETS)}) or an ir_datasets id instead.")
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is a file; a local dataset is a BEIR folder (corpus.jsonl, "
                         f"queries.jsonl, qrels/) or 'trec:docs_tsv=...,queries_tsv=...,qrels_trec=...'")
    return load_beir_folder(name, folder, options.pop("split", "test"), options.pop("cache_dir", None), common)


def load_collection(spec: Union[str, "os.PathLike[str]"], **options) -> Collection:
    """Open a dataset as a :class:`Collection` (queries and qrels are read now).

    Args:
        spec: one of
            * an abbreviation of :data:`DATASETS` (``"ms"``, ``"nf"``, ``"ms-dev"``, ...);
            * an ir_datasets id (``"cranfield"``, ``"beir/nfcorpus/test"``, ...),
              read from / downloaded to ``IR_DATASETS_HOME`` by ir_datasets;
            * a local BEIR folder (``corpus.jsonl``, ``queries.jsonl``,
              ``qrels/<split>.tsv``) as a path; write a relative folder whose
              name is also an ir_datasets id as ``./name``;
            * ``"trec:docs_tsv=PATH,queries_tsv=PATH,qrels_trec=PATH"`` (or
              ``docs_jsonl=`` instead of ``docs_tsv=``, optional
              ``scoreddocs_trec=`` for a first-stage run), or ``"trec"`` with
              the same keys as keyword options (needed when a path contains
              ``,``).  These are read with ir_datasets' readers exactly as
              ``ir_datasets.create_dataset(docs_tsv=..., queries_tsv=...,
              qrels_trec=...)`` does, except that the docstore is written to
              ``cache_dir``, not next to the docs file;
            * ``"b"`` / ``"bioasq"``: BioASQ (licensed) as a local BEIR folder,
              found at ``$FASTNIG_BIOASQ`` or ``$IR_DATASETS_HOME/bioasq``;
            * ``"med"``: MEDLINE (1,033 abstracts, 30 queries, relevant-only
              judgments), packaged with fastnig (:mod:`.packaged`).
              ``cranfield`` is packaged too: its original ``cran.tar.gz`` is
              placed where ir_datasets looks when none is there.
            * any of these followed by ``@train`` or ``@heldout``
              (``"cranfield@heldout"``): only the queries of that part of
              :func:`fastnig.data.splits.split_queries` (test fraction 0.3,
              seed 0: the split the offline demo model is trained on); the
              corpus stays whole.
        options: keyword options
            * ``offline`` (all; default ``False`` unless ``FASTNIG_OFFLINE=1``):
              never download; missing files raise :class:`DatasetUnavailable` at once;
            * ``connect_timeout`` (all; seconds, default 5): a host that does not
              accept a connection within it is taken as unreachable;
            * ``source_paper`` (``cranfield`` only): what Cranfield's ``-1`` rows
              become, ``"relevant"`` (default, gain 4), ``"nonrelevant"`` (0) or
              ``"drop"`` (see below);
            * ``split`` (BEIR folders; default ``"test"``): which ``qrels/<split>.tsv``;
            * ``cache_dir`` (local data; default ``$IR_DATASETS_HOME/fastnig-local``):
              where the docstore index of a local corpus is kept;
            * ``docs_tsv``, ``docs_jsonl``, ``queries_tsv``, ``qrels_trec``,
              ``scoreddocs_trec`` (``"trec"`` only): the files.

    Cranfield (id ``cranfield``): qrels number queries 1..225 by their position
    in ``cran.qry``, whose own ids (001..365) have gaps, so query ids here are
    positions (qrels query 3 = ``.I 004``, "what problems of heat conduction in
    composite slabs ...").  Its codes are "lower is better" (Cleverdon: 1 =
    complete answer ... 4 = minimum interest) and become gains ``5 - code``
    (4..1; no code 5 = "no interest" exists, so there are no non-relevant
    judgments).  ``-1`` (once per query) marks the paper the question was
    written from: it answers the question by construction, so by default it
    counts as relevant with the top gain 4.  Counting it non-relevant would
    punish a ranker for finding it (BM25 ranks it first for 94/225 queries),
    and dropping it leaves it unjudged, which metrics score like non-relevant;
    both remain available through ``source_paper``.  Known limit of
    ir_datasets' parser: doc 240 has stray ``.A``/``.B`` lines inside its
    abstract, so its passage stops there (doc 240 is not judged).

    Raises:
        TypeError: ``spec`` is not a string / path, or an option does not apply.
        ValueError: unknown spec (the message lists what is accepted), bad option value.
        DatasetUnavailable: the data is not here and cannot be downloaded
            (licensed, no network, missing local files); the message says what to put where.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
        as_path = True
    elif isinstance(spec, str):
        as_path = False
    else:
        raise TypeError(f"spec must be a dataset name, ir_datasets id or folder path (str), got {type(spec).__name__}")
    name = spec
    key = spec.strip()
    if not key:
        raise ValueError(f"spec is empty; give one of {', '.join(DATASETS)}, an ir_datasets id or a folder path")

    offline = options.pop("offline", None)
    if offline is None:
        offline = os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")
    if not isinstance(offline, bool):
        raise TypeError(f"offline must be True or False, got {offline!r}")
    connect_timeout = check_number("connect_timeout", options.pop("connect_timeout", 5.0), positive=True,
                                   hint=" (seconds)")
    common = dict(offline=offline, connect_timeout=connect_timeout)

    part = None
    if not as_path:
        key, part = split_suffix(key)
        if part is not None:  # "SPEC@train" / "SPEC@heldout": one part of the seeded query split
            collection = load_collection(key, offline=offline, connect_timeout=connect_timeout, **options)
            train, heldout = split_queries(collection, DEFAULT_TEST_FRACTION, DEFAULT_SPLIT_SEED)
            collection.name = name
            return collection.restrict(train if part == "train" else heldout, (
                f"queries: the {part} part of the seeded split (test_fraction {DEFAULT_TEST_FRACTION}, "
                f"seed {DEFAULT_SPLIT_SEED}): {len(train if part == 'train' else heldout)} of "
                f"{len(train) + len(heldout)} judged queries"))
        key = DATASETS.get(key, key)
    if not as_path and (key == "trec" or key.startswith("trec:")):  # local TREC-style files
        collection = _load_trec(name, key, options, common)
    elif not as_path and key == "bioasq":  # licensed: a local BEIR folder
        collection = _load_bioasq(name, options, common)
    elif not as_path and key == "med":  # packaged with fastnig
        collection = _load_med(name, options, common)
    else:
        collection = None if as_path else _load_registered(name, key, options, common)
        if collection is None:
            collection = _load_folder(name, key, as_path, options, common)
    if options:  # pragma: no cover - every branch pops what it allows
        raise TypeError(f"load_collection: unexpected option(s) {sorted(options)}")
    # Read the (small) queries and qrels now: an unavailable dataset fails here, not mid-run.
    collection._check_licensed_docs()
    collection.queries()
    collection.qrels()
    return collection
