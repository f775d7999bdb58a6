"""Markdown -> HTML for the report and the explorer, with markdown-it-py (CommonMark + GFM tables).

Owns: :func:`md_to_html`: the one Markdown renderer of the package.  Raw
HTML in the Markdown is escaped (``html=False``; only ``<u>…</u>``, Table
4's underline, is kept), GFM tables keep an escaped ``\\|`` inside a cell,
and every table cell whose text is a number (``12``, ``-0.5``, ``3.2 %``,
``1e-05``, ``nan``) gets ``class="num"`` so that the page can align numbers
right and text left, whatever table wrote it.
Must not: lay out a page (:mod:`fastnig.report.document`, :mod:`fastnig.report.explorer`).
"""
from __future__ import annotations

import re

NUMBER = re.compile(r"^[-+−]?(\d[\d,]*(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*%?$|^[-+]?(nan|inf)$", re.IGNORECASE)


def _renderer():
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")

    def cell_open(self, tokens, idx, options, env):
        inline = tokens[idx + 1] if idx + 1 < len(tokens) else None
        text = inline.content if inline is not None and inline.type == "inline" else ""
        text = re.sub(r"</?u>|[*_`]", "", text).strip()
        if NUMBER.match(text):
            tokens[idx].attrJoin("class", "num")
        return self.renderToken(tokens, idx, options, env)

    md.add_render_rule("td_open", cell_open)
    md.add_render_rule("th_open", cell_open)
    return md


_MD = None


def md_to_html(text: str) -> str:
    """HTML of Markdown ``text`` (CommonMark, GFM tables; raw HTML escaped; numeric cells ``class="num"``)."""
    global _MD
    if _MD is None:
        _MD = _renderer()
    # the one raw tag the tables use (Table 4 underlines the second best): escaped by markdown-it, restored here
    return re.sub(r"&lt;u&gt;(.+?)&lt;/u&gt;", r"<u>\1</u>", _MD.render(text))
