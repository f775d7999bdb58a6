"""The :class:`Collection` facade: one dataset's queries, graded qrels, passages and run.

Owns: reading queries and qrels once (with an optional grade conversion and
position-numbered queries), passage lookup through ir_datasets' docstore,
the corpus walk, the first-stage run, and turning ir_datasets' download and
missing-file errors into :class:`DatasetUnavailable` with a message that
says what to put where.

Must not: decide which files or ir_datasets id a spec means (that is
:mod:`.loading` and :mod:`.readers`), sample pairs, or run a model.
"""
from __future__ import annotations

import contextlib
import tarfile
import zipfile
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from ..common import check_int
from .network import LOCAL_HINT, download_policy, hint_text, missing_files, short_cause
from .records import DatasetUnavailable, MissingJudgments, doc_passage, query_text

GradeMap = Callable[[int], Optional[int]]


def check_threshold(relevance_threshold) -> int:
    """``relevance_threshold`` (the lowest grade counted as relevant) if it is an int >= 1."""
    return check_int("relevance_threshold", relevance_threshold, 1, " (grade 0 means non-relevant)")


class Collection:
    """Queries, graded qrels and passages of one dataset, through ir_datasets.

    Attributes:
        name: the spec it was loaded from.
        source: what it was read from, in words (ir_datasets id or local paths).
        dataset: the underlying ``ir_datasets`` dataset object.
        ir_datasets_id: the registered id, ``None`` for local data.
        notes: conversions applied to the raw data (query-id remaps, grade codes).

    Queries and qrels are read once and cached; passages are looked up in the
    ir_datasets docstore (built on first use, never loaded whole in memory).
    """

    def __init__(self, name: str, dataset, *, source: str, ir_datasets_id: Optional[str] = None,
                 grade_map: Optional[GradeMap] = None, queries_by_position: bool = False,
                 notes: Iterable[str] = (), offline: bool = False, connect_timeout: float = 5.0):
        self.name = name
        self.source = source
        self.dataset = dataset
        self.ir_datasets_id = ir_datasets_id
        self.notes: List[str] = list(notes)
        self._grade_map = grade_map
        self._queries_by_position = queries_by_position
        self._offline = offline
        self._connect_timeout = connect_timeout
        self._queries: Optional[Dict[str, str]] = None
        self._qrels: Optional[Dict[str, Dict[str, int]]] = None

    def __repr__(self) -> str:
        return f"Collection({self.name!r}, source={self.source!r})"

    # ..................................................... error translation
    @contextlib.contextmanager
    def _guard(self, component: str):
        """Turn ir_datasets' download / missing-file errors into DatasetUnavailable."""
        with download_policy(self._offline, self._connect_timeout):
            try:
                yield
            except (OSError, EOFError, zipfile.BadZipFile, tarfile.ReadError) as exc:
                raise self._unavailable(component, exc) from None
            except RuntimeError as exc:
                if "download" in str(exc).lower():
                    raise self._unavailable(component, exc) from None
                if self.ir_datasets_id is None:  # ir_datasets' readers report bad lines as RuntimeError
                    raise ValueError(f"dataset {self.name!r}: cannot read its {component} from {self.source}: "
                                     f"{exc}") from None
                raise

    def _unavailable(self, component: str, exc: BaseException) -> DatasetUnavailable:
        what = f"Dataset {self.name!r}"
        if self.ir_datasets_id and self.ir_datasets_id != self.name:
            what += f" (ir_datasets id {self.ir_datasets_id!r})"
        if self.ir_datasets_id is None:
            return DatasetUnavailable(
                f"{what} is not available: reading its {component} from {self.source} failed "
                f"({short_cause(exc)}). Check that the files exist and are readable.", exc)
        hint = hint_text(missing_files(self._handlers(component)))
        return DatasetUnavailable(
            f"{what} is not available: ir_datasets could not get its {component} ({short_cause(exc)}). "
            f"{hint}ir_datasets keeps its files under IR_DATASETS_HOME (default ~/.ir_datasets), read when "
            f"ir_datasets is imported, so set it before starting Python; {LOCAL_HINT}.", exc)

    def _handlers(self, component: str) -> list:
        """ir_datasets handlers whose files a failure of ``component`` may involve.

        Queries and qrels go together (e.g. "judged" query subsets are
        filtered by the qrels); docs and scoreddocs stand alone.
        """
        names = [component] + ([c for c in ("queries", "qrels") if c != component]
                               if component in ("queries", "qrels") else [])
        handlers = []
        for name in names:
            with contextlib.suppress(Exception):
                if getattr(self.dataset, f"has_{name}")():
                    handlers.append(getattr(self.dataset, f"{name}_handler")())
        return handlers

    def _check_licensed_docs(self) -> None:
        """Fail now, with the provider's instructions, if the corpus is licensed and absent."""
        if self.ir_datasets_id is None or not self.dataset.has_docs():
            return
        licensed = [h for h in missing_files(self._handlers("docs")) if h["instructions"] and not h["url"]]
        if licensed:
            raise DatasetUnavailable(
                f"Dataset {self.name!r}" + (f" (ir_datasets id {self.ir_datasets_id!r})"
                                            if self.ir_datasets_id != self.name else "")
                + f" is not available: its documents are licensed data that ir_datasets cannot download. "
                f"{hint_text(licensed)}{LOCAL_HINT[0].upper()}{LOCAL_HINT[1:]}.")

    # .............................................................. queries
    def queries(self) -> Dict[str, str]:
        """``query_id -> text`` (ir_datasets' default text, e.g. the TREC title; whitespace collapsed)."""
        if self._queries is None:
            if not self.dataset.has_queries():
                raise MissingJudgments(f"dataset {self.name!r} ({self.source}) has no queries")
            with self._guard("queries"):
                queries: Dict[str, str] = {}
                for position, query in enumerate(self.dataset.queries_iter(), start=1):
                    qid = str(position) if self._queries_by_position else str(query.query_id)
                    queries[qid] = query_text(query)
            self._queries = queries
        return dict(self._queries)

    def qrels(self) -> Dict[str, Dict[str, int]]:
        """``query_id -> {doc_id: grade}``, higher = more relevant; 0 = judged non-relevant.

        Unjudged documents are absent.  A (query, doc) listed twice keeps its
        highest grade.
        """
        if self._qrels is None:
            if not self.dataset.has_qrels():
                raise MissingJudgments(f"dataset {self.name!r} ({self.source}) has no relevance judgments (qrels)")
            with self._guard("qrels"):
                qrels: Dict[str, Dict[str, int]] = {}
                for row in self.dataset.qrels_iter():
                    grade = int(row.relevance)
                    if self._grade_map is not None:
                        grade = self._grade_map(grade)
                        if grade is None:
                            continue
                    docs = qrels.setdefault(str(row.query_id), {})
                    did = str(row.doc_id)
                    docs[did] = max(grade, docs.get(did, grade))
            self._qrels = qrels
        return {qid: dict(docs) for qid, docs in self._qrels.items()}

    def restrict(self, query_ids, note: str) -> "Collection":
        """Keep only ``query_ids`` (and their qrels), in place; the corpus stays whole.  Returns ``self``."""
        keep = {str(q) for q in query_ids}
        self.queries()
        self.qrels()
        self._queries = {q: t for q, t in self._queries.items() if q in keep}
        self._qrels = {q: docs for q, docs in self._qrels.items() if q in keep}
        self.notes.append(note)
        return self

    @property
    def has_nonrelevant(self) -> bool:
        """Whether some qrel has grade 0 (needed to sample label 0, i.e. N_x)."""
        self.qrels()
        return any(g == 0 for docs in self._qrels.values() for g in docs.values())

    def label_counts(self, relevance_threshold: int = 1) -> Dict[str, int]:
        """Judged pairs per label: ``{"relevant": n (grade >= threshold), "non-relevant": n (grade 0)}``."""
        check_threshold(relevance_threshold)
        self.qrels()
        grades = [g for docs in self._qrels.values() for g in docs.values()]
        return {"relevant": sum(g >= relevance_threshold for g in grades),
                "non-relevant": sum(g == 0 for g in grades)}

    # ............................................................... docs
    def _require_docs(self) -> None:
        if not self.dataset.has_docs():
            raise DatasetUnavailable(f"dataset {self.name!r} ({self.source}) has no documents")

    def doc_texts(self, doc_ids: Iterable[str]) -> Dict[str, str]:
        """``doc_id -> passage`` (title + text) for the given ids, via the docstore.

        Ids not in the corpus are absent from the result.  The first call
        builds ir_datasets' docstore (one pass over the corpus, kept on disk).
        """
        if isinstance(doc_ids, str):
            doc_ids = [doc_ids]
        ids = list(dict.fromkeys(str(d) for d in doc_ids))
        if not ids:
            return {}
        self._require_docs()
        with self._guard("docs"):
            found = self.dataset.docs_store().get_many(ids)
        return {did: doc_passage(doc) for did, doc in found.items()}

    def iter_docs(self) -> Iterator[Tuple[str, str]]:
        """``(doc_id, passage)`` over the whole corpus, in corpus order (e.g. for a BM25 index)."""
        self._require_docs()
        with self._guard("docs"):
            for doc in self.dataset.docs_iter():
                yield str(doc.doc_id), doc_passage(doc)

    def docs_count(self) -> int:
        """Number of documents in the corpus (builds the docstore if needed)."""
        self._require_docs()
        with self._guard("docs"):
            store = self.dataset.docs_store()
            store.build()
            return int(store.count())

    def scoreddocs(self, query_ids: Optional[Iterable[str]] = None, depth: Optional[int] = None
                   ) -> Optional[Dict[str, List[Tuple[str, float]]]]:
        """The dataset's first-stage run, ``query_id -> [(doc_id, score), ...]``, best first.

        ``None`` when the dataset has none (then rank with BM25 over
        :meth:`iter_docs`).  ``query_ids`` keeps only those queries; ``depth``
        keeps the top ``depth`` documents of each (ties by doc id).
        """
        if not self.dataset.has_scoreddocs():
            return None
        if depth is not None:
            depth = check_int("depth", depth, 1, " or None")
        wanted = None if query_ids is None else {str(q) for q in query_ids}
        run: Dict[str, List[Tuple[str, float]]] = {}
        with self._guard("scoreddocs"):
            for row in self.dataset.scoreddocs_iter():
                qid = str(row.query_id)
                if wanted is None or qid in wanted:
                    run.setdefault(qid, []).append((str(row.doc_id), float(row.score)))
        for qid, docs in run.items():
            docs.sort(key=lambda d: (-d[1], d[0]))
            if depth is not None:
                del docs[depth:]
        return run
