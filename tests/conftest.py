"""Shared fixtures: the real collections of ../shared/data and tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout (override with FASTNIG_SHARED_DATA)."""
    return Path(os.environ.get("FASTNIG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"the real test collections are not at {path} (set FASTNIG_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from tiny_models import make_tokenizer

    return make_tokenizer("bert")


@pytest.fixture(scope="session")
def tiny_bert(tokenizer):
    from tiny_models import make_model

    return make_model("bert", num_labels=2, vocab_size=tokenizer.vocab_size)


@pytest.fixture(scope="session")
def saved_tiny_model(tmp_path_factory, tokenizer):
    """``saved_tiny_model(seed)``: folder of a tiny 2-logit BERT + tokenizer (``from_pretrained``-able)."""
    from tiny_models import make_model

    def save(seed: int = 0):
        folder = tmp_path_factory.mktemp(f"model-seed{seed}")
        make_model("bert", num_labels=2, vocab_size=tokenizer.vocab_size, seed=seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return folder

    return save


@pytest.fixture(scope="session", autouse=True)
def neutral_working_directory(tmp_path_factory):
    """Run from an empty folder: `python -m fastnig` in a subprocess must import the
    installed package (with its compiled extension), not the source tree."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)
