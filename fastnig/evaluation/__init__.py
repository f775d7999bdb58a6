"""What is measured with a model (above :mod:`fastnig.neurons`).

- :mod:`.reranking` — BM25 candidates, scoring, nDCG@10 and its test;
- :mod:`.pruning` — zeroing neuron sets, random baselines, :class:`PruningBenchmark`;
- :mod:`.table1` — Table 1: how much relevance signal each baseline keeps;
- :mod:`.table4` — Table 4's rows (:class:`PruningTable`: CSV, Markdown, LaTeX).
"""
