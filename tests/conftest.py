"""Shared fixtures: real collections and tiny models.

Cranfield and MEDLINE ship inside the package (``fastnig/data/collections``), so
every test that reads them runs on a fresh clone.  Only NFCorpus, which is
larger and whose terms do not allow shipping it, is read from a data folder
(``../shared/data`` beside the checkout, or ``$FASTNIG_SHARED_DATA``); the
few tests that need it skip, saying so, when it is absent.
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout (override with FASTNIG_SHARED_DATA)."""
    return Path(os.environ.get("FASTNIG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def nfcorpus_dir() -> Path:
    """NFCorpus's TREC-style files (``nfcorpus/test.docs``, ...) from the larger, unshippable collections."""
    path = shared_data_dir() / "nfcorpus"
    if not (path / "test.docs").is_file():
        pytest.skip(f"needs NFCorpus (3,162 docs, not shipped with fastnig: its terms forbid it) at {path}; "
                    "put its TREC-style files there or set FASTNIG_SHARED_DATA to the folder holding nfcorpus/")
    return path


@pytest.fixture(scope="session")
def cran_tarball() -> Path:
    """The packaged original ``cran.tar.gz`` (its sha256 checked against ``checksums.json``)."""
    from fastnig.data.packaged import packaged_archive

    return packaged_archive("cranfield")


def pytest_configure(config):
    """A fresh IR_DATASETS_HOME for the session (before anything imports ir_datasets): the tests neither
    read nor write a user's ~/.ir_datasets; fastnig places the packaged Cranfield archive there itself."""
    home = tempfile.mkdtemp(prefix="fastnig-tests-irds-")
    config._fastnig_irds_home = (home, os.environ.get("IR_DATASETS_HOME"))
    os.environ["IR_DATASETS_HOME"] = home


def pytest_unconfigure(config):
    home, before = getattr(config, "_fastnig_irds_home", (None, None))
    if home is None:
        return
    shutil.rmtree(home, ignore_errors=True)
    if before is None:
        os.environ.pop("IR_DATASETS_HOME", None)
    else:
        os.environ["IR_DATASETS_HOME"] = before


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


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to open a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def cli(capsys):
    """``cli(*args)`` runs ``fastnig ARGS`` in this process: ``(exit code, stdout, stderr)``
    (an argparse error's ``SystemExit`` becomes its code)."""
    from fastnig.cli import main

    def run(*args):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _cpu_isas():
    try:
        from fastnig.engine.kernels import available_cpu_isas

        return list(available_cpu_isas())
    except ImportError:  # no extension: the kernel tests say so themselves
        return ["auto"]


@pytest.fixture(params=_cpu_isas())
def cpu_isa(request):
    """Runs the test once per build of the CPU kernel that can run here (AVX2 + FMA, baseline)."""
    from fastnig.engine.kernels import forced_cpu_isa

    with forced_cpu_isa(request.param):
        yield request.param


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine they cost several times the time
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a test file)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
