"""`fastnig run CONFIG --plan`: counts from the config alone, FLOPs model, offline and fast."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import fastnig
from fastnig.study.plan import (
    ACCELERATORS,
    EXPECTED_PREFIX_WORK,
    EXPECTED_REPETITIONS,
    KNOWN_SHAPES,
    ModelShape,
    accelerator_rate,
    measure_cpu_flops,
    model_shape,
    plan_config,
    render,
)

PAPER_YAML = Path(fastnig.__file__).resolve().parent / "study" / "configs" / "paper.yaml"


def test_paper_plan_counts_equal_hand_computed_numbers(no_network):
    raw = yaml.safe_load(PAPER_YAML.read_text())
    att, pru, ana = raw["attribution"], raw["pruning"], raw["analysis"]
    # The paper's schemes: P_x for the 8 datasets, N_x for all but BioASQ and FiQA (footnote 5, Table 3).
    expected_schemes = [f"P_{d}" for d in att["datasets"]] + [f"N_{d}" for d in att["datasets"] if d not in ("b", "f")]
    plan = plan_config("paper")
    assert sorted(plan.schemes) == sorted(expected_schemes) and len(plan.schemes) == 14
    stages = {s.name.split(" (")[0]: s for s in plan.stages}
    assert plan.path_points == att["steps"] + 1 == 101
    assert stages["NIG path"].sequences == 14 * 1000 * 101 == 1_414_000
    assert stages["NIG path"].token_rows == 1_414_000 * 512 == 723_968_000
    assert stages["agreement filter"].sequences == 14 * att["pairs"]
    # Table 1: the agreement filter over the relevant pairs, then input + 4 baselines.
    assert stages["Table 1 baselines"].sequences == ana["baseline_pairs"] * 6
    candidates = pru["queries"] * (pru["depth"] + 1)
    # Every one of the 50 random repetitions and full forwards (the plan before the adaptive rule): stated too.
    assert pru["repetitions"]["max"] == 50 and pru["repetitions"]["stop_when"]
    runs = 1 + len(pru["sets"]) * len(pru["levels"]) * (1 + pru["repetitions"]["max"])
    assert (candidates, runs) == (4200, 1531)
    per_forward = 2 * 301_989_888 * 512 + 4 * 24 * 512 ** 2 * 1024
    assert plan.fixed_pruning_flops == len(pru["validation"]) * candidates * runs * per_forward
    assert len(pru["validation"]) * candidates * runs == 38_581_200
    # Expected: the adaptive rule's measured repetitions per row, pruned forwards at the measured layer share.
    pruned_runs = 30 * (1 + EXPECTED_REPETITIONS)
    assert plan.adaptive and plan.expected_repetitions == EXPECTED_REPETITIONS
    assert stages["pruning reranking"].sequences == round(6 * 4200 * (1 + pruned_runs))
    assert stages["pruning reranking"].flops == pytest.approx(
        6 * 4200 * (1 + pruned_runs * EXPECTED_PREFIX_WORK) * per_forward)
    # BERT-large: 24 x (4 x 1024 + 4096 + 1024) neurons (docs/method.md §4), 24 x (4 d^2 + 2 d f) Linear weights.
    assert plan.shape.neurons == 221_184
    assert plan.shape.linear_params == 24 * (4 * 1024 ** 2 + 2 * 1024 * 4096) == 301_989_888
    assert plan.shape.forward_flops(512) == per_forward == 335_007_449_088
    assert stages["NIG path"].flops == 3 * 1_414_000 * per_forward
    before = per_forward * (14_000 + 3 * 1_414_000 + 6_000 + 38_581_200)
    assert plan.fixed_total_flops == pytest.approx(before)
    assert plan.total_flops == pytest.approx(before - plan.fixed_pruning_flops + stages["pruning reranking"].flops)
    assert plan.total_flops < before
    # Shorter pairs: token rows and the quadratic attention term scale down.
    short = plan_config("paper", tokens=128)
    assert short.attribution_tokens == 128 and short.shape.forward_flops(128) < per_forward / 4


def test_plan_follows_the_label_mapping(no_network):
    """N_x is planned where the dataset's known grades hold a non-relevant one under its mapping."""
    base = yaml.safe_load(PAPER_YAML.read_text())
    base["attribution"]["datasets"] = {
        "ms": {"dataset": "ms", "relevant": [2, 3], "nonrelevant": []},     # explicitly none -> no N_ms
        "nq": "beir/nq",                                                     # BEIR NQ: grade 1 only -> no N
        "nqb": {"dataset": "beir/nq", "negatives": "bm25"},                  # BM25 negatives -> N
        "nf": {"dataset": "nf", "relevant": [1, 2]},                         # both grades relevant -> no N
        "loc": {"dataset": "/nowhere/local-beir-folder"},                    # grades unknown -> N assumed
    }
    base["attribution"]["in_domain"] = ["ms"]
    base["analysis"]["exclude"] = []
    base["pruning"]["sets"] = ["P_ms"]
    plan = plan_config(base)
    assert plan.schemes == ["P_ms", "P_nq", "P_nqb", "N_nqb", "P_nf", "P_loc", "N_loc"]
    assert any("N_loc assumed" in n for n in plan.notes) and any(n.startswith("no N_nf") for n in plan.notes)


@pytest.mark.slow
def test_paper_plan_cli_runs_offline_in_seconds(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", FASTNIG_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fastnig", "run", "paper", "--plan", "--device", "h100",
                          "--gpus", "8"], capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    assert out.returncode == 0, out.stderr
    assert elapsed < 30
    text = out.stdout
    # pruning: 6 datasets x 4200 candidates x (1 + 10 sets x 3 levels x (1 + 140 / 12 expected adaptive repetitions))
    # = 25,200 x 381
    assert "14 schemes" in text and "1,414,000 sequences" in text and "9,601,200 sequences" in text
    assert "total 1.44e+19" in text  # every repetition and full forwards: the plan before issue 24
    assert "221,184" in text and "3.35e+11 FLOPs per forward" in text
    line = next(l for l in text.splitlines() if "8 x h100" in l)
    assert "989 TFLOP/s" in line and "35%" in line
    assert re.search(r"this machine: .* GFLOP/s \(measured fp32 matmul\)", text)


def test_render_times_follow_the_stated_rates():
    plan = plan_config("paper")
    text = render(plan, cpu_flops=1e11, device="a100", gpus=2, efficiency=0.5)
    seconds = plan.total_flops / (312e12 * 0.5 * 2)
    assert accelerator_rate("a100", 2, 0.5) == 312e12
    assert f"{seconds / 3600:.1f} h" in next(l for l in text.splitlines() if "2 x a100" in l)
    assert plan.seconds(1e11) == pytest.approx(plan.total_flops / 1e11)
    assert set(ACCELERATORS) >= {"h100", "h200", "a100", "l4", "t4"}


def test_plan_prices_a_gpu_reference_by_default(cli, monkeypatch, no_network):
    """Without --device the plan also prints the time on 1 and 8 H100s (the paper's run is a GPU job; this
    machine's time alone said only "10.4 years"); with --device, that accelerator instead."""
    from fastnig.cli import run_cmd
    from fastnig.study.plan import duration

    monkeypatch.setattr(run_cmd, "measure_cpu_flops", lambda hidden: 5e10)  # no 1.5 s measurement
    code, out, err = cli("run", "paper", "--plan")
    assert code == 0, err
    plan = plan_config("paper")
    lines = [line.strip() for line in out.splitlines()]
    assert duration(plan.seconds(5e10)) in next(line for line in lines if line.startswith("this machine:"))
    assert any(line.startswith("GPU reference, h100 (another accelerator: --device") for line in lines)
    for gpus in (1, 8):
        line = next(line for line in lines if line.startswith(f"{gpus} x h100:"))
        assert "989 TFLOP/s peak" in line and f"35% x {gpus})" in line
        assert line.endswith(f"= {duration(plan.seconds(accelerator_rate('h100', gpus)))}")
    code, out, _ = cli("run", "paper", "--plan", "--device", "a100", "--gpus", "2")
    assert code == 0 and "2 x a100:" in out and "x h100" not in out and "GPU reference" not in out
    assert "x h100" not in render(plan, cpu_flops=5e10, reference=None)


def test_shape_from_a_local_model_folder_matches_the_model(saved_tiny_model, tmp_path):
    from tiny_models import make_model

    from fastnig.neurons.sets import neuron_universe

    folder = saved_tiny_model(seed=3)
    shape = model_shape(str(folder))
    assert (shape.layers, shape.hidden, shape.intermediate, shape.heads) == (2, 32, 64, 4)
    assert str(folder) in shape.source
    model = make_model("bert", hidden=32, layers=2, intermediate=64, heads=4)
    assert shape.neurons == sum(neuron_universe(model).values())
    encoder_weights = sum(m.weight.numel() for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and ".encoder." in f".{name}")
    assert shape.linear_params == encoder_weights
    # A whole config planned on that folder reads the shape from config.json.
    plan = plan_config({"name": "tiny", "model": str(folder), "output": str(tmp_path / "out"),
                        "attribution": {"datasets": {"a": str(tmp_path / "beir-a")}, "in_domain": ["a"],
                                        "pairs": 10, "steps": 4, "max_length": 32},
                        "analysis": {"baseline_pairs": 0},
                        "pruning": {"levels": [1], "sets": ["P_a"], "queries": 3, "depth": 5, "repetitions": 2,
                                    "validation": {"a": str(tmp_path / "beir-a")}}})
    assert plan.shape == shape and plan.schemes == ["P_a", "N_a"]
    stages = {s.name.split(" (")[0]: s.sequences for s in plan.stages}
    assert stages == {"agreement filter": 20, "NIG path": 2 * 10 * 5, "pruning reranking": 3 * 6 * (1 + 1 * 3)}


def test_distilbert_config_json(tmp_path):
    from tiny_models import make_model

    make_model("distilbert", hidden=32, layers=3, intermediate=48, heads=4).save_pretrained(tmp_path)
    shape = model_shape(str(tmp_path))
    assert (shape.layers, shape.hidden, shape.intermediate) == (3, 32, 48)


def test_flops_model_equals_torch_flop_counter():
    from tiny_models import make_model
    from torch.utils.flop_counter import FlopCounterMode

    model = make_model("bert", hidden=32, layers=2, intermediate=64, heads=4)
    model.set_attn_implementation("eager")  # sdpa's products are not counted by FlopCounterMode
    tokens = 24
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(5, 100, (1, tokens)))
    encoder = sum(counter.get_flop_counts()["BertForSequenceClassification.bert.encoder"].values())
    assert ModelShape(2, 32, 64, 4, "tiny").forward_flops(tokens) == encoder


def test_known_shapes_and_errors(tmp_path):
    assert model_shape("castorini/monobert-large-msmarco").layers == 24
    assert model_shape("demo").hidden == 384 and "demo" in KNOWN_SHAPES
    with pytest.raises(ValueError, match="not a known shape"):
        model_shape("someone/unknown-model")
    with pytest.raises(ValueError, match="no config.json"):
        model_shape(str(tmp_path))
    with pytest.raises(ValueError, match="not one of"):
        accelerator_rate("v100")
    assert measure_cpu_flops(hidden=64, seconds=0.05, rows=16) > 0


@pytest.mark.parametrize("args, message", [
    (["--plan", "--device", "v100"], "--device 'v100' is not one of"),
    (["--plan", "--gpus", "8"], "--gpus needs --device"),
    (["--device", "h100"], "go with --plan"),
])
def test_plan_cli_errors(args, message, cli):
    code, _, err = cli("run", "paper", *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
