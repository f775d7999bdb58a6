"""`fastnig demo` as a user runs it: from a folder outside the checkout, on the packaged data only.

The demo's own model (MiniLM fine-tuned for minutes) is replaced by a tiny
BERT through ``--model``, so the test takes about a minute; everything else is
the packaged ``demo`` configuration: Cranfield and MEDLINE from the package,
no data folder, no network (HF_HUB_OFFLINE, FASTNIG_OFFLINE), empty caches.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test here shares one `fastnig demo` run (minutes)

REPO = Path(__file__).resolve().parents[1]


def centred_tiny_model(folder: Path) -> Path:
    """A tiny 2-logit BERT whose relevance margin is centred on this data (median 0 over sampled demo
    pairs): it does not rank, but about half the pairs of each label pass the agreement filter, so every
    scheme of the demo gets pairs."""
    import torch
    from tiny_models import make_model, make_tokenizer

    from fastnig.data import load_collection, sample_pairs
    from fastnig.engine.encoding import encode_batch
    from fastnig.study.config import load_config

    max_length = load_config("demo").attribution["max_length"]  # the tokens the demo's agreement filter reads
    tokenizer = make_tokenizer("bert")
    model = make_model("bert", num_labels=2, vocab_size=tokenizer.vocab_size, seed=7, init_range=0.5).eval()
    pairs = []
    for spec in ("cranfield@train", "med"):
        collection = load_collection(spec)
        pairs += sample_pairs(collection, label=1, num_pairs=48, seed=0)
        pairs += sample_pairs(collection, label=0, num_pairs=48, seed=0, negatives="unjudged")
    with torch.no_grad():
        logits = model(**encode_batch(tokenizer, [p.text_pair for p in pairs], max_length)).logits
        margin = (logits[:, 1] - logits[:, 0]).median()
        model.classifier.bias[1] -= margin
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    where = tmp_path_factory.mktemp("user-folder")
    assert REPO not in where.parents
    model = centred_tiny_model(tmp_path_factory.mktemp("centred-model"))
    env = {k: v for k, v in os.environ.items() if k not in ("FASTNIG_DATA", "FASTNIG_SHARED_DATA", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", FASTNIG_OFFLINE="1", IR_DATASETS_HOME=str(where / "irds"),
               FASTNIG_CACHE=str(where / "cache"), PYTHONUNBUFFERED="1")
    fastnig = Path(sys.executable).with_name("fastnig")
    command = [str(fastnig)] if fastnig.exists() else [sys.executable, "-m", "fastnig"]
    proc = subprocess.run([*command, "demo", "--model", str(model), "--quiet"], cwd=where, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return where / "runs" / "demo", proc


@pytest.mark.slow
def test_demo_writes_its_report_from_a_folder_outside_the_checkout(demo_run):
    out, _ = demo_run
    for name in ("report.md", "report.html", "pruning/table4.csv", "analysis/schemes.csv", "timings.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    config = json.loads((out / "config.json").read_text())
    datasets = {k: (v["dataset"] if isinstance(v, dict) else v) for k, v in config["attribution"]["datasets"].items()}
    assert datasets == {"cran": "cranfield@train", "med": "med"}  # the packaged collections, nothing else
    assert [v["dataset"] for v in config["pruning"]["validation"].values()] == ["cranfield@heldout"]
    with open(out / "analysis" / "schemes.csv") as f:
        names = {r["name"] for r in csv.DictReader(f)}
    assert {"P_cran", "N_cran", "P_med", "N_med"} <= names
    with open(out / "pruning" / "table4.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["dataset"] for r in rows} == {"cran"}
    assert all(int(r["num_queries"]) == 34 for r in rows)  # pruning.queries of the 68 held-out Cranfield queries
    report = (out / "report.md").read_text()
    assert "Table 4" in report and "**Evidence**: agreeing pairs per scheme" in report
    # The demo attributes with segments: the segment table, figure and report line (issue 14).
    assert (out / "analysis" / "segments.csv").is_file() and (out / "analysis" / "segments_cran_at_1pct.png").is_file()
    assert "**Segments**" in report and "segments_cran_at_1pct.png" in report
    assert not (out / "model_quality.json").exists()  # only the demo's own model is evaluated that way


def test_demo_reranks_held_out_queries_only(demo_run):
    from fastnig.data import load_collection
    from fastnig.data.splits import split_queries
    from fastnig.evaluation.reranking import build_candidates

    train, heldout = split_queries(load_collection("cranfield"))
    assert (len(train), len(heldout)) == (157, 68)
    candidates = build_candidates(load_collection("cranfield@heldout"), num_queries=34, seed=1, depth=0,
                                  progress=False)  # what the demo's pruning stage draws (depth 0: no BM25)
    assert len(candidates.queries) == 34 and set(candidates.queries) <= set(heldout)
    attributed = load_collection("cranfield@train")
    assert set(attributed.queries()) == set(train)


def test_report_shows_the_model_quality(tmp_path):
    from fastnig.report.document import evidence_lines

    (tmp_path / "model_quality.json").write_text(json.dumps({
        "dataset": "cranfield@heldout", "queries": 68, "depth": 20, "k": 10, "ndcg": 0.5123, "bm25_ndcg": 0.4987,
        "random_ndcg": 0.2101, "random_orders": 100, "train_queries": 157,
        "training": {"settings": {"steps": 300}}}))
    lines = evidence_lines(tmp_path)
    assert len(lines) == 1
    assert "nDCG@10 **0.512**, BM25 0.499, random order 0.210" in lines[0]
    assert "68 held-out queries" in lines[0] and "fine-tuned 300 steps on the other 157 queries" in lines[0]


def test_demo_report_and_explorer_in_a_real_browser(demo_run):
    """The demo's own report.html and explorer.html, as headless Chromium shows them (tests/test_browser.py):
    no column count mismatch, every figure loaded, no console error, no request; the explorer's views agree
    with the scheme files and the report links to it."""
    from browser_driver import Browser, find_chromium
    from test_browser import check_explorer_page, check_report_page

    from fastnig.study.explore import run_schemes, with_fusions

    out, _ = demo_run
    assert (out / "explorer.html").is_file()
    assert "[explorer.html](explorer.html)" in (out / "report.md").read_text()
    if not find_chromium():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("headless Chromium is not installed: under CI the browser tests must run")
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium; `make test` does it)")
    schemes = run_schemes(out)
    with Browser() as browser:
        images = check_report_page(browser, out / "report.html")
        assert len(images) >= 5
        result = check_explorer_page(browser, out / "explorer.html", with_fusions(schemes))
        assert result["page"].eval("document.querySelectorAll('#card .pair').length") > 0
