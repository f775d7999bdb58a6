"""The paper's figures and numbers, as CSV tables and PNG figures (above :mod:`fastnig.neurons`).

- :mod:`.neuron_analyses` — overlaps, intersections, layer/component counts
  (Figures 2-5) and :func:`analyze`;
- :mod:`.segments` — the segment analysis (``segments.csv`` + figure);
- :mod:`.table1` — Table 1's CSV and figure;
- :mod:`.writers` — CSV and matplotlib plumbing.
"""
