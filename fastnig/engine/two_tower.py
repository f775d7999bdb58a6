"""Two-tower rankers: dense bi-encoders, SPLADE and ColBERT (docs/rankers.md "Two-tower rankers").

In all three the score is a function of *two* encodings, of the query and of the
passage, usually by the same weights.  fastnig lays a pair out as ONE row, the
query tower's tokens followed by the document tower's (``token_type_ids`` holds
the tower of each token: 0 query, 1 document, 2 a query token the query tower
does not attend to, ColBERT's [MASK] padding), so that the path, its baselines,
chunks, out-of-memory redo, Richardson and ``steps="auto"`` are the engine's,
unchanged: :meth:`BoundTwoTower.logits` splits each path row back into the
query part and the document part and runs the tower(s) on each, with its own
attention mask and positions.  A shared tower's Linears therefore run twice per
forward; the hooks attribute every call with its own tokens and sum the calls
(:class:`fastnig.engine.attribute._HookState`, :attr:`EncodedPairs.towers`).

* :class:`BiEncoder` — a transformers encoder (``BertModel``, ...), pooling
  ``cls`` / ``mean``, similarity ``dot`` / ``cosine``; one shared tower, or two
  separate ones passed as ``model=(query_encoder, document_encoder)``
  (:class:`TwoTowers`).
* :class:`Splade` — ``*ForMaskedLM``: w = max over real tokens of
  log(1 + relu(logits)) per vocabulary term; F = w_q · w_d.  The vocabulary
  projection's units (terms) are attributed with ``include_vocabulary=True``.
* :class:`ColBERT` — an encoder with a ``linear`` projection (colbert-ai's
  ``HF_ColBERT``): L2-normalised token vectors, F = Σ over query tokens of the
  max over document tokens of the dot product; ``[Q]`` / ``[D]`` markers, the
  query padded with [MASK] to ``query_length``.

The score is returned as ``[batch, 1]``: F = +score for "relevant", −score for
"non-relevant" (``output="logit"``; a score has no probability, docs/method.md §2).

Must not: know about path integrals, datasets, neuron sets or files.
"""
from __future__ import annotations

import string
import weakref
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .encoding import EncodedPairs, Pair
from .model import input_embeddings, resolve_max_length
from .rankers import BoundRanker, Ranker, register

POOLINGS = ("cls", "mean")
SIMILARITIES = ("dot", "cosine")
QUERY, DOCUMENT, QUERY_UNATTENDED, DOCUMENT_UNSCORED = 0, 1, 2, 3
"""Tower ids of a row's tokens (its ``token_type_ids``): a query token, a document token, a query token the
query tower does not attend to (ColBERT's [MASK] padding), a document token left out of ColBERT's max
(punctuation)."""
_IN_DOCUMENT = (DOCUMENT, DOCUMENT_UNSCORED)
_SENTENCE_TRANSFORMERS: "weakref.WeakKeyDictionary[nn.Module, Dict[str, str]]" = weakref.WeakKeyDictionary()


class TwoTowers(nn.Module):
    """Separate query and document encoders as one module: their Linears are named ``query.*`` and
    ``document.*``; the word embeddings of both share one input row (document ids offset by the
    query vocabulary, :class:`_TowerEmbeddings`)."""

    is_two_towers = True

    def __init__(self, query: nn.Module, document: nn.Module):
        super().__init__()
        self.query, self.document = query, document
        dims = {input_embeddings(m).weight.shape[1] for m in (query, document)}
        if len(dims) != 1:
            raise ValueError(f"the two towers' word embeddings differ in width {sorted(dims)}: fastnig interpolates "
                             "both inputs on one path and needs one embedding width")

    @property
    def config(self):
        return getattr(self.query, "config", None)

    def get_input_embeddings(self) -> nn.Module:
        return input_embeddings(self.query)


class _TowerEmbeddings(nn.Module):
    """Word embeddings of a :class:`TwoTowers` row: ids below ``offset`` are the query encoder's, the
    others the document encoder's (id − offset)."""

    def __init__(self, query: nn.Module, document: nn.Module):
        super().__init__()
        self.query, self.document, self.offset = query, document, query.weight.shape[0]

    @property
    def weight(self) -> torch.Tensor:  # device, dtype and width, as the engine reads them
        return self.query.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        doc = ids >= self.offset
        q = self.query(ids.masked_fill(doc, 0))
        d = self.document((ids - self.offset).masked_fill(~doc, 0))
        return torch.where(doc.unsqueeze(-1), d, q)


def sentence_transformer_parts(model) -> Optional[Tuple[nn.Module, object, Dict[str, str]]]:
    """``(transformers model, tokenizer, {pooling, similarity})`` of a ``sentence_transformers.SentenceTransformer``
    (its Pooling and Normalize modules), or ``None`` for anything else.  The options are remembered for the
    transformers model, so that :class:`BiEncoder` defaults to them."""
    if not any(c.__name__ == "SentenceTransformer" and c.__module__.startswith("sentence_transformers")
               for c in type(model).__mro__):
        return None
    first = model[0]
    inner = getattr(first, "auto_model", None) or getattr(first, "model", None)
    options = {"pooling": "cls", "similarity": "dot"}
    for module in list(model)[1:]:
        mode = getattr(module, "pooling_mode", None)
        if mode is None and hasattr(module, "get_pooling_mode_str"):
            mode = module.get_pooling_mode_str()
        if mode is not None:
            if mode not in POOLINGS:
                raise ValueError(f"the SentenceTransformer pools with {mode!r}; fastnig's BiEncoder supports "
                                 f"{POOLINGS}")
            options["pooling"] = mode
        elif type(module).__name__ == "Normalize":
            options["similarity"] = "cosine"
        elif type(module).__name__ != "Pooling":
            raise ValueError(f"the SentenceTransformer has a {type(module).__name__} module after pooling; fastnig's "
                             "BiEncoder supports Transformer + Pooling (+ Normalize)")
    _SENTENCE_TRANSFORMERS[inner] = options
    return inner, getattr(first, "tokenizer", None), options


# ----------------------------------------------------------------- the rankers
class TwoTowerRanker(Ranker):
    """A ranker whose score compares two encodings (no template: each tower reads its own text)."""

    family: ClassVar[str] = ""

    def __init__(self, padding_side: Optional[str] = None):
        super().__init__(None, padding_side)

    def options(self) -> Dict[str, object]:
        return {}

    def words(self) -> Dict[str, object]:  # what a run config's ranker mapping may set
        return self.options()

    def describe(self) -> Dict[str, object]:
        return {"family": self.family, **self.options()}


class BiEncoder(TwoTowerRanker):
    """A dense bi-encoder: ``pooling`` ``"cls"`` / ``"mean"`` and ``similarity`` ``"dot"`` / ``"cosine"``
    (``None``: a SentenceTransformer's own, else ``"cls"`` and ``"dot"``)."""

    family = "bi_encoder"

    def __init__(self, pooling: Optional[str] = None, similarity: Optional[str] = None,
                 padding_side: Optional[str] = None):
        super().__init__(padding_side)
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if similarity is not None and similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.pooling, self.similarity = pooling, similarity

    def options(self):
        return {"pooling": self.pooling, "similarity": self.similarity}

    def supports(self, model) -> bool:
        if isinstance(model, TwoTowers):
            return True
        config = getattr(model, "config", None)
        return (type(model).__name__.endswith("Model") and not getattr(config, "is_encoder_decoder", False)
                and not isinstance(getattr(model, "layers", None), nn.ModuleList))

    def _bound(self, model, tokenizer):
        return BoundBiEncoder(self, model, tokenizer)


class Splade(TwoTowerRanker):
    """SPLADE (``*ForMaskedLM``): w = max over tokens of log(1 + relu(logits)); F = w_q · w_d."""

    family = "splade"

    def supports(self, model) -> bool:
        return type(model).__name__.endswith("ForMaskedLM") and isinstance(model.get_output_embeddings(), nn.Linear)

    def _bound(self, model, tokenizer):
        return BoundSplade(self, model, tokenizer)


class ColBERT(TwoTowerRanker):
    """ColBERT: an encoder and its ``linear`` projection; normalised token vectors, F = Σ_q max_d q · d.

    Args:
        query_length: query tokens, [MASK]-padded up to it (colbert-ai's ``query_maxlen``, 32).
        document_length: at most this many document tokens (``doc_maxlen``, 180; and at most ``max_length``).
        query_marker, document_marker: the ``[Q]`` / ``[D]`` tokens put after [CLS] (colbert-ai:
            ``[unused0]`` / ``[unused1]``); ``None`` = none.
        attend_to_mask_tokens: whether the query attends to its [MASK] padding (colbert-ai: False).
        mask_punctuation: leave punctuation tokens out of the document's max (colbert-ai: True).
    """

    family = "colbert"

    def __init__(self, query_length: int = 32, document_length: int = 180, query_marker: Optional[str] = "[unused0]",
                 document_marker: Optional[str] = "[unused1]", attend_to_mask_tokens: bool = False,
                 mask_punctuation: bool = True, padding_side: Optional[str] = None):
        super().__init__(padding_side)
        for name, value in (("query_length", query_length), ("document_length", document_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 4:
                raise ValueError(f"{name} must be an integer >= 4, got {value!r}")
        self.query_length, self.document_length = query_length, document_length
        self.query_marker, self.document_marker = query_marker, document_marker
        self.attend_to_mask_tokens, self.mask_punctuation = bool(attend_to_mask_tokens), bool(mask_punctuation)

    def options(self):
        return {"query_length": self.query_length, "document_length": self.document_length,
                "query_marker": self.query_marker, "document_marker": self.document_marker,
                "attend_to_mask_tokens": self.attend_to_mask_tokens, "mask_punctuation": self.mask_punctuation}

    def supports(self, model) -> bool:
        base = getattr(model, "base_model", None)
        return isinstance(getattr(model, "linear", None), nn.Linear) and base is not None and base is not model

    def _bound(self, model, tokenizer):
        return BoundColBERT(self, model, tokenizer)


# ---------------------------------------------------------- bound to a model
def _gather(x: torch.Tensor, select: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selected tokens of each row moved to its front: ``(x [B, L, ...], valid [B, L], index [B, L])``,
    L = the most selected in a row (order kept)."""
    B, T = select.shape
    positions = torch.arange(T, device=select.device).expand(B, T)
    order = torch.where(select, positions, positions + T).argsort(dim=1)
    counts = select.sum(dim=1)
    width = max(int(counts.max()), 1)
    index = order[:, :width]
    valid = torch.arange(width, device=select.device)[None, :] < counts[:, None]
    picked = x.gather(1, index.view(B, width, *([1] * (x.dim() - 2))).expand(B, width, *x.shape[2:]))
    return picked, valid, index


class BoundTwoTower(BoundRanker):
    """The layout and forward every two-tower ranker shares (see the module docstring)."""

    uses_template = False
    score_only: ClassVar[bool] = True  # F = ±score (output="logit"): no probability

    def __init__(self, ranker, model, tokenizer):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("tokenizer must be a fast (Rust) Hugging Face tokenizer")
        super().__init__(ranker, model, tokenizer)
        self.separate = isinstance(model, TwoTowers)
        if self.separate:
            self.embeddings = _TowerEmbeddings(input_embeddings(model.query), input_embeddings(model.document))
        self._tower: Optional[int] = None

    # the towers
    def towers(self) -> Tuple[nn.Module, nn.Module]:
        return (self.model.query, self.model.document) if self.separate else (self.model, self.model)

    def current_tower(self) -> Optional[int]:
        """The tower running now (0 query, 1 document; ``None`` outside one): read by the engine's hooks."""
        return self._tower

    def encode_tower(self, tower: int, embeds: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The tower's per-token output for ``embeds`` ``[B, L, D]`` (right-padded, ``attention`` ``[B, L]``)."""
        module = self.towers()[tower]
        self._tower = tower
        try:
            return self.tower_output(module, embeds, attention)
        finally:
            self._tower = None

    def tower_output(self, module: nn.Module, embeds: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return module(inputs_embeds=embeds, attention_mask=attention.long()).last_hidden_state

    def heads(self) -> List[nn.Module]:
        return []

    def max_length(self, max_length):
        """Tokens per tower: as for a cross-encoder's pair (:func:`resolve_max_length`), for each text."""
        return min(resolve_max_length(t, self.tokenizer, max_length) for t in self.towers())

    # the tokens
    def tower_tokens(self, text: str, tower: int, max_length: int) -> Tuple[List[int], List[int], List[int]]:
        """``(ids, special mask, tower ids)`` of one text in one tower."""
        enc = self.tokenizer(text, truncation=True, max_length=max_length, return_special_tokens_mask=True)
        ids = list(enc["input_ids"])
        return ids, list(enc["special_tokens_mask"]), [tower] * len(ids)

    def pair_tokens(self, pair: Pair, max_length: int) -> Tuple[List[int], List[int], List[int]]:
        """The pair's row: query tower's tokens, then the document tower's (ids offset for separate towers)."""
        q_ids, q_special, q_towers = self.tower_tokens(pair[0], QUERY, max_length)
        d_ids, d_special, d_towers = self.tower_tokens(pair[1] or "", DOCUMENT, max_length)
        if self.separate:
            d_ids = [i + self.embeddings.offset for i in d_ids]
        return q_ids + d_ids, q_special + d_special, q_towers + d_towers

    def rows(self, pairs: Sequence[Pair], max_length: int) -> List[Dict[str, List[int]]]:
        out = []
        for pair in pairs:
            ids, _, towers = self.pair_tokens(pair, max_length)
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "token_type_ids": towers})
        return out

    def encode(self, pairs: Sequence[Pair], max_length: int, baseline: str) -> EncodedPairs:
        """The pairs' rows, right-padded; the baseline replaces the non-special tokens of both towers
        (``*-query``: the query tower's); per tower, the real tokens and segment ids of its outputs
        (segment = tower: 0 query, 1 passage)."""
        pad = self.tokenizer.pad_token_id
        if baseline.startswith("pad") and pad is None:
            raise ValueError(f"baseline={baseline!r} needs a [PAD] token but the tokenizer has none; use 'zero'")
        rows = [self.pair_tokens(p, max_length) for p in pairs]
        P, T = len(rows), max(len(ids) for ids, _, _ in rows)
        fill = pad if pad is not None else 0
        input_ids = torch.full((P, T), fill, dtype=torch.long)
        attention = torch.zeros((P, T), dtype=torch.long)
        towers = torch.zeros((P, T), dtype=torch.long)
        special = torch.ones((P, T), dtype=torch.bool)
        for i, (ids, spec, tow) in enumerate(rows):
            n = len(ids)
            input_ids[i, :n], attention[i, :n] = torch.tensor(ids), 1
            special[i, :n], towers[i, :n] = torch.tensor(spec, dtype=torch.bool), torch.tensor(tow)
        real = attention.bool()
        in_document = real & ((towers == DOCUMENT) | (towers == DOCUMENT_UNSCORED))
        in_query = real & ~in_document
        replace = real & ~special & (in_query if baseline.endswith("query") else real)
        segments = torch.where(real, in_document.long(), torch.full_like(towers, -1))
        baseline_ids = None
        if baseline.startswith("pad"):
            pad_ids = torch.full_like(input_ids, fill)
            if self.separate:
                pad_ids = torch.where(in_document, pad_ids + self.embeddings.offset, pad_ids)
            baseline_ids = torch.where(replace, pad_ids, input_ids)
        per_tower = []
        for tower, select in ((QUERY, in_query), (DOCUMENT, in_document)):
            counts = select.sum(dim=1)
            width = max(int(counts.max()), 1)
            ids = torch.where(torch.arange(width)[None, :] < counts[:, None], tower, -1)
            per_tower.append((counts, ids))
        return EncodedPairs(input_ids, attention, towers, replace, attention.sum(dim=1), segments,
                            read_segment=None, towers=per_tower, baseline_ids=baseline_ids)

    # the score
    def split(self, inputs_embeds, attention_mask, token_type_ids):
        """Per tower ``(embeds [B, L, D], valid [B, L], kind [B, L])`` of the rows (kind: the tower ids)."""
        if token_type_ids is None:
            raise ValueError("a two-tower row needs its tower ids (token_type_ids); encode it with this ranker")
        real = attention_mask.bool()
        document = (token_type_ids == DOCUMENT) | (token_type_ids == DOCUMENT_UNSCORED)
        parts = []
        for select in (real & ~document, real & document):
            embeds, valid, index = _gather(inputs_embeds, select)
            parts.append((embeds, valid, token_type_ids.gather(1, index)))
        return parts

    def logits(self, inputs_embeds, attention_mask, token_type_ids=None, cut=True):
        """``[batch, 1]``: the score of each row (query part and document part, each through its tower)."""
        (qe, qv, qk), (de, dv, dk) = self.split(inputs_embeds, attention_mask, token_type_ids)
        qa, da = qv & (qk != QUERY_UNATTENDED), dv
        q = self.encode_tower(QUERY, qe, qa)
        d = self.encode_tower(DOCUMENT, de, da)
        return self.score(q, qa, d, da, dv & (dk != DOCUMENT_UNSCORED), qv).float().unsqueeze(1)

    def score(self, q, q_attended, d, d_attended, d_scored, q_valid) -> torch.Tensor:
        """``[B]`` score from the towers' outputs ``[B, L, ...]`` and their masks."""
        raise NotImplementedError

    def score_logits(self, batch):
        return self.logits(self.embeddings(batch["input_ids"]), batch["attention_mask"], batch.get("token_type_ids"))


class BoundBiEncoder(BoundTwoTower):
    def __init__(self, ranker: BiEncoder, model, tokenizer):
        super().__init__(ranker, model, tokenizer)
        remembered = _SENTENCE_TRANSFORMERS.get(model, {})
        self.pooling = ranker.pooling or remembered.get("pooling", "cls")
        self.similarity = ranker.similarity or remembered.get("similarity", "dot")
        self.ranker = BiEncoder(self.pooling, self.similarity, ranker.padding_side)  # what a result records

    def pool(self, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return h[:, 0]
        weight = attended.to(h.dtype).unsqueeze(-1)
        return (h * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1e-9)

    def score(self, q, q_attended, d, d_attended, d_scored, q_valid):
        eq, ed = self.pool(q, q_attended), self.pool(d, d_attended)
        if self.similarity == "cosine":
            eq, ed = nn.functional.normalize(eq, dim=-1), nn.functional.normalize(ed, dim=-1)
        return (eq * ed).sum(dim=-1)


class BoundSplade(BoundTwoTower):
    def heads(self):
        return [self.model.get_output_embeddings()]

    def token_heads(self) -> Dict[str, nn.Linear]:
        """Linears outside the encoder that run on every token (the memory model counts them)."""
        return self.vocabulary_modules()

    def vocabulary_modules(self) -> Dict[str, nn.Linear]:
        """The vocabulary projection, whose output units are terms (``include_vocabulary=True``)."""
        head = self.model.get_output_embeddings()
        return {n: m for n, m in self.model.named_modules() if m is head}

    def tower_output(self, module, embeds, attention):
        return module(inputs_embeds=embeds, attention_mask=attention.long()).logits

    def weights(self, logits: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """``[B, vocab]`` max over attended tokens of log(1 + relu(logits))."""
        w = torch.log1p(torch.relu(logits.float())) * attended.unsqueeze(-1).float()
        return w.max(dim=1).values

    def score(self, q, q_attended, d, d_attended, d_scored, q_valid):
        return (self.weights(q, q_attended) * self.weights(d, d_attended)).sum(dim=-1)


_PUNCTUATION = set(string.punctuation)


class BoundColBERT(BoundTwoTower):
    def __init__(self, ranker: ColBERT, model, tokenizer):
        super().__init__(ranker, model, tokenizer)
        self.markers = [self._marker(ranker.query_marker), self._marker(ranker.document_marker)]
        vocab = tokenizer.get_vocab()
        self.skip = {vocab[p] for p in _PUNCTUATION if p in vocab} if ranker.mask_punctuation else set()
        if self.separate:
            raise ValueError("ColBERT has one encoder and projection: pass the model, not a pair of towers")

    def _marker(self, token: Optional[str]) -> Optional[int]:
        if token is None:
            return None
        ids = self.tokenizer.convert_tokens_to_ids(token)
        if ids is None or ids == self.tokenizer.unk_token_id:
            raise ValueError(f"ColBERT marker {token!r} is not a token of the tokenizer; pass query_marker= / "
                             "document_marker= (None for none)")
        return ids

    def towers(self):
        return (self.model.base_model, self.model.base_model)

    def tower_output(self, module, embeds, attention):
        return self.model.linear(super().tower_output(module, embeds, attention))

    def tower_tokens(self, text, tower, max_length):
        ranker = self.ranker
        length = ranker.query_length if tower == QUERY else min(ranker.document_length, max_length)
        marker = self.markers[tower]
        ids, special, towers = super().tower_tokens(text, tower, length - (marker is not None))
        if marker is not None:  # [CLS] [Q] ... (colbert-ai puts the marker after [CLS])
            ids, special, towers = ids[:1] + [marker] + ids[1:], special[:1] + [1] + special[1:], towers + [tower]
        if tower == QUERY:  # [MASK] padding to query_length, attended to or not
            extra = ranker.query_length - len(ids)
            ids += [self.tokenizer.mask_token_id] * extra
            special += [1] * extra
            towers += [QUERY if ranker.attend_to_mask_tokens else QUERY_UNATTENDED] * extra
        else:
            towers = [DOCUMENT_UNSCORED if i in self.skip else DOCUMENT for i in ids]
        return ids, special, towers

    def score(self, q, q_attended, d, d_attended, d_scored, q_valid):
        """Σ over the query's tokens ([MASK] padding included) of the max over scored document tokens."""
        q = nn.functional.normalize(q.float(), p=2, dim=-1)
        d = nn.functional.normalize(d.float(), p=2, dim=-1)
        sim = torch.einsum("bqh,bdh->bqd", q, d).masked_fill(~d_scored[:, None, :], float("-inf"))
        return sim.max(dim=-1).values.masked_fill(~q_valid, 0.0).sum(dim=-1)


def attributed_by(bound: BoundRanker, settings) -> Tuple[object, Dict[str, nn.Linear]]:
    """``(settings, modules)`` that :func:`fastnig.attribute` uses with ``bound``: ``bound.modules(...)``,
    plus SPLADE's vocabulary projection with ``include_vocabulary``; a two-tower ranker's settings with
    ``output="logit"`` (its score has no probability: F = ±score, docs/method.md §2)."""
    if getattr(bound, "score_only", False) and settings.output != "logit":
        settings = settings.replace(output="logit")
    modules = bound.modules(settings.layers, settings.include_pooler)
    if settings.include_vocabulary:
        vocabulary = getattr(bound, "vocabulary_modules", None)
        if vocabulary is None:
            raise ValueError(f"include_vocabulary=True: only the splade ranker has vocabulary units to attribute "
                             f"(this is {bound.family!r})")
        modules = {**modules, **vocabulary()}
    return settings, modules


def agreement_probabilities(model, tokenizer, pairs: Sequence[Pair], *, max_length: Optional[int] = None,
                            batch_size: int = 32, progress: bool = False, ranker=None) -> List[float]:
    """What the agreement filter compares with 0.5 (docs/method.md §6.1), per pair.

    A ranker with a probability (cross-encoders, monoT5, yes/no LLMs): P(relevant).  A two-tower
    ranker's score has none, so the filter asks how the model *ranks* the passage against the
    query's empty passage (the document tower reading only its special tokens): with the margin
    m = s(q, d) − s(q, ""), it returns σ(m), above 0.5 exactly when the model ranks the passage above
    an empty one (agrees with "relevant"), below when it ranks it under (agrees with "non-relevant").
    Per pair and deterministic (a resumed run filters the same pairs)."""
    from .model import unwrap
    from .rankers import bind_ranker
    from .scoring import score_pairs  # scoring imports the rankers, which import this module

    pairs = list(pairs)
    options = dict(max_length=max_length, batch_size=batch_size, progress=progress, desc="agreement filter")
    inner, inner_tokenizer = unwrap(model, tokenizer)
    bound = bind_ranker(ranker, inner, inner_tokenizer)
    if not getattr(bound, "score_only", False):
        return score_pairs(model, tokenizer, pairs, output="probability", ranker=ranker, **options).tolist()
    scores = score_pairs(inner, inner_tokenizer, pairs, output="score", ranker=bound, **options)
    queries = sorted({q for q, _ in pairs})
    empty = dict(zip(queries, score_pairs(inner, inner_tokenizer, [(q, "") for q in queries], output="score",
                                          ranker=bound, **options)))
    margins = torch.tensor([s - empty[q] for s, (q, _) in zip(scores.tolist(), pairs)], dtype=torch.float64)
    return torch.sigmoid(margins).tolist()


register(BiEncoder, Splade)
register(ColBERT, auto=False)

__all__ = ["BiEncoder", "Splade", "ColBERT", "TwoTowers", "sentence_transformer_parts", "POOLINGS", "SIMILARITIES"]
