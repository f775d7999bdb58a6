"""When the compiled extension cannot load, the error names the cause it detects and the one fix.

``fastnig.engine.kernels._extension()`` is called with the extension marked missing
and the package pointed at a fake folder laid out for each cause: a checkout
never built, a build for another Python, no compiler, an installed package
whose build fails to load or is absent.
"""
from __future__ import annotations

import shutil
import sysconfig

import pytest

import fastnig.engine
from fastnig.engine import kernels

SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")
OTHER = ".cpython-39-x86_64-linux-gnu.so" if "cpython-39" not in SUFFIX else ".cpython-312-x86_64-linux-gnu.so"


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """``fake(checkout, builds, compiler)``: the engine folder ``tmp/src/fastnig/engine`` holding ``builds``
    (file names), inside a source checkout or not, with or without a C++ compiler on PATH."""
    def make(checkout=True, builds=(), compiler=True, error="No module named 'fastnig.engine._C'"):
        root = tmp_path / "src"
        package = root / "fastnig" / "engine"
        package.mkdir(parents=True)
        if checkout:
            (root / "pyproject.toml").write_text("[project]\nname = 'fastnig'\n")
            (root / "CMakeLists.txt").write_text("project(fastnig)\n")
        for name in builds:
            (package / name).write_bytes(b"\x7fELF")
        monkeypatch.setattr(kernels, "_C", None)
        monkeypatch.setattr(kernels, "_IMPORT_ERROR", ImportError(error))
        monkeypatch.setattr(kernels, "__file__", str(package / "kernels.py"))
        monkeypatch.setattr(fastnig.engine, "__path__", [str(package)])
        monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if compiler else None)
        with pytest.raises(ImportError) as err:
            kernels._extension()
        message = str(err.value)
        assert message.startswith("fastnig's compiled extension (fastnig.engine._C) could not be loaded: ")
        assert message.count(" Fix: ") == 1 and "\n" not in message
        return message, root
    return make


def test_source_folder_without_a_build(fake):
    message, root = fake()
    assert f"imported the source folder {root / 'fastnig' / 'engine'}, which holds no build" in message
    assert f"pip install -e {root}" in message and "make install" in message


def test_build_for_another_python(fake):
    message, root = fake(builds=[f"_C{OTHER}"])
    assert f"_C{OTHER} was built for another Python" in message
    assert f"'_C{SUFFIX}'" in message  # the ABI tag this interpreter loads
    assert "rebuild it with this Python: " in message and f"pip install -e {root}" in message


def test_no_compiler(fake):
    message, root = fake(compiler=False)
    assert "no C++ compiler" in message and "install a C++17 compiler" in message
    assert f"pip install -e {root}" in message


def test_installed_build_that_fails_to_load(fake):
    message, root = fake(checkout=False, builds=[f"_C{SUFFIX}"], error="undefined symbol: _ZN3foo")
    assert "exists but failed to load (undefined symbol: _ZN3foo)" in message
    assert "--force-reinstall" in message and "-e " not in message


def test_installed_package_without_a_build(fake):
    message, _ = fake(checkout=False)
    assert "has no build of it" in message and "--force-reinstall" in message


def test_the_extension_loads_here():
    assert kernels._extension() is kernels._C is not None
