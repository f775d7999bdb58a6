"""The neuron explorer: one self-contained HTML file (data, code, styles inside) for a run's schemes.

Owns: what the page holds (:func:`explorer_data`: the schemes' per-neuron
values, segment shares, named sets, exemplar pairs with their per-token
conductance, the run's facts) and how it is written (:func:`write_explorer`:
``explorer_assets/explorer.html`` with the CSS, the JavaScript and the data
inlined).  The page loads nothing from anywhere: no server, no network; it
opens from ``file://`` (docs/explorer.md).

Data layout (``<script type="application/json" id="fastnig-data">``): scheme
values as one base64 float32 array ``[schemes, neurons]`` (neurons in model
order: modules in ``sizes`` order, units within), segment shares as base64
uint8 ``[schemes with segments, neurons]`` (one code per neuron for its share
of |conductance| through the query and the passage in steps of 5 %: the
special tokens have the rest; :func:`share_codes`), exemplar
tokens as base64 int8 (×127 / the largest |term| of that exemplar).

Must not: run models or compute attributions (the per-token view comes in
ready, from :func:`fastnig.analysis.token_conductance.token_conductance`,
called by :mod:`fastnig.study.explore`).
"""
from __future__ import annotations

import base64
import json
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..common import write_atomic
from ..neurons.scheme import Scheme
from ..neurons.sets import COMPONENTS, OTHER_COMPONENTS, component, layer_index, top_count
from .markdown import md_to_html
from .run_folder import NotARunFolder, read_csv
from .scorecard import scorecard

ASSETS = "explorer_assets"
DATA_ID = "fastnig-data"


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


SHARE_STEPS = 20
"""Segment shares are kept in steps of 1/20 (5 %): one byte per neuron codes (query, passage) steps."""
_SHARE_CODE = {}
for _q in range(SHARE_STEPS + 1):
    for _p in range(SHARE_STEPS + 1 - _q):
        _SHARE_CODE[(_q, _p)] = len(_SHARE_CODE)  # 231 codes, in the order explorer.js rebuilds them


def share_codes(parts: np.ndarray) -> np.ndarray:
    """``[3, N]`` |segment means| (query, passage, special) -> ``[N]`` uint8 codes of the (query, passage)
    shares in steps of 1/:data:`SHARE_STEPS` (the special tokens have the rest; a neuron with no
    conductance codes 0, 0)."""
    total = parts.sum(axis=0)
    share = np.divide(parts[:2], total, out=np.zeros_like(parts[:2]), where=total > 0)
    q = np.clip(np.round(share[0] * SHARE_STEPS), 0, SHARE_STEPS).astype(np.int64)
    p = np.minimum(np.round(share[1] * SHARE_STEPS).astype(np.int64), SHARE_STEPS - q)
    table = np.zeros((SHARE_STEPS + 1, SHARE_STEPS + 1), dtype=np.uint8)
    for (a, b), code in _SHARE_CODE.items():
        table[a, b] = code
    return table[q, p]


def _shares(scheme: Scheme) -> Optional[np.ndarray]:
    """``[N]`` uint8 share codes (:func:`share_codes`) of a scheme with segment means, or None."""
    seg = scheme.segment_means()
    if seg is None:
        return None
    return share_codes(np.concatenate([seg[m].abs().numpy() for m in scheme.sizes], axis=1))


def named_sets(schemes: Sequence[Scheme]) -> List[Dict[str, Any]]:
    """The paper's named sets of these schemes: each scheme's own (P_x, N_x, F_x, F_A) and P_x ∩ N_x per
    dataset; ``{"name", "terms": [scheme indices, intersected]}``."""
    names = [s.name for s in schemes]
    sets = [{"name": n, "terms": [i]} for i, n in enumerate(names)]
    for i, n in enumerate(names):
        if n.startswith("P_") and "N_" + n[2:] in names:
            sets.append({"name": f"{n} ∩ N_{n[2:]}", "terms": [i, names.index("N_" + n[2:])]})
    return sets


def token_payload(tokens: Sequence[float]) -> Tuple[str, float]:
    """(base64 int8 of the tokens' terms scaled to ±127, the scale: term = int8 · scale)."""
    values = np.asarray(tokens, dtype=np.float64)
    peak = float(np.abs(values).max()) if values.size else 0.0
    scale = peak / 127 if peak > 0 else 1.0
    return _b64(np.round(values / scale).astype(np.int8)), scale


def explorer_data(schemes: Sequence[Scheme], *, title: str, levels: Sequence[float], default_level: float,
                  exemplars: Optional[Mapping[int, List[Dict[str, Any]]]] = None,
                  pairs: Optional[List[Dict[str, Any]]] = None, facts: Optional[List[Dict[str, str]]] = None,
                  hint: str = "") -> Dict[str, Any]:
    """The page's data (JSON-serialisable).

    Args:
        schemes: pair schemes and fusions of one model (same modules), in the order shown.
        title: the page's title (the run's name).
        levels: the top-X % levels offered; ``default_level`` the one shown first.
        exemplars: flat neuron index -> ``[{"scheme": i, "pair": j, "value": NIG, "tokens": b64, "scale": s}]``
            (:func:`token_payload`), for the neurons whose exemplars the page shows.
        pairs: ``[{"id", "dataset", "query", "passage", "tokens": [T str], "segments": [T int]}]``.
        facts: ``[{"title", "html"}]`` (:func:`run_facts`).
        hint: what to run to get the exemplars of a neuron not in ``exemplars`` (shown in its card).
    """
    if not schemes:
        raise ValueError("explorer: no schemes given")
    sizes = schemes[0].sizes
    for s in schemes[1:]:
        if list(s.sizes.items()) != list(sizes.items()):
            raise ValueError(f"explorer: {s.name} has other modules than {schemes[0].name}")
    values = np.stack([s.mean_vector().numpy().astype(np.float32) for s in schemes])  # [S, N]
    shares, with_shares = [], []
    for s in schemes:
        share = _shares(s)
        with_shares.append(len(shares) if share is not None else -1)
        if share is not None:
            shares.append(share)
    total = int(values.shape[1])
    modules = [[m, layer_index(m), component(m), n] for m, n in sizes.items()]
    present = [c for c in COMPONENTS + OTHER_COMPONENTS if any(row[2] == c for row in modules)]
    return {
        "format": "fastnig-explorer", "version": 1, "title": title, "model": schemes[0].model,
        "modules": modules, "components": present, "total": total,
        "schemes": [{"name": s.name, "label": s.label, "dataset": s.dataset,
                     "pairs": None if s.is_fused else s.count, "shares": with_shares[i]}
                    for i, s in enumerate(schemes)],
        "values": _b64(values), "shares": _b64(np.stack(shares)) if shares else "",
        "levels": [float(x) for x in levels], "defaultLevel": float(default_level),
        "topCounts": {f"{float(x):g}": top_count(x, total) for x in levels},
        "sets": named_sets(schemes), "exemplars": {str(k): v for k, v in (exemplars or {}).items()},
        "pairs": pairs or [], "facts": facts or [], "hint": hint,
    }


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(ASSETS, name).read_text(encoding="utf-8")


def explorer_html(data: Mapping[str, Any]) -> str:
    """The page: the template with the CSS, the JavaScript and ``data`` inlined.

    The JSON is made safe inside ``<script>``: ``<``, ``>``, ``&`` and the
    line separators are written as ``\\u`` escapes, so no text of the data (a
    passage containing ``</script>``) can end the element.
    """
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch in ("<", ">", "&", "\u2028", "\u2029"):
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    page = _asset("explorer.html")
    for key, value in (("/*STYLE*/", _asset("explorer.css")), ("/*SCRIPT*/", _asset("explorer.js")),
                       ("/*DATA*/", text)):
        page = page.replace(key, value, 1)
    return page


def write_explorer(path, data: Mapping[str, Any]) -> Path:
    """Write the page (:func:`explorer_html`) to ``path`` atomically; returns it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, explorer_html(data))
    return path


def run_facts(run_dir) -> List[Dict[str, str]]:
    """The run's facts as HTML sections: the scorecard, Table 1, Table 4, the model quality and the heads
    analysis (each when the run folder has it)."""
    run_dir = Path(run_dir)
    facts = []
    try:
        facts.append({"title": "Reproduction scorecard", "html": md_to_html(scorecard(run_dir).to_markdown())})
    except NotARunFolder:
        pass
    for title, rel in (("Table 4 — pruning", "pruning/table4.md"), ("Heads", "analysis/heads.md")):
        if (run_dir / rel).is_file():
            facts.append({"title": title, "html": md_to_html((run_dir / rel).read_text(encoding="utf-8"))})
    table1 = read_csv(run_dir / "analysis" / "baselines.csv")
    if table1:
        cols = [c for c in table1[0] if any(str(r.get(c, "")).strip() for r in table1)]
        md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        md += "".join("| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols) + " |\n" for r in table1)
        facts.insert(1 if facts else 0, {"title": "Table 1 — baselines", "html": md_to_html(md)})
    quality = run_dir / "model_quality.json"
    if quality.is_file():
        q = json.loads(quality.read_text())
        rows = [(k, q.get(k)) for k in ("dataset", "queries", "depth", "k", "ndcg", "bm25_ndcg", "random_ndcg")
                if k in q]
        md = "| measure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
        facts.append({"title": "Model quality", "html": md_to_html(md)})
    return facts
