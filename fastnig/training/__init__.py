"""Models that rank (above :mod:`fastnig.evaluation`).

- :mod:`.finetune` — fine-tuning a cross-encoder on a collection's judgments;
- :mod:`.demo_model` — the offline demo model (MiniLM-L6 fine-tuned on
  Cranfield, cached) and :func:`load_cross_encoder` (any id, folder or
  offline name; re-exported as :func:`fastnig.load_cross_encoder`).
"""
