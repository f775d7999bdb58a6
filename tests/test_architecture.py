"""The package's layers (docs/architecture.md) hold: the import-linter contract of pyproject.toml.

The contract is checked on the real package, and on a copy of it with one
upward import added (the engine importing the CLI), where it must fail: a
contract that cannot fail checks nothing.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")
from importlinter.cli import lint_imports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 620  # "modules under ~600 lines"


def _lint(root: Path, monkeypatch) -> int:
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(root))
    # an editable install's finder would hand grimp the installed checkout, whatever sys.path says
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if "Redirecting" not in type(f).__name__])
    for name in [m for m in sys.modules if m == "fastnig" or m.startswith("fastnig.")]:
        monkeypatch.delitem(sys.modules, name)  # grimp finds the package on sys.path: this copy's
    return lint_imports(config_filename=str(root / "pyproject.toml"), no_cache=True, no_logo=True)


def test_the_layers_contract_is_kept(monkeypatch):
    assert _lint(ROOT, monkeypatch) == 0


def test_an_upward_import_breaks_the_contract(tmp_path, monkeypatch, capsys):
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT / "fastnig", copy / "fastnig",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.tar.gz"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    engine = copy / "fastnig" / "engine" / "model.py"
    engine.write_text(engine.read_text() + "\nfrom ..cli import main  # an upward import\n")
    assert _lint(copy, monkeypatch) == 1
    out = capsys.readouterr().out
    assert "BROKEN" in out and "fastnig.engine.model -> fastnig.cli" in out


def test_no_module_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "fastnig").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over ~600 lines: {long}"


def test_ruff_lint_is_clean():
    """``ruff check`` with the project's settings (pyproject.toml) finds nothing: no unused import (so no
    compatibility re-export), no undefined name, sorted imports."""
    ruff = pytest.importorskip("ruff.__main__")
    result = subprocess.run([ruff.find_ruff_bin(), "check", "--no-cache", "fastnig", "tests", "bench"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
