"""The whole study, staged and resumable (above everything but the report and CLI).

- :mod:`.config` — :class:`RunConfig`, read and validated from YAML/TOML or a
  packaged config (``configs/``);
- :mod:`.plan` — what a config costs (``fastnig run --plan``);
- :mod:`.distributed` — ranks for ``torchrun``;
- :mod:`.attribution_job` — one (dataset, label) attribution job: sampling,
  resume, shards, early stop;
- :mod:`.pipeline` — the stages (model quality, attribution, analysis,
  pruning, report) and :func:`run_study`.
"""
