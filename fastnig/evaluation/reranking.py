"""Reranking a dataset's candidates and scoring the ranking: the evaluation half of pruning.

Owns: the passages to rerank per query (:func:`build_candidates`: the
dataset's own first-stage run or BM25 via ``bm25s``, index cached on disk),
tokenising them once and scoring them (:func:`encode_candidates`,
:func:`score_candidates`, on :mod:`fastnig.engine.model`'s batched scoring
with the first-token cut), nDCG@k equal to trec_eval's (:func:`ndcg_at_k`,
ranx) and the paired comparison of two rankings (:func:`compare_ndcg`).

The score is the relevance **logit** (1-logit models: the logit; 2-logit
models: ``logit[1] - logit[0]``), i.e. the log-odds of P(relevant): it ranks
exactly like P(relevant) = sigmoid(score) but does not saturate to ties at
1.0 in float32.

Must not: change a model (that is :mod:`fastnig.evaluation.pruning`), know about neuron
sets or render tables.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from torch import nn

from ..common import check_int, optional_import
from ..engine.encoding import EncodedBatches, encode_batches
from ..engine.scoring import relevance_score, score_batches, scoring_ranker

DEFAULT_DEPTH = 20
SIGNIFICANCE_LEVEL = 0.05
BM25_K1 = 0.9  # Anserini / Pyserini defaults, the usual "BM25" of IR papers
BM25_B = 0.4

__all__ = ["Candidates", "EncodedCandidates", "bm25_index", "bm25_run", "build_candidates", "encode_candidates",
           "score_candidates", "relevance_score", "ndcg_at_k", "Comparison", "compare_ndcg"]


# ========================================================= candidates
@dataclass
class Candidates:
    """The passages to rerank for each sampled query of one dataset.

    Attributes:
        name: the dataset's name.
        queries: qid -> query text, in evaluation order (sorted qids).
        docs: qid -> candidate doc ids (first-stage order, then the judged
            relevant passages it missed).
        passages: doc id -> passage text for every candidate.
        qrels: qid -> doc id -> grade (every judgment of the sampled queries;
            grade > 0 = relevant, the gain of nDCG).
        source: where the first-stage list came from: ``"scoreddocs"`` or ``"bm25"``.
    """

    name: str
    queries: Dict[str, str]
    docs: Dict[str, List[str]]
    passages: Dict[str, str]
    qrels: Dict[str, Dict[str, int]]
    source: str

    def pairs(self) -> List[Tuple[str, str]]:
        """``[(qid, doc_id)]`` of every candidate, query by query."""
        return [(qid, doc) for qid in self.queries for doc in self.docs[qid]]

    @property
    def num_pairs(self) -> int:
        return sum(len(d) for d in self.docs.values())

    @property
    def num_queries(self) -> int:
        return len(self.queries)


def _bm25_cache_dir(cache_dir: Union[str, Path], collection_name: str, source: str, k1: float, b: float) -> Path:
    identity = [collection_name, source, k1, b, "bm25s-lucene-en-stopwords-nostem"]
    key = hashlib.sha1(json.dumps(identity).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", collection_name).strip("_")[-60:] or "collection"
    return Path(cache_dir).expanduser() / f"{slug}-{key}"


def bm25_index(collection, cache_dir: Union[str, Path, None] = None, k1: float = BM25_K1, b: float = BM25_B,
               progress: bool = True):
    """A ``bm25s`` index over ``collection.iter_docs()`` and its doc ids, cached on disk.

    Tokenisation: bm25s's (lowercase, words of 2+ characters, English stop
    words removed, no stemming).  With ``cache_dir`` the index is saved to /
    loaded from ``cache_dir/<name>-<hash of name, source, k1, b>`` (the
    collection's ``name`` and ``source``); delete that folder if the corpus
    changes under the same name.

    Returns:
        ``(retriever, doc_ids)``: a ``bm25s.BM25`` and the list mapping its row
        numbers to doc ids.
    """
    bm25s = optional_import("bm25s", "for BM25 candidates")

    name = str(getattr(collection, "name", "") or "")
    source = str(getattr(collection, "source", "") or "")
    folder = _bm25_cache_dir(cache_dir, name, source, k1, b) if cache_dir is not None and name else None
    if folder is not None and (folder / "doc_ids.json").is_file():
        retriever = bm25s.BM25.load(str(folder))
        doc_ids = json.loads((folder / "doc_ids.json").read_text())
        return retriever, doc_ids
    doc_ids, texts = [], []
    for doc_id, text in collection.iter_docs():
        doc_ids.append(str(doc_id))
        texts.append(text or "")
    if not doc_ids:
        raise ValueError(f"collection {name!r} has no documents to index with BM25")
    tokens = bm25s.tokenize(texts, stopwords="en", show_progress=progress)
    del texts
    retriever = bm25s.BM25(k1=k1, b=b)
    retriever.index(tokens, show_progress=progress)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        retriever.save(str(folder))
        tmp = folder / "doc_ids.json.tmp"
        tmp.write_text(json.dumps(doc_ids))
        tmp.replace(folder / "doc_ids.json")  # written last: marks the cache complete
    return retriever, doc_ids


def bm25_run(collection, queries: Mapping[str, str], k: int = 100, cache_dir: Union[str, Path, None] = None,
             k1: float = BM25_K1, b: float = BM25_B, progress: bool = True) -> Dict[str, List[Tuple[str, float]]]:
    """BM25 top ``k`` of each query over the collection's corpus.

    Returns:
        qid -> ``[(doc_id, score)]`` by decreasing score (fewer than ``k`` when
        the corpus is smaller).
    """
    bm25s = optional_import("bm25s", "for BM25 candidates")

    check_int("k", k, 1, " (passages per query)")
    retriever, doc_ids = bm25_index(collection, cache_dir, k1, b, progress)
    qids = list(queries)
    if not qids:
        return {}
    query_tokens = bm25s.tokenize([queries[q] for q in qids], stopwords="en", show_progress=False)
    depth = min(k, len(doc_ids))
    rows, scores = retriever.retrieve(query_tokens, k=depth, show_progress=progress)
    return {qid: [(doc_ids[int(r)], float(s)) for r, s in zip(rows[i], scores[i])] for i, qid in enumerate(qids)}


def _first_stage(collection, qids: Sequence[str], depth: int) -> Optional[Dict[str, List[Tuple[str, float]]]]:
    """The dataset's own run for ``qids`` (top ``depth``, best first), or ``None`` when it has none."""
    try:
        run = collection.scoreddocs(query_ids=list(qids), depth=max(depth, 1))
    except TypeError:  # a collection whose scoreddocs() takes no arguments
        run = collection.scoreddocs()
    if run is None:
        return None
    wanted = set(qids)
    out = {}
    for qid, hits in run.items():
        if str(qid) in wanted:
            ranked = sorted(((str(d), float(sc)) for d, sc in hits), key=lambda ds: (-ds[1], ds[0]))
            out[str(qid)] = ranked[:depth]
    return out


def build_candidates(collection, num_queries: Optional[int] = None, seed: int = 0, depth: int = DEFAULT_DEPTH,
                     cache_dir: Union[str, Path, None] = None, k1: float = BM25_K1, b: float = BM25_B,
                     progress: bool = True) -> Candidates:
    """The candidates to rerank for (a seeded sample of) a dataset's queries (docs/method.md §8).

    Eligible queries have a text and at least one relevant judgment (grade >
    0).  ``num_queries`` of them are drawn with ``random.Random(seed)`` from
    the sorted qids (all of them if ``None`` or more than there are).  Each
    gets its first-stage top ``depth`` (the dataset's own run,
    ``collection.scoreddocs()``, when it has one; else :func:`bm25_run` over
    its corpus) plus every judged relevant passage.  A sampled query missing
    from the dataset's own run is left out (with a warning).  Relevant
    passages missing from the corpus stay in the qrels (they count in the
    ideal DCG) but cannot be reranked.

    Args:
        collection: a :mod:`fastnig.data` Collection (``name``, ``queries()``,
            ``qrels()``, ``doc_texts(ids)``, ``iter_docs()``, ``scoreddocs()``).
        num_queries: queries to sample; ``None`` = all eligible.
        seed: sampling seed (integer >= 0).
        depth: first-stage passages per query (the paper: 20).
        cache_dir: where BM25 indexes are cached (``None``: not cached).
        k1, b: BM25 parameters (default 0.9 / 0.4, Anserini's).
    """
    seed = check_int("seed", seed, 0)
    check_int("depth", depth, 0, " (first-stage passages per query)")
    if num_queries is not None:
        check_int("num_queries", num_queries, 1, " or None (all)")
    name = str(getattr(collection, "name", "") or "collection")
    query_texts = {str(q): t for q, t in collection.queries().items()}
    all_qrels = {str(q): {str(d): int(g) for d, g in docs.items()} for q, docs in collection.qrels().items()}
    eligible = sorted(q for q, docs in all_qrels.items()
                      if any(g > 0 for g in docs.values()) and (query_texts.get(q) or "").strip())
    if not eligible:
        raise ValueError(f"dataset {name}: no query has both a text and a relevant judgment (grade > 0)")
    if num_queries is not None and num_queries < len(eligible):
        chosen = set(random.Random(seed).sample(eligible, num_queries))
        eligible = [q for q in eligible if q in chosen]

    run = _first_stage(collection, eligible, depth)
    if run is not None:
        source = "scoreddocs"
        absent = [q for q in eligible if q not in run]
        if absent:
            warnings.warn(f"dataset {name}: {len(absent)} sampled queries are not in its first-stage run "
                          f"(e.g. {absent[:3]}); they are left out", stacklevel=2)
            eligible = [q for q in eligible if q in run]
            if not eligible:
                raise ValueError(f"dataset {name}: none of the sampled queries is in its first-stage run")
    else:
        source = "bm25"
        queries_for_bm25 = {q: query_texts[q] for q in eligible}
        run = bm25_run(collection, queries_for_bm25, depth, cache_dir, k1, b, progress) if depth else {}
    queries = {q: query_texts[q] for q in eligible}
    docs = {}
    for q in queries:
        listed = [str(d) for d, _ in run.get(q, [])]
        relevant = [d for d, g in sorted(all_qrels[q].items()) if g > 0]
        docs[q] = list(dict.fromkeys(listed + relevant))
    wanted = sorted({d for ds in docs.values() for d in ds})
    passages = {str(d): t for d, t in collection.doc_texts(wanted).items() if t is not None}
    missing = [d for d in wanted if d not in passages]
    if missing:
        warnings.warn(f"dataset {name}: {len(missing)} candidate passages are not in the corpus "
                      f"(e.g. {missing[:3]}); they are left out of the reranking", stacklevel=2)
        docs = {q: [d for d in ds if d in passages] for q, ds in docs.items()}
    return Candidates(name=name, queries=queries, docs=docs, passages=passages,
                      qrels={q: all_qrels[q] for q in queries}, source=source)


# ========================================================== reranking
EncodedCandidates = EncodedBatches


def encode_candidates(tokenizer, candidates: Candidates, max_length: int = 512, batch_size: int = 32,
                      ranker=None) -> EncodedBatches:
    """Tokenise every (query, passage) candidate pair once, in ``Candidates.pairs()`` order
    (:func:`fastnig.engine.encoding.encode_batches`: ``only_second`` truncation, batches of similar length);
    with a bound ``ranker`` (:func:`fastnig.engine.rankers.bind_ranker`) in its layout, scored through it."""
    texts = [(candidates.queries[q], candidates.passages[d] or "") for q, d in candidates.pairs()]
    return encode_batches(tokenizer, texts, max_length, batch_size,
                          scoring_ranker(ranker) if ranker is not None else None)


def score_candidates(model: nn.Module, encoded: EncodedBatches, progress: bool = True,
                     desc: str = "rerank", partial: bool = False) -> np.ndarray:
    """Relevance scores (:func:`relevance_score`) of every encoded pair.

    Returns:
        float64 ``[num_pairs]``, in ``Candidates.pairs()`` order.  With
        ``partial`` (``encoded`` holds only some batches, e.g. one rank's
        share), the pairs of the other batches are 0.
    """
    return score_batches(model, encoded, output="score", progress=progress, desc=desc, partial=partial)


# ============================================================ metrics
def ndcg_at_k(run: Mapping[str, Mapping[str, float]], qrels: Mapping[str, Mapping[str, int]], k: int = 10
              ) -> Dict[str, float]:
    """nDCG@k of each query with ranx (gain = grade, Järvelin & Kekäläinen; grades <= 0 count 0).

    Ties in score are broken by doc id, descending, as trec_eval does, so the
    values equal trec_eval's / pytrec_eval's ``ndcg_cut_k``.  Queries of
    ``qrels`` without any relevant judgment are skipped (nDCG is undefined);
    a query missing from ``run`` scores 0.  Uses ranx's numba kernel
    (``ranx.metrics.ndcg``) on arrays built here, which avoids compiling
    ranx's string-keyed containers on every new process.

    Returns:
        qid -> nDCG@k, for every query of ``qrels`` with a relevant judgment.
    """
    TypedList = optional_import("numba.typed", "for nDCG").List
    ndcg = optional_import("ranx.metrics", "for nDCG").ndcg

    check_int("k", k, 1, " (rank cutoff)")
    qids, qrels_arrays, run_arrays = [], [], []
    for qid, judged in qrels.items():
        qid = str(qid)
        relevant = sorted(((str(d), int(g)) for d, g in judged.items() if int(g) > 0), key=lambda dg: -dg[1])
        if not relevant:
            continue
        docs = {str(d): float(s) for d, s in run.get(qid, {}).items()}
        # trec_eval's order: score descending, then doc id descending.
        ranking = sorted(docs, key=lambda d: (docs[d], d), reverse=True)
        number = {d: i for i, d in enumerate(dict.fromkeys([d for d, _ in relevant] + ranking))}
        qids.append(qid)
        qrels_arrays.append(np.array([[number[d], g] for d, g in relevant], dtype=np.float64).reshape(-1, 2))
        run_arrays.append(np.array([[number[d], len(ranking) - i] for i, d in enumerate(ranking)],
                                   dtype=np.float64).reshape(-1, 2))
    if not qids:
        raise ValueError("qrels has no relevant judgment (grade > 0): nDCG is undefined")
    values = ndcg(TypedList(qrels_arrays), TypedList(run_arrays), k)
    return {q: float(v) for q, v in zip(qids, values)}


@dataclass
class Comparison:
    """A pruned model vs the original on the same queries.

    ``drop_percent`` = (original - pruned) / original * 100 of the mean
    nDCG (positive = the pruned model is worse); ``p_value`` of the
    two-tailed paired t-test over queries (1.0 when nothing changed).
    """

    ndcg_original: float
    ndcg_pruned: float
    drop_percent: float
    p_value: float
    significant: bool


def compare_ndcg(original: Sequence[float], pruned: Sequence[float], alpha: float = SIGNIFICANCE_LEVEL
                 ) -> Comparison:
    """% drop of the mean nDCG and a two-tailed paired t-test (scipy ``ttest_rel``), significant at p <= alpha.

    Args:
        original, pruned: per-query nDCG, ``[num_queries]``, same query order.
    """
    ttest_rel = optional_import("scipy.stats", "for the paired t-test").ttest_rel

    a = np.asarray(original, dtype=np.float64)
    p = np.asarray(pruned, dtype=np.float64)
    if a.shape != p.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"original and pruned must be per-query arrays of the same length, got {a.shape} and "
                         f"{p.shape}")
    mean_a, mean_p = float(a.mean()), float(p.mean())
    drop = (mean_a - mean_p) / mean_a * 100.0 if mean_a != 0 else math.nan
    diff = a - p
    if not diff.any():
        p_value = 1.0
    elif a.size < 2:
        p_value = math.nan
    elif np.all(diff == diff[0]):  # constant non-zero difference: t is infinite
        p_value = 0.0
    else:
        p_value = float(ttest_rel(a, p).pvalue)
    significant = bool(not math.isnan(p_value) and p_value <= alpha)
    return Comparison(mean_a, mean_p, drop, p_value, significant)
