"""Rankers: how each model family turns a (query, passage) pair into tokens and a score.

One home per family (docs/method.md §11, docs/rankers.md):

* :class:`Classifier` — an encoder with a sequence-classification head read at
  its first token (the paper's MonoBERT; BERT, MiniLM, ELECTRA, RoBERTa, ...):
  the tokenizer's own pair encoding, 1 or 2 logits, the first-token cut;
* :class:`MonoT5` — ``T5ForConditionalGeneration`` / MT5: the prompt
  ``Query: {query} Document: {passage} Relevant:`` into the encoder, one decoder
  step from the start token, the logits of ``true`` / ``false`` → P(true);
* :class:`YesNo` — a decoder-only causal LM (Qwen2/Qwen3, Llama, Mistral,
  Gemma): Qwen3-Reranker's prompt, the logits of ``yes`` / ``no`` at the last
  token → P(yes); only the two answer rows of the vocabulary head are computed,
  and only at the last token;
* :class:`LastTokenClassifier` — ``*ForSequenceClassification`` of a decoder:
  its score head on the last real token.

A ranker is bound to a model and its tokenizer (:meth:`Ranker.bind`) and the
:class:`BoundRanker` is what the engine uses: :meth:`~BoundRanker.encode` (the
attribution's tokens, baseline positions and segments), :meth:`~BoundRanker.rows`
(token rows to score), :meth:`~BoundRanker.logits` (``[batch, 1 | 2]`` logits
from input embeddings: one relevance logit, or (non-relevant, relevant)),
:meth:`~BoundRanker.modules` (the Linears attributed by default: every encoder
and decoder Linear, never the vocabulary or score head).  The map from those
logits to F is :func:`fastnig.engine.scoring.target_function` for every family.

Decoders are always laid out right-padded with explicit position ids
(``cumsum(mask) - 1``), so a pair's score and attributions do not depend on its
batch or on the tokenizer's padding side; scoring may pad on the left
(``padding_side``) with the same result.

Must not: know about path integrals, datasets, neuron sets or files.
"""
from __future__ import annotations

import re
from contextlib import nullcontext
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .encoding import EncodedPairs, Pair, encode_pairs, pad_token_id, tokenize_pairs
from .first_token import first_token_only
from .last_token import last_token_only
from .model import accepts_token_type_ids, input_embeddings, linear_modules, resolve_max_length
from .templates import check_template, tokenize_template, word_id

# Qwen3-Reranker's prompt (its model card), the instruction filled in.
QWEN3_RERANKER_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
    "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: {query}\n<Document>: {passage}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
MONOT5_TEMPLATE = "Query: {query} Document: {passage} Relevant:"
PADDING_SIDES = ("right", "left")


class UnsupportedModel(TypeError):
    """No ranker family handles this model; the message lists the families."""


# ----------------------------------------------------------------- the rankers
class Ranker:
    """What a family is, before it meets a model: its template and answer words.

    Args:
        template: the prompt, a plain string with ``{query}`` and ``{passage}``
            (``None`` = the family's default; for :class:`Classifier` the
            tokenizer's own pair encoding, ``[CLS] q [SEP] p [SEP]``).
        padding_side: ``"right"`` or ``"left"`` for scoring batches (``None`` =
            the tokenizer's); scores and attributions are the same either way.
    """

    family: ClassVar[str] = ""
    default_template: ClassVar[Optional[str]] = None

    def __init__(self, template: Optional[str] = None, padding_side: Optional[str] = None):
        self.template = check_template(template) if template is not None else self.default_template
        if padding_side is not None and padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be 'right', 'left' or None, got {padding_side!r}")
        self.padding_side = padding_side

    def words(self) -> Dict[str, str]:
        return {}

    def describe(self) -> Dict[str, object]:
        """What a result records of the ranker (family, template, answer words)."""
        return {"family": self.family, "template": self.template, **self.words()}

    def supports(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def bind(self, model: nn.Module, tokenizer) -> "BoundRanker":
        """This ranker for ``model`` and its fast ``tokenizer`` (``TypeError`` for a model of another family)."""
        if not self.supports(model):
            raise UnsupportedModel(f"ranker={self.family!r} does not handle {type(model).__name__}; "
                                   f"{_families_text()}")
        return self._bound(model, tokenizer)

    def _bound(self, model, tokenizer) -> "BoundRanker":
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "family")
        return f"{type(self).__name__}({args})"


def _class_name(model) -> str:
    return type(model).__name__


class Classifier(Ranker):
    """An encoder cross-encoder with a sequence-classification head on its first token (the paper's)."""

    family = "classifier"

    def supports(self, model) -> bool:
        """A ``*ForSequenceClassification`` of an encoder, or a model of the user's own (a class name
        that is no Hugging Face head or bare model) whose ``forward(inputs_embeds=...)`` returns 1 or 2 logits."""
        name = _class_name(model)
        if name.endswith("ForSequenceClassification"):
            return not _is_decoder_classifier(model)
        if getattr(model, "is_two_towers", False):  # (query_encoder, document_encoder): a bi-encoder
            return False
        return re.search(r"(For[A-Z]\w*|Model|Encoder|Decoder)$", name) is None

    def _bound(self, model, tokenizer):
        return BoundClassifier(self, model, tokenizer)


class MonoT5(Ranker):
    """monoT5: P(``true``) of one decoder step after the prompt (T5 / MT5 ``ForConditionalGeneration``)."""

    family = "monot5"
    default_template = MONOT5_TEMPLATE

    def __init__(self, template: Optional[str] = None, true: str = "true", false: str = "false",
                 padding_side: Optional[str] = None):
        super().__init__(template, padding_side)
        self.true, self.false = true, false

    def words(self):
        return {"true": self.true, "false": self.false}

    def supports(self, model) -> bool:
        config = getattr(model, "config", None)
        return (bool(getattr(config, "is_encoder_decoder", False))
                and _class_name(model).endswith("ForConditionalGeneration")
                and getattr(model, "encoder", None) is not None and getattr(model, "decoder", None) is not None)

    def _bound(self, model, tokenizer):
        return BoundMonoT5(self, model, tokenizer)


class YesNo(Ranker):
    """A decoder LLM reranker: P(``yes``) from the logits of ``yes`` / ``no`` at the last token."""

    family = "yes_no"
    default_template = QWEN3_RERANKER_TEMPLATE

    def __init__(self, template: Optional[str] = None, yes: str = "yes", no: str = "no",
                 padding_side: Optional[str] = None):
        super().__init__(template, padding_side)
        self.yes, self.no = yes, no

    def words(self):
        return {"yes": self.yes, "no": self.no}

    def supports(self, model) -> bool:
        return (_class_name(model).endswith("ForCausalLM") and _decoder_base(model) is not None
                and isinstance(model.get_output_embeddings(), nn.Linear))

    def _bound(self, model, tokenizer):
        return BoundYesNo(self, model, tokenizer)


class LastTokenClassifier(Ranker):
    """``*ForSequenceClassification`` of a decoder (RankLLaMA, mxbai-rerank v2 conversions): its score
    head read at the last real token."""

    family = "last_token_classifier"
    default_template = "query: {query} document: {passage}"

    def supports(self, model) -> bool:
        return _class_name(model).endswith("ForSequenceClassification") and _is_decoder_classifier(model)

    def _bound(self, model, tokenizer):
        return BoundLastTokenClassifier(self, model, tokenizer)


RANKERS = {cls.family: cls for cls in (Classifier, MonoT5, YesNo, LastTokenClassifier)}
FAMILIES = tuple(RANKERS)  # with the two-tower families, registered at the end of this module


def _families_text() -> str:
    return ("fastnig's ranker families: classifier (encoder *ForSequenceClassification: BERT, MiniLM, ELECTRA, "
            "RoBERTa, ...), monot5 (T5/MT5 ForConditionalGeneration), yes_no (decoder *ForCausalLM: Qwen, Llama, "
            "Mistral, Gemma), last_token_classifier (decoder *ForSequenceClassification), bi_encoder (an encoder "
            "*Model, a SentenceTransformer, or (query_encoder, document_encoder)), splade (*ForMaskedLM), colbert "
            "(an encoder with a `linear` projection; never picked automatically)")


def _decoder_base(model: nn.Module) -> Optional[nn.Module]:
    """The decoder stack of a causal LM or decoder classifier (``model.model``), or ``None``."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return None
    return base if isinstance(getattr(base, "layers", None), nn.ModuleList) else None


def _is_decoder_classifier(model: nn.Module) -> bool:
    """A ``*ForSequenceClassification`` whose head is a decoder's ``score`` Linear over a layer stack."""
    return isinstance(getattr(model, "score", None), nn.Linear) and _decoder_base(model) is not None


def resolve_ranker(ranker: Union[None, str, Ranker], model: nn.Module) -> Ranker:
    """The ranker for ``model``: ``None`` picks the family from the model's class; a family name
    (:data:`FAMILIES`) gives its defaults; a :class:`Ranker` is used as it is.  A model no family
    handles is one :class:`UnsupportedModel` error listing the families."""
    if isinstance(ranker, Ranker):
        return ranker
    if isinstance(ranker, str):
        if ranker not in RANKERS:
            raise ValueError(f"ranker must be one of {list(FAMILIES)} or a fastnig.rankers object, got {ranker!r}")
        return RANKERS[ranker]()
    if ranker is not None:
        raise TypeError(f"ranker must be None, a family name {list(FAMILIES)} or a fastnig.rankers object, got "
                        f"{type(ranker).__name__}")
    for family in AUTO_DETECTED:
        candidate = RANKERS[family]()
        if candidate.supports(model):
            return candidate
    raise UnsupportedModel(f"fastnig cannot rank with {type(model).__name__}: {_families_text()}; pass "
                           "ranker=... if your model is one of these under another class name")


def ranker_from_spec(spec: Union[None, str, Dict[str, object], Ranker], where: str = "ranker") -> Optional[Ranker]:
    """A ranker from a run config's ``ranker`` entry: ``None`` (auto-detect), a family name, or a mapping
    ``{family: yes_no, template: "...", yes: "yes", no: "no", padding_side: left}``; a ``ValueError``
    naming ``where`` and the allowed keys otherwise."""
    if spec is None or isinstance(spec, Ranker):
        return spec
    if isinstance(spec, str):
        if spec not in RANKERS:
            raise ValueError(f"{where}: {spec!r} is not a ranker family; choose one of {list(FAMILIES)}")
        return RANKERS[spec]()
    if not isinstance(spec, dict) or "family" not in spec:
        raise ValueError(f"{where} must be a family name {list(FAMILIES)} or a mapping with 'family' "
                         f"(and template, answer words, padding_side), got {spec!r}")
    options = {k: v for k, v in spec.items() if k != "family"}
    family = spec["family"]
    if family not in RANKERS:
        raise ValueError(f"{where}.family: {family!r} is not a ranker family; choose one of {list(FAMILIES)}")
    allowed = ["template", "padding_side", *RANKERS[family]().words()]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} for family {family!r}; allowed: {allowed}")
    try:
        return RANKERS[family](**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def bind_ranker(ranker: Union[None, str, Ranker, "BoundRanker"], model: nn.Module, tokenizer) -> "BoundRanker":
    """:func:`resolve_ranker` bound to ``model`` and ``tokenizer`` (a bound ranker of this model is kept)."""
    if isinstance(ranker, BoundRanker):
        if ranker.model is not model:
            raise ValueError("ranker is bound to another model; pass the Ranker itself (e.g. fastnig.rankers.YesNo())")
        return ranker
    return resolve_ranker(ranker, model).bind(model, tokenizer)


# ---------------------------------------------------------- bound to a model
class BoundRanker:
    """A ranker with its model and tokenizer: what the engine calls (see the module docstring)."""

    uses_template: ClassVar[bool] = True

    def __init__(self, ranker: Ranker, model: nn.Module, tokenizer):
        self.ranker, self.model, self.tokenizer = ranker, model, tokenizer
        self.embeddings = input_embeddings(model)

    @property
    def family(self) -> str:
        return self.ranker.family

    def modules(self, layers: Optional[Sequence[str]] = None, include_pooler: bool = False) -> Dict[str, nn.Linear]:
        """The Linears attributed: ``layers`` by name, or every encoder / decoder Linear but the heads
        (:func:`fastnig.engine.model.linear_modules`: the vocabulary head is never attributed by default,
        and a decoder classifier's ``score`` head sits outside its ``base_model``)."""
        return linear_modules(self.model, layers, include_pooler)

    def max_length(self, max_length: Optional[int]) -> int:
        return resolve_max_length(self.model, self.tokenizer, max_length)

    @property
    def uses_token_types(self) -> bool:
        return False

    @property
    def pad_id(self) -> Optional[int]:
        """The token the PAD baselines put on query and passage positions (docs/rankers.md): the tokenizer's
        pad token, else its end-of-sequence token (decoders without a pad token, e.g. Llama)."""
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def rows(self, pairs: Sequence[Pair], max_length: int) -> List[Dict[str, List[int]]]:
        """Unpadded token rows (``input_ids``, ``attention_mask``) of ``pairs`` as the model scores them."""
        out = []
        for query, passage in pairs:
            ids, _ = tokenize_template(self.tokenizer, self.ranker.template, query, passage or "", max_length)
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
        return out

    def padding_side(self) -> str:
        side = self.ranker.padding_side or getattr(self.tokenizer, "padding_side", "right")
        return side if side in PADDING_SIDES else "right"

    def read_segment(self, segments: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[P]`` segment of one-token outputs (the scored position): the last real token's."""
        return segments.gather(1, (lengths - 1).clamp(min=0).view(-1, 1)).squeeze(1)

    def encode(self, pairs: Sequence[Pair], max_length: int, baseline: str) -> EncodedPairs:
        """Pairs through the template, right-padded (:class:`EncodedPairs`): the baseline replaces query and
        passage tokens (``*-query``: the query's only); the template's tokens are kept."""
        if baseline.startswith("pad") and self.pad_id is None:
            raise ValueError(f"baseline={baseline!r} needs a pad (or end-of-sequence) token but the tokenizer has "
                             "neither; use baseline='zero'")
        rows = [tokenize_template(self.tokenizer, self.ranker.template, q, p or "", max_length) for q, p in pairs]
        P, T = len(rows), max(len(ids) for ids, _ in rows)
        input_ids = torch.full((P, T), pad_token_id(self.tokenizer), dtype=torch.long)
        attention = torch.zeros((P, T), dtype=torch.long)
        segments = torch.full((P, T), -1, dtype=torch.long)
        lengths = torch.tensor([len(ids) for ids, _ in rows], dtype=torch.long)
        for i, (ids, seg) in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attention[i, :len(ids)] = 1
            segments[i, :len(ids)] = torch.tensor(seg)
        replace = (segments == 0) if baseline.endswith("query") else (segments == 0) | (segments == 1)
        return EncodedPairs(input_ids, attention, None, replace, lengths, segments,
                            read_segment=self.read_segment(segments, lengths))

    def logits(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: Optional[torch.Tensor] = None, cut: bool = True) -> torch.Tensor:
        """``[batch, 1 | 2]`` logits from ``inputs_embeds`` ``[batch, tokens, dim]`` (see the module docstring)."""
        raise NotImplementedError

    def score_logits(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``[batch, 1 | 2]`` logits of a padded batch of token rows (:meth:`rows`), either padding side."""
        ids = batch["input_ids"]
        return self.logits(self.embeddings(ids), batch["attention_mask"], batch.get("token_type_ids"))


class BoundClassifier(BoundRanker):
    """Today's cross-encoders, through exactly the code paths they always had (results unchanged)."""

    @property
    def uses_template(self) -> bool:  # type: ignore[override]
        return self.ranker.template is not None

    @property
    def uses_token_types(self) -> bool:
        return accepts_token_type_ids(self.model, self.tokenizer) and not self.uses_template

    @property
    def pad_id(self) -> Optional[int]:
        return self.tokenizer.pad_token_id

    def padding_side(self) -> str:
        return self.ranker.padding_side or "right"

    def rows(self, pairs, max_length):
        if self.uses_template:
            return super().rows(pairs, max_length)
        return tokenize_pairs(self.tokenizer, pairs, max_length)

    def read_segment(self, segments, lengths):
        return segments[:, 0]

    def encode(self, pairs, max_length, baseline):
        if self.uses_template:
            return super().encode(pairs, max_length, baseline)
        return encode_pairs(self.tokenizer, pairs, max_length, baseline, self.uses_token_types)

    def logits(self, inputs_embeds, attention_mask, token_type_ids=None, cut=True):
        kwargs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        with first_token_only(self.model, cut):
            return self.model(**kwargs).logits

    def score_logits(self, batch):
        with first_token_only(self.model):
            out = self.model(**batch)
        return out.logits if hasattr(out, "logits") else out[0]


class BoundMonoT5(BoundRanker):
    """monoT5: the path moves the encoder's input; the decoder's one step starts from its fixed start token."""

    def __init__(self, ranker: MonoT5, model, tokenizer):
        super().__init__(ranker, model, tokenizer)
        self.answer = torch.tensor([word_id(tokenizer, ranker.false, "false"), word_id(tokenizer, ranker.true, "true")])
        start = getattr(model.config, "decoder_start_token_id", None)
        self.start = int(start if start is not None else pad_token_id(tokenizer))

    def read_segment(self, segments, lengths):
        return torch.full_like(lengths, 2)  # one-token outputs are the decoder's step: structure

    def logits(self, inputs_embeds, attention_mask, token_type_ids=None, cut=True):
        start = torch.full((inputs_embeds.shape[0], 1), self.start, dtype=torch.long, device=inputs_embeds.device)
        out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, decoder_input_ids=start,
                         use_cache=False)
        return out.logits[:, 0, self.answer.to(out.logits.device)]  # (false, true) = (non-relevant, relevant)


class _BoundDecoder(BoundRanker):
    """Decoders: explicit positions, the last real token read, the last-token cut."""

    def __init__(self, ranker, model, tokenizer):
        super().__init__(ranker, model, tokenizer)
        self.base = _decoder_base(model)

    def hidden_at_last_token(self, inputs_embeds, attention_mask, cut) -> torch.Tensor:
        """``[batch, dim]`` last hidden state at each row's last real token (either padding side)."""
        mask = attention_mask.long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        index = torch.arange(mask.shape[1], device=mask.device)
        read = (mask * index).argmax(-1)
        with last_token_only(self.base, read, cut) if cut else nullcontext():
            hidden = self.base(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=positions,
                               use_cache=False).last_hidden_state
        return hidden.gather(1, read.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)


class BoundYesNo(_BoundDecoder):
    def __init__(self, ranker: YesNo, model, tokenizer):
        super().__init__(ranker, model, tokenizer)
        self.answer = torch.tensor([word_id(tokenizer, ranker.no, "no"), word_id(tokenizer, ranker.yes, "yes")])
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def logits(self, inputs_embeds, attention_mask, token_type_ids=None, cut=True):
        hidden = self.hidden_at_last_token(inputs_embeds, attention_mask, cut)
        head = self.model.get_output_embeddings()
        rows = self.answer.to(head.weight.device)
        logits = nn.functional.linear(hidden, head.weight[rows], head.bias[rows] if head.bias is not None else None)
        if self.softcap:  # Gemma 2: elementwise, so the same on two rows as on the whole vocabulary
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits  # (no, yes) = (non-relevant, relevant)


class BoundLastTokenClassifier(_BoundDecoder):
    def logits(self, inputs_embeds, attention_mask, token_type_ids=None, cut=True):
        return self.model.score(self.hidden_at_last_token(inputs_embeds, attention_mask, cut))


__all__: Tuple[str, ...] = ("Ranker", "Classifier", "MonoT5", "YesNo", "LastTokenClassifier", "BoundRanker",
                            "FAMILIES", "UnsupportedModel", "resolve_ranker", "bind_ranker", "ranker_from_spec")

AUTO_DETECTED = FAMILIES  # the families resolve_ranker tries, in order


def register(*families: type, auto: bool = True) -> None:
    """Add ranker classes to :data:`RANKERS` / :data:`FAMILIES` (tried by :func:`resolve_ranker` after the
    others when ``auto``)."""
    global FAMILIES, AUTO_DETECTED
    RANKERS.update({cls.family: cls for cls in families})
    FAMILIES = tuple(RANKERS)
    if auto:
        AUTO_DETECTED = AUTO_DETECTED + tuple(cls.family for cls in families)


# The two-tower families (bi_encoder, splade; colbert never automatically: an encoder with a projection
# could be anything) live in fastnig.engine.two_tower, which builds on the classes above and registers them.
from . import two_tower  # noqa: E402,F401
