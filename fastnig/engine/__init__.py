"""The engine: NIG (conductance) of every Linear neuron in one forward + backward.

- :mod:`.attribute` — :func:`attribute` and :class:`Attributions`: the path, its
  chunks, the hooks that feed every Linear to the fused op;
- :mod:`.settings` — :class:`AttributionSettings`, every setting validated once;
- :mod:`.kernels` — the fused C++/CUDA op and its pure-PyTorch reference;
- :mod:`.quadrature` — path nodes and rules (trapezoid, left, Richardson), ``steps="auto"``;
- :mod:`.memory` — the memory model that sizes chunks, out-of-memory recovery;
- :mod:`.first_token` — the exact first-token cut of the last layer;
- :mod:`.encoding` — pairs as tokens, segments, integration baselines;
- :mod:`.scoring` — logits to F, P(relevant) and ranking scores;
- :mod:`.model` — model plumbing: Linears, devices, autocast, frozen eval;
- :mod:`.loading` — Hugging Face ids and folders, the offline MiniLM.

Imports nothing from the layers above (:mod:`fastnig.common` only).
"""
