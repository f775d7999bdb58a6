"""Shared by the bench scripts: run metadata for every result file, and the random-weight models.

The scripts live in ``bench/throughput/`` and ``bench/accuracy/`` and are run
from the repository root as ``python bench/<group>/<script>.py``; each puts
``bench/`` (this folder) on ``sys.path`` and imports this module.  Nothing
here imports from ``tests/``.

* :func:`run_metadata`: git commit, date, CPU, GPU, torch threads, torch and
  Python versions of the run, recorded in every result file:
  JSON results carry it under the key ``"run"`` (:func:`with_run`), each CSV
  gets a sidecar ``<name>.meta.json`` (:func:`write_csv_meta`), Markdown a
  closing ``Run:`` line (:func:`run_markdown`).
* :func:`make_tokenizer` / :func:`make_model`: a WordPiece tokenizer built
  offline from a fixed word list and a randomly initialised BERT
  cross-encoder of any shape (the real architecture, random weights), for the
  throughput benchmarks: nothing is downloaded.
* :func:`make_word_tokenizer`: a word-level fast tokenizer with T5's or Qwen's
  special tokens (a copy of ``tests/tiny_models.py``'s), for the generative
  rankers of ``throughput/bench_rankers.py``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import string
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"


# ------------------------------------------------------------------ run metadata
def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str:
    """Short hash of HEAD, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    commit = _git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("-dirty" if status else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_model() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "none"


def run_metadata() -> Dict[str, object]:
    """Where and with what a result was measured (call it when writing: torch's thread count is read then)."""
    import torch

    return {
        "git_commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu_model(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if sys.argv and sys.argv[0] else None,
    }


NOW = "now"  # default of the ``run`` arguments below: this run's metadata (None = not recorded, written as null)


def _resolve(run):
    return run_metadata() if isinstance(run, str) and run == NOW else run


def with_run(report: Dict, run=NOW) -> Dict:
    """``report`` with the run metadata as its first key, ``"run"``."""
    return {"run": _resolve(run), **{k: v for k, v in report.items() if k != "run"}}


def write_json(path, report: Dict, run=NOW, indent: int = 2) -> Path:
    path = Path(path)
    path.write_text(json.dumps(with_run(report, run), indent=indent))
    return path


def meta_path(csv_path) -> Path:
    """The sidecar of a CSV result: ``name.csv`` -> ``name.meta.json``."""
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.stem + ".meta.json")


def write_csv_meta(csv_path, run=NOW, **extra) -> Path:
    """Writes the run metadata of ``csv_path`` beside it, as ``<name>.meta.json`` (``extra``: more keys)."""
    path = meta_path(csv_path)
    path.write_text(json.dumps({"file": Path(csv_path).name, "run": _resolve(run), **extra}, indent=2) + "\n")
    return path


def run_markdown(run=NOW) -> str:
    """One Markdown line naming the run (closing line of every Markdown result)."""
    r = _resolve(run)
    if r is None:
        return "Run: not recorded (measured before the bench scripts recorded it)."
    return (f"Run: commit `{r['git_commit']}`, {r['date_utc']}, CPU {r['cpu']} ({r.get('cpu_count')} cores), "
            f"GPU {r['gpu']}, torch threads {r['torch_threads']}, torch {r['torch']}, Python {r['python']}.")


# ------------------------------------------------------------------ random-weight models
WORDS = """the a an of to in and or is are was be for on with by as at from that this which what how why
when where who not no yes can does do about into over under between effect effects heat flow flows boundary
layer layers pressure wing wings supersonic subsonic shock wave waves laminar turbulent heating transfer
theory experimental results model models method methods cancer cell cells patient patients disease diet
food vitamin blood risk study studies protein gene genes brain acid information retrieval library search
query queries document documents index indexing system systems user users data analysis library books
number numbers high low large small new use used using given show shows case cases test tests value values
""".split()


def write_vocab(folder: str) -> str:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += sorted(set(WORDS))
    tokens += list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    tokens += list(string.digits) + list(".,;:?!'\"()-/%")
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(dict.fromkeys(tokens)) + "\n")
    return path


def make_tokenizer(folder: Optional[str] = None):
    """A BERT WordPiece tokenizer over :data:`WORDS` (built offline)."""
    from transformers import BertTokenizerFast

    if folder is None:  # the tokenizer keeps its vocabulary in memory: the file can go
        with tempfile.TemporaryDirectory(prefix="fastnig-bench-vocab-") as scratch:
            return BertTokenizerFast(vocab=write_vocab(scratch))
    return BertTokenizerFast(vocab=write_vocab(folder))


def make_model(num_labels: int = 2, hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64,
               vocab_size: int = 200, max_positions: int = 160, seed: int = 0, init_range: float = 0.2):
    """A randomly initialised BERT cross-encoder of the given shape, fp32, in eval mode."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=max_positions,
                        vocab_size=vocab_size, num_labels=num_labels, initializer_range=init_range)
    return tf.BertForSequenceClassification(cfg).to(torch.float32).eval()


# ------------------------------------------------ generative rerankers (issue 23)
SPECIAL_WORDS = ["<pad>", "</s>", "<unk>", "<s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                 "</think>"]
TEMPLATE_WORDS = "query document relevant true false yes no system user assistant judge whether meets".split()


def make_word_tokenizer(kind: str = "t5"):
    """A word-level fast tokenizer built offline with ``tokenizers`` (a copy of the tests' builder):
    lower-cased words of :data:`WORDS` and punctuation, with the special tokens of T5 (``kind="t5"``:
    ``</s>`` appended, pad ``<pad>`` = 0) or Qwen (``"qwen"``: the chat markers, pad ``<|endoftext|>``,
    nothing appended).  Words outside the list become ``<unk>`` (one token each)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(SPECIAL_WORDS + sorted(set(WORDS + TEMPLATE_WORDS))
                               + list(string.ascii_lowercase) + list(".,;:?!'\"()-/%<>")))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(SPECIAL_WORDS)
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if kind == "qwen":
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                       unk_token="<unk>", padding_side="left")
    raise ValueError(kind)
