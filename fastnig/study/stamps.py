"""Resume stamps of the study's stages: a stage whose stamp holds the same settings key is skipped.

Owns: :func:`settings_hash` (the key of a stage's settings), :func:`stage_done` and
:func:`mark_done` (``<output>/stages/<stage>.json``).  Must not: run stages
(:mod:`fastnig.study.pipeline`, :mod:`fastnig.study.head_stages`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..common import write_atomic


def settings_hash(*parts: Any) -> str:
    """A short, stable key of JSON-able settings (sorted keys; other objects by ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stamp_path(out: Path, stage: str) -> Path:
    return out / "stages" / f"{stage}.json"


def stage_done(out: Path, stage: str, key: str) -> bool:
    """Whether ``stage`` finished in ``out`` with settings key ``key``."""
    path = stamp_path(out, stage)
    return path.exists() and json.loads(path.read_text()).get("key") == key


def mark_done(out: Path, stage: str, key: str) -> None:
    write_atomic(stamp_path(out, stage), json.dumps({"key": key}))
