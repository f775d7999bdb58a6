"""Local data read with ir_datasets' own format readers: BEIR folders and TREC-style files.

Owns: the BEIR folder layout (``corpus.jsonl``, ``queries.jsonl``,
``qrels/<split>.tsv``) and the TREC-style files (``docs_tsv`` / ``docs_jsonl``,
``queries_tsv``, ``qrels_trec``, ``scoreddocs_trec``), their checks and
messages, and where the docstore of a local corpus is kept (a cache folder,
never next to the user's data).

Must not: resolve abbreviations or ir_datasets ids (:mod:`.loading` does),
download anything, or import ir_datasets at module level (it is imported
lazily, when local data is read).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, NamedTuple, Optional

from .collection import Collection
from .network import irds
from .records import DatasetUnavailable

#: The keys of a ``"trec:KEY=PATH,..."`` spec (and of ``load_collection("trec", KEY=PATH)``).
TREC_KEYS = ("docs_tsv", "docs_jsonl", "queries_tsv", "qrels_trec", "scoreddocs_trec")


class LocalDoc(NamedTuple):
    """A document of a local BEIR corpus."""

    doc_id: str
    title: str
    text: str

    def default_text(self) -> str:
        return f"{self.title} {self.text}"


def _local_components():
    """ir_datasets readers for local files, with the docstore kept in a cache folder.

    ir_datasets' own ``create_dataset`` writes the docstore next to the docs
    file (``<docs>.pklz4``), i.e. into the user's data folder, which may be
    shared or read-only.  These subclasses only move it.
    """
    ir_datasets = irds()
    from ir_datasets.formats import GenericQuery, JsonlDocs, JsonlQueries, TrecQrel, TrecQrels, TsvDocs
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


def _file_key(path: Path) -> str:
    """A cache key that changes when the file does."""
    st = path.stat()
    raw = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def _cache_dir(cache_dir) -> Path:
    if cache_dir is None:
        return Path(irds().util.home_path()) / "fastnig-local"
    return Path(os.path.expanduser(os.fspath(cache_dir)))


def _docstore_path(cache_dir, docs: Path) -> str:
    folder = _cache_dir(cache_dir) / _file_key(docs)
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / "docs.pklz4")


def load_beir_folder(name: str, folder: Path, split: str, cache_dir, common: dict,
                     what: Optional[str] = None) -> Collection:
    """A BEIR-format folder as a :class:`Collection` (``common``: the collection's download options)."""
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


def parse_trec_spec(spec: str) -> Dict[str, str]:
    """``"trec:KEY=PATH,..."`` -> ``{KEY: PATH}`` (``{}`` for plain ``"trec"``)."""
    body = spec[len("trec:"):] if spec.startswith("trec:") else ""
    files: Dict[str, str] = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in TREC_KEYS:
            raise ValueError(f"dataset spec {spec!r}: {item!r} is not KEY=PATH with KEY in {list(TREC_KEYS)} "
                             "(paths containing ',' must be passed as keyword options instead)")
        files[key] = value.strip()
    return files


def load_trec_files(name: str, files: Dict[str, str], cache_dir, common: dict) -> Collection:
    """TREC-style files (keys of :data:`TREC_KEYS`) as a :class:`Collection`."""
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
