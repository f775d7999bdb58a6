"""Labelled (query, passage) pairs from IR test collections (docs/method.md §6–7).

The first stage of the pipeline: a dataset spec becomes a :class:`Collection`
(queries, graded qrels, passages through a docstore, an optional first-stage
run), :func:`sample_pairs` draws a fixed number of relevant or non-relevant
pairs from it deterministically, and :func:`filter_agreeing` keeps the pairs
whose model prediction agrees with their label, as docs/method.md §6 requires
before a pair enters an attribution scheme.

Everything goes through ``ir_datasets``: its registered ids (downloads,
docstores, caching under ``IR_DATASETS_HOME``) and, for local data, its own
format readers (``TsvDocs``, ``TsvQueries``, ``TrecQrels``, ``JsonlDocs``...).

Dataset specs accepted by :func:`load_collection`:

* an abbreviation of docs/method.md §7 or a validation set, see :data:`DATASETS`
  (``"ms"``, ``"nf"``, ``"ms-dev"``, ``"lotte-science"``...);
* any ``ir_datasets`` id (``"cranfield"``, ``"beir/nfcorpus/test"``...);
* a local BEIR folder: ``corpus.jsonl``, ``queries.jsonl``,
  ``qrels/<split>.tsv`` (a path, ``str`` or ``os.PathLike``);
* local TREC-style files: ``"trec:docs_tsv=D,queries_tsv=Q,qrels_trec=R"``,
  or ``load_collection("trec", docs_tsv=D, queries_tsv=Q, qrels_trec=R)``.

Datasets that cannot be had (licensed data not placed where ``ir_datasets``
looks for it, no network, missing local files) raise
:class:`DatasetUnavailable`, a ``ValueError`` whose one-paragraph message says
what to provide and where.

The modules, each importing only those above it:

* :mod:`.registry` — the paper's datasets (abbreviations, ids, groups, names);
* :mod:`.records` — :class:`LabelledPair`, the two errors, passage text;
* :mod:`.network` — lazy ir_datasets import, offline / unreachable-host
  handling, missing-file hints;
* :mod:`.collection` — the :class:`Collection` facade;
* :mod:`.readers` — local BEIR folders and TREC-style files;
* :mod:`.loading` — :func:`load_collection`, spec -> collection;
* :mod:`.sampling` — :func:`sample_pairs`;
* :mod:`.agreement` — :func:`filter_agreeing`.

This package must not import the later stages (schemes, pruning, pipeline,
models); it re-exports its public names here and holds no code of its own.
"""
from .agreement import filter_agreeing
from .collection import Collection
from .loading import load_collection
from .records import DatasetUnavailable, LabelledPair, MissingJudgments
from .registry import (
                       ATTRIBUTION_DATASETS,
                       DATASETS,
                       GRADES_WITHOUT_METADATA,
                       IN_DOMAIN,
                       PAPER_NAMES,
                       VALIDATION_DATASETS,
                       WITHOUT_NONRELEVANT,
)
from .sampling import NEGATIVES, LabelMapping, count_labels, known_grades, label_mapping, sample_pairs

__all__ = [
    "DATASETS", "ATTRIBUTION_DATASETS", "VALIDATION_DATASETS", "IN_DOMAIN", "PAPER_NAMES",
    "WITHOUT_NONRELEVANT", "DatasetUnavailable", "MissingJudgments", "LabelledPair", "Collection",
    "load_collection", "sample_pairs", "filter_agreeing", "NEGATIVES", "GRADES_WITHOUT_METADATA", "LabelMapping",
    "label_mapping", "count_labels", "known_grades",
]
