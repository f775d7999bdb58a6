"""What a run folder hands to a reader (the top layer below the CLI).

- :mod:`.run_folder` — reading a run folder's files (config, CSVs, Table 4 groups);
- :mod:`.scorecard` — the paper's claims checked against a run, with the
  paper's reference numbers (``reference/paper.json``);
- :mod:`.comparison` — two runs side by side;
- :mod:`.document` — ``report.md`` / ``report.html``.

Must not: run models or compute results.
"""
