"""The collections that ship inside fastnig: Cranfield and MEDLINE (``fastnig/collections/``).

Owns: finding the packaged archives (``importlib.resources``), checking them
against ``checksums.json``, placing Cranfield's original ``cran.tar.gz`` where
ir_datasets looks for it (so ``cranfield`` loads through its real id with no
network), and unpacking MEDLINE's SMART files into TREC-style files that
:func:`fastnig.data.readers.load_trec_files` reads (spec ``med``).  The
origin, licence and checksums of every file are in
``fastnig/collections/README.md``.

Must not: parse anything but MEDLINE's three small SMART files, sample pairs,
or download.
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile
from importlib import resources
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

from ..common import write_atomic
from .network import irds
from .records import DatasetUnavailable

#: Packaged collection -> its archive in ``fastnig/collections``.
ARCHIVES = {"cranfield": "cran.tar.gz", "med": "med.tar.gz"}
_VERIFIED: Dict[str, Path] = {}


def _collections_dir():
    return resources.files("fastnig.data").joinpath("collections")


def checksums() -> Dict[str, Dict[str, object]]:
    """``checksums.json``: archive -> ``{sha256, md5, bytes, members: {name: {sha256, md5, bytes}}}``."""
    return json.loads(_collections_dir().joinpath("checksums.json").read_text())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_archive(collection: str) -> Path:
    """Path of a packaged collection's archive, its sha256 checked once per process.

    Raises:
        DatasetUnavailable: the file is missing or altered (a broken install).
    """
    if collection in _VERIFIED:
        return _VERIFIED[collection]
    name = ARCHIVES[collection]
    path = Path(str(_collections_dir().joinpath(name)))
    expected = checksums()[name]["sha256"]
    if not path.is_file() or _sha256(path) != expected:
        raise DatasetUnavailable(
            f"the packaged collection file {path} is missing or altered (sha256 should be {expected}); "
            "reinstall fastnig (pip install --force-reinstall .)")
    _VERIFIED[collection] = path
    return path


def place_cranfield() -> Path:
    """Put the packaged ``cran.tar.gz`` where ir_datasets reads ``cranfield`` from
    (``$IR_DATASETS_HOME/cranfield/cran.tar.gz``) unless a file is already there."""
    dest = Path(irds().util.home_path()) / "cranfield" / "cran.tar.gz"
    if not dest.exists():
        write_atomic(dest, packaged_archive("cranfield").read_bytes())
    return dest


def _smart_records(text: str) -> Iterator[Tuple[str, str]]:
    """``(id, text)`` of each ``.I id`` / ``.W`` record of a SMART file, whitespace collapsed."""
    for block in re.split(r"^\.I\s+", text, flags=re.M)[1:]:
        head, _, body = block.partition("\n")
        body = re.sub(r"^\.W\s*$", "", body, count=1, flags=re.M)
        yield head.strip(), " ".join(body.split())


def med_trec_files(cache_dir: Optional[Path] = None) -> Dict[str, str]:
    """MEDLINE as TREC-style files: ``{docs_tsv, queries_tsv, qrels_trec}`` paths.

    Unpacked once from the packaged ``med.tar.gz`` into
    ``cache_dir/med-<sha>`` (default ``$IR_DATASETS_HOME/fastnig-local``):
    1,033 abstracts, 30 queries, 696 judgments, all relevant (``MED.REL``,
    copied as it is).  Each member's sha256 is checked against ``checksums.json``.
    """
    archive = packaged_archive("med")
    expected = checksums()["med.tar.gz"]
    root = Path(cache_dir) if cache_dir is not None else Path(irds().util.home_path()) / "fastnig-local"
    folder = root / f"med-{expected['sha256'][:16]}"
    files = {"docs_tsv": folder / "docs.tsv", "queries_tsv": folder / "queries.tsv", "qrels_trec": folder / "qrels.txt"}
    if not files["qrels_trec"].is_file():  # written last: marks the folder complete
        members = {}
        with tarfile.open(archive) as tar:
            for name in ("MED.ALL", "MED.QRY", "MED.REL"):
                data = tar.extractfile(name).read()
                if hashlib.sha256(data).hexdigest() != expected["members"][name]["sha256"]:
                    raise DatasetUnavailable(f"{archive}: member {name} is altered; reinstall fastnig")
                members[name] = data.decode("ascii").replace("\r\n", "\n")
        for key, member in (("docs_tsv", "MED.ALL"), ("queries_tsv", "MED.QRY")):
            write_atomic(files[key], "".join(f"{i}\t{t}\n" for i, t in _smart_records(members[member])))
        write_atomic(files["qrels_trec"], members["MED.REL"])
    return {k: str(v) for k, v in files.items()}

