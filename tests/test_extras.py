"""Optional extras fail clearly: a missing ``[ir]`` dependency stops with one line naming
``pip install "fastnig[ir]"``, from a function and from the command line.

The dependency is hidden, not uninstalled: ``sys.modules[name] = None`` makes
every ``import name`` fail with ModuleNotFoundError, as on a machine without it.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from fastnig.common import MissingExtra

PIP = 'pip install "fastnig[ir]"'


def _one_line_naming(message: str, module: str) -> None:
    assert "\n" not in message.strip(), message
    assert PIP in message and repr(module) in message, message


def test_bm25_without_bm25s(monkeypatch, tmp_path):
    from fastnig.data import load_collection
    from fastnig.evaluation.reranking import bm25_run

    collection = load_collection("med", cache_dir=tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "bm25s", None)
    with pytest.raises(MissingExtra) as err:
        bm25_run(collection, {"1": "crystalline lens"}, k=5, progress=False)
    _one_line_naming(str(err.value), "bm25s")
    assert "BM25" in str(err.value)
    assert isinstance(err.value, ImportError)  # callers catching ImportError still do


def test_datasets_without_ir_datasets(monkeypatch):
    from fastnig.data import load_collection

    monkeypatch.setitem(sys.modules, "ir_datasets", None)
    with pytest.raises(MissingExtra) as err:
        load_collection("cranfield")
    _one_line_naming(str(err.value), "ir_datasets")


def test_ndcg_without_ranx(monkeypatch):
    from fastnig.evaluation.reranking import ndcg_at_k

    monkeypatch.setitem(sys.modules, "ranx", None)
    monkeypatch.setitem(sys.modules, "ranx.metrics", None)
    with pytest.raises(MissingExtra) as err:
        ndcg_at_k({"q": {"d": 1.0}}, {"q": {"d": 1}})
    assert PIP in str(err.value) and "\n" not in str(err.value)


def _cli_with_hidden(modules, args, cwd):
    """``fastnig ARGS`` in a fresh interpreter in which ``modules`` cannot be imported."""
    code = ("import sys\n"
            f"for m in {list(modules)!r}:\n    sys.modules[m] = None\n"
            "from fastnig.cli import main\n"
            f"sys.exit(main({list(map(str, args))!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("hidden,args,module", [
    (["ir_datasets"], ["run", "demo", "--output", "out"], "ir_datasets"),  # stops in the preflight
    (["ir_datasets"], ["attribute", "--model", "TINY", "--dataset", "cranfield", "--label", "relevant",
                       "--out", "out/P_cran"], "ir_datasets"),
])
def test_cli_prints_one_line_and_exits_2(tmp_path, saved_tiny_model, hidden, args, module):
    args = [str(saved_tiny_model(0)) if a == "TINY" else a for a in args]
    proc = _cli_with_hidden(hidden, args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"fastnig {args[0]}: error: ")
    _one_line_naming(err, module)
    assert not (tmp_path / "out").exists()
