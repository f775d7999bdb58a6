"""Every ```python block of README.md and docs/*.md runs, or says why it does not.

A block runs here, in-process: compiled under the name ``FILE:LINE`` and
executed in a fresh namespace, with the current folder moved to the test's
``tmp_path`` (so a file a snippet writes lands there) and downloads switched
off.  A block that must not run here carries a marker on an HTML comment
line directly above its opening fence (other comment lines, such as
``<!-- quickstart-snippet -->`` for CI, may sit in between):

    <!-- snippet: needs-network (why) -->   needs the network (the Hugging Face Hub, a download)
    <!-- snippet: skip (why) -->            not meant to run here; the reason is required

Marked blocks produce no test (so a fresh, offline clone skips nothing here);
:func:`test_every_block_runs_or_is_marked` fails on a block that is neither
collected to run nor marked, on an unknown marker and on a marker that
precedes no python block.  The runnable blocks load the offline MiniLM-L6 of
the ``[demo]`` extra and attribute a few pairs with a few steps: seconds each.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!--\s*snippet:\s*(?P<kind>[a-z-]+)\s*(?:\((?P<reason>[^)]*)\))?\s*-->$")
KINDS = ("needs-network", "skip")


@dataclass
class Block:
    path: Path
    line: int                    # 1-based line of the opening fence
    code: str
    marker: Optional[str]        # "needs-network", "skip" or None
    reason: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO).as_posix()}:{self.line}"


def doc_files() -> List[Path]:
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def python_blocks(path: Path, problems: Optional[List[str]] = None) -> List[Block]:
    """The ```python blocks of one Markdown file, each with the marker of the comment lines above it."""
    problems = problems if problems is not None else []
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        fence = lines[i].strip()
        if not fence.startswith("```"):
            if MARKER.match(lines[i].strip()) is None and lines[i].strip().startswith("<!-- snippet"):
                problems.append(f"{path.name}:{i + 1}: malformed snippet marker {lines[i].strip()!r}")
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith("```"):
            end += 1
        if end == len(lines):
            problems.append(f"{path.name}:{i + 1}: code fence never closed")
            break
        markers = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("<!--") and lines[j].strip().endswith("-->"):
            match = MARKER.match(lines[j].strip())
            if match:
                markers.append((j + 1, match.group("kind"), (match.group("reason") or "").strip()))
            j -= 1
        language = fence[3:].strip().split()[0] if fence[3:].strip() else ""
        if language != "python":
            if markers:
                problems.append(f"{path.name}:{markers[0][0]}: snippet marker above a ```{language} block "
                                "(only python blocks are run)")
        else:
            marker, reason = None, ""
            if len(markers) > 1:
                problems.append(f"{path.name}:{i + 1}: more than one snippet marker")
            if markers:
                at, marker, reason = markers[0]
                if marker not in KINDS:
                    problems.append(f"{path.name}:{at}: unknown snippet marker {marker!r} (use one of {KINDS})")
                elif marker == "skip" and not reason:
                    problems.append(f"{path.name}:{at}: 'snippet: skip' needs a reason in parentheses")
            blocks.append(Block(path, i + 1, "\n".join(lines[i + 1:end]) + "\n", marker, reason))
        i = end + 1
    return blocks


ALL_BLOCKS = [block for path in doc_files() for block in python_blocks(path)]
RUNNABLE = [block for block in ALL_BLOCKS if block.marker is None]


def test_every_block_runs_or_is_marked():
    problems: List[str] = []
    blocks = [block for path in doc_files() for block in python_blocks(path, problems)]
    assert blocks, "no python block found in README.md and docs/*.md"
    collected = {block.name for block in RUNNABLE}
    for block in blocks:
        if block.marker is None and block.name not in collected:
            problems.append(f"{block.name}: neither run by this test nor marked")
    assert not problems, "\n".join(problems)


def test_the_readme_starts_with_a_hub_model_and_keeps_the_quickstart_offline():
    """The README's first code block attributes a model named by its Hub id; the block CI runs
    (the first python block after ``<!-- quickstart-snippet -->``) uses the offline demo model."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first = python_blocks(REPO / "README.md")[0]
    assert first.line == min(i + 1 for i, line in enumerate(text.splitlines()) if line.startswith("```"))
    assert "fastnig.attribute(" in first.code and re.search(r'load_cross_encoder\("[\w.-]+/[\w.-]+"\)', first.code)
    after = text.split("<!-- quickstart-snippet -->", 1)[1]
    quickstart = after.split("```python", 1)[1].split("```", 1)[0]
    assert 'load_cross_encoder("minilm-l6-cranfield")' in quickstart and "fastnig.attribute(" in quickstart


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_snippet_runs(block: Block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("FASTNIG_OFFLINE", "1")
    code = compile(block.code, block.name, "exec")
    exec(code, {"__name__": "__main__", "__file__": str(tmp_path / "snippet.py")})
