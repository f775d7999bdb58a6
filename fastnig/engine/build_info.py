"""What this installation is: versions, the compiled extension's build, the devices torch sees.

Owns: the facts ``fastnig doctor`` prints before its checks
(:mod:`fastnig.engine.selfcheck`): the versions of Python, torch,
transformers and fastnig (:func:`versions`); which build of the CPU kernel
runs, whether the CUDA kernels were built and the GPU code compiled into
them (:func:`extension_build`, :func:`cuda_architectures`, read from the
CUDA fat binaries inside the shared library); the CPU and every GPU, and
whether that GPU code runs on each (:func:`devices`, :func:`runs_on`).
Must not: run anything on a device (the checks do), print, or fail: what
cannot be known is said so (``None``, "unknown").
"""
from __future__ import annotations

import os
import platform
import struct
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from .kernels import available_cpu_isas, cpu_kernel_isa, cuda_kernels_built


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed, or no metadata (a source checkout)
        return "not installed"


def versions() -> List[Tuple[str, str]]:
    """(name, version) of Python, torch (with its CUDA), transformers and fastnig."""
    cuda = torch.version.cuda
    return [("python", f"{platform.python_version()} ({sys.executable})"),
            ("torch", f"{torch.__version__} (" + (f"CUDA {cuda}" if cuda else "CPU-only build") + ")"),
            ("transformers", _version("transformers")),
            ("fastnig", f"{_version('fastnig')} ({Path(__file__).resolve().parents[1]})")]


_FATBIN_MAGIC = 0xBA55ED50


def cuda_architectures(path: Optional[os.PathLike] = None) -> Optional[List[str]]:
    """The GPU code compiled into the extension: ``["sm_75", ..., "compute_120"]`` (``sm_XX``: machine
    code for that architecture; ``compute_XX``: PTX, compiled by the driver for that one and newer ones).

    Read from the CUDA fat binaries embedded in the extension's shared library
    (``path``; default: the loaded ``fastnig.engine._C``).  ``None`` when the
    file cannot be read; ``[]`` when no fat binary this reader knows is in
    it (no GPU code, or a format it does not know: treat as unknown).
    """
    if path is None:
        from . import kernels

        if kernels._C is None or not getattr(kernels._C, "__file__", None):
            return None
        path = kernels._C.__file__
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    found: List[Tuple[int, str]] = []
    magic = struct.pack("<I", _FATBIN_MAGIC)
    pos = data.find(magic)
    while pos != -1:
        parsed = _fatbin_entries(data, pos)
        if parsed is None:  # the magic number by chance: look further
            pos = data.find(magic, pos + 4)
            continue
        entries, end = parsed
        found += entries
        pos = data.find(magic, end)
    names = sorted(set(found), key=lambda t: (t[0], t[1].startswith("compute")))
    return [name for _, name in names]


def _fatbin_entries(data: bytes, pos: int) -> Optional[Tuple[List[Tuple[int, str]], int]]:
    """(arch, name) of the entries of the fat binary whose header starts at ``pos``, and where it ends:
    a 16-byte header (magic, version, header size, size), then per entry a header (kind: 1 = PTX,
    2 = machine code; its header size and payload size; the architecture at byte 28) and the payload.
    ``None`` when the bytes there are not one (the magic number by chance)."""
    if pos + 16 > len(data):
        return None
    _version_, header, size = struct.unpack_from("<HHQ", data, pos + 4)
    offset, end = pos + header, pos + header + size
    if header < 16 or end > len(data):
        return None
    entries = []
    while offset + 32 <= end:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, offset)
        arch = struct.unpack_from("<I", data, offset + 28)[0]
        if kind not in (1, 2) or entry_header < 32 or not 10 <= arch < 1000:
            return None
        entries.append((arch, ("compute_" if kind == 1 else "sm_") + str(arch)))
        offset += entry_header + payload
    return entries, end


def runs_on(architectures: Sequence[str], capability: Tuple[int, int]) -> bool:
    """Whether code compiled for ``architectures`` runs on a GPU of compute ``capability`` (major, minor):
    machine code of the same major and a minor not above the GPU's, or PTX of an architecture not above it."""
    major, minor = capability
    here = major * 10 + minor
    for name in architectures:
        kind, _, number = name.partition("_")
        arch = int(number)
        if kind == "sm" and arch // 10 == major and arch % 10 <= minor:
            return True
        if kind == "compute" and arch <= here:
            return True
    return False


def extension_build() -> List[Tuple[str, str]]:
    """(what, value) of the compiled extension: its file, the CPU kernel's builds, the CUDA kernels."""
    from . import kernels

    try:
        isa = cpu_kernel_isa()
    except ImportError as exc:
        return [("extension", f"NOT LOADED: {exc}")]
    rows = [("file", str(getattr(kernels._C, "__file__", "?"))),
            ("CPU kernel", f"{isa} (builds that run here: {', '.join(available_cpu_isas())})")]
    if cuda_kernels_built():
        archs = cuda_architectures()
        compiled = ", ".join(archs) if archs else "unknown (not readable from the library)"
        rows.append(("CUDA kernels", f"built; GPU code: {compiled}"))
    else:
        rows.append(("CUDA kernels", "not built (nvcc was not found when fastnig was built): CPU only"))
    return rows


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def devices() -> List[Tuple[str, str]]:
    """(device, description) of the CPU and of every GPU torch sees."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    rows = [("cpu", f"{_cpu_name()}; {usable} usable core(s), torch uses {torch.get_num_threads()} thread(s)")]
    if not torch.cuda.is_available():
        why = ("torch is a CPU-only build" if not torch.version.cuda
               else "torch was built with CUDA, but no GPU is visible (driver, CUDA_VISIBLE_DEVICES?)")
        rows.append(("cuda", f"none ({why})"))
        return rows
    try:
        built = cuda_kernels_built()
    except ImportError:  # no extension: said in the build section and by the checks
        built = False
    archs = cuda_architectures() if built else []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        text = f"{p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2 ** 30:.0f} GiB"
        if built and archs:
            text += "; fastnig's CUDA kernels " + ("run on it" if runs_on(archs, (p.major, p.minor))
                                                   else "have NO code for it: rebuild on this machine")
        rows.append((f"cuda:{i}", text))
    return rows


def gpus() -> List[str]:
    """The CUDA devices torch sees (``["cuda:0", ...]``), none without a usable GPU."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
