"""The paper's datasets: abbreviations, ir_datasets ids, names and groups (docs/method.md §7).

Owns: :data:`DATASETS` (abbreviation -> source), the attribution corpus A and
the validation sets of the pruning study, which ones are in-domain, which
lack non-relevant judgments, and their names in figures and tables.

Must not: import ir_datasets or any other module, read files or touch the
network; this is a table, nothing more.
"""
from __future__ import annotations

import os
from typing import Dict, Tuple

#: Abbreviation -> source.  Attribution datasets of docs/method.md §7 (the paper's
#: Table 2), then the validation sets of the pruning study (docs/method.md §7-8).
#: ``"bioasq"`` is not an ir_datasets id: BioASQ is licensed and comes as a
#: local BEIR folder (see :func:`fastnig.data.load_collection`).
DATASETS: Dict[str, str] = {
    "ms": "msmarco-passage/trec-dl-2019/judged",
    "f": "beir/fiqa/test",
    "tc": "beir/trec-covid",
    "nf": "beir/nfcorpus/test",
    "nq": "beir/nq",
    "tn": "wapo/v2/trec-news-2018",
    "r": "disks45/nocr/trec-robust-2004",
    "b": "bioasq",
    "ms-dev": "msmarco-passage/dev/small",
    "lotte-lifestyle": "lotte/lifestyle/dev/search",
    "lotte-recreation": "lotte/recreation/dev/search",
    "lotte-science": "lotte/science/dev/search",
    "lotte-technology": "lotte/technology/dev/search",
    "lotte-writing": "lotte/writing/dev/search",
}
#: The attribution corpus A of the paper, in its order.
ATTRIBUTION_DATASETS: Tuple[str, ...] = ("ms", "f", "tc", "nf", "nq", "tn", "r", "b")
#: Validation sets of the pruning evaluation (Table 4).
VALIDATION_DATASETS: Tuple[str, ...] = (
    "ms-dev", "lotte-lifestyle", "lotte-recreation", "lotte-science", "lotte-technology", "lotte-writing")
#: In-domain datasets (the model's training domain); every other one is OOD (the set O).
IN_DOMAIN = frozenset({"ms", "ms-dev"})
#: Names for figures and tables.
PAPER_NAMES: Dict[str, str] = {
    "ms": "TREC DL 2019", "f": "FiQA", "tc": "TREC-COVID", "nf": "NFCorpus", "nq": "Natural Questions",
    "tn": "TREC-News", "r": "Robust04", "b": "BioASQ", "ms-dev": "MS MARCO dev (small)",
    "lotte-lifestyle": "LoTTE Lifestyle", "lotte-recreation": "LoTTE Recreation",
    "lotte-science": "LoTTE Science", "lotte-technology": "LoTTE Technology", "lotte-writing": "LoTTE Writing",
}
#: Datasets the paper lists as lacking non-relevant judgments (no N_x, docs/method.md §6).
#: :attr:`fastnig.data.Collection.has_nonrelevant` checks the actual qrels.
WITHOUT_NONRELEVANT = frozenset({"f", "b"})
#: Grades of datasets that ir_datasets' metadata does not list (see :func:`fastnig.data.known_grades`):
#: BEIR's BioASQ qrels judge relevant passages only (grade 1).
GRADES_WITHOUT_METADATA = {"bioasq": (1,)}
#: Other ids of the attribution datasets, for :func:`short_name` (the one table is :data:`DATASETS`).
ALIASES: Dict[str, str] = {"msmarco-passage/trec-dl-2019": "ms", "beir/bioasq": "b"}


def short_name(dataset: str) -> str:
    """Short dataset name for labels such as ``P_ms``: the abbreviation of :data:`DATASETS`
    (docs/method.md §7; also for :data:`ALIASES`), else the last part of the id or path."""
    if dataset in DATASETS:
        return dataset
    for abbreviation, source in DATASETS.items():
        if source == dataset:
            return abbreviation
    if dataset in ALIASES:
        return ALIASES[dataset]
    stripped = dataset.rstrip("/\\")
    return os.path.basename(stripped) or stripped
