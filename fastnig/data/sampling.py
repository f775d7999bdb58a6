"""Drawing labelled pairs from a collection, deterministically: :func:`sample_pairs`.

Owns: what counts as relevant / non-relevant (:class:`LabelMapping`,
docs/method.md §6.1: judged grades per dataset; default non-relevant = the
judged grades below the lowest relevant one, never a negative grade), where
negatives come from (judged only; judged filled up with the top BM25-ranked
unjudged passages of the query, ``negatives="bm25"``; or random unjudged
documents), the seeded order of the draw (:func:`fastnig.common.sample_key`,
independent of dict order and platform, a larger draw extending a smaller
one), the per-query cap, the warnings when fewer pairs exist, and the grades
ir_datasets' own metadata lists for a dataset (:func:`known_grades`, no download).

Must not: know where the collection's files come from, rank documents itself
(the BM25 ranking of ``negatives="bm25"`` is handed in as ``ranker``, see
:func:`fastnig.study.attribution_job.bm25_ranker`), or run a model (the agreement filter,
:mod:`.agreement`, comes after).
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from ..common import check_int, is_int, sample_key
from .collection import Collection, check_threshold
from .loading import load_collection
from .records import LabelledPair, MissingJudgments
from .registry import DATASETS, GRADES_WITHOUT_METADATA

#: Where label-0 pairs come from: judged non-relevant grades only; judged ones filled up with the
#: top BM25-ranked unjudged passages of the query when too few (the authors' hard negatives); or
#: random unjudged documents.
NEGATIVES = ("judged", "bm25", "unjudged")

#: ``ranker(queries, k)`` -> ``{query_id: [doc_id, ...]}`` best first, at most ``k`` a query.
Ranker = Callable[[Mapping[str, str], int], Mapping[str, Sequence[str]]]


def _grades(value, what: str, minimum: int) -> Tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"{what} must be a list of integer grades, e.g. [2, 3], got {value!r}")
    grades = list(value)
    bad = [g for g in grades if not is_int(g)]
    if bad:
        raise ValueError(f"{what} must be a list of integer grades, got {value!r} ({bad[0]!r} is not an int)")
    low = [g for g in grades if g < minimum]
    if low:
        why = ("negative grades are never non-relevant (e.g. dpr-w100's -1 = random negative samples)"
               if minimum == 0 else "grade 0 means non-relevant")
        raise ValueError(f"{what}: grade {low[0]} is below {minimum}; {why}")
    return tuple(sorted(set(int(g) for g in grades)))


@dataclass(frozen=True)
class LabelMapping:
    """Which judged grades are relevant (label 1) and which non-relevant (label 0) for one dataset.

    ``relevant`` = the listed grades, or every grade >= ``threshold`` when
    ``None``.  ``nonrelevant`` = the listed grades, or, when ``None``, every
    judged grade g with 0 <= g < the lowest relevant grade (negative grades
    are never non-relevant).  Grades in neither set are left out.  Build it
    with :func:`label_mapping`, which checks the values.
    """

    relevant: Optional[Tuple[int, ...]] = None
    nonrelevant: Optional[Tuple[int, ...]] = None
    threshold: int = 1

    @property
    def lowest_relevant(self) -> int:
        return min(self.relevant) if self.relevant else self.threshold

    def is_relevant(self, grade: int) -> bool:
        return grade in self.relevant if self.relevant is not None else grade >= self.threshold

    def is_nonrelevant(self, grade: int) -> bool:
        if self.nonrelevant is not None:
            return grade in self.nonrelevant
        return 0 <= grade < self.lowest_relevant and not self.is_relevant(grade)

    def label(self, grade: int) -> Optional[int]:
        """1, 0, or ``None`` (the grade belongs to neither label)."""
        return 1 if self.is_relevant(grade) else 0 if self.is_nonrelevant(grade) else None

    def resolve(self, grades: Iterable[int]) -> Dict[str, List[int]]:
        """``{"relevant": [...], "nonrelevant": [...], "ignored": [...]}`` among ``grades`` (e.g. a dataset's)."""
        out: Dict[str, List[int]] = {"relevant": [], "nonrelevant": [], "ignored": []}
        for g in sorted(set(grades)):
            out[{1: "relevant", 0: "nonrelevant", None: "ignored"}[self.label(g)]].append(g)
        return out

    def describe(self) -> str:
        rel = "{" + ", ".join(map(str, self.relevant)) + "}" if self.relevant is not None else f">= {self.threshold}"
        non = ("{" + ", ".join(map(str, self.nonrelevant)) + "}" if self.nonrelevant is not None
               else f"0 <= grade < {self.lowest_relevant}")
        return f"relevant {rel}, non-relevant {non}"

    def as_dict(self) -> Dict[str, Optional[List[int]]]:
        """The explicit parts, for records (``None`` = the default rule)."""
        return {"relevant": None if self.relevant is None else list(self.relevant),
                "nonrelevant": None if self.nonrelevant is None else list(self.nonrelevant)}


def label_mapping(relevant: Optional[Iterable[int]] = None, nonrelevant: Optional[Iterable[int]] = None,
                  relevance_threshold: int = 1) -> LabelMapping:
    """A checked :class:`LabelMapping`.

    Args:
        relevant: grades counted relevant (ints >= 1, non-empty), or ``None``
            for every grade >= ``relevance_threshold``.
        nonrelevant: grades counted non-relevant (ints >= 0; may be empty:
            no N_x), or ``None`` for the judged grades below the lowest relevant one.
        relevance_threshold: used when ``relevant`` is ``None``.

    Raises:
        ValueError: a grade that is not an int, a relevant grade < 1, a
            negative non-relevant grade, an empty relevant list, or a grade in both lists.
    """
    check_threshold(relevance_threshold)
    rel = None if relevant is None else _grades(relevant, "relevant grades", 1)
    if rel is not None and not rel:
        raise ValueError("relevant grades: give at least one grade (e.g. [1]) or leave it out for the default")
    non = None if nonrelevant is None else _grades(nonrelevant, "non-relevant grades", 0)
    mapping = LabelMapping(rel, non, relevance_threshold)
    if non is not None:
        both = [g for g in non if mapping.is_relevant(g)]
        if both:
            raise ValueError(f"grade {both[0]} is both relevant and non-relevant ({mapping.describe()})")
    return mapping


def _metadata_file() -> Optional[Path]:
    spec = importlib.util.find_spec("ir_datasets")  # locate the package without importing it (fast)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "etc" / "metadata.json"
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def _metadata() -> Dict[str, dict]:
    path = _metadata_file()
    return json.loads(path.read_text(encoding="utf-8")) if path else {}


def known_grades(spec: str) -> Optional[Dict[int, int]]:
    """``grade -> number of qrels`` of a dataset, from ir_datasets' packaged metadata; no download.

    ``spec`` is an abbreviation (:data:`DATASETS`) or an ir_datasets id.
    BioASQ (not in ir_datasets) is known from the registry (grade 1 only,
    count unknown: 0).  ``None`` when the dataset is not listed (local data,
    unknown ids, or ir_datasets not installed).
    """
    key = DATASETS.get(str(spec), str(spec))
    if key in GRADES_WITHOUT_METADATA:
        return {g: 0 for g in GRADES_WITHOUT_METADATA[key]}
    meta = _metadata()
    seen = set()
    while key in meta and key not in seen:
        seen.add(key)
        qrels = meta[key].get("qrels")
        if not isinstance(qrels, dict):
            return None
        if "_ref" in qrels:
            key = qrels["_ref"]
            continue
        counts = qrels.get("fields", {}).get("relevance", {}).get("counts_by_value")
        return {int(g): int(n) for g, n in counts.items()} if counts else None
    return None


def count_labels(collection: Collection, mapping: Optional[LabelMapping] = None) -> Dict[str, int]:
    """Judged pairs per label under ``mapping``: ``{"relevant": n, "non-relevant": n}``."""
    mapping = mapping or LabelMapping()
    grades = [g for docs in collection.qrels().values() for g in docs.values()]
    return {"relevant": sum(mapping.is_relevant(g) for g in grades),
            "non-relevant": sum(mapping.is_nonrelevant(g) for g in grades)}

_LABELS = {
    "1": 1, "relevant": 1, "rel": 1, "positive": 1, "pos": 1, "p": 1,
    "0": 0, "non-relevant": 0, "nonrelevant": 0, "non_relevant": 0, "nonrel": 0, "negative": 0, "neg": 0, "n": 0,
}


def _normalize_label(label) -> int:
    if isinstance(label, (bool, int)) and int(label) in (0, 1):
        return int(label)
    if isinstance(label, str) and label.strip().lower() in _LABELS:
        return _LABELS[label.strip().lower()]
    raise ValueError(f"label must be 1 / 'relevant' or 0 / 'non-relevant', got {label!r}")


def _unjudged_candidates(collection: Collection, qrels, mapping: LabelMapping, seed: int, per_query: int):
    """(qid, doc_id, 0) for up to ``per_query`` random unjudged documents of each query with a relevant doc."""
    doc_ids = sorted(did for did, _ in collection.iter_docs())
    out = []
    for qid in sorted(qrels):
        judged = qrels[qid]
        if not any(mapping.is_relevant(g) for g in judged.values()):
            continue
        rng = random.Random(sample_key(seed, qid, ""))
        picked = set()
        for _ in range(per_query * 20):  # rejection sampling; judged docs are few
            if len(picked) == per_query or len(picked) + len(judged) >= len(doc_ids):
                break
            did = doc_ids[rng.randrange(len(doc_ids))]
            if did not in judged:
                picked.add(did)
        out.extend((qid, did, 0) for did in sorted(picked))
    return out


def _bm25_candidates(qrels, queries, mapping: LabelMapping, needed: int, ranker: Ranker):
    """(qid, doc_id, 0) for the top BM25-ranked unjudged passages of each query with a relevant doc and a text.

    Each such query gets the same number of passages, ceil(needed / queries) + 1
    (the ranking is asked for that many plus the query's judged documents,
    which are skipped); the list is ordered by rank within the query first
    (every query's best unjudged passage, then every second best, ...), then
    by the seeded key, so the hardest negatives come first.
    """
    qids = sorted(q for q, docs in qrels.items() if queries.get(q) and any(mapping.is_relevant(g)
                                                                          for g in docs.values()))
    if not qids or needed <= 0:
        return []
    per_query = -(-needed // len(qids)) + 1
    depth = per_query + max(len(qrels[q]) for q in qids)
    ranking = ranker({q: queries[q] for q in qids}, depth)
    out = []
    for qid in qids:
        judged = qrels[qid]
        fresh = [str(d) for d in ranking.get(qid, ()) if str(d) not in judged]
        out.extend((rank, qid, did) for rank, did in enumerate(list(dict.fromkeys(fresh))[:per_query]))
    return out


def sample_pairs(collection: Union[Collection, str], *, label: Union[int, str], num_pairs: int, seed: int = 0,
                 relevance_threshold: int = 1, max_per_query: Optional[int] = None,
                 negatives: str = "judged", relevant: Optional[Iterable[int]] = None,
                 nonrelevant: Optional[Iterable[int]] = None, ranker: Optional[Ranker] = None
                 ) -> List[LabelledPair]:
    """Draw ``num_pairs`` judged pairs of one label, deterministically from ``seed``.

    Relevant (label 1) = a qrel grade in ``relevant`` (default: grade >=
    ``relevance_threshold``); non-relevant (label 0) = a qrel grade in
    ``nonrelevant`` (default: the judged grades below the lowest relevant
    one, never negative), i.e. *judged* non-relevant (docs/method.md §6.1);
    see :class:`LabelMapping`.  TREC DL 2019 with ``relevant=[2, 3]`` gets
    non-relevant = grades {0, 1}, TREC DL's binary convention.

    Each judged pair gets a pseudo-random rank from a hash of (seed, query id,
    doc id); pairs are taken in that order.  The result therefore depends on
    the seed and the qrels only (not on dict order, Python version or
    platform), and a larger ``num_pairs`` extends a smaller draw.  Pairs whose
    query has no text, whose document is missing from the corpus or whose
    passage is empty are skipped.

    Args:
        collection: a :class:`Collection` (or a spec for :func:`load_collection`).
        label: 1 / ``"relevant"`` or 0 / ``"non-relevant"``.
        num_pairs: how many pairs (>= 1); fewer are returned, with a warning,
            when the collection has fewer.
        seed: any int.
        relevance_threshold: lowest grade counted as relevant (>= 1).
        max_per_query: at most this many pairs per query (``None`` = no cap).
        negatives: for label 0, ``"judged"`` (default: judged non-relevant
            grades only); ``"bm25"``: the judged ones first, then, when they
            are fewer than ``num_pairs``, the top-ranked passages of
            ``ranker`` (BM25) that the qrels do not list for a query with a
            relevant document (grade 0 in the pairs; the authors' hard
            negatives); or ``"unjudged"``: random documents the qrels do not
            list for a query that has a relevant one (grade 0 in the pairs) —
            the usual random negatives, for collections such as Cranfield that
            judge no document non-relevant.  It lists every doc id, so it is
            meant for small corpora.
        relevant, nonrelevant: the dataset's label mapping (:func:`label_mapping`).
        ranker: for ``negatives="bm25"``: ``ranker(queries, k)`` ->
            ``{query_id: [doc_id, ...]}`` best first (e.g.
            :func:`fastnig.study.attribution_job.bm25_ranker`); called only when the judged
            non-relevant pairs are too few.

    Returns:
        ``num_pairs`` :class:`LabelledPair`, in sampling order.

    Raises:
        MissingJudgments: no qrel has the label (e.g. label 0 on a dataset whose
            only grade is relevant, such as FiQA, BioASQ or Cranfield).
    """
    if isinstance(collection, (str, os.PathLike)):
        collection = load_collection(collection)
    if not isinstance(collection, Collection):
        raise TypeError(f"collection must be a fastnig.data.Collection or a dataset spec, "
                        f"got {type(collection).__name__}")
    label = _normalize_label(label)
    num_pairs = check_int("num_pairs", num_pairs, 1)
    if not is_int(seed):
        raise TypeError(f"seed must be an int, got {seed!r}")
    mapping = label_mapping(relevant, nonrelevant, relevance_threshold)
    if max_per_query is not None:
        max_per_query = check_int("max_per_query", max_per_query, 1, " or None")

    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if negatives == "bm25" and label == 0 and ranker is None:
        raise ValueError("negatives='bm25' needs ranker=, a BM25 ranking of the collection "
                         "(fastnig.study.attribution_job.bm25_ranker(collection))")

    queries = collection.queries()
    qrels = collection.qrels()
    grades = sorted({g for docs in qrels.values() for g in docs.values()})
    fill: List[Tuple[str, str, int]] = []
    if label == 0 and negatives == "unjudged":
        judged_queries = max(sum(1 for d in qrels.values() if d), 1)
        candidates = _unjudged_candidates(collection, qrels, mapping, seed,
                                          per_query=max(2 * -(-num_pairs // judged_queries), 2))
    else:
        matches = mapping.is_nonrelevant if label == 0 else mapping.is_relevant
        candidates = [(qid, did, g) for qid, docs in qrels.items() for did, g in docs.items() if matches(g)]
        if label == 0 and negatives == "bm25":
            judged_with_text = sum(1 for c in candidates if queries.get(c[0]))
            ranked = _bm25_candidates(qrels, queries, mapping, num_pairs - judged_with_text, ranker)
            ranked.sort(key=lambda c: (c[0], sample_key(seed, c[1], c[2]), c[1], c[2]))
            fill = [(qid, did, 0) for _, qid, did in ranked]
    if not candidates and not fill:
        if label == 0:
            raise MissingJudgments(
                f"dataset {collection.name!r} has no non-relevant judgments ({mapping.describe()}; its grades "
                f"are {grades}), so no label-0 pairs can be sampled: unjudged documents are not taken as "
                f"non-relevant. docs/method.md §6 leaves such datasets out of the non-relevant schemes (N_x); "
                f"check count_labels() / Collection.has_nonrelevant and sample label 1 only, or pass "
                f"negatives='bm25' (BM25-ranked unjudged passages) or negatives='unjudged' (random ones).")
        raise MissingJudgments(
            f"dataset {collection.name!r} has no relevant qrel ({mapping.describe()}; its grades are "
            f"{grades}); lower relevance_threshold or list other relevant grades.")
    no_text = sorted({qid for qid, _, _ in candidates if not queries.get(qid)})
    if no_text:
        warnings.warn(f"{collection.name}: {len(no_text)} judged queries have no query text "
                      f"(e.g. {no_text[:3]}); their pairs are skipped", stacklevel=2)
        candidates = [c for c in candidates if queries.get(c[0])]
    candidates.sort(key=lambda c: (sample_key(seed, c[0], c[1]), c[0], c[1]))
    candidates += fill  # BM25 negatives only after every judged one, hardest first

    pairs: List[LabelledPair] = []
    per_query: Dict[str, int] = {}
    skipped_docs = 0
    chunk = max(2 * num_pairs, 64)
    start = 0
    while len(pairs) < num_pairs and start < len(candidates):
        block = candidates[start:start + chunk]
        start += chunk
        if max_per_query is not None:
            block = [c for c in block if per_query.get(c[0], 0) < max_per_query]
        texts = collection.doc_texts(did for _, did, _ in block)
        for qid, did, grade in block:
            if len(pairs) == num_pairs:
                break
            if max_per_query is not None and per_query.get(qid, 0) >= max_per_query:
                continue
            passage = texts.get(did)
            if not passage:
                skipped_docs += 1
                continue
            pairs.append(LabelledPair(qid, did, queries[qid], passage, label, grade))
            per_query[qid] = per_query.get(qid, 0) + 1
    if len(pairs) < num_pairs:
        what = "relevant" if label == 1 else "non-relevant"
        warnings.warn(f"{collection.name}: only {len(pairs)} {what} pairs are available "
                      f"({skipped_docs} skipped: document missing or empty); returning them all", stacklevel=2)
    return pairs
