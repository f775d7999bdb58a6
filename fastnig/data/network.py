"""ir_datasets' downloads: importing it lazily, failing fast offline, and saying what file is missing.

Owns: the lazy import of ir_datasets (:func:`irds`); the reachability probe
patched into ir_datasets' downloader, active only inside fastnig's own calls
(:func:`download_policy`), so that an unreachable host or ``offline`` mode
fails in seconds, not minutes of retries; the hints that name the files
ir_datasets lacks and where to put them (:func:`missing_files`,
:func:`hint_text`); and the one-line summary of a download error
(:func:`short_cause`).

Must not: know about collections, qrels or pairs; build error messages about a
dataset (the collection does, with these hints); change anything for users of
ir_datasets outside :func:`download_policy`.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

from ..common import optional_import
from .records import clean_text

OFFLINE_ENV = "FASTNIG_OFFLINE"
#: The alternative every "not available" message offers.
LOCAL_HINT = ("or pass a local copy instead: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv) "
              "or 'trec:docs_tsv=DOCS,queries_tsv=QUERIES,qrels_trec=QRELS'")


def irds():
    """The ``ir_datasets`` module (imported lazily: ~0.5 s, not needed by ``import fastnig``); without it,
    :class:`fastnig.common.MissingExtra` naming ``pip install "fastnig[ir]"``."""
    return optional_import("ir_datasets", "to read datasets")


# ----------------------------------------------------- downloads: fail fast
# ir_datasets retries a dead host 3 times with a 15 s socket timeout, per
# mirror.  Before it opens a connection we probe the host (or the proxy that
# requests would use) once with a short connect timeout and remember the
# answer, so an unreachable network fails in seconds, not minutes.
_POLICY: List[Tuple[bool, float]] = []  # (offline, connect_timeout) of the active guards
_PROBES: Dict[Tuple[str, int], Tuple[float, Optional[str]]] = {}
_PROBE_RETRY_S = 300.0
_probe_installed = False


def _reachability_problem(url: str, timeout: float) -> Optional[str]:
    requests = irds().lazy_libs.requests()
    parts = urlsplit(url)
    try:
        proxies = requests.utils.get_environ_proxies(url)  # honours NO_PROXY
    except Exception:  # pragma: no cover - odd proxy settings: probe the host itself
        proxies = {}
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    target = urlsplit(proxy if "://" in proxy else f"http://{proxy}") if proxy else parts
    host = target.hostname
    if not host:
        return None
    port = target.port or (443 if target.scheme == "https" else 80)
    now = time.monotonic()
    cached = _PROBES.get((host, port))
    if cached is not None and (cached[1] is None or now - cached[0] < _PROBE_RETRY_S):
        return cached[1]
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        problem = None
    except OSError as exc:
        problem = f"cannot connect to {host}:{port} ({getattr(exc, 'strerror', None) or exc})"
    _PROBES[(host, port)] = (now, problem)
    return problem


def _install_download_probe() -> None:
    global _probe_installed
    if _probe_installed:
        return
    _probe_installed = True
    download = getattr(irds().util, "download", None)
    cls = getattr(download, "RequestsDownload", None)
    original = getattr(cls, "__iter__", None)
    if original is None or getattr(original, "_fastnig_probe", False):  # other ir_datasets: its own timeouts
        return

    def __iter__(self):
        if _POLICY:  # only inside fastnig's calls; other users of ir_datasets are untouched
            offline, timeout = _POLICY[-1]
            url = getattr(self, "url", "")
            requests = irds().lazy_libs.requests()
            if offline:
                raise requests.exceptions.ConnectionError(
                    f"offline mode ({OFFLINE_ENV}=1 or offline=True): not downloading {url}")
            problem = _reachability_problem(url, timeout)
            if problem:
                raise requests.exceptions.ConnectionError(problem)
        yield from original(self)

    __iter__._fastnig_probe = True
    cls.__iter__ = __iter__


@contextlib.contextmanager
def download_policy(offline: bool, connect_timeout: float) -> Iterator[None]:
    """Downloads by ir_datasets inside the block: none when ``offline``, else
    only from hosts that accept a connection within ``connect_timeout`` seconds."""
    _install_download_probe()
    _POLICY.append((offline, connect_timeout))
    try:
        yield
    finally:
        _POLICY.pop()


# ------------------------------------------------------ missing-file hints
def _walk_downloads(obj, seen: set, found: list, depth: int = 0) -> None:
    """ir_datasets ``Download`` objects reachable from a dataset handler."""
    from ir_datasets.util.download import Download

    if depth > 10 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Download):
        found.append(obj)
        return
    if isinstance(obj, (list, tuple, set)):
        for item in obj:
            _walk_downloads(item, seen, found, depth + 1)
    elif isinstance(obj, dict):
        for item in obj.values():
            _walk_downloads(item, seen, found, depth + 1)
    elif type(obj).__module__.startswith("ir_datasets") and hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            _walk_downloads(item, seen, found, depth + 1)


def missing_files(handlers) -> List[Dict[str, Optional[str]]]:
    """The files ir_datasets lacks for these handlers: url, md5, target path, instructions."""
    from ir_datasets.util.download import LocalDownload

    found: list = []
    seen_objects: set = set()
    for handler in handlers:
        with contextlib.suppress(Exception):  # a hint is best effort
            _walk_downloads(handler, seen_objects, found)
    missing, seen = [], set()
    for dl in found:
        cache = getattr(dl, "_cache_path", None)
        mirrors = list(getattr(dl, "mirrors", []))
        local = [m for m in mirrors if isinstance(m, LocalDownload)]
        if (cache and os.path.exists(cache)) or any(Path(m._path).exists() for m in local):
            continue
        urls = [m.url for m in mirrors if getattr(m, "url", None) and "mirror.ir-datasets.com" not in m.url]
        notes = [clean_text(m._message) for m in local
                 if getattr(m, "_message", None) and not m._message.startswith("If you have a local copy")]
        target = str(cache) if cache else (str(local[0]._path) if local else None)
        key = (target, urls[0] if urls else None)
        if key not in seen:
            seen.add(key)
            missing.append({"url": urls[0] if urls else None, "md5": getattr(dl, "expected_md5", None),
                            "target": target, "instructions": notes[0] if notes else None})
    return missing


def hint_text(missing: List[Dict[str, Optional[str]]]) -> str:
    """'To provide it: download X and copy it to Y; ...' (at most 3 files)."""
    hints = []
    for item in missing:
        if item["instructions"]:
            note = item["instructions"]
            note = note if len(note) <= 700 else note[:697] + "..."
            where = "" if item["target"] and item["target"] in note else f" and put it at {item['target']}"
            hints.append(f"follow the provider's instructions ({note}){where}")
        elif item["url"] and item["target"]:
            md5 = f" (md5 {item['md5']})" if item["md5"] else ""
            hints.append(f"download {item['url']}{md5} on a connected machine and copy it to {item['target']}")
        elif item["url"]:
            hints.append(f"ir_datasets needs network access to {item['url']}")
    if not hints:
        return ""
    more = f" (and {len(hints) - 3} more files)" if len(hints) > 3 else ""
    return "To provide it: " + "; ".join(hints[:3]) + more + ". "


def short_cause(exc: BaseException) -> str:
    """``"Type: message"`` of a download / read error, on one line of at most ~200 characters."""
    if isinstance(exc, RuntimeError) and len(exc.args) == 2 and isinstance(exc.args[1], list) and exc.args[1]:
        exc = exc.args[1][0][1]  # ir_datasets: ('All download sources failed', [(mirror, error), ...])
    message = str(exc)
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None)
    if url and ("Max retries" in message or "NameResolution" in message):
        message = f"cannot reach {urlsplit(url).hostname}"
    if isinstance(exc, FileNotFoundError) and exc.filename:
        message = f"missing file {exc.filename}"
    message = clean_text(message)
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
