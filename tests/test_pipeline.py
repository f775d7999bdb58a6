"""`fastnig attribute` on Cranfield: scheme files, resume after a kill, then `fastnig analyze`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastnig.neurons.scheme import Scheme


@pytest.fixture(scope="module")
def cranfield_home(tmp_path_factory):
    """An empty IR_DATASETS_HOME: Cranfield is read by its real id, from the tarball fastnig packages
    (and places there itself)."""
    return tmp_path_factory.mktemp("irds")


@pytest.fixture(scope="module")
def model_dir(saved_tiny_model):
    return saved_tiny_model(seed=3)


def _cli(args, home, **kw):
    env = dict(os.environ, IR_DATASETS_HOME=str(home), FASTNIG_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "fastnig", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _attribute_args(model_dir, out, label="relevant", pairs=12):
    extra = ["--negatives", "unjudged"] if label == "non-relevant" else []
    return ["attribute", *extra, "--model", model_dir, "--dataset", "cranfield", "--label", label, "--pairs", pairs,
            "--steps", 6, "--max-length", 96, "--chunk-pairs", 1, "--out", out, "--quiet"]


def _run(args, home):
    proc = _cli(args, home)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def _assert_same_scheme(a: Scheme, b: Scheme):
    assert sorted(a.pair_ids) == sorted(b.pair_ids)
    assert sorted(a.dropped_ids) == sorted(b.dropped_ids)
    for m in a.sizes:
        assert torch.equal(a.mean[m], b.mean[m]), m


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, model_dir, cranfield_home):
    out = tmp_path_factory.mktemp("full") / "P_cran"
    _run(_attribute_args(model_dir, out), cranfield_home)
    return Scheme.load(out)


@pytest.mark.slow
def test_attribute_writes_a_scheme_of_cranfield_pairs(full_run, model_dir):
    s = full_run
    assert s.label == "relevant" and s.dataset == "cranfield"
    assert s.count + s.num_dropped == 12 and s.count > 0
    assert s.settings["steps"] == 6 and s.settings["rule"] == "richardson"  # the CLI default
    assert all("\t" in pid for pid in s.pair_ids)
    qrels_pairs = {tuple(pid.split("\t")) for pid in s.pair_ids}
    assert all(q.isdigit() and d.isdigit() for q, d in qrels_pairs)
    from transformers import AutoModelForSequenceClassification

    import fastnig
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    assert s.sizes == {n: m.out_features for n, m in fastnig.linear_modules(model).items()}
    assert torch.isfinite(s.delta).all() and s.delta.shape == (s.count,)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_scheme(tmp_path, model_dir, cranfield_home, full_run):
    out = tmp_path / "P_cran"
    proc = _cli(_attribute_args(model_dir, out), cranfield_home)
    deadline = time.time() + 300
    json_path = out.with_suffix(".json")
    while time.time() < deadline:  # kill once at least two chunks are saved
        if json_path.exists():
            try:
                if len(json.loads(json_path.read_text()).get("pair_ids", [])) >= 2:
                    break
            except (ValueError, OSError):
                pass
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert killed, "the run finished before it could be killed"
    partial = Scheme.load(out)
    assert 0 < partial.count < full_run.count
    _run(_attribute_args(model_dir, out), cranfield_home)  # resume
    _assert_same_scheme(Scheme.load(out), full_run)


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(tmp_path, model_dir, cranfield_home, full_run):
    out = tmp_path / "P_cran"
    _run(_attribute_args(model_dir, out, pairs=3), cranfield_home)
    proc = _cli(_attribute_args(model_dir, out, pairs=3)[:-1] + ["--quiet", "--rule", "left"], cranfield_home)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2
    assert "settings" in err and "Traceback" not in err


@pytest.mark.slow
def test_analyze_builds_figures_and_tables_from_the_schemes(tmp_path, model_dir, cranfield_home, full_run):
    import csv

    from matplotlib.image import imread

    runs = tmp_path / "runs"
    runs.mkdir()
    p_scheme = runs / "P_cran"
    full_run.save(p_scheme)
    # this random model calls everything relevant: no agreement filter for its negatives
    _run(_attribute_args(model_dir, runs / "N_cran", label="non-relevant") + ["--no-filter"], cranfield_home)
    n_scheme = Scheme.load(runs / "N_cran")
    assert n_scheme.label == "non-relevant" and n_scheme.count > 0
    report = tmp_path / "report"
    _run(["analyze", runs, "--out", report, "--levels", 1, 10, "--layer-percent", 10], cranfield_home)
    with open(report / "intersections.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["curve"] == "P_cap_N" and float(r["level_percent"]) == 10.0]
    # P ∩ N at 10 %, recomputed from the schemes themselves
    p_top, n_top = full_run.top(10), n_scheme.top(10)
    assert len(rows) == 1
    assert int(rows[0]["set_size"]) == len(p_top) == round(0.1 * sum(full_run.sizes.values()))
    assert int(rows[0]["common"]) == len(p_top & n_top)
    assert float(rows[0]["percent"]) == pytest.approx(p_top.overlap(n_top))
    with open(report / "layers_components.csv") as f:
        counts = {(int(r["layer"]), r["component"]): int(r["count"])
                  for r in csv.DictReader(f) if r["set"] == "P_cranfield@10%"}
    expected = p_top.counts_by_layer_component()
    assert sum(counts.values()) == len(p_top)
    assert {k: v for k, v in counts.items() if v} == {k: v for k, v in expected.items() if v}
    pngs = sorted(report.glob("*.png"))
    assert pngs
    for png in pngs:
        image = imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
