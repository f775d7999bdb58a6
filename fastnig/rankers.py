"""The ranker families fastnig attributes (the public names of :mod:`fastnig.engine.rankers`).

``fastnig.attribute(model, pairs, ranker=None)`` picks the family from the
model's class; pass one of these to set a template or the answer words::

    from fastnig.rankers import MonoT5, YesNo
    fastnig.attribute(monot5, pairs, tokenizer=tok, ranker=MonoT5(true="yes", false="no"))
    fastnig.attribute(qwen3, pairs, tokenizer=tok, ranker=YesNo(template="...{query}...{passage}..."))
    fastnig.attribute(encoder, pairs, tokenizer=tok, ranker=BiEncoder(pooling="mean", similarity="dot"))
    fastnig.attribute((query_encoder, document_encoder), pairs, tokenizer=tok, ranker=BiEncoder())
    fastnig.attribute(splade, pairs, tokenizer=tok, ranker=Splade(), include_vocabulary=True)

The families, their F, templates, baselines and exact savings: docs/rankers.md.
"""
from .engine.rankers import (
    FAMILIES,
    Classifier,
    LastTokenClassifier,
    MonoT5,
    Ranker,
    UnsupportedModel,
    YesNo,
    resolve_ranker,
)
from .engine.two_tower import BiEncoder, ColBERT, Splade, TwoTowers

__all__ = ["FAMILIES", "BiEncoder", "Classifier", "ColBERT", "LastTokenClassifier", "MonoT5", "Ranker", "Splade",
           "TwoTowers", "UnsupportedModel", "YesNo", "resolve_ranker"]
