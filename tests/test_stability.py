"""The split-half stability estimate and early stopping (docs/method.md §6.6).

Synthetic schemes have a known structure (true means + Gaussian noise of known
variance per pair), so the truth — the overlap of the top set of n pairs with
that of 2n pairs — can be computed and compared with the estimate.
"""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_schemes import make_attributions

from fastnig.neurons.fusion import fuse
from fastnig.neurons.scheme import Scheme, pair_half
from fastnig.neurons.stability import MIN_HALF_PAIRS, StopRule, stability, top_indices, top_overlap

REPO = Path(__file__).resolve().parents[1]
A, B = "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.output.dense"
SIZES = {A: 1000, B: 1000}
M = 2000


def draws(mu: np.ndarray, sigma, num: int, seed: int) -> np.ndarray:
    """``[num, M]`` per-pair values: true mean + Gaussian noise of sd ``sigma``."""
    rng = np.random.default_rng(seed)
    return (mu + sigma * rng.standard_normal((num, mu.size))).astype(np.float32)


def scheme_of(values: np.ndarray, prefix: str = "p", ids=None) -> Scheme:
    scheme = Scheme.empty(SIZES, {"model": "tiny", "dataset": "ms", "label": "relevant"})
    ids = ids if ids is not None else [f"{prefix}{i}" for i in range(values.shape[0])]
    return scheme.add(make_attributions({A: values[:, :1000], B: values[:, 1000:]}), ids)


def planted(strength: float = 1.0, size: int = 20) -> np.ndarray:
    mu = np.zeros(M)
    mu[np.random.default_rng(99).choice(M, size, replace=False)] = strength
    return mu


def smooth_means(seed: int = 7) -> np.ndarray:
    """Heavy-tailed true means (Student t, 3 degrees of freedom): a few strong neurons, a smooth bulk."""
    return np.random.default_rng(seed).standard_t(3, M) * 0.3


# ------------------------------------------------------------------ halves
def test_pair_halves_depend_on_the_id_only_and_are_balanced():
    ids = [f"q{i}\td{i * 7}" for i in range(2000)]
    halves = [pair_half(i) for i in ids]
    assert halves == [pair_half(i) for i in ids] and set(halves) == {0, 1}
    assert 900 < sum(halves) < 1100
    assert pair_half("q1\td7") == pair_half("q1\td7")


def test_pairs_of_one_query_are_in_one_half():
    """Halves are split by query: a query's pairs share its effect on every neuron, so spread over both
    halves they would make the halves agree more than samples of other queries do (issue 22, item 3)."""
    for q in range(60):
        halves = {pair_half(f"q{q}\td{d}") for d in range(25)}
        assert len(halves) == 1, f"the pairs of query q{q} are spread over both halves"
    per_query = [pair_half(f"q{q}\td0") for q in range(2000)]
    assert 900 < sum(per_query) < 1100  # and the queries are balanced
    assert pair_half("no-tab-id") in (0, 1)  # an id without a tab is a cluster of its own


def clustered(num_queries: int, per_query: int, query_sd: float, pair_sd: float, seed: int):
    """``[num_queries · per_query, M]`` values (true means + a per-query effect + per-pair noise) and their
    ids ``q<j>\td<i>``, query by query."""
    rng = np.random.default_rng(seed)
    queries = np.repeat(np.arange(num_queries), per_query)
    effects = rng.standard_normal((num_queries, M)) * query_sd
    values = smooth_means() + effects[queries] + pair_sd * rng.standard_normal((queries.size, M))
    return values.astype(np.float32), [f"q{q}\td{i}" for i, q in enumerate(queries)]


@pytest.mark.slow
def test_with_query_effects_the_estimate_tracks_a_doubling_by_new_queries():
    """Pairs of a query share a strong query effect, and doubling brings new queries: the truth is low
    (≈ 0.78).  Halves by query see the query effects and track it; halves by pair would not (≈ 0.93)."""
    est, true = [], []
    for rep in range(4):
        values, ids = clustered(16, 8, 1.0, 0.3, seed=300 + rep)
        small = scheme_of(values[:64], ids=ids[:64])
        whole = small.merge(scheme_of(values[64:], ids=ids[64:]))  # exact: = the scheme of all 128 pairs
        est.append(stability(small, 1))
        true.append(top_overlap(small.mean_vector().numpy(), whole.mean_vector().numpy(), small.top_count(1)))
    assert np.mean(true) < 0.85  # the regime where it matters
    assert abs(np.mean(est) - np.mean(true)) < 0.05, f"estimate {np.mean(est):.3f}, truth {np.mean(true):.3f}"


def test_half_sums_are_exact_and_survive_merge_save_and_load(tmp_path):
    values = draws(smooth_means(), 1.0, 64, seed=1) * np.float32(1e3) ** np.random.default_rng(2).integers(
        -3, 3, (64, M)).astype(np.float32)
    whole = scheme_of(values)
    parts = []  # three runs over the same pairs (same ids: the halves follow the ids)
    for a, b in ((0, 10), (10, 41), (41, 64)):
        s = Scheme.empty(SIZES, {"model": "tiny", "dataset": "ms", "label": "relevant"})
        parts.append(s.add(make_attributions({A: values[a:b, :1000], B: values[a:b, 1000:]}),
                           [f"p{i}" for i in range(a, b)]))
    merged = parts[2].merge(parts[0]).merge(parts[1])
    assert merged.half_counts() == whole.half_counts() and sum(whole.half_counts()) == 64
    for m in SIZES:
        assert torch.equal(merged._half_bins[m], whole._half_bins[m])
        assert torch.equal(whole._half_bins[m][0] + whole._half_bins[m][1], whole._bins[m])
    h0, h1 = whole.half_means()
    ids0 = [i for i in range(64) if pair_half(f"p{i}") == 0]
    assert torch.allclose(h0, torch.from_numpy(values[ids0].astype(np.float64)).mean(0), rtol=1e-12, atol=1e-9)
    loaded = Scheme.load(whole.save(tmp_path / "P_ms"))
    assert loaded.has_halves
    for m in SIZES:
        assert torch.equal(loaded._half_bins[m], whole._half_bins[m])
    assert stability(loaded, 1) == stability(whole, 1)


def test_old_scheme_files_load_without_halves_and_give_no_estimate(tmp_path):
    from safetensors.torch import load_file, save_file

    scheme = scheme_of(draws(smooth_means(), 1.0, 16, seed=3))
    path = scheme.save(tmp_path / "P_ms")
    meta = json.loads(path.read_text())
    tensor_file = tmp_path / meta["tensors"]
    tensors = {k: v for k, v in load_file(str(tensor_file)).items() if not k.startswith("half_bins/")}
    save_file(tensors, str(tensor_file), metadata={"format": "fastnig-scheme", "token": meta["token"]})
    del meta["halves"]  # as written before the halves existed (and before the tensor file's digest)
    del meta["tensors_blake2b"]
    path.write_text(json.dumps(meta))
    old = Scheme.load(path)
    assert not old.has_halves and old.half_means() is None
    assert torch.equal(old.mean_vector(), scheme.mean_vector())
    assert math.isnan(stability(old, 1))
    more = make_attributions({A: np.ones((2, 1000)), B: np.ones((2, 1000))})
    old.add(more, ["x1", "x2"])  # still adds to the main sum, still without halves
    assert old.count == 18 and not old.has_halves
    assert not old.merge(scheme_of(draws(smooth_means(), 1.0, 4, seed=4), prefix="y")).has_halves
    meta["halves"] = "blake2b-8(pair id) & 1"  # the earlier halves by pair id: loads, without halves
    path.write_text(json.dumps(meta))
    assert not Scheme.load(path).has_halves and math.isnan(stability(Scheme.load(path), 1))
    meta["halves"] = "some other rule"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="halves"):
        Scheme.load(path)


def test_a_scheme_with_the_earlier_halves_by_pair_is_not_resumed_with_early_stopping(tmp_path):
    from fastnig.study.attribution_job import open_scheme

    scheme = scheme_of(draws(smooth_means(), 1.0, 16, seed=3))
    path = scheme.save(tmp_path / "P_ms")
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "halves": "blake2b-8(pair id) & 1"}))  # as fastnig wrote it before
    job_meta = {"model": "tiny", "dataset": "ms", "label": "relevant", "settings": scheme.settings}
    with pytest.raises(ValueError, match="keeps no query halves .*delete the scheme to re-create it"):
        open_scheme(tmp_path / "P_ms", SIZES, job_meta, {"stop_when": StopRule(1, 0.95).as_dict()})
    resumed = open_scheme(tmp_path / "P_ms", SIZES, job_meta, {"seed": 0})  # without early stopping: resumes
    assert resumed.count == 16 and not resumed.has_halves


def test_no_estimate_for_fusions_tiny_schemes_or_empty_levels():
    pos = scheme_of(draws(smooth_means(), 1.0, 32, seed=5))
    neg = Scheme.empty(SIZES, {"model": "tiny", "dataset": "ms", "label": "non-relevant"})
    vals = draws(smooth_means(), 1.0, 32, seed=6)
    neg.add(make_attributions({A: vals[:, :1000], B: vals[:, 1000:]}, label="non-relevant"),
            [f"n{i}" for i in range(32)])
    assert math.isnan(stability(fuse(pos, neg), 1))
    tiny = scheme_of(draws(smooth_means(), 1.0, 2 * MIN_HALF_PAIRS - 1, seed=7))
    assert math.isnan(stability(tiny, 1))
    assert math.isnan(stability(pos, 0.01))  # 0.01 % of 2000 neurons keeps none
    assert 0 <= stability(pos, 1) <= 1
    with pytest.raises(ValueError, match="factor"):
        stability(pos, 1, factor=1)


def test_top_indices_break_ties_like_scheme_ranking():
    scheme = scheme_of(np.round(draws(smooth_means(), 1.0, 4, seed=8), 1))
    values = scheme.mean_vector().numpy()
    for by in ("value", "abs"):
        assert np.array_equal(top_indices(values, 50, by), scheme.ranking(by)[:50])
    assert top_overlap(values, values, 20) == 1.0 and math.isnan(top_overlap(values, values, 0))


# ------------------------------------------------------- behaviour by design
def test_a_planted_stable_set_is_detected():
    mu = planted(strength=1.0, size=20)  # exactly the top 1 % (20 of 2000)
    values = draws(mu, 1.0, 256, seed=11)
    few, many = scheme_of(values[:8]), scheme_of(values)
    assert stability(many, 1) >= 0.95
    assert stability(few, 1) < 0.8
    assert set(np.flatnonzero(mu)) == set(many.ranking()[:20].tolist())  # and it is the planted set


def test_pure_noise_is_not_detected_as_stable():
    values = draws(np.zeros(M), 1.0, 256, seed=12)
    for n in (16, 64, 256):
        for level in (0.5, 1, 5):
            assert stability(scheme_of(values[:n]), level) < 0.7, (n, level)


def test_more_pairs_give_a_higher_estimate():
    values = draws(smooth_means(), 1.0, 512, seed=13)
    for level in (1, 5):
        estimates = [stability(scheme_of(values[:n]), level) for n in (16, 64, 512)]
        assert estimates[0] < estimates[1] < estimates[2], (level, estimates)


@pytest.mark.slow
def test_the_estimate_tracks_the_true_doubling_overlap():
    """Noise model with heavy-tailed means and neuron-specific noise: estimate ≈ truth on average,
    closer than the uncorrected split-half overlap."""
    mu = smooth_means()
    sigma = np.exp(np.random.default_rng(21).standard_normal(M) * 0.5)
    for n, level in ((32, 1), (64, 5)):
        est, raw, true = [], [], []
        for rep in range(6):
            values = draws(mu, sigma, 2 * n, seed=100 + rep)
            small, double = scheme_of(values[:n]), scheme_of(values)
            k = small.top_count(level)
            est.append(stability(small, level))
            raw.append(stability(small, level, factor=math.inf))  # 1 - mean split-half loss, uncorrected
            true.append(top_overlap(small.mean_vector().numpy(), double.mean_vector().numpy(), k))
        assert abs(np.mean(est) - np.mean(true)) < 0.04, (n, level, est, true)
        assert abs(np.mean(est) - np.mean(true)) < abs(np.mean(raw) - np.mean(true))


# ------------------------------------------------------------------- rule
def test_stop_rule_checks_its_fields_and_rounds():
    rule = StopRule.parse({"level": 1, "overlap": 0.95})
    assert rule.round_ends(1000) == [16, 32, 64, 128, 256, 512, 1000]
    assert rule.round_ends(16) == [16] and rule.round_ends(10) == [10]
    assert StopRule(1, 0.9, first_round=8).round_ends(40) == [8, 16, 32, 40]
    assert StopRule.parse(None) is None and StopRule.parse(rule) is rule
    for bad, words in [({"level": 0, "overlap": 0.9}, "level"), ({"level": 1, "overlap": 1.2}, "overlap"),
                       ({"level": 1}, "missing"), ({"level": 1, "overlap": 0.9, "patience": 2}, "unknown"),
                       ({"level": 1, "overlap": 0.9, "first_round": 2}, "first_round"),
                       ({"level": 1, "overlap": 0.9, "by": "rank"}, "by"),
                       ({"level": 1, "overlap": 0.9, "confirm": 0}, "confirm")]:
        with pytest.raises(ValueError, match=words):
            StopRule.parse(bad)


def test_stop_rule_needs_the_criterion_at_confirm_round_ends_in_a_row(monkeypatch):
    import fastnig.neurons.stability as stab

    monkeypatch.setattr(stab, "stability", lambda scheme, level, by="value", factor=2.0: 0.97)
    rule, scheme = StopRule(1, 0.95), scheme_of(draws(smooth_means(), 1.0, 8, seed=41))
    assert rule.confirm == 2 and rule.as_dict()["confirm"] == 2
    assert rule.check(scheme) == (False, 0.97)  # the first pass alone does not stop
    assert rule.check(scheme, [0.5, 0.96]) == (True, 0.97)
    assert rule.check(scheme, [0.96, 0.94])[0] is False  # the round end before did not pass
    assert rule.check(scheme, [0.96, None])[0] is False and rule.check(scheme, [float("nan")])[0] is False
    assert StopRule(1, 0.95, confirm=1).check(scheme) == (True, 0.97)  # the former rule
    assert StopRule(1, 0.95, confirm=3).check(scheme, [0.96, 0.96])[0]
    assert not StopRule(1, 0.95, confirm=3).check(scheme, [0.96])[0]
    monkeypatch.setattr(stab, "stability", lambda scheme, level, by="value", factor=2.0: float("nan"))
    assert not rule.check(scheme, [0.99])[0]  # an estimate that is not available never holds


class _Pair:
    def __init__(self, q: int, d: int):
        self.query_id, self.doc_id = f"q{q}", f"d{d}"


class _FakeJob:
    """``_Job``'s interface without a model: each pair's NIG is made up from its index (for the round logic)."""

    def __init__(self, scheme: Scheme, out: Path, die_after=None):
        self.scheme, self.out, self.die_after, self.done = scheme, out, die_after, 0

    def run(self, todo) -> None:
        from fastnig.study.attribution_job import pair_id

        for pair in todo:
            if self.die_after is not None and self.done >= self.die_after:
                raise KeyboardInterrupt("killed")
            i = int(pair.doc_id[1:])
            values = draws(smooth_means(), 1.0, 1, seed=1000 + i)
            self.scheme.add(make_attributions({A: values[:, :1000], B: values[:, 1000:]}), [pair_id(pair)])
            self.scheme.save(self.out)
            self.done += 1


def _rounds(tmp_path, *, confirm=2, num=40, die_after=None, name="P"):
    """Run fastnig's round logic on ``num`` made-up pairs with the estimate ``estimates[pairs seen]``."""
    from fastnig.study.attribution_job import _attribute_in_rounds, pair_id

    out = tmp_path / name
    scheme = Scheme.load(out) if Scheme.exists(out) else Scheme.empty(
        SIZES, {"model": "tiny", "dataset": "ms", "label": "relevant"})
    drawn = [_Pair(i % 7, i) for i in range(num)]
    job = _FakeJob(scheme, out, die_after)
    rule = StopRule.parse({"level": 1, "overlap": 0.95, "first_round": 4, **({} if confirm == 2 else
                                                                               {"confirm": confirm})})
    end, reason, checks = _attribute_in_rounds(job, drawn, lambda i, p: pair_id(p) not in scheme.seen_ids,
                                               rule, None)
    return end, reason, [(c["pairs_sampled"], c["estimate"]) for c in checks], job


def _estimates_by_seen(table):
    return lambda scheme, level, by="value", factor=2.0: table[len(scheme.seen_ids)]


def test_early_stopping_stops_one_round_end_after_the_first_pass(tmp_path, monkeypatch):
    """Issue 22, item 3: stopping at the first round end whose estimate passes selects the round ends where
    the noise pushed it up.  The rule now asks for two passes in a row: here it stops at 16, not at 8."""
    import fastnig.neurons.stability as stab

    monkeypatch.setattr(stab, "stability", _estimates_by_seen({4: 0.5, 8: 0.96, 16: 0.97, 32: 0.98}))
    end, reason, checks, _ = _rounds(tmp_path)
    assert (end, reason) == (16, "stable"), f"stopped at {end} ({reason}); checks {checks}"
    assert checks == [(4, 0.5), (8, 0.96), (16, 0.97)]
    end, reason, _, _ = _rounds(tmp_path, confirm=1, name="former")
    assert (end, reason) == (8, "stable")  # confirm=1: the former rule


def test_one_lucky_round_end_does_not_stop_a_run(tmp_path, monkeypatch):
    import fastnig.neurons.stability as stab

    monkeypatch.setattr(stab, "stability", _estimates_by_seen({4: 0.5, 8: 0.96, 16: 0.90, 32: 0.97}))
    end, reason, checks, _ = _rounds(tmp_path)
    assert (end, reason) == (40, None) and [c[0] for c in checks] == [4, 8, 16, 32]  # to the max, not at 8


def test_a_resumed_run_reads_the_checks_of_the_round_ends_it_went_past(tmp_path, monkeypatch):
    """Killed after the first pass (round end 8) and before the confirming one (16): the resumed run must
    find the pass at 8 in the saved scheme and stop at 16, as the uninterrupted run does."""
    import fastnig.neurons.stability as stab

    monkeypatch.setattr(stab, "stability", _estimates_by_seen({4: 0.5, 8: 0.96, 16: 0.97, 32: 0.98}))
    with pytest.raises(KeyboardInterrupt):
        _rounds(tmp_path, die_after=11)
    killed = Scheme.load(tmp_path / "P")
    assert len(killed.seen_ids) == 11 and [c["pairs_sampled"] for c in killed.extra["stopping"]["checks"]] == [4, 8]
    end, reason, checks, job = _rounds(tmp_path)
    assert (end, reason) == (16, "stable") and job.done == 5
    assert checks == [(4, 0.5), (8, 0.96), (16, 0.97)]
    whole = _rounds(tmp_path, name="whole")
    assert whole[:3] == (end, reason, checks)
    assert torch.equal(Scheme.load(tmp_path / "P").mean_vector(), Scheme.load(tmp_path / "whole").mean_vector())


def test_config_pairs_accepts_a_number_or_max_with_stop_when():
    from fastnig.study.config import ConfigError, load_config

    base = {"model": "demo", "output": "runs/x", "attribution": {"datasets": {"cran": "cranfield"}}}
    cfg = load_config({**base, "attribution": {**base["attribution"], "pairs": 300}})
    assert cfg.attribution["pairs"] == 300 and cfg.attribution["stop_when"] is None
    cfg = load_config({**base, "attribution": {**base["attribution"],
                                                "pairs": {"max": 1000, "stop_when": {"level": 1, "overlap": 0.95}}}})
    assert cfg.attribution["pairs"] == 1000
    assert cfg.attribution["stop_when"] == {"level": 1, "overlap": 0.95, "by": "value", "first_round": 16,
                                            "confirm": 2}
    for pairs, words in [({"stop_when": {"level": 1, "overlap": 0.95}}, "max"),
                         ({"max": 10, "stop_when": {"level": 1, "overlap": 2}}, "overlap"),
                         ({"max": 0}, "positive integer")]:
        with pytest.raises(ConfigError, match=words):
            load_config({**base, "attribution": {**base["attribution"], "pairs": pairs}})


# ------------------------------------------------------ early stopping runs
@pytest.fixture(scope="module")
def collection():
    from fastnig.data import load_collection

    return load_collection("med")


@pytest.fixture(scope="module")
def model_dir(saved_tiny_model):
    return saved_tiny_model(seed=4)  # agrees with about a third of the MED relevant pairs


@pytest.fixture(scope="module")
def tiny(model_dir):
    """A tiny 2-logit BERT loaded from a folder (so that it has a name) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def _attribute(model, tokenizer, collection, out, **kw):
    from fastnig.engine.settings import AttributionSettings
    from fastnig.study.attribution_job import attribute_dataset

    kw = {"label": "relevant", "settings": AttributionSettings(steps=4, max_length=48), "chunk_pairs": 3,
          "progress": False, **kw}
    return attribute_dataset(model, tokenizer, collection, out=out, **kw)


def _fake_estimate(threshold: int):
    """An estimate that says 'stable' once the scheme holds ``threshold`` pairs (tests the control flow)."""
    def estimate(scheme, level, by="value", factor=2.0):
        return 1.0 if scheme.count >= threshold else 0.5
    return estimate


def _fake_estimate_seen(threshold: int):
    """'stable' once ``threshold`` pairs were sampled (summed or dropped by the agreement filter)."""
    def estimate(scheme, level, by="value", factor=2.0):
        return 1.0 if len(scheme.seen_ids) >= threshold else 0.5
    return estimate


def assert_bit_identical(a: Scheme, b: Scheme) -> None:
    assert a.pair_ids == b.pair_ids and a.dropped_ids == b.dropped_ids
    for m in a.sizes:
        assert torch.equal(a._bins[m], b._bins[m]) and torch.equal(a._half_bins[m], b._half_bins[m])
    for t in ("delta", "f_input", "f_baseline", "num_tokens"):
        assert torch.equal(getattr(a, t), getattr(b, t))


@pytest.mark.slow
def test_early_stopping_stops_at_the_rule_and_never_exceeds_max(tmp_path, tiny, collection,
                                                                monkeypatch):
    import fastnig.neurons.stability as stab

    monkeypatch.setattr(stab, "stability", _fake_estimate(6))
    rule = {"level": 1, "overlap": 0.9, "first_round": 4}
    s = _attribute(*tiny, collection, tmp_path / "P", num_pairs=20, stop_when=rule,
                   agreement_filter=False)
    stopping = s.extra["stopping"]  # stable from 8 on: confirmed at 16 (confirm = 2)
    assert stopping["reason"] == "stable" and stopping["pairs_sampled"] == 16 and s.count == 16
    assert [(c["pairs_sampled"], c["estimate"]) for c in stopping["checks"]] == [(4, 0.5), (8, 1.0), (16, 1.0)]
    assert Scheme.load(tmp_path / "P").extra["stopping"] == stopping
    monkeypatch.setattr(stab, "stability", _fake_estimate(10 ** 9))  # never stable: up to max, not beyond
    s = _attribute(*tiny, collection, tmp_path / "P2", num_pairs=11, stop_when=rule,
                   agreement_filter=False)
    assert s.extra["stopping"]["reason"] == "max pairs" and s.count == 11
    assert [c["pairs_sampled"] for c in s.extra["stopping"]["checks"]] == [4, 8]
    # the real estimate: the whole model (100 %) is "stable" as soon as both halves (by query) hold
    # MIN_HALF_PAIRS pairs, so it stops at the second round end where the estimate is available
    monkeypatch.undo()
    s = _attribute(*tiny, collection, tmp_path / "P3", num_pairs=40,
                   stop_when={"level": 100, "overlap": 1.0, "first_round": 8}, agreement_filter=False)
    assert min(s.half_counts()) >= MIN_HALF_PAIRS
    checks = s.extra["stopping"]["checks"]
    assert s.extra["stopping"]["reason"] == "stable" and s.count == s.extra["stopping"]["pairs_sampled"] < 40
    assert [c["estimate"] for c in checks][-2:] == [1.0, 1.0]
    assert all(c["estimate"] is None for c in checks[:-2]) and checks[-1]["pairs_sampled"] == s.count


@pytest.mark.slow
def test_a_stopped_scheme_equals_a_fixed_run_with_its_pairs_bit_for_bit(tmp_path, tiny, collection, monkeypatch):
    import fastnig.neurons.stability as stab

    monkeypatch.setattr(stab, "stability", _fake_estimate(5))
    stopped = _attribute(*tiny, collection, tmp_path / "stopped", num_pairs=60,
                         stop_when={"level": 1, "overlap": 0.9, "first_round": 4})
    used = stopped.extra["stopping"]["pairs_sampled"]
    assert stopped.extra["stopping"]["reason"] == "stable" and used < 60
    assert stopped.num_dropped > 0  # the agreement filter ran round by round
    fixed = _attribute(*tiny, collection, tmp_path / "fixed", num_pairs=used, chunk_pairs=5)
    assert fixed.extra["stopping"] == {"rule": None, "max_pairs": used, "pairs_sampled": used,
                                       "reason": "max pairs"}
    assert_bit_identical(stopped, fixed)
    # running it again resumes nothing and stops at the same point
    again = _attribute(*tiny, collection, tmp_path / "stopped", num_pairs=60,
                       stop_when={"level": 1, "overlap": 0.9, "first_round": 4})
    assert_bit_identical(again, stopped) and again.extra == stopped.extra


CHILD = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{tests!r}]  # fastnig itself: the installed package (with its compiled extension)
    import fastnig.study.attribution_job as job, fastnig.neurons.stability as stab
    from fastnig.engine.settings import AttributionSettings
    from fastnig.data import load_collection
    from test_stability import _fake_estimate_seen
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
    stab.stability = _fake_estimate_seen(8)
    real = job.attribute
    def slow(*a, **k):
        time.sleep(0.15)  # so that the parent's kill lands inside a round
        return real(*a, **k)
    job.attribute = slow
    job.attribute_dataset(model, tokenizer, load_collection("med"), label="relevant", out=sys.argv[1],
                               num_pairs=60, settings=AttributionSettings(steps=4, max_length=48), chunk_pairs=1,
                          progress=False,
                               stop_when={{"level": 1, "overlap": 0.9, "first_round": 4}})
""")


@pytest.mark.slow
def test_resume_after_a_kill_in_the_middle_of_a_round_gives_the_same_scheme(tmp_path, tiny, model_dir, collection,
                                                                             monkeypatch):
    import fastnig.neurons.stability as stab

    script = CHILD.format(tests=str(REPO / "tests"))
    out = tmp_path / "P"
    child = subprocess.Popen([sys.executable, "-c", script, str(out), str(model_dir)], stderr=subprocess.PIPE,
                             text=True)
    json_path = out.with_suffix(".json")
    deadline, killed_at = time.time() + 300, None
    while time.time() < deadline and child.poll() is None:
        try:
            meta = json.loads(json_path.read_text())
            seen = len(meta["pair_ids"]) + len(meta["dropped_ids"])
        except (OSError, ValueError, KeyError):
            seen = 0
        if 9 <= seen <= 14:  # past the round end at 8 (a first pass), before the one at 16 (the confirming one)
            child.send_signal(signal.SIGKILL)
            killed_at = seen
            break
        time.sleep(0.02)
    child.communicate(timeout=60)
    assert killed_at is not None, "the child finished (or never reached the round) before the kill"
    partial = Scheme.load(out)
    assert 8 < len(partial.seen_ids) < 16
    monkeypatch.setattr(stab, "stability", _fake_estimate_seen(8))
    resumed = _attribute(*tiny, collection, out, num_pairs=60, chunk_pairs=1,
                         stop_when={"level": 1, "overlap": 0.9, "first_round": 4})
    whole = _attribute(*tiny, collection, tmp_path / "whole", num_pairs=60, chunk_pairs=1,
                       stop_when={"level": 1, "overlap": 0.9, "first_round": 4})
    assert resumed.extra["stopping"] == whole.extra["stopping"]
    assert whole.extra["stopping"]["reason"] == "stable" and whole.extra["stopping"]["pairs_sampled"] == 16
    assert_bit_identical(resumed, whole)
    assert len(list(tmp_path.glob("P.*"))) == 2  # no leftovers


@pytest.mark.slow
def test_sharded_early_stopping_equals_one_process(tmp_path, tiny, collection, monkeypatch):
    """Two shards in two threads (each its own model copy), combined at every round end, as torchrun ranks."""
    import copy
    import threading

    import fastnig.neurons.stability as stab

    monkeypatch.setattr(stab, "stability", _fake_estimate(5))
    rule = {"level": 1, "overlap": 0.9, "first_round": 4}
    single = _attribute(*tiny, collection, tmp_path / "single", num_pairs=60, stop_when=rule)
    barrier, slots = threading.Barrier(2), [None, None]

    def combine_for(rank):
        def combine(part):
            slots[rank] = part
            barrier.wait()
            merged = slots[0].merge(slots[1])
            barrier.wait()
            return merged
        return combine

    results, errors = [None, None], []

    def run(rank):
        try:
            # own model and tokenizer per thread: a fast tokenizer's truncation setting is shared state
            # (one thread's only_second -> longest_first fallback can meet the other's only_second)
            results[rank] = _attribute(copy.deepcopy(tiny[0]), copy.deepcopy(tiny[1]), collection,
                                       tmp_path / f"shard{rank}",
                                       num_pairs=60, stop_when=rule, shard=(rank, 2), combine=combine_for(rank))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    merged = results[0].merge(results[1])
    assert merged.extra["stopping"]["pairs_sampled"] == single.extra["stopping"]["pairs_sampled"]
    assert sorted(merged.pair_ids) == sorted(single.pair_ids)
    assert sorted(merged.dropped_ids) == sorted(single.dropped_ids)
    for m in single.sizes:
        assert torch.equal(merged._bins[m], single._bins[m])
        assert torch.equal(merged._half_bins[m], single._half_bins[m])


def test_schemes_csv_and_the_report_show_the_estimate_per_level(tmp_path):
    import csv

    from fastnig.analysis.neuron_analyses import scheme_summary
    from fastnig.report.document import write_report

    scheme = scheme_of(draws(smooth_means(), 1.0, 48, seed=31))
    scheme.extra["stopping"] = {"rule": None, "max_pairs": 48, "pairs_sampled": 48, "reason": "max pairs"}
    rows = scheme_summary([scheme], tmp_path / "analysis", levels=[0.1, 1, 5])
    assert rows[0]["stability@1%"] == stability(scheme, 1) and rows[0]["stop_reason"] == "max pairs"
    with open(tmp_path / "analysis" / "schemes.csv") as f:
        row = next(csv.DictReader(f))
    assert [c for c in row if c.startswith("stability@")] == ["stability@0.1%", "stability@1%", "stability@5%"]
    assert float(row["stability@5%"]) == stability(scheme, 5) and row["pairs_sampled"] == "48"
    md = write_report(tmp_path, {"name": "t"}, {}, {})["md"].read_text()
    assert "## Pairs used and stability of the top-X % sets" in md and "stability@1%" in md
