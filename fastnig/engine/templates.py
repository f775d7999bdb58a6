"""A (query, passage) pair laid out by a prompt template, with the segment of every token.

Owns: checking templates (:func:`check_template`), tokenising a pair through one
(:func:`tokenize_template`: the whole prompt at once, so the tokenizer sees what
the model saw in training; passage truncated first), and finding the single
vocabulary id of an answer word (:func:`word_id`).  Generative rerankers
(monoT5, yes/no LLM rerankers) and decoder classifiers read their pairs through
here; the paper's cross-encoders keep the tokenizer's own pair encoding
(:mod:`fastnig.engine.encoding`).

Segments are found from the fast tokenizer's character offsets: a token whose
characters overlap the query is a query token (0), the passage a passage token
(1), anything else — the template's words, special tokens added by the
tokenizer — structure (2).

Must not: run a model, know about path integrals, datasets or files.
"""
from __future__ import annotations

import string
from typing import List, Tuple

MAX_TRUNCATION_ROUNDS = 8


def check_template(template: str, what: str = "template") -> str:
    """``template`` if it is a string with ``{query}`` and ``{passage}`` once each and no other field."""
    if not isinstance(template, str):
        raise TypeError(f"{what} must be a string with {{query}} and {{passage}}, got {type(template).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"{what} {template!r} is not a valid format string ({exc}); write literal braces as "
                         "{{ and }}") from None
    for name in ("query", "passage"):
        if fields.count(name) != 1:
            raise ValueError(f"{what} must contain {{{name}}} exactly once, got {template!r}")
    other = sorted(set(fields) - {"query", "passage"})
    if other:
        raise ValueError(f"{what} has fields {other}; only {{query}} and {{passage}} are filled in "
                         "(write literal braces as {{ and }})")
    return template


def _fill(template: str, query: str, passage: str) -> Tuple[str, Tuple[int, int], Tuple[int, int]]:
    """The prompt text and the character spans ``[start, stop)`` of the query and of the passage in it."""
    text, spans = "", {}
    for literal, field, _, _ in string.Formatter().parse(template):
        text += literal
        if field is not None:
            value = query if field == "query" else passage
            spans[field] = (len(text), len(text) + len(value))
            text += value
    return text, spans["query"], spans["passage"]


def _overlaps(token: Tuple[int, int], span: Tuple[int, int]) -> bool:
    return token[1] > token[0] and token[0] < span[1] and span[0] < token[1]


def _encode(tokenizer, template: str, query: str, passage: str):
    text, q_span, p_span = _fill(template, query, passage)
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True, truncation=False)
    ids = list(enc["input_ids"])
    segments = []
    for offset in enc["offset_mapping"]:
        offset = tuple(offset)
        segments.append(0 if _overlaps(offset, q_span) else 1 if _overlaps(offset, p_span) else 2)
    return ids, segments, [tuple(o) for o in enc["offset_mapping"]], q_span, p_span


def _shorten(text: str, span: Tuple[int, int], offsets, segments, segment: int, excess: int) -> str:
    """``text``'s part in ``span`` (the query or the passage) without its last ``excess`` tokens."""
    mine = [offsets[i] for i, s in enumerate(segments) if s == segment]
    if not mine:
        return text[span[0]:span[1]]
    keep = max(0, len(mine) - excess)
    if keep == 0:
        return ""
    end = max(mine[keep - 1][1], span[0])
    return text[span[0]:end].rstrip()


def tokenize_template(tokenizer, template: str, query: str, passage: str, max_length: int
                      ) -> Tuple[List[int], List[int]]:
    """Token ids of ``template`` filled with the pair, and each token's segment (0 query, 1 passage, 2 structure).

    The whole prompt is tokenised at once (with the tokenizer's special tokens,
    e.g. T5's ``</s>``, Llama's ``<s>``).  Longer than ``max_length``: the passage
    loses tokens from its end first, then the query; a template that alone
    exceeds ``max_length`` is a ``ValueError``.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("tokenizer must be a fast (Rust) Hugging Face tokenizer: fastnig needs its character "
                        "offsets to tell query, passage and template tokens apart")
    for _ in range(MAX_TRUNCATION_ROUNDS):
        ids, segments, offsets, q_span, p_span = _encode(tokenizer, template, query, passage)
        excess = len(ids) - max_length
        if excess <= 0:
            return ids, segments
        text, _, _ = _fill(template, query, passage)
        if passage:
            passage = _shorten(text, p_span, offsets, segments, 1, excess)
        elif query:
            query = _shorten(text, q_span, offsets, segments, 0, excess)
        else:
            raise ValueError(f"max_length={max_length} tokens: the template alone takes {len(ids)} tokens; "
                             "raise max_length or shorten the template")
    raise ValueError(f"could not truncate the pair to max_length={max_length} tokens with this template")


def word_id(tokenizer, word: str, what: str) -> int:
    """The one vocabulary id of an answer ``word`` (e.g. ``"true"``, ``"yes"``).

    Tried in order: the word encoded alone as a single token (SentencePiece
    gives monoT5's ``▁true``), then the word as a token of the vocabulary
    (Qwen3-Reranker's ``convert_tokens_to_ids("yes")``).  A word that is
    neither is a ``ValueError`` naming the argument.
    """
    if not isinstance(word, str) or not word:
        raise ValueError(f"{what} must be a non-empty word, got {word!r}")
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
        return int(ids[0])
    token = tokenizer.convert_tokens_to_ids(word)
    if isinstance(token, int) and token != tokenizer.unk_token_id and token >= 0:
        return token
    raise ValueError(f"{what}={word!r} is not one token of the model's vocabulary (it encodes to {len(ids)} "
                     "token(s), or to the unknown token); give a word that is a single vocabulary entry")
