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
JSON does not name is an orphan that the next save removes.  One writer per
scheme path.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import torch

from ..common import PathLike, fsync_path, optional_import

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
    gets ``format``, ``version``, ``token`` and ``tensors`` (the tensor
    file's name) first, then ``meta``.  See the module docstring for why a
    killed save leaves the previous scheme readable.
    """
    save_file = optional_import("safetensors.torch", "to save schemes").save_file

    json_path = scheme_json_path(path)
    folder = json_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = json_path.name[:-len(".json")]
    token = secrets.token_hex(6)
    tensor_name = f"{stem}.{token}.safetensors"

    tmp = folder / f".{tensor_name}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"format": FORMAT, "token": token})
    with open(tmp, "rb") as f:  # on disk before it is named (an fsync error stops the save)
        os.fsync(f.fileno())
    os.replace(tmp, folder / tensor_name)

    body = {"format": FORMAT, "version": FORMAT_VERSION, "token": token, "tensors": tensor_name, **meta}
    tmp_json = folder / f".{json_path.name}.{token}.tmp"
    with open(tmp_json, "w", encoding="utf-8") as f:
        json.dump(body, f, ensure_ascii=False, indent=1, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_json, json_path)  # the commit point
    fsync_path(folder)

    # The new scheme is committed; what follows only frees disk space.
    keep = {tensor_name}
    for leftover in _files_of(folder, stem):
        if leftover.name not in keep:
            try:
                leftover.unlink()
            except OSError:
                pass
    return json_path


def read_scheme(path: PathLike) -> Tuple[Path, Dict[str, object], Dict[str, torch.Tensor]]:
    """``(json path, metadata, tensors)`` of a scheme written by :func:`write_scheme`.

    Checks the format, the version and that the tensor file belongs to the
    same save as the JSON (``path`` with or without ``.json``).
    """
    safe_open = optional_import("safetensors", "to read schemes").safe_open

    json_path = scheme_json_path(path)
    if not json_path.is_file():
        raise FileNotFoundError(f"no scheme at {json_path} (a scheme is a .json file written by Scheme.save)")
    for attempt in range(2):
        meta = _read_scheme_json(json_path)
        tensor_path = json_path.parent / meta["tensors"]
        try:
            with safe_open(str(tensor_path), framework="pt") as f:
                file_meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            break
        except FileNotFoundError:
            if attempt:  # a concurrent save may have replaced it once; twice means it is gone
                raise FileNotFoundError(f"scheme {json_path} names the tensor file {meta['tensors']}, "
                                        "which is missing; the scheme files were moved or deleted in part") from None
    if file_meta.get("token") != meta["token"]:
        raise ValueError(f"scheme {json_path}: its tensor file {meta['tensors']} belongs to another save "
                         f"(token {file_meta.get('token')!r} != {meta['token']!r}); the files were mixed up")
    return json_path, meta, tensors


def expect_tensor(tensors: Mapping[str, torch.Tensor], key: str, shape: Tuple[int, ...], where: Path) -> torch.Tensor:
    """``tensors[key]``, or ``ValueError`` when the scheme at ``where`` lacks it or has another shape."""
    if key not in tensors:
        raise ValueError(f"scheme {where}: its tensor file lacks {key!r}")
    t = tensors[key]
    if tuple(t.shape) != shape:
        raise ValueError(f"scheme {where}: {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t


def _read_scheme_json(json_path: Path) -> Dict[str, object]:
    try:
        with open(json_path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{json_path} is not a valid scheme file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not a fastnig scheme file (no \"format\": \"{FORMAT}\")")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{json_path}: scheme format version {meta.get('version')} is not supported "
                         f"(this fastnig reads version {FORMAT_VERSION})")
    return meta


def _files_of(folder: Path, stem: str) -> List[Path]:
    """Tensor files and temp files that saves of scheme ``stem`` may have left in ``folder``."""
    pattern = re.compile(r"^\.?" + re.escape(stem) + r"(\.json)?\.[0-9a-f]{12}(\.safetensors)?(\.tmp)?$")
    return [p for p in folder.iterdir() if pattern.match(p.name)]
