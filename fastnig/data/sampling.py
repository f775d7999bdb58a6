"""Drawing labelled pairs from a collection, deterministically: :func:`sample_pairs`.

Owns: what counts as relevant / non-relevant (docs/method.md §6: judged grades
only, unless random unjudged negatives are asked for), the seeded order of
the draw (:func:`fastnig.common.sample_key`, independent of dict order and
platform, a larger draw extending a smaller one), the per-query cap, and the
warnings when fewer pairs exist.

Must not: know where the collection's files come from, or run a model (the
agreement filter, :mod:`.agreement`, comes after).
"""
from __future__ import annotations

import os
import random
import warnings
from typing import Dict, List, Optional, Union

from ..common import check_int, is_int, sample_key
from .collection import Collection, check_threshold
from .loading import load_collection
from .records import LabelledPair, MissingJudgments

#: Where label-0 pairs come from: qrel grade 0 only, or random unjudged documents.
NEGATIVES = ("judged", "unjudged")

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


def _unjudged_candidates(collection: Collection, qrels, relevance_threshold: int, seed: int, per_query: int):
    """(qid, doc_id, 0) for up to ``per_query`` random unjudged documents of each query with a relevant doc."""
    doc_ids = sorted(did for did, _ in collection.iter_docs())
    out = []
    for qid in sorted(qrels):
        judged = qrels[qid]
        if not any(g >= relevance_threshold for g in judged.values()):
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


def sample_pairs(collection: Union[Collection, str], *, label: Union[int, str], num_pairs: int, seed: int = 0,
                 relevance_threshold: int = 1, max_per_query: Optional[int] = None,
                 negatives: str = "judged") -> List[LabelledPair]:
    """Draw ``num_pairs`` judged pairs of one label, deterministically from ``seed``.

    Relevant (label 1) = qrel grade >= ``relevance_threshold``; non-relevant
    (label 0) = qrel grade 0, i.e. *judged* non-relevant: unjudged documents
    are never used as negatives (docs/method.md §6), and grades between 0 and the
    threshold belong to neither label.  (TREC DL's binary convention is
    ``relevance_threshold=2``.)

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
        negatives: for label 0, ``"judged"`` (default, docs/method.md §6: qrel grade 0
            only) or ``"unjudged"``: random documents the qrels do not list
            for a query that has a relevant one (grade 0 in the pairs) — the
            usual random negatives, for collections such as Cranfield or
            NFCorpus that judge no document non-relevant.  It lists every doc
            id, so it is meant for small corpora.

    Returns:
        ``num_pairs`` :class:`LabelledPair`, in sampling order.

    Raises:
        MissingJudgments: no qrel has the label (e.g. label 0 on a dataset with
            no grade-0 rows, such as FiQA, BioASQ, Cranfield or NFCorpus).
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
    check_threshold(relevance_threshold)
    if max_per_query is not None:
        max_per_query = check_int("max_per_query", max_per_query, 1, " or None")

    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")

    queries = collection.queries()
    qrels = collection.qrels()
    grades = sorted({g for docs in qrels.values() for g in docs.values()})
    if label == 0 and negatives == "unjudged":
        judged_queries = max(sum(1 for d in qrels.values() if d), 1)
        candidates = _unjudged_candidates(collection, qrels, relevance_threshold, seed,
                                          per_query=max(2 * -(-num_pairs // judged_queries), 2))
    else:
        matches = (lambda g: g == 0) if label == 0 else (lambda g: g >= relevance_threshold)
        candidates = [(qid, did, g) for qid, docs in qrels.items() for did, g in docs.items() if matches(g)]
    if not candidates:
        if label == 0:
            raise MissingJudgments(
                f"dataset {collection.name!r} has no non-relevant judgments (no qrel with grade 0; its grades "
                f"are {grades}), so no label-0 pairs can be sampled: unjudged documents are not taken as "
                f"non-relevant. docs/method.md §6 leaves such datasets out of the non-relevant schemes (N_x); "
                f"check Collection.has_nonrelevant and sample label 1 only, or pass negatives='unjudged' to use "
                f"random unjudged documents as non-relevant.")
        raise MissingJudgments(
            f"dataset {collection.name!r} has no qrel with grade >= {relevance_threshold} (its grades are "
            f"{grades}); lower relevance_threshold.")
    no_text = sorted({qid for qid, _, _ in candidates if not queries.get(qid)})
    if no_text:
        warnings.warn(f"{collection.name}: {len(no_text)} judged queries have no query text "
                      f"(e.g. {no_text[:3]}); their pairs are skipped", stacklevel=2)
        candidates = [c for c in candidates if queries.get(c[0])]
    candidates.sort(key=lambda c: (sample_key(seed, c[0], c[1]), c[0], c[1]))

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
