"""Labelled (query, passage) pairs from IR test collections (SPEC §6–7).

The first stage of the pipeline: a dataset spec becomes a :class:`Collection`
(queries, graded qrels, passages through a docstore, an optional first-stage
run), :func:`sample_pairs` draws a fixed number of relevant or non-relevant
pairs from it deterministically, and :func:`filter_agreeing` keeps the pairs
whose model prediction agrees with their label, as SPEC §6 requires before a
pair enters an attribution scheme.

Everything goes through ``ir_datasets``: its registered ids (downloads,
docstores, caching under ``IR_DATASETS_HOME``) and, for local data, its own
format readers (``TsvDocs``, ``TsvQueries``, ``TrecQrels``, ``JsonlDocs``...).

Dataset specs accepted by :func:`load_collection`:

* an abbreviation of SPEC §7 or a validation set, see :data:`DATASETS`
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
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union
from urllib.parse import urlsplit

__all__ = [
    "DATASETS", "ATTRIBUTION_DATASETS", "VALIDATION_DATASETS", "IN_DOMAIN", "PAPER_NAMES",
    "WITHOUT_NONRELEVANT", "DatasetUnavailable", "MissingJudgments", "LabelledPair", "Collection",
    "load_collection", "sample_pairs", "filter_agreeing", "NEGATIVES",
]

# ------------------------------------------------------------------ datasets
#: Abbreviation -> source.  Attribution datasets of SPEC §7 (the paper's
#: Table 2), then the validation sets of the pruning study (SPEC §7-8).
#: ``"bioasq"`` is not an ir_datasets id: BioASQ is licensed and comes as a
#: local BEIR folder (see :func:`load_collection`).
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
#: Datasets the paper lists as lacking non-relevant judgments (no N_x, SPEC §6).
#: :attr:`Collection.has_nonrelevant` checks the actual qrels.
WITHOUT_NONRELEVANT = frozenset({"f", "b"})

_BIOASQ_ENV = "FASTNIG_BIOASQ"
_OFFLINE_ENV = "FASTNIG_OFFLINE"
_TREC_KEYS = ("docs_tsv", "docs_jsonl", "queries_tsv", "qrels_trec", "scoreddocs_trec")
_COMMON_OPTIONS = ("offline", "connect_timeout")
_SOURCE_PAPER_POLICIES = ("relevant", "nonrelevant", "drop")
_LOCAL_HINT = ("or pass a local copy instead: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) "
               "or 'trec:docs_tsv=DOCS,queries_tsv=QUERIES,qrels_trec=QRELS'")


class DatasetUnavailable(ValueError):
    """The dataset's files are not here and cannot be downloaded.

    The message names the dataset and what to provide where.  ``cause`` holds
    the underlying exception (if any), kept off the traceback on purpose.
    """

    def __init__(self, message: str, cause: Optional[BaseException] = None):
        super().__init__(message)
        self.cause = cause


class MissingJudgments(ValueError):
    """The collection has no qrels of the requested kind (e.g. no grade-0 rows)."""


# --------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class LabelledPair:
    """One judged (query, passage) pair.

    Attributes:
        query_id, doc_id: ids as in the collection (Cranfield: query ids are
            qrels positions, see :func:`load_collection`).
        query: the query text, whitespace collapsed.
        passage: the document as the cross-encoder sees it: title + text.
        label: 1 = relevant (grade >= the threshold used), 0 = non-relevant (grade 0).
        grade: the pair's grade in :meth:`Collection.qrels` (higher = more
            relevant; the raw qrel value except for Cranfield's converted codes).
    """

    query_id: str
    doc_id: str
    query: str
    passage: str
    label: int
    grade: int

    @property
    def text_pair(self) -> Tuple[str, str]:
        """``(query, passage)``, the input of :func:`fastnig.attribute`."""
        return (self.query, self.passage)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "LabelledPair":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


# ------------------------------------------------------------------- helpers
def _irds():
    import ir_datasets  # imported lazily: ~0.5 s, not needed by `import fastnig`

    return ir_datasets


def _clean(text: Optional[str]) -> str:
    """Whitespace runs (newlines, tabs, CRs) -> one space; stripped."""
    return " ".join((text or "").split())


def _doc_passage(doc) -> str:
    """title + text of an ir_datasets doc, as the cross-encoder should see it.

    ``default_text()`` is ir_datasets' own "title + body" for each format
    (BEIR, Cranfield, WaPo, TREC disks, MS MARCO = text only).
    """
    default = getattr(doc, "default_text", None)
    if callable(default):
        return _clean(default())
    return _clean(f"{getattr(doc, 'title', '') or ''} {getattr(doc, 'text', '') or ''}")


def _query_text(query) -> str:
    default = getattr(query, "default_text", None)
    if callable(default):
        return _clean(default())
    return _clean(getattr(query, "text", ""))


def _file_key(path: Path) -> str:
    """A cache key that changes when the file does."""
    st = path.stat()
    raw = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


# ----------------------------------------------------- downloads: fail fast
# ir_datasets retries a dead host 3 times with a 15 s socket timeout, per
# mirror.  Before it opens a connection we probe the host (or the proxy that
# requests would use) once with a short connect timeout and remember the
# answer, so an unreachable network fails in seconds, not minutes.
_POLICY: List[Tuple[bool, float]] = []  # (offline, connect_timeout) of the active guards
_PROBES: Dict[Tuple[str, int], Tuple[float, Optional[str]]] = {}
_PROBE_RETRY_S = 300.0
_probe_installed = False


def _reachability_problem(url: str, timeout: float) -> Optional[str]:
    requests = _irds().lazy_libs.requests()
    parts = urlsplit(url)
    try:
        proxies = requests.utils.get_environ_proxies(url)  # honours NO_PROXY
    except Exception:  # pragma: no cover - odd proxy settings: probe the host itself
        proxies = {}
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    target = urlsplit(proxy if "://" in proxy else f"http://{proxy}") if proxy else parts
    host = target.hostname
    if not host:
        return None
    port = target.port or (443 if target.scheme == "https" else 80)
    now = time.monotonic()
    cached = _PROBES.get((host, port))
    if cached is not None and (cached[1] is None or now - cached[0] < _PROBE_RETRY_S):
        return cached[1]
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        problem = None
    except OSError as exc:
        problem = f"cannot connect to {host}:{port} ({getattr(exc, 'strerror', None) or exc})"
    _PROBES[(host, port)] = (now, problem)
    return problem


def _install_download_probe() -> None:
    global _probe_installed
    if _probe_installed:
        return
    _probe_installed = True
    download = getattr(_irds().util, "download", None)
    cls = getattr(download, "RequestsDownload", None)
    original = getattr(cls, "__iter__", None)
    if original is None or getattr(original, "_fastnig_probe", False):  # other ir_datasets: its own timeouts
        return

    def __iter__(self):
        if _POLICY:  # only inside fastnig's calls; other users of ir_datasets are untouched
            offline, timeout = _POLICY[-1]
            url = getattr(self, "url", "")
            requests = _irds().lazy_libs.requests()
            if offline:
                raise requests.exceptions.ConnectionError(
                    f"offline mode ({_OFFLINE_ENV}=1 or offline=True): not downloading {url}")
            problem = _reachability_problem(url, timeout)
            if problem:
                raise requests.exceptions.ConnectionError(problem)
        yield from original(self)

    __iter__._fastnig_probe = True
    cls.__iter__ = __iter__


def _walk_downloads(obj, seen: set, found: list, depth: int = 0) -> None:
    """ir_datasets ``Download`` objects reachable from a dataset handler."""
    from ir_datasets.util.download import Download

    if depth > 10 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Download):
        found.append(obj)
        return
    if isinstance(obj, (list, tuple, set)):
        for item in obj:
            _walk_downloads(item, seen, found, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            _walk_downloads(item, seen, found, depth + 1)
    elif type(obj).__module__.startswith("ir_datasets") and hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            _walk_downloads(item, seen, found, depth + 1)


def _missing_files(handlers) -> List[Dict[str, Optional[str]]]:
    """The files ir_datasets lacks for these handlers: url, md5, target path, instructions."""
    from ir_datasets.util.download import LocalDownload

    found: list = []
    seen_objects: set = set()
    for handler in handlers:
        with contextlib.suppress(Exception):  # a hint is best effort
            _walk_downloads(handler, seen_objects, found)
    missing, seen = [], set()
    for dl in found:
        cache = getattr(dl, "_cache_path", None)
        mirrors = list(getattr(dl, "mirrors", []))
        local = [m for m in mirrors if isinstance(m, LocalDownload)]
        if (cache and os.path.exists(cache)) or any(Path(m._path).exists() for m in local):
            continue
        urls = [m.url for m in mirrors if getattr(m, "url", None) and "mirror.ir-datasets.com" not in m.url]
        notes = [_clean(m._message) for m in local
                 if getattr(m, "_message", None) and not m._message.startswith("If you have a local copy")]
        target = str(cache) if cache else (str(local[0]._path) if local else None)
        key = (target, urls[0] if urls else None)
        if key not in seen:
            seen.add(key)
            missing.append({"url": urls[0] if urls else None, "md5": getattr(dl, "expected_md5", None),
                            "target": target, "instructions": notes[0] if notes else None})
    return missing


def _hint_text(missing: List[Dict[str, Optional[str]]]) -> str:
    """'To provide it: download X and copy it to Y; ...' (at most 3 files)."""
    hints = []
    for item in missing:
        if item["instructions"]:
            note = item["instructions"]
            note = note if len(note) <= 700 else note[:697] + "..."
            where = "" if item["target"] and item["target"] in note else f" and put it at {item['target']}"
            hints.append(f"follow the provider's instructions ({note}){where}")
        elif item["url"] and item["target"]:
            md5 = f" (md5 {item['md5']})" if item["md5"] else ""
            hints.append(f"download {item['url']}{md5} on a connected machine and copy it to {item['target']}")
        elif item["url"]:
            hints.append(f"ir_datasets needs network access to {item['url']}")
    if not hints:
        return ""
    more = f" (and {len(hints) - 3} more files)" if len(hints) > 3 else ""
    return "To provide it: " + "; ".join(hints[:3]) + more + ". "


def _missing_files_hint(handlers) -> str:
    return _hint_text(_missing_files(handlers))


def _short_cause(exc: BaseException) -> str:
    if isinstance(exc, RuntimeError) and len(exc.args) == 2 and isinstance(exc.args[1], list) and exc.args[1]:
        exc = exc.args[1][0][1]  # ir_datasets: ('All download sources failed', [(mirror, error), ...])
    message = str(exc)
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None)
    if url and ("Max retries" in message or "NameResolution" in message):
        message = f"cannot reach {urlsplit(url).hostname}"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        message = f"missing file {exc.filename}"
    message = _clean(message)
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# -------------------------------------------------------------- collections
GradeMap = Callable[[int], Optional[int]]


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
        import tarfile
        import zipfile

        _install_download_probe()
        _POLICY.append((self._offline, self._connect_timeout))
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
        finally:
            _POLICY.pop()

    def _unavailable(self, component: str, exc: BaseException) -> DatasetUnavailable:
        what = f"Dataset {self.name!r}"
        if self.ir_datasets_id and self.ir_datasets_id != self.name:
            what += f" (ir_datasets id {self.ir_datasets_id!r})"
        if self.ir_datasets_id is None:
            return DatasetUnavailable(
                f"{what} is not available: reading its {component} from {self.source} failed "
                f"({_short_cause(exc)}). Check that the files exist and are readable.", exc)
        hint = _missing_files_hint(self._handlers(component))
        return DatasetUnavailable(
            f"{what} is not available: ir_datasets could not get its {component} ({_short_cause(exc)}). "
            f"{hint}ir_datasets keeps its files under IR_DATASETS_HOME (default ~/.ir_datasets), read when "
            f"ir_datasets is imported, so set it before starting Python; {_LOCAL_HINT}.", exc)

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
        licensed = [h for h in _missing_files(self._handlers("docs")) if h["instructions"] and not h["url"]]
        if licensed:
            raise DatasetUnavailable(
                f"Dataset {self.name!r}" + (f" (ir_datasets id {self.ir_datasets_id!r})"
                                            if self.ir_datasets_id != self.name else "")
                + f" is not available: its documents are licensed data that ir_datasets cannot download. "
                f"{_hint_text(licensed)}{_LOCAL_HINT[0].upper()}{_LOCAL_HINT[1:]}.")

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
                    queries[qid] = _query_text(query)
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

    @property
    def has_nonrelevant(self) -> bool:
        """Whether some qrel has grade 0 (needed to sample label 0, i.e. N_x)."""
        self.qrels()
        return any(g == 0 for docs in self._qrels.values() for g in docs.values())

    def label_counts(self, relevance_threshold: int = 1) -> Dict[str, int]:
        """Judged pairs per label: ``{"relevant": n (grade >= threshold), "non-relevant": n (grade 0)}``."""
        _check_threshold(relevance_threshold)
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
        return {did: _doc_passage(doc) for did, doc in found.items()}

    def iter_docs(self) -> Iterator[Tuple[str, str]]:
        """``(doc_id, passage)`` over the whole corpus, in corpus order (e.g. for a BM25 index)."""
        self._require_docs()
        with self._guard("docs"):
            for doc in self.dataset.docs_iter():
                yield str(doc.doc_id), _doc_passage(doc)

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
        if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 1):
            raise ValueError(f"depth must be a positive int or None, got {depth!r}")
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


# -------------------------------------------------------- local-file readers
def _local_components():
    """ir_datasets readers for local files, with the docstore kept in a cache folder.

    ir_datasets' own ``create_dataset`` writes the docstore next to the docs
    file (``<docs>.pklz4``), i.e. into the user's data folder, which may be
    shared or read-only.  These subclasses only move it.
    """
    ir_datasets = _irds()
    from ir_datasets.formats import GenericQuery, JsonlDocs, JsonlQueries, TrecQrels, TsvDocs
    from ir_datasets.indices import DEFAULT_DOCSTORE_OPTIONS, PickleLz4FullStore

    class CachedTsvDocs(TsvDocs):
        def __init__(self, dlc, docstore_path: str):
            super().__init__(dlc)
            self._docstore_path = docstore_path

        def docs_store(self, field="doc_id", options=DEFAULT_DOCSTORE_OPTIONS):
            return PickleLz4FullStore(path=self._docstore_path, init_iter_fn=self.docs_iter,
                                      data_cls=self.docs_cls(), lookup_field=field, index_fields=["doc_id"],
                                      options=options)

    def jsonl_rows(dlcs):
        for dlc in dlcs:
            path = dlc.path()
            with dlc.stream() as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        data = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}, line {number}: not JSON ({exc.msg})") from None
                    key = next((k for k in ("_id", "doc_id", "query_id", "docid", "id") if k in data), None)
                    if key is None:
                        raise ValueError(f"{path}, line {number}: no id field ('_id' in BEIR format)")
                    yield data, str(data[key])

    class LocalJsonlDocs(JsonlDocs):
        """BEIR corpus.jsonl: ``{"_id", "title", "text"}`` (title optional)."""

        def __init__(self, dlc, docstore_path: str):
            super().__init__(dlc, doc_cls=LocalDoc, docstore_path=docstore_path)

        def _iter(self):
            for data, did in jsonl_rows(self._dlcs):
                yield LocalDoc(did, str(data.get("title") or ""), str(data.get("text") or data.get("contents") or ""))

    class LocalJsonlQueries(JsonlQueries):
        """BEIR queries.jsonl: ``{"_id", "text"}``."""

        def __init__(self, dlc):
            super().__init__(dlc, query_cls=GenericQuery)

        def _iter(self):
            for data, qid in jsonl_rows(self._dlcs):
                yield GenericQuery(qid, str(data.get("text") or ""))

    class BeirTsvQrels(TrecQrels):
        """BEIR qrels/<split>.tsv: ``query-id<TAB>corpus-id<TAB>score``, header optional."""

        def __init__(self, dlc):
            super().__init__(dlc, {}, format_3col=True)

        def _qrels_internal_iter(self, dlc):
            from ir_datasets.formats import TrecQrel

            with dlc.stream() as f:
                for number, line in enumerate(f, start=1):
                    cols = line.decode("utf-8-sig").split()
                    if not cols:
                        continue
                    if len(cols) != 3:
                        raise ValueError(f"{dlc.path()}, line {number}: expected 3 columns "
                                         f"(query-id, corpus-id, score), got {len(cols)}")
                    try:
                        grade = int(cols[2])
                    except ValueError:
                        if number == 1:  # the header row
                            continue
                        raise ValueError(f"{dlc.path()}, line {number}: score {cols[2]!r} is not an integer") from None
                    yield TrecQrel(cols[0], cols[1], grade, "0")

    return ir_datasets, CachedTsvDocs, LocalJsonlDocs, LocalJsonlQueries, BeirTsvQrels


class LocalDoc(NamedTuple):
    """A document of a local BEIR corpus."""

    doc_id: str
    title: str
    text: str

    def default_text(self) -> str:
        return f"{self.title} {self.text}"


def _cache_dir(cache_dir) -> Path:
    if cache_dir is None:
        return Path(_irds().util.home_path()) / "fastnig-local"
    return Path(os.path.expanduser(os.fspath(cache_dir)))


def _docstore_path(cache_dir, docs: Path) -> str:
    folder = _cache_dir(cache_dir) / _file_key(docs)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / "docs.pklz4")


def _load_beir_folder(name: str, folder: Path, split: str, cache_dir, common: dict,
                      what: Optional[str] = None) -> Collection:
    ir_datasets, _, LocalJsonlDocs, LocalJsonlQueries, BeirTsvQrels = _local_components()
    from ir_datasets.util import LocalDownload

    what = what or f"Local BEIR folder {str(folder)!r}"
    qrels_dir = folder / "qrels"
    qrels = qrels_dir / f"{split}.tsv"
    if not qrels.is_file():
        splits = sorted(p.stem for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
        if split == "test" and len(splits) == 1:
            qrels = qrels_dir / f"{splits[0]}.tsv"
        elif splits:
            raise ValueError(f"{what} has no qrels/{split}.tsv; split must be one of {splits}")
    missing = [p.relative_to(folder).as_posix() for p in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels)
               if not p.is_file()]
    if missing:
        raise DatasetUnavailable(
            f"{what} lacks {', '.join(missing)}: a BEIR-format dataset folder holds corpus.jsonl "
            f"(one JSON object per line with _id, title, text), queries.jsonl (_id, text) and "
            f"qrels/<split>.tsv (query-id, corpus-id, score; split={split!r}). Put the files there.")
    dataset = ir_datasets.datasets.base.Dataset(
        LocalJsonlDocs(LocalDownload(folder / "corpus.jsonl", mkdir=False),
                       _docstore_path(cache_dir, folder / "corpus.jsonl")),
        LocalJsonlQueries(LocalDownload(folder / "queries.jsonl", mkdir=False)),
        BeirTsvQrels(LocalDownload(qrels, mkdir=False)),
    )
    return Collection(name, dataset, source=f"BEIR folder {folder} (qrels/{qrels.name})", **common)


def _parse_trec_spec(spec: str) -> Dict[str, str]:
    body = spec[len("trec:"):] if spec.startswith("trec:") else ""
    files: Dict[str, str] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _TREC_KEYS:
            raise ValueError(f"dataset spec {spec!r}: {item!r} is not KEY=PATH with KEY in {list(_TREC_KEYS)} "
                             "(paths containing ',' must be passed as keyword options instead)")
        files[key] = value.strip()
    return files


def _load_trec_files(name: str, files: Dict[str, str], cache_dir, common: dict) -> Collection:
    ir_datasets, CachedTsvDocs, LocalJsonlDocs, _, _ = _local_components()
    from ir_datasets.formats import TrecQrels, TrecScoredDocs, TsvQueries
    from ir_datasets.util import LocalDownload

    usage = ("give docs_tsv (doc_id<TAB>text) or docs_jsonl (BEIR corpus lines), queries_tsv "
             "(query_id<TAB>text) and qrels_trec (query_id iteration doc_id grade), e.g. "
             "'trec:docs_tsv=docs.tsv,queries_tsv=queries.tsv,qrels_trec=qrels.txt'")
    if ("docs_tsv" in files) == ("docs_jsonl" in files):
        raise ValueError(f"dataset {name!r}: give exactly one of docs_tsv / docs_jsonl; {usage}")
    for key in ("queries_tsv", "qrels_trec"):
        if key not in files:
            raise ValueError(f"dataset {name!r}: {key} is missing; {usage}")
    paths = {k: Path(os.path.expanduser(os.fspath(v))) for k, v in files.items()}
    missing = [f"{k}={p}" for k, p in paths.items() if not p.is_file()]
    if missing:
        raise DatasetUnavailable(f"Dataset {name!r} (local TREC-style files) is not available: no such file "
                                 f"{'; '.join(missing)}. Put the files there or fix the paths; {usage}.")
    if "docs_tsv" in paths:
        docs = CachedTsvDocs(LocalDownload(paths["docs_tsv"], mkdir=False),
                             _docstore_path(cache_dir, paths["docs_tsv"]))
    else:
        docs = LocalJsonlDocs(LocalDownload(paths["docs_jsonl"], mkdir=False),
                              _docstore_path(cache_dir, paths["docs_jsonl"]))
    parts = [docs, TsvQueries(LocalDownload(paths["queries_tsv"], mkdir=False)),
             TrecQrels(LocalDownload(paths["qrels_trec"], mkdir=False), {})]
    if "scoreddocs_trec" in paths:
        parts.append(TrecScoredDocs(LocalDownload(paths["scoreddocs_trec"], mkdir=False)))
    dataset = ir_datasets.datasets.base.Dataset(*parts)
    source = "TREC-style files " + ", ".join(f"{k}={p}" for k, p in paths.items())
    return Collection(name, dataset, source=source, **common)


def _cranfield_grades(policy: str) -> GradeMap:
    source_gain = {"relevant": 4, "nonrelevant": 0, "drop": None}[policy]

    def gain(code: int) -> Optional[int]:
        if code == -1:
            return source_gain
        if 1 <= code <= 5:
            return 5 - code  # Cleverdon: 1 = complete answer ... 5 = no interest (-> 0)
        raise ValueError(f"cranfield qrels: unknown relevance code {code} (expected 1-5 or -1)")

    return gain


# ------------------------------------------------------------------ loading
def _check_options(kind: str, options: dict, allowed: Tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed) - set(_COMMON_OPTIONS))
    if unknown:
        raise TypeError(f"load_collection: option(s) {unknown} do not apply to {kind}; "
                        f"its options are {sorted(set(allowed) | set(_COMMON_OPTIONS))}")


def _unknown_spec(spec: str) -> ValueError:
    ids: List[str] = []
    with contextlib.suppress(Exception):
        ids = list(_irds().registry)
    close = difflib.get_close_matches(spec, list(DATASETS) + ids, n=3, cutoff=0.6)
    maybe = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(
        f"unknown dataset {spec!r}: not an abbreviation ({', '.join(DATASETS)}), not an ir_datasets id "
        f"(e.g. 'cranfield', 'beir/nfcorpus/test'; see https://ir-datasets.com), and no folder "
        f"{os.path.abspath(os.path.expanduser(spec))} exists for a local BEIR dataset; local TREC files are "
        f"given as 'trec:docs_tsv=...,queries_tsv=...,qrels_trec=...'.{maybe}")


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
              found at ``$FASTNIG_BIOASQ`` or ``$IR_DATASETS_HOME/bioasq``.
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
        offline = os.environ.get(_OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")
    if not isinstance(offline, bool):
        raise TypeError(f"offline must be True or False, got {offline!r}")
    connect_timeout = options.pop("connect_timeout", 5.0)
    if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, (int, float)) or connect_timeout <= 0:
        raise ValueError(f"connect_timeout must be a positive number of seconds, got {connect_timeout!r}")
    common = dict(offline=offline, connect_timeout=float(connect_timeout))

    if not as_path:
        key = DATASETS.get(key, key)

    # -- local TREC-style files
    if not as_path and (key == "trec" or key.startswith("trec:")):
        _check_options("'trec' datasets", options, _TREC_KEYS + ("cache_dir",))
        files = _parse_trec_spec(key)
        for k in _TREC_KEYS:
            if k in options:
                files[k] = options.pop(k)
        collection = _load_trec_files(name, files, options.pop("cache_dir", None), common)
    # -- BioASQ: licensed, a local BEIR folder
    elif not as_path and key == "bioasq":
        _check_options("BioASQ", options, ("split", "cache_dir"))
        folder = Path(os.environ.get(_BIOASQ_ENV) or Path(_irds().util.home_path()) / "bioasq")
        if not folder.is_dir():
            raise DatasetUnavailable(
                f"Dataset {name!r} (BioASQ) is licensed data that no one can download for you: register at "
                f"http://participants-area.bioasq.org, build its BEIR-format folder (corpus.jsonl, queries.jsonl, "
                f"qrels/test.tsv) with BEIR's BioASQ instructions (https://github.com/beir-cellar/beir), and put "
                f"it at {folder} or point {_BIOASQ_ENV} to it (or pass the folder path as the dataset).")
        collection = _load_beir_folder(name, folder, options.pop("split", "test"), options.pop("cache_dir", None),
                                       common, what=f"BioASQ folder {str(folder)!r}")
    else:
        collection = None
        if not as_path:
            ir_datasets = _irds()
            try:
                dataset = ir_datasets.load(key)
            except KeyError:
                dataset = None
            if dataset is not None:
                is_cranfield = key == "cranfield"
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
                collection = Collection(name, dataset, source=f"ir_datasets {key!r}", ir_datasets_id=key,
                                        **extra, **common)
        if collection is None:
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
            collection = _load_beir_folder(name, folder, options.pop("split", "test"),
                                           options.pop("cache_dir", None), common)
    if options:  # pragma: no cover - every branch pops what it allows
        raise TypeError(f"load_collection: unexpected option(s) {sorted(options)}")
    # Read the (small) queries and qrels now: an unavailable dataset fails here, not mid-run.
    collection._check_licensed_docs()
    collection.queries()
    collection.qrels()
    return collection


# ----------------------------------------------------------------- sampling
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


def _check_threshold(relevance_threshold) -> None:
    if isinstance(relevance_threshold, bool) or not isinstance(relevance_threshold, int) or relevance_threshold < 1:
        raise ValueError(f"relevance_threshold must be an int >= 1 (grade 0 means non-relevant), "
                         f"got {relevance_threshold!r}")


def _sample_key(seed: int, qid: str, did: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x1f{qid}\x1f{did}".encode(), digest_size=8).digest()


NEGATIVES = ("judged", "unjudged")


def _unjudged_candidates(collection: Collection, qrels, relevance_threshold: int, seed: int, per_query: int):
    """(qid, doc_id, 0) for up to ``per_query`` random unjudged documents of each query with a relevant doc."""
    import random

    doc_ids = sorted(did for did, _ in collection.iter_docs())
    out = []
    for qid in sorted(qrels):
        judged = qrels[qid]
        if not any(g >= relevance_threshold for g in judged.values()):
            continue
        rng = random.Random(_sample_key(seed, qid, ""))
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
    are never used as negatives (SPEC §6), and grades between 0 and the
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
        negatives: for label 0, ``"judged"`` (default, SPEC §6: qrel grade 0
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
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs must be an int >= 1, got {num_pairs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    _check_threshold(relevance_threshold)
    if max_per_query is not None and (isinstance(max_per_query, bool) or not isinstance(max_per_query, int)
                                      or max_per_query < 1):
        raise ValueError(f"max_per_query must be an int >= 1 or None, got {max_per_query!r}")

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
                f"non-relevant. SPEC §6 leaves such datasets out of the non-relevant schemes (N_x); check "
                f"Collection.has_nonrelevant and sample label 1 only, or pass negatives='unjudged' to use "
                f"random unjudged documents as non-relevant.")
        raise MissingJudgments(
            f"dataset {collection.name!r} has no qrel with grade >= {relevance_threshold} (its grades are "
            f"{grades}); lower relevance_threshold.")
    no_text = sorted({qid for qid, _, _ in candidates if not queries.get(qid)})
    if no_text:
        warnings.warn(f"{collection.name}: {len(no_text)} judged queries have no query text "
                      f"(e.g. {no_text[:3]}); their pairs are skipped", stacklevel=2)
        candidates = [c for c in candidates if queries.get(c[0])]
    candidates.sort(key=lambda c: (_sample_key(seed, c[0], c[1]), c[0], c[1]))

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


# ------------------------------------------------------- agreement filter
def filter_agreeing(model, tokenizer, pairs: Iterable[LabelledPair], *, batch_size: int = 32,
                    max_length: int = 512, device=None, progress: bool = True
                    ) -> Tuple[List[LabelledPair], Dict[str, Any]]:
    """Keep the pairs whose model prediction agrees with their label (SPEC §6).

    A pair agrees when P(relevant) > 0.5 for label 1 and < 0.5 for label 0
    (exactly 0.5 agrees with neither).  P(relevant) comes from
    :func:`fastnig.relevance_probability` of the model's logits (1 or 2), on
    the pair encoding of :func:`fastnig.attribution.encode_pairs`
    (``truncation="only_second"``), i.e. the input the attribution sees.

    Args:
        model: a Hugging Face sequence-classification cross-encoder.
        tokenizer: its fast tokenizer.
        pairs: :class:`LabelledPair` objects, any labels.
        batch_size: pairs per forward pass.
        max_length: tokens of the pair encoding.
        device: where to run; ``None`` = the model's device (the model is moved
            there otherwise, as :func:`fastnig.attribute` does).
        progress: show a tqdm bar over pairs.

    Returns:
        ``(kept, report)``: the agreeing pairs in input order, and a
        JSON-serialisable dict with ``total``, ``kept``, ``dropped``,
        ``by_label`` (``{"relevant"|"non-relevant": {total, kept, dropped}}``),
        ``p_relevant`` (P(relevant) of every input pair, in input order) and
        ``dropped_pairs`` (``[query_id, doc_id]`` of the dropped ones).
    """
    import torch
    from tqdm.auto import tqdm

    from .attribution import encode_pairs, relevance_probability

    pairs = list(pairs)
    for i, pair in enumerate(pairs):
        if not isinstance(pair, LabelledPair):
            raise TypeError(f"pairs[{i}] must be a fastnig.data.LabelledPair, got {type(pair).__name__}")
        if pair.label not in (0, 1):
            raise ValueError(f"pairs[{i}].label must be 0 or 1, got {pair.label!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch nn.Module (a Hugging Face cross-encoder), got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
        raise ValueError(f"max_length must be an int >= 8 (tokens), got {max_length!r}")
    if device is not None:
        model.to(device)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    import inspect

    accepts_types = ("token_type_ids" in inspect.signature(model.forward).parameters
                     and "token_type_ids" in getattr(tokenizer, "model_input_names", ()))

    probabilities: List[float] = []
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(pairs), desc="agreement filter", unit="pair", disable=not progress)
    try:
        with torch.inference_mode():
            for start in range(0, len(pairs), batch_size):
                batch = pairs[start:start + batch_size]
                enc = encode_pairs(tokenizer, [p.text_pair for p in batch], max_length, "zero", accepts_types)
                inputs = {"input_ids": enc.input_ids.to(device), "attention_mask": enc.attention_mask.to(device)}
                if enc.token_type_ids is not None:
                    inputs["token_type_ids"] = enc.token_type_ids.to(device)
                out = model(**inputs)
                logits = out.logits if hasattr(out, "logits") else out[0]
                probabilities += relevance_probability(logits).float().cpu().tolist()
                bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)

    kept: List[LabelledPair] = []
    dropped: List[List[str]] = []
    by_label = {name: {"total": 0, "kept": 0, "dropped": 0} for name in ("relevant", "non-relevant")}
    for pair, p in zip(pairs, probabilities):
        counts = by_label["relevant" if pair.label == 1 else "non-relevant"]
        counts["total"] += 1
        if (p > 0.5) if pair.label == 1 else (p < 0.5):
            kept.append(pair)
            counts["kept"] += 1
        else:
            dropped.append([pair.query_id, pair.doc_id])
            counts["dropped"] += 1
    report = {"total": len(pairs), "kept": len(kept), "dropped": len(dropped), "by_label": by_label,
              "p_relevant": probabilities, "dropped_pairs": dropped}
    return kept, report
