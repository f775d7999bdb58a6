"""Schemes, neuron sets and their algebra (docs/method.md §4, §6), with hand-computed expectations."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastnig.engine.attribute import Attributions
from fastnig.neurons.exact_sums import MAX_PAIRS
from fastnig.neurons.fusion import fuse, fuse_all
from fastnig.neurons.scheme import Scheme
from fastnig.neurons.scheme_storage import scheme_json_path
from fastnig.neurons.sets import COMPONENTS, NeuronSet, component, intersection, layer_index, neuron_universe, union

REPO = Path(__file__).resolve().parents[1]

SETTINGS = {"model": "tiny", "target": "relevant", "output": "probability", "baseline": "pad", "steps": 8,
            "rule": "trapezoid", "max_length": 512, "dtype": "float32"}
A, B = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.intermediate.dense"
SIZES = {A: 4, B: 6}


def make_attributions(scores: dict, label: str = "relevant", **settings) -> Attributions:
    """Attributions of P pairs from ``{module: [P, n] values}`` (per-pair numbers are made up)."""
    scores = {m: torch.as_tensor(v, dtype=torch.float32) for m, v in scores.items()}
    num = next(iter(scores.values())).shape[0]
    return Attributions(scores=scores, delta=torch.arange(num, dtype=torch.float32) * 1e-3,
                        f_input=torch.full((num,), 0.9), f_baseline=torch.full((num,), 0.1),
                        targets=[label] * num, num_tokens=torch.full((num,), 7, dtype=torch.long),
                        settings={**SETTINGS, "target": label, **settings})


def make_scheme(scores: dict, ids, label="relevant", dataset="ms", sizes=None, **settings) -> Scheme:
    sizes = sizes or {m: len(v[0]) for m, v in scores.items()}
    scheme = Scheme.empty(sizes, {"model": "tiny", "dataset": dataset, "label": label})
    return scheme.add(make_attributions(scores, label, **settings), ids)


# ------------------------------------------------------------------ names
@pytest.mark.parametrize("name, layer, comp", [
    ("bert.encoder.layer.3.attention.self.query", 3, "query"),
    ("bert.encoder.layer.3.attention.self.key", 3, "key"),
    ("bert.encoder.layer.3.attention.self.value", 3, "value"),
    ("bert.encoder.layer.3.attention.output.dense", 3, "attention_output"),
    ("bert.encoder.layer.3.intermediate.dense", 3, "intermediate"),
    ("bert.encoder.layer.3.output.dense", 3, "ff_output"),
    ("roberta.encoder.layer.11.attention.self.value", 11, "value"),
    ("roberta.encoder.layer.11.output.dense", 11, "ff_output"),
    ("electra.encoder.layer.0.attention.output.dense", 0, "attention_output"),
    ("electra.encoder.layer.0.intermediate.dense", 0, "intermediate"),
    ("electra.embeddings_project", -1, "embeddings"),
    ("distilbert.transformer.layer.5.attention.q_lin", 5, "query"),
    ("distilbert.transformer.layer.5.attention.k_lin", 5, "key"),
    ("distilbert.transformer.layer.5.attention.v_lin", 5, "value"),
    ("distilbert.transformer.layer.5.attention.out_lin", 5, "attention_output"),
    ("distilbert.transformer.layer.5.ffn.lin1", 5, "intermediate"),
    ("distilbert.transformer.layer.5.ffn.lin2", 5, "ff_output"),
    ("bert.pooler.dense", -1, "pooler"),
    ("classifier", -1, "other"),
])
def test_layer_and_component_from_names(name, layer, comp):
    assert layer_index(name) == layer
    assert component(name) == comp


@pytest.mark.parametrize("kind", ["bert", "electra", "distilbert", "roberta"])
def test_every_layer_of_each_family_has_the_six_components_once(kind):
    from tiny_models import make_model

    sizes = neuron_universe(make_model(kind, layers=3))
    in_layers = [(layer_index(m), component(m)) for m in sizes if layer_index(m) >= 0]
    assert sorted(in_layers) == sorted((layer, c) for layer in range(3) for c in COMPONENTS)
    others = [component(m) for m in sizes if layer_index(m) < 0]
    assert others == (["embeddings"] if kind == "electra" else [])


def test_names_must_be_strings():
    with pytest.raises(TypeError, match="module_name"):
        component(3)


# ----------------------------------------------------------------- top X %
# One pair with scores 2v and one with 0: the mean is exactly v.
VALUES_A = [0.5, 0.2, 0.5, -1.0]
VALUES_B = [0.5, 0.0, 0.3, -0.2, 0.9, 0.2]


@pytest.fixture
def ranked():
    scores = {A: [[2 * v for v in VALUES_A], [0.0] * 4], B: [[2 * v for v in VALUES_B], [0.0] * 6]}
    return make_scheme(scores, ["q1/d1", "q1/d2"])


def members(neuron_set):
    return {(m, int(u)) for m, units in neuron_set.by_module().items() for u in units}


def test_mean_is_sum_over_count(ranked):
    assert ranked.count == 2
    assert torch.equal(ranked.mean[A], torch.tensor(VALUES_A, dtype=torch.float32).double())
    assert torch.equal(ranked.sum[B], 2 * torch.tensor(VALUES_B, dtype=torch.float32).double())


@pytest.mark.parametrize("percent, expected", [(1, 0), (5, 1), (10, 1), (15, 2), (25, 3), (35, 4), (100, 10)])
def test_top_count_is_round_half_up_of_percent_of_total(ranked, percent, expected):
    # 10 neurons: 5 % -> 0.5 -> 1, 15 % -> 1.5 -> 2, 25 % -> 2.5 -> 3, 35 % -> 3.5 -> 4.
    assert ranked.top_count(percent) == expected
    assert len(ranked.top(percent)) == expected


def test_top_count_of_bert_large_sizes():
    sizes = {f"bert.encoder.layer.{i}.{c}": n for i in range(24)
             for c, n in [("q", 1024), ("k", 1024), ("v", 1024), ("o", 1024), ("i", 4096), ("f", 1024)]}
    scheme = Scheme.empty(sizes, {"model": "m", "dataset": "ms", "label": "relevant"})
    assert scheme.total_neurons == 221_184
    assert [scheme.top_count(p) for p in (0.01, 0.1, 1)] == [22, 221, 2212]


def test_top_ranks_all_modules_together_and_breaks_ties_by_model_order(ranked):
    # Sorted means: 0.9 B4 | 0.5 A0 A2 B0 | 0.3 B2 | 0.2 A1 B5 | 0.0 B1 | -0.2 B3 | -1.0 A3
    assert members(ranked.top(10)) == {(B, 4)}
    assert members(ranked.top(30)) == {(B, 4), (A, 0), (A, 2)}          # B0 loses the 0.5 tie
    assert members(ranked.top(40)) == {(B, 4), (A, 0), (A, 2), (B, 0)}
    assert members(ranked.top(60)) == {(B, 4), (A, 0), (A, 2), (B, 0), (B, 2), (A, 1)}  # A1 beats B5
    assert ranked.top(30).name == "P_ms@30%"
    flat = [(A, i) for i in range(4)] + [(B, i) for i in range(6)]
    assert [flat[i] for i in ranked.ranking("value")] == [
        (B, 4), (A, 0), (A, 2), (B, 0), (B, 2), (A, 1), (B, 5), (B, 1), (B, 3), (A, 3)]


def test_top_by_abs(ranked):
    # |mean|: 1.0 A3 | 0.9 B4 | 0.5 A0 A2 B0 | 0.3 B2 | 0.2 A1 B3 B5 | 0 B1
    assert members(ranked.top(20, by="abs")) == {(A, 3), (B, 4)}
    assert members(ranked.top(70, by="abs")) == {(A, 3), (B, 4), (A, 0), (A, 2), (B, 0), (B, 2), (A, 1)}
    assert ranked.top(20, by="abs").name == "|P_ms|@20%"
    with pytest.raises(ValueError, match="by must be one of"):
        ranked.top(20, by="absolute")


@pytest.mark.parametrize("percent", [0, -1, 101, "1", True])
def test_top_rejects_bad_percent(ranked, percent):
    with pytest.raises(ValueError, match="percent"):
        ranked.top(percent)


def test_top_of_a_scheme_without_pairs_is_refused():
    scheme = Scheme.empty(SIZES, {"model": "tiny", "dataset": "ms", "label": "relevant"})
    with pytest.raises(ValueError, match="no pairs"):
        scheme.top(10)


# ------------------------------------------------------------------ fusion
Q, O = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.output.dense"


@pytest.fixture
def p_and_n():
    pos = make_scheme({Q: [[1, 2], [3, 4], [5, 0]], O: [[1], [1], [4]]}, ["a", "b", "c"])   # means [3, 2], [2]
    neg = make_scheme({Q: [[0, -2], [2, -4]], O: [[6], [0]]}, ["d", "e"], label="non-relevant")  # [1, -3], [3]
    return pos, neg


def test_fusion_is_the_mean_of_the_means_not_of_the_pairs(p_and_n):
    pos, neg = p_and_n
    fused = fuse(pos, neg)
    assert fused.name == "F_ms" and fused.is_fused and fused.label == "fused"
    assert fused.mean[Q].tolist() == [2.0, -0.5]   # pair-weighted would give [2.2, -0.8]
    assert fused.mean[O].tolist() == [2.5]
    assert [p["name"] for p in fused.parts] == ["P_ms", "N_ms"]
    assert members(fused.top(34)) == {(O, 0)}       # 2.5 > 2.0 > -0.5
    with pytest.raises(TypeError, match="fusion"):
        fused.add(make_attributions({Q: [[1, 1]], O: [[1]]}), ["z"])


def test_fuse_all_weighs_every_scheme_the_same(p_and_n):
    pos, neg = p_and_n
    other = make_scheme({Q: [[4, 4]], O: [[-2]]}, ["x"], dataset="tc")
    f_a = fuse_all([pos, neg, other])
    assert f_a.name == "F_A"
    assert f_a.mean[Q].tolist() == [(3 + 1 + 4) / 3, (2 - 3 + 4) / 3]
    assert f_a.mean[O].tolist() == [(2 + 3 - 2) / 3]


def test_fuse_refuses_incompatible_or_repeated_schemes(p_and_n):
    pos, neg = p_and_n
    with pytest.raises(ValueError, match=r"settings\['steps'\] 8 vs 16"):
        fuse(pos, make_scheme({Q: [[1, 1]], O: [[1]]}, ["x"], label="non-relevant", steps=16))
    with pytest.raises(ValueError, match="given twice"):
        fuse(pos, neg, pos)
    bigger = make_scheme({Q: [[1, 1, 1]], O: [[1]]}, ["x"], label="non-relevant")
    with pytest.raises(ValueError, match="attributed modules differ"):
        fuse(pos, bigger)


# ------------------------------------------------------------------- merge
def test_merge_of_two_half_runs_equals_one_run_exactly():
    """Wildly scaled values, where a plain float64 running sum depends on the split."""
    gen = torch.Generator().manual_seed(0)
    values = (torch.randn(600, 10, generator=gen) * torch.exp(torch.randn(600, 10, generator=gen) * 12)).float()
    split = {A: values[:, :4], B: values[:, 4:]}
    ids = [f"p{i}" for i in range(600)]
    full = make_scheme({m: v for m, v in split.items()}, ids)
    parts = [(0, 97), (97, 350), (350, 600)]
    chunks = [make_scheme({m: v[a:b] for m, v in split.items()}, ids[a:b]) for a, b in parts]
    merged = chunks[2].merge(chunks[0]).merge(chunks[1])      # any order
    for m in SIZES:
        assert torch.equal(merged.sum[m], full.sum[m])
        assert torch.equal(merged.mean[m], full.mean[m])
    assert sorted(merged.pair_ids) == sorted(ids) and merged.count == 600
    # The bins really matter here: summing the halves in float64 differs.
    naive = values[:97].double().sum(0) + values[97:].double().sum(0)
    assert not torch.equal(naive, values.double().sum(0))


@pytest.mark.slow
def test_merge_of_half_runs_of_the_engine_equals_the_full_run(tiny_bert, tokenizer):
    from tiny_models import PAIRS

    import fastnig

    def run(pairs):
        return fastnig.attribute(tiny_bert, pairs, tokenizer=tokenizer, steps=6, progress=False)

    sizes = neuron_universe(tiny_bert)
    meta = {"model": "tiny-bert", "dataset": "ms", "label": "relevant"}
    full = Scheme.empty(sizes, meta).add(run(PAIRS), ["0", "1", "2", "3"])
    first = Scheme.empty(sizes, meta).add(run(PAIRS[:2]), ["0", "1"])
    second = Scheme.empty(sizes, meta).add(run(PAIRS[2:]), ["2", "3"])
    merged = first.merge(second)
    assert merged.pair_ids == full.pair_ids
    assert torch.equal(merged.mean_vector(), full.mean_vector())
    assert torch.equal(merged.delta, full.delta)
    assert merged.settings == full.settings and merged.settings["steps"] == 6
    assert merged.top(1) == full.top(1)


def test_merge_refuses_shared_pairs_and_different_runs(p_and_n):
    pos, _ = p_and_n
    again = make_scheme({Q: [[0, 0]], O: [[0]]}, ["c"])
    with pytest.raises(ValueError, match=r"1 pair id\(s\) are in both.*'c'"):
        pos.merge(again)
    for kwargs, what in [({"dataset": "tc"}, "dataset 'ms' vs 'tc'"),
                         ({"label": "non-relevant"}, "label 'relevant' vs 'non-relevant'"),
                         ({"baseline": "zero"}, r"settings\['baseline'\] 'pad' vs 'zero'"),
                         ({"rule": "left", "steps": 100}, r"settings\['rule'\].*settings\['steps'\]")]:
        other = make_scheme({Q: [[0, 0]], O: [[0]]}, ["z"], **kwargs)
        with pytest.raises(ValueError, match=what):
            pos.merge(other)
    other_model = Scheme.empty(pos.sizes, {"model": "other", "dataset": "ms", "label": "relevant"})
    with pytest.raises(ValueError, match="model 'tiny' vs 'other'"):
        pos.merge(other_model)


def test_add_checks_its_input(p_and_n):
    pos, _ = p_and_n
    one = make_attributions({Q: [[1, 1]], O: [[1]]})
    with pytest.raises(ValueError, match="already in scheme"):
        pos.add(one, ["a"])
    with pytest.raises(ValueError, match="repeats ids"):
        pos.add(make_attributions({Q: [[1, 1], [2, 2]], O: [[1], [2]]}), ["y", "y"])
    with pytest.raises(ValueError, match="2 ids but the attributions hold 1"):
        pos.add(one, ["y", "z"])
    with pytest.raises(ValueError, match="label 'relevant'"):
        pos.add(make_attributions({Q: [[1, 1]], O: [[1]]}, label="non-relevant"), ["y"])
    with pytest.raises(ValueError, match=r"settings\['steps'\]"):
        pos.add(make_attributions({Q: [[1, 1]], O: [[1]]}, steps=50), ["y"])
    with pytest.raises(ValueError, match="modules differ"):
        pos.add(make_attributions({Q: [[1, 1]]}), ["y"])
    with pytest.raises(ValueError, match="NaN"):
        pos.add(make_attributions({Q: [[float("nan"), 1]], O: [[1]]}), ["y"])
    with pytest.raises(TypeError, match="Attributions"):
        pos.add({"scores": {}}, ["y"])
    assert pos.count == 3  # nothing half-added


def test_dropped_pairs_are_counted_and_never_added_twice(p_and_n):
    pos, _ = p_and_n
    pos.mark_dropped(["q9/d9", 17])
    assert pos.num_dropped == 2 and pos.seen_ids == {"a", "b", "c", "q9/d9", "17"}
    with pytest.raises(ValueError, match="already in scheme"):
        pos.add(make_attributions({Q: [[1, 1]], O: [[1]]}), [17])
    other = make_scheme({Q: [[0, 0]], O: [[0]]}, ["w"]).mark_dropped(["v"])
    merged = pos.merge(other)
    assert merged.num_dropped == 3 and merged.count == 4
    assert merged.describe()["num_dropped"] == 3


def test_bins_hold_the_extremes_of_float32_exactly():
    tiny = torch.tensor([[1.4e-45, -3.0e38, 1.0, 2.0 ** -130]])
    s = make_scheme({A: tiny}, ["x"])
    assert torch.equal(s.sum[A], tiny.double()[0])
    assert MAX_PAIRS == 2 ** 21


# --------------------------------------------------------------- persistence
def assert_same_scheme(a: Scheme, b: Scheme) -> None:
    assert (a.name, a.model, a.dataset, a.label, a.settings) == (b.name, b.model, b.dataset, b.label, b.settings)
    assert list(a.sizes.items()) == list(b.sizes.items())
    assert a.pair_ids == b.pair_ids and a.dropped_ids == b.dropped_ids
    for m in a.sizes:
        assert torch.equal(a.mean[m], b.mean[m])
    if not a.is_fused:
        for m in a.sizes:
            assert torch.equal(a._bins[m], b._bins[m])
        for t in ("delta", "f_input", "f_baseline", "num_tokens"):
            assert torch.equal(getattr(a, t), getattr(b, t))


def test_save_load_round_trip_is_exact(tmp_path, p_and_n):
    pos, neg = p_and_n
    pos.mark_dropped(["dropped-1"])
    pos.extra["seed"] = 3
    path = pos.save(tmp_path / "runs" / "P_ms")
    assert path == tmp_path / "runs" / "P_ms.json" and Scheme.exists(tmp_path / "runs" / "P_ms")
    loaded = Scheme.load(path)
    assert_same_scheme(pos, loaded)
    assert loaded.extra == {"seed": 3} and loaded.num_dropped == 1
    meta = json.loads(path.read_text())
    assert meta["display_name"] == "P_ms" and meta["num_pairs"] == 3 and meta["settings"]["steps"] == 8
    fused = fuse(pos, neg)
    assert_same_scheme(fused, Scheme.load(fused.save(tmp_path / "F_ms.json")))
    assert Scheme.load(tmp_path / "F_ms").parts == fused.parts


def test_resaving_replaces_the_tensor_file(tmp_path, p_and_n):
    pos, _ = p_and_n
    pos.save(tmp_path / "P_ms")
    pos.add(make_attributions({Q: [[9, 9]], O: [[9]]}), ["new"])
    pos.save(tmp_path / "P_ms")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[1] == "P_ms.json" and names[0].endswith(".safetensors")
    assert Scheme.load(tmp_path / "P_ms").count == 4


def test_a_save_killed_before_its_commit_leaves_the_previous_scheme(tmp_path, p_and_n, monkeypatch):
    pos, _ = p_and_n
    pos.save(tmp_path / "P_ms")
    before = Scheme.load(tmp_path / "P_ms")
    # Leftovers of saves killed (SIGKILL: no clean-up ran) while writing their tensors / before their commit.
    (tmp_path / ".P_ms.0123456789ab.safetensors.tmp").write_bytes(b"half a tensor file")
    (tmp_path / "P_ms.abcdef012345.safetensors").write_bytes(b"an orphan tensor file")
    pos.add(make_attributions({Q: [[9, 9]], O: [[9]]}), ["new"])

    real_replace = os.replace

    def die_at_the_commit(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt  # killed after the tensors, before the metadata
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", die_at_the_commit)
    with pytest.raises(KeyboardInterrupt):
        pos.save(tmp_path / "P_ms")
    monkeypatch.setattr(os, "replace", real_replace)
    # an interrupt (not a SIGKILL) removes what the save wrote; the orphans of killed saves stay till the next
    assert len(list(tmp_path.glob("P_ms.*.safetensors"))) == 2 and len(list(tmp_path.glob(".*.tmp"))) == 1
    assert_same_scheme(before, Scheme.load(tmp_path / "P_ms"))
    # The next save commits and clears every leftover.
    pos.save(tmp_path / "P_ms")
    assert len(list(tmp_path.iterdir())) == 2
    assert Scheme.load(tmp_path / "P_ms").count == 4


def test_missing_or_mixed_up_files_are_reported(tmp_path, p_and_n):
    pos, neg = p_and_n
    pos.save(tmp_path / "P_ms")
    neg.save(tmp_path / "N_ms")
    assert not Scheme.exists(tmp_path / "P_tc")
    with pytest.raises(FileNotFoundError, match="no scheme"):
        Scheme.load(tmp_path / "P_tc")
    # A JSON that names the tensor file of another save.
    meta = json.loads((tmp_path / "P_ms.json").read_text())
    meta["tensors"] = next(tmp_path.glob("N_ms.*.safetensors")).name
    (tmp_path / "P_x.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="belongs to another save"):
        Scheme.load(tmp_path / "P_x.json")
    # Metadata present, tensors deleted.
    for f in tmp_path.glob("N_ms.*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        Scheme.load(tmp_path / "N_ms")
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="not a fastnig scheme"):
        Scheme.load(tmp_path / "junk.json")
    with pytest.raises(ValueError, match="not its tensor file"):
        scheme_json_path(tmp_path / "P_ms.abc.safetensors")


CHILD = textwrap.dedent("""
    import sys, time, torch
    sys.path[:0] = [{repo!r}, {tests!r}]
    from test_schemes import chunk_attributions, SIZES, CHUNKS
    from fastnig.neurons.scheme import Scheme
    path = sys.argv[1]
    scheme = (Scheme.load(path) if Scheme.exists(path)
              else Scheme.empty(SIZES, {{"model": "tiny", "dataset": "ms", "label": "relevant"}}))
    for k in range(CHUNKS):
        ids = [f"c{{k}}-{{i}}" for i in range(5)]
        if ids[0] in scheme.seen_ids:
            continue
        scheme.add(chunk_attributions(k), ids).mark_dropped([f"c{{k}}-dropped"])
        scheme.save(path)
        print("saved", k, flush=True)
        time.sleep(0.02)  # so that the parent's signal lands before the last chunk
""")
CHUNKS = 40


def chunk_attributions(k: int) -> Attributions:
    gen = torch.Generator().manual_seed(k)
    values = torch.randn(5, 10, generator=gen) * torch.exp(torch.randn(5, 10, generator=gen) * 8)
    return make_attributions({A: values[:, :4], B: values[:, 4:]})


@pytest.mark.slow
def test_a_run_killed_by_a_signal_resumes_to_the_uninterrupted_scheme(tmp_path):
    path = tmp_path / "P_ms"
    script = CHILD.format(repo=str(REPO), tests=str(REPO / "tests"))
    child = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    for line in child.stdout:
        if line.startswith("saved 3"):
            break
    child.send_signal(signal.SIGKILL)  # likely in the middle of a later save
    child.wait()
    killed = Scheme.load(path)
    assert 4 <= killed.count // 5 < CHUNKS

    subprocess.run([sys.executable, "-c", script, str(path)], check=True, stdout=subprocess.DEVNULL)
    resumed = Scheme.load(path)
    whole = Scheme.empty(SIZES, {"model": "tiny", "dataset": "ms", "label": "relevant"})
    for k in range(CHUNKS):
        whole.add(chunk_attributions(k), [f"c{k}-{i}" for i in range(5)]).mark_dropped([f"c{k}-dropped"])
    assert resumed.pair_ids == whole.pair_ids and resumed.num_dropped == CHUNKS
    for m in SIZES:
        assert torch.equal(resumed.sum[m], whole.sum[m])
    assert resumed.exemplars.same_as(whole.exemplars, resumed.pair_ids, whole.pair_ids)  # docs/explorer.md
    assert len(list(tmp_path.iterdir())) == 2  # no leftovers


# -------------------------------------------------------------- neuron sets
@pytest.fixture
def two_sets():
    s1 = NeuronSet.from_indices({A: [2, 0, 1], B: [0]}, SIZES, "S1")
    s2 = NeuronSet.from_indices({A: [1, 2], B: [3, 0]}, SIZES, "S2")
    return s1, s2


def test_set_algebra_and_overlap(two_sets):
    s1, s2 = two_sets
    assert len(s1) == 4 and len(s2) == 4 and s1.total == 10
    assert s1.by_module()[A].tolist() == [0, 1, 2] and s1.by_module()[A].dtype == torch.long
    both = s1 & s2
    assert members(both) == {(A, 1), (A, 2), (B, 0)} and both.name == "S1 ∩ S2"
    assert members(s1 | s2) == {(A, 0), (A, 1), (A, 2), (B, 0), (B, 3)}
    assert s1.overlap(s2) == 75.0
    assert members(s1 - s2) == {(A, 0)}
    s3 = NeuronSet.from_indices({A: [2], B: [0, 5]}, SIZES, "S3")
    assert members(intersection(s1, s2, s3)) == {(A, 2), (B, 0)}
    assert members(intersection([s1, s2, s3], name="x")) == {(A, 2), (B, 0)}
    assert len(union(s1, s2, s3)) == 6
    assert (A, 2) in s1 and (B, 5) not in s1 and ("nope", 0) not in s1
    empty = NeuronSet.empty(SIZES)
    assert len(empty) == 0 and empty.by_module() == {}
    assert empty.overlap(s1) != empty.overlap(s1)  # NaN: nothing to overlap


def test_sets_of_different_models_do_not_mix(two_sets):
    s1, _ = two_sets
    other = NeuronSet.from_indices({A: [0]}, {A: 4, B: 7}, "other")
    for op in (lambda: s1 & other, lambda: s1 | other, lambda: s1.overlap(other)):
        with pytest.raises(ValueError, match="different neurons"):
            op()
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        NeuronSet.from_indices({A: [4]}, SIZES)
    with pytest.raises(ValueError, match="not in sizes"):
        NeuronSet.from_indices({"nope": [0]}, SIZES)


def test_counts_by_layer_and_component():
    sizes = {"bert.encoder.layer.0.attention.self.query": 3, "bert.encoder.layer.0.attention.self.key": 3,
             "bert.encoder.layer.0.intermediate.dense": 5, "bert.encoder.layer.1.attention.self.value": 3,
             "bert.encoder.layer.1.attention.output.dense": 3, "bert.encoder.layer.1.output.dense": 3,
             "bert.pooler.dense": 3}
    s = NeuronSet.from_indices({"bert.encoder.layer.0.attention.self.query": [0, 2],
                                "bert.encoder.layer.0.intermediate.dense": [4],
                                "bert.encoder.layer.1.output.dense": [0, 1, 2], "bert.pooler.dense": [1]}, sizes)
    assert list(s.counts_by_layer_component().items()) == [
        ((-1, "pooler"), 1), ((0, "query"), 2), ((0, "key"), 0), ((0, "intermediate"), 1),
        ((1, "value"), 0), ((1, "attention_output"), 0), ((1, "ff_output"), 3)]
    assert s.describe()[0] == {"module": "bert.encoder.layer.0.attention.self.query", "unit": 0, "layer": 0,
                               "component": "query"}
    assert NeuronSet.from_dict(json.loads(json.dumps(s.to_dict()))) == s
