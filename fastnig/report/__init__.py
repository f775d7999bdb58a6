"""What a run hands to a reader: the report document and the paper's Table 4.

Owns: rendering only — :mod:`.document` (``report.md`` / ``report.html``) and
:mod:`.table4` (:class:`PruningTable`: CSV, Markdown, LaTeX).  Must not:
run models or compute results; depends on the standard library and NumPy only,
so every stage may import it.
"""
from .document import write_report
from .table4 import CSV_COLUMNS, PruningTable

__all__ = ["write_report", "CSV_COLUMNS", "PruningTable"]
