"""What the data stage hands out: :class:`LabelledPair`, its two errors, and passage text.

Owns: the judged-pair record (:class:`LabelledPair`), the errors
:class:`DatasetUnavailable` and :class:`MissingJudgments`, and how an
ir_datasets document or query becomes the text the cross-encoder sees
(:func:`clean_text`, :func:`doc_passage`, :func:`query_text`).

Must not: import ir_datasets, read files, touch the network or run a model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple


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


@dataclass(frozen=True)
class LabelledPair:
    """One judged (query, passage) pair.

    Attributes:
        query_id, doc_id: ids as in the collection (Cranfield: query ids are
            qrels positions, see :func:`fastnig.data.load_collection`).
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


def clean_text(text: Optional[str]) -> str:
    """Whitespace runs (newlines, tabs, CRs) -> one space; stripped."""
    return " ".join((text or "").split())


def doc_passage(doc) -> str:
    """title + text of an ir_datasets doc, as the cross-encoder should see it.

    ``default_text()`` is ir_datasets' own "title + body" for each format
    (BEIR, Cranfield, WaPo, TREC disks, MS MARCO = text only).
    """
    default = getattr(doc, "default_text", None)
    if callable(default):
        return clean_text(default())
    return clean_text(f"{getattr(doc, 'title', '') or ''} {getattr(doc, 'text', '') or ''}")


def query_text(query) -> str:
    """The query's default text (e.g. the TREC title), whitespace collapsed."""
    default = getattr(query, "default_text", None)
    if callable(default):
        return clean_text(default())
    return clean_text(getattr(query, "text", ""))
