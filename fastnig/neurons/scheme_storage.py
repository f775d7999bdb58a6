"""The on-disk format of a scheme: which files, what they hold, how a save commits.

Owns: the file names (:func:`scheme_json_path`, :func:`is_scheme_file`), the
format tag and version, and the crash-safe protocol of :func:`write_scheme`
/ :func:`read_scheme`, which move a scheme's metadata (a JSON-serialisable
dict) and tensors (name -> tensor) to and from disk.

Must not: know what a scheme's fields mean (:class:`fastnig.neurons.scheme.Scheme`
packs and unpacks them) or import any fastnig module but
:mod:`fastnig.common`.  ``safetensors`` is imported only when a scheme is
written or read.

``scheme.save("runs/P_ms")`` writes two files in ``runs/``:
``P_ms.json`` (metadata, pair ids, the name of its tensor file) and
``P_ms.<token>.safetensors`` (sums and per-pair numbers).  Each save writes a
new tensor file under a fresh token, then atomically replaces the JSON (temp
file in the same folder + ``os.replace``), then deletes the old tensor file.
The JSON is the commit point: a save killed at any moment leaves either the
previous scheme or the new one, never a mix; a tensor file whose token the
JSON does not name is an orphan that the next save removes.  A save that
fails (a full disk, an I/O error) removes what it wrote and raises an
``OSError`` (same errno) naming the scheme; the previous scheme stays.  One
writer per scheme path (:func:`fastnig.study.attribution_job.attribute_dataset`
holds a lock).

The JSON records the BLAKE2b digest of the tensor file (``tensors_blake2b``),
so a damaged or truncated tensor file is refused (:class:`fastnig.common.CorruptFile`,
naming it) rather than read as wrong numbers; a truncated or damaged JSON is
refused the same way.  (Files saved before the digest existed are read
without that check.)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import torch

from ..common import CorruptFile, PathLike, fsync_path, optional_import

FORMAT = "fastnig-scheme"
FORMAT_VERSION = 1


def scheme_json_path(path: PathLike) -> Path:
    """The JSON file of the scheme saved at ``path`` (``.json`` added when missing)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path, got {type(path).__name__}")
    p = Path(path)
    if p.name.endswith(".safetensors"):
        raise ValueError(f"path {p}: give the scheme's .json file (or its name without extension), "
                         "not its tensor file")
    return p if p.suffix == ".json" else p.with_name(p.name + ".json")


def is_scheme_file(path: PathLike) -> bool:
    """True when ``path`` is a JSON file written by :meth:`Scheme.save`."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(200)
    except OSError:
        return False
    return f'"format": "{FORMAT}"' in head


def write_scheme(path: PathLike, meta: Mapping[str, object], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Atomically write ``<path>.json`` (``meta``) + ``<stem>.<token>.safetensors`` (``tensors``).

    ``path`` may end in ``.json`` or not; returns the JSON path.  The JSON
    gets ``format``, ``version``, ``token``, ``tensors`` (the tensor file's
    name) and ``tensors_blake2b`` (its digest) first, then ``meta``.  See the
    module docstring for why a killed or failed save leaves the previous
    scheme readable.

    Raises:
        OSError: writing failed (e.g. ``errno.ENOSPC``, disk full); the
            message names the scheme and the file being written; nothing of
            this save is left on disk.
    """
    to_bytes = optional_import("safetensors.torch", "to save schemes").save

    json_path = scheme_json_path(path)
    folder = json_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = json_path.name[:-len(".json")]
    token = secrets.token_hex(6)
    tensor_name = f"{stem}.{token}.safetensors"
    tensor_path, tmp = folder / tensor_name, folder / f".{tensor_name}.tmp"
    tmp_json = folder / f".{json_path.name}.{token}.tmp"

    data = to_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": FORMAT, "token": token})
    body = {"format": FORMAT, "version": FORMAT_VERSION, "token": token, "tensors": tensor_name,
            "tensors_blake2b": _digest(data), **meta}
    text = json.dumps(body, ensure_ascii=False, indent=1, allow_nan=True).encode("utf-8")
    writing, json_inode = tensor_path, None
    try:
        _write_durably(tmp, data)  # on disk before it is named
        os.replace(tmp, tensor_path)
        writing = json_path
        json_inode = _write_durably(tmp_json, text)
        os.replace(tmp_json, json_path)  # the commit point
    except BaseException as exc:
        if json_inode is not None and _inode(json_path) == json_inode:
            raise  # interrupted just after the commit: the new scheme is complete
        for leftover in (tmp, tensor_path, tmp_json):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"could not save scheme ({exc.strerror or exc} while writing {writing.name}); "
                                     "the scheme on disk is as it was before this save", str(json_path)) from exc
        raise
    fsync_path(folder)

    # The new scheme is committed; what follows only frees disk space (a failure leaves an orphan that
    # the next save removes).
    for leftover in _files_of(folder, stem):
        if leftover.name != tensor_name:
            with contextlib.suppress(OSError):
                leftover.unlink()
    return json_path


def read_scheme(path: PathLike) -> Tuple[Path, Dict[str, object], Dict[str, torch.Tensor]]:
    """``(json path, metadata, tensors)`` of a scheme written by :func:`write_scheme`.

    Checks the format, the version, that the tensor file belongs to the
    same save as the JSON and that it is intact (``path`` with or without
    ``.json``).

    Raises:
        FileNotFoundError: no scheme at ``path``, or its tensor file is missing.
        CorruptFile: the JSON or the tensor file is truncated or damaged.
        ValueError: not a scheme file, another format version, or the files of two saves mixed up.
    """
    from_bytes = optional_import("safetensors.torch", "to read schemes").load

    json_path = scheme_json_path(path)
    if not json_path.is_file():
        raise FileNotFoundError(f"no scheme at {json_path} (a scheme is a .json file written by Scheme.save)")
    for attempt in range(2):
        meta = _read_scheme_json(json_path)
        tensor_path = json_path.parent / meta["tensors"]
        try:
            data = tensor_path.read_bytes()
            break
        except FileNotFoundError:
            if attempt:  # a concurrent save may have replaced it once; twice means it is gone
                raise FileNotFoundError(f"scheme {json_path} names the tensor file {meta['tensors']}, "
                                        "which is missing; the scheme files were moved or deleted in part") from None
    damaged = f"scheme {json_path}: its tensor file {tensor_path} is truncated or damaged"
    file_meta = _safetensors_metadata(data, damaged)
    if file_meta.get("token") != meta["token"]:
        raise ValueError(f"scheme {json_path}: its tensor file {meta['tensors']} belongs to another save "
                         f"(token {file_meta.get('token')!r} != {meta['token']!r}); the files were mixed up")
    if meta.get("tensors_blake2b") is not None and _digest(data) != meta["tensors_blake2b"]:
        raise CorruptFile(f"{damaged} (its checksum is not the one saved with the scheme); restore both files "
                          "from a backup or re-create the scheme")
    try:
        tensors = from_bytes(data)
    except Exception as exc:  # safetensors' own error type
        raise CorruptFile(f"{damaged} ({exc})") from None
    return json_path, meta, tensors


def expect_tensor(tensors: Mapping[str, torch.Tensor], key: str, shape: Tuple[int, ...], where: Path) -> torch.Tensor:
    """``tensors[key]``, or :class:`CorruptFile` when the scheme at ``where`` lacks it or has another shape."""
    if key not in tensors:
        raise CorruptFile(f"scheme {where}: its tensor file lacks {key!r}")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise CorruptFile(f"scheme {where}: {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def _read_scheme_json(json_path: Path) -> Dict[str, object]:
    try:
        with open(json_path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise CorruptFile(f"{json_path} is not a valid scheme file: truncated or damaged ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not a fastnig scheme file (no \"format\": \"{FORMAT}\")")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{json_path}: scheme format version {meta.get('version')} is not supported "
                         f"(this fastnig reads version {FORMAT_VERSION})")
    for key in ("token", "tensors"):
        if not isinstance(meta.get(key), str) or not meta[key] or "/" in meta[key] or "\\" in meta[key]:
            raise CorruptFile(f"{json_path}: damaged scheme file (its {key!r} entry is {meta.get(key)!r})")
    return meta


def _write_durably(path: Path, data: bytes) -> int:
    """Write ``data`` to a new file ``path`` and fsync it; returns its inode."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        return os.fstat(f.fileno()).st_ino


def _inode(path: Path):
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _safetensors_metadata(data: bytes, damaged: str) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte length, then JSON), or :class:`CorruptFile`."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < size <= len(data) - 8:
        raise CorruptFile(f"{damaged} ({len(data)} bytes, no complete header)")
    try:
        header = json.loads(data[8:8 + size])
    except ValueError as exc:
        raise CorruptFile(f"{damaged} (its header is not valid JSON: {exc})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _files_of(folder: Path, stem: str) -> List[Path]:
    """Tensor files and temp files that saves of scheme ``stem`` may have left in ``folder``."""
    pattern = re.compile(r"^\.?" + re.escape(stem) + r"(\.json)?\.[0-9a-f]{12}(\.safetensors)?(\.tmp)?$")
    return [p for p in folder.iterdir() if pattern.match(p.name)]
