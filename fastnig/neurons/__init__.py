"""Neurons and what is computed over them (above :mod:`fastnig.data`).

- :mod:`.sets` — neuron identities (layer, component) and :class:`NeuronSet` algebra;
- :mod:`.scheme` — :class:`Scheme`, the mean NIG per neuron over a dataset's pairs
  (P_x, N_x), with :mod:`.scheme_storage` (its files) and :mod:`.exact_sums`;
- :mod:`.fusion` — F_x = P_x ⊕ N_x and F_A;
- :mod:`.stability` — split-half stability of top sets, the sampling stop rule;
- :mod:`.segment_shares` — conductance through query / passage / special tokens;
- :mod:`.expressions` — the set-expression language (``inter(O, P)``, ``F_ms & N_ms``).
"""
