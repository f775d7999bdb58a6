"""`fastnig run`: a reduced study end to end, kill + resume, torchrun, bad configs."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fastnig.neurons.scheme import Scheme


@pytest.fixture(scope="module")
def model_dir(saved_tiny_model):
    return saved_tiny_model(seed=5)


def _config(model_dir, **overrides):
    """A reduced study on the two packaged collections (Cranfield in-domain, MEDLINE out of domain)."""
    cfg = {
        "name": "tiny", "model": str(model_dir), "output": "unused",
        "attribution": {
            "datasets": {"cran": "cranfield", "med": "med"},
            "in_domain": ["cran"], "labels": ["relevant", "non-relevant"], "negatives": "unjudged",
            "agreement_filter": False, "pairs": 6, "steps": 4, "max_length": 48, "chunk_pairs": 2},
        "analysis": {"levels": [1, 10], "layer_percent": 10, "baseline_pairs": 4},
        "pruning": {"levels": [1, 10], "sets": ["P_cran", "F_A"], "queries": 6, "depth": 5, "repetitions": 2,
                    "validation": {"cran": {"dataset": "cranfield", "group": "Cranfield"}}},
    }
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    return cfg


def _write(tmp_path, cfg, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(home):
    return dict(os.environ, IR_DATASETS_HOME=str(home), FASTNIG_OFFLINE="1", HF_HUB_OFFLINE="1",
                PYTHONUNBUFFERED="1", FASTNIG_CACHE=str(Path(home) / "cache"))


def _start(args, home, launcher=(sys.executable, "-m", "fastnig"), threads=None):
    """``fastnig ARGS`` in a subprocess; ``threads`` pins torch's thread count (OMP_NUM_THREADS and
    MKL_NUM_THREADS, whatever the caller exported); ``None`` keeps the caller's environment."""
    env = _env(home)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return subprocess.Popen([*launcher, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return out, err


@pytest.fixture(scope="module")
def irds_home(tmp_path_factory):
    return tmp_path_factory.mktemp("irds")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir, irds_home):
    """One uninterrupted single-process run of the tiny study."""
    folder = tmp_path_factory.mktemp("reference")
    config = _write(folder, _config(model_dir))
    _finish(_start(["run", config, "--output", folder / "out", "--quiet"], irds_home))
    return folder / "out", config


def _table4(out: Path):
    with open(out / "pruning" / "table4.csv") as f:
        return list(csv.DictReader(f))


def _schemes(out: Path):
    return {p.name: Scheme.load(p.with_suffix("")) for p in sorted((out / "schemes").glob("*.json"))
            if ".rank" not in p.name}


@pytest.mark.slow
def test_reduced_study_writes_the_report_with_its_numbers(reference):
    out, _ = reference
    schemes = _schemes(out)
    assert set(schemes) == {"P_cran.json", "N_cran.json", "P_med.json", "N_med.json"}
    assert all(s.count == 6 for s in schemes.values())
    rows = _table4(out)
    assert {(r["set"], float(r["level_percent"])) for r in rows} == {
        ("P_cran", 1.0), ("P_cran", 10.0), ("F_A", 1.0), ("F_A", 10.0)}
    original = {r["ndcg_original"] for r in rows}
    assert len(original) == 1, "the original model is scored once for every set"
    for r in rows:
        o, p = float(r["ndcg_original"]), float(r["ndcg_pruned"])
        assert float(r["drop_percent"]) == pytest.approx((o - p) / o * 100, abs=1e-6)
        assert int(r["random_repetitions"]) == 2 and 0 <= float(r["p_value"]) <= 1
    total = sum(schemes["P_cran.json"].sizes.values())
    assert {int(r["num_neurons"]) for r in rows if r["set"] == "P_cran"} == {round(total / 100), round(total / 10)}
    report = (out / "report.md").read_text()
    assert "Table 4" in report and "Table 1" in report and "Figure 3" in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    table4_md = (out / "pruning" / "table4.md").read_text()
    assert table4_md in report
    assert (out / "run.log").read_text().count("pruned ") == 4
    assert (out / "analysis" / "baselines.csv").exists()


def _wait_for(proc, predicate, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_killed_twice_then_resumed_equals_the_uninterrupted_run(tmp_path, reference, irds_home):
    ref_out, config = reference
    out = tmp_path / "out"
    args = ["run", config, "--output", out, "--quiet"]

    def attribution_started():
        return any(json.loads(p.read_text()).get("pair_ids") for p in (out / "schemes").glob("*.json")
                   if p.stat().st_size) if (out / "schemes").exists() else False

    proc = _start(args, irds_home)
    assert _wait_for(proc, attribution_started), "attribution never started (or finished too fast)"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "pruning").exists()

    proc = _start(args, irds_home)
    assert _wait_for(proc, lambda: len(list((out / "pruning" / "rows").glob("*.json"))) >= 1), \
        "pruning never started"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (out / "pruning" / "table4.csv").exists()

    _finish(_start(args, irds_home))
    ref, got = _schemes(ref_out), _schemes(out)
    assert set(ref) == set(got)
    for name in ref:
        assert sorted(ref[name].pair_ids) == sorted(got[name].pair_ids)
        for m in ref[name].sizes:
            assert torch.equal(ref[name].mean[m], got[name].mean[m]), (name, m)
    assert _table4(out) == _table4(ref_out)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, reference, irds_home):
    _, config = reference
    # The single process and every torchrun rank run with one thread, whatever the caller exported
    # (torchrun keeps an exported OMP_NUM_THREADS): both then sum in the same order; with other thread
    # counts float rounding may swap near-tied candidates and Table 4 differs in the 4th digit.
    ref_out = tmp_path / "single"
    _finish(_start(["run", config, "--output", ref_out, "--quiet"], irds_home, threads=1))
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = _start(["--nproc-per-node", "2", "--standalone", "-m", "fastnig", "run", config, "--output", out,
                   "--quiet"], irds_home, launcher=(str(torchrun),), threads=1)
    _finish(proc)
    # timings.json (and the report's settings) record the thread counts each run computed with
    for folder, processes in ((ref_out, 1), (out, 2)):
        threads = json.loads((folder / "timings.json").read_text())["threads"]
        assert [(t["processes"], t["torch_threads"], t["OMP_NUM_THREADS"]) for t in threads] == [
            (processes, 1, "1")], threads
        assert '"torch_threads": 1' in (folder / "report.md").read_text()
    assert "2 process(es)" in (out / "run.log").read_text()
    assert sorted(p.name for p in (out / "schemes").glob("P_cran.rank*.json")) == [
        "P_cran.rank0-of-2.json", "P_cran.rank1-of-2.json"]  # each rank attributed its shard
    ref, got = _schemes(ref_out), _schemes(out)
    for name in ref:
        assert sorted(ref[name].pair_ids) == sorted(got[name].pair_ids)
        for m in ref[name].sizes:
            # equal up to float rounding
            torch.testing.assert_close(got[name].mean[m], ref[name].mean[m], rtol=1e-4, atol=1e-8)
    for a, b in zip(_table4(out), _table4(ref_out)):
        for key in a:
            if key in ("ndcg_original", "ndcg_pruned", "drop_percent", "random_drop_mean", "random_ndcg_mean"):
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6, abs=1e-9)
            elif key not in ("p_value", "random_drop_std"):
                assert a[key] == b[key], key


@pytest.mark.slow
@pytest.mark.parametrize("change,words", [
    ({"attribution__bogus": 1}, "unknown key(s) ['bogus'] in config section 'attribution'"),
    ({"pruning__sets": ["P_cran &"]}, "pruning.sets"),
    ({"pruning__sets": ["P_tc"]}, "unknown dataset 'tc'"),
    ({"attribution__datasets": {"cran": "no-such-dataset/at-all"}}, "attribution dataset 'cran'"),
    ({"model": "nobody/no-such-model"}, "model:"),
])
def test_bad_config_stops_before_any_work(tmp_path, model_dir, irds_home, change, words):
    config = _write(tmp_path, _config(model_dir, **change))
    out = tmp_path / "out"
    proc = _start(["run", config, "--output", out], irds_home)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    assert words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.slow
def test_rerun_with_nothing_left_keeps_the_timings(tmp_path, reference, irds_home):
    ref_out, config = reference
    before = json.loads((ref_out / "timings.json").read_text())
    assert before["timings"]["attribution_s"] > 0 and before["timings"]["pruning_s"] > 0
    _finish(_start(["run", config, "--output", ref_out, "--quiet"], irds_home))
    after = json.loads((ref_out / "timings.json").read_text())
    assert after["timings"]["attribution_s"] == before["timings"]["attribution_s"]
    assert after["timings"]["pruning_s"] == before["timings"]["pruning_s"]
