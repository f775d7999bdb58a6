"""`fastnig run` end to end on the generative rerankers of issue 23: a tiny monoT5 and a tiny yes/no decoder.

The models are random (Hub weights cannot be downloaded here), saved with
``save_pretrained`` and loaded back by the study through their
``config.architectures`` (:func:`fastnig.engine.loading.load_pretrained_ranker`);
the ranker comes from the model's class or from the config's ``ranker`` entry.
"""
from __future__ import annotations

import csv
import json

import pytest
import yaml
from tiny_models import make_generative, make_word_tokenizer

from fastnig.neurons.scheme import Scheme


def _saved(tmp_path_factory, kind, tokenizer_kind):
    folder = tmp_path_factory.mktemp(f"{kind}-model")
    tokenizer = make_word_tokenizer(tokenizer_kind)
    make_generative(kind, vocab_size=len(tokenizer), seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _config(model_dir, output, ranker=None):
    cfg = {
        "name": "tiny-generative", "model": str(model_dir), "output": str(output),
        "attribution": {
            "datasets": {"cran": "cranfield", "med": "med"}, "in_domain": ["cran"],
            "labels": ["relevant", "non-relevant"], "negatives": "unjudged", "agreement_filter": False,
            "pairs": 4, "steps": 4, "max_length": 96, "chunk_pairs": 2},
        "analysis": {"levels": [1, 10], "layer_percent": 10, "baseline_pairs": 3},
        "pruning": {"levels": [10], "sets": ["P_cran"], "queries": 4, "depth": 4, "repetitions": 2,
                    "validation": {"cran": {"dataset": "cranfield", "group": "Cranfield"}}},
    }
    if ranker is not None:
        cfg["ranker"] = ranker
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("kind, tokenizer_kind, ranker, family", [
    ("t5", "t5", None, "monot5"),
    ("qwen3", "qwen", {"family": "yes_no", "template": "query: {query} document: {passage} relevant:",
                       "padding_side": "left"}, "yes_no"),
])
def test_reduced_study_completes_for_a_generative_ranker(tmp_path, tmp_path_factory, monkeypatch, cli, kind,
                                                         tokenizer_kind, ranker, family):
    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path / "irds"))
    monkeypatch.setenv("FASTNIG_CACHE", str(tmp_path / "cache"))
    model_dir = _saved(tmp_path_factory, kind, tokenizer_kind)
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(model_dir, out, ranker)))
    code, _, err = cli("run", config, "--quiet")
    assert code == 0, err[-3000:]
    schemes = {p.stem: Scheme.load(p.with_suffix("")) for p in (out / "schemes").glob("*.json")}
    assert {"P_cran", "P_med"} <= set(schemes)
    for scheme in schemes.values():
        recorded = scheme.settings.get("ranker")
        assert recorded and recorded["family"] == family
        if ranker is not None:
            assert recorded["template"] == ranker["template"]
        assert not any("lm_head" in name for name in scheme.sizes)  # the vocabulary head is never a neuron
    with open(out / "pruning" / "table4.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(row["set"] for row in rows)
    assert (out / "report.md").is_file() and (out / "analysis").is_dir()
    quality = json.loads((out / "analysis" / "table1.json").read_text()) if (out / "analysis" / "table1.json"
                                                                               ).exists() else None
    if quality is not None:
        assert "original" in json.dumps(quality)


@pytest.mark.slow
def test_fastnig_prune_takes_the_ranker_and_its_template(tmp_path, tmp_path_factory, monkeypatch):
    """`fastnig prune --ranker yes_no --template ...` reranks through that ranker: its rows equal the Python API's
    PruningBenchmark with the same ranker and template; --template alone is a usage error."""
    import fastnig
    from fastnig.cli import main
    from fastnig.evaluation.pruning import PruningBenchmark
    from fastnig.evaluation.reranking import build_candidates
    from fastnig.rankers import YesNo

    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path / "irds"))
    model_dir = _saved(tmp_path_factory, "qwen3", "qwen")
    template = "query: {query} document: {passage} relevant:"
    model, tok = fastnig.load_ranker(str(model_dir))
    scheme_path = tmp_path / "P_x"
    pairs = [("heat transfer in wings", "the wing heat flow was measured"), ("shock waves", "laminar boundary layer")]
    att = fastnig.attribute(model, pairs, tokenizer=tok, ranker=YesNo(template=template), steps=2, progress=False)
    Scheme.from_attributions(att, ["a", "b"], "cranfield", model=str(model_dir)).save(scheme_path)
    common = ["prune", "--model", str(model_dir), "--set", f"P_x={scheme_path}", "--levels", "10",
              "--dataset", "Cranfield=cranfield", "--queries", "3", "--depth", "3", "--repetitions", "1",
              "--seed", "2", "--batch-size", "8", "--max-length", "64", "--bm25-cache", str(tmp_path / "bm25"),
              "--quiet"]
    assert main(common + ["--ranker", "yes_no", "--template", template, "--out", str(tmp_path / "a")]) == 0
    with open(tmp_path / "a" / "table4.csv", newline="") as f:
        row = next(csv.DictReader(f))
    candidates = build_candidates(fastnig.load_collection("cranfield"), num_queries=3, seed=2, depth=3,
                                  cache_dir=tmp_path / "bm25", progress=False)
    bench = PruningBenchmark(model, tok, candidates, batch_size=8, max_length=64, progress=False,
                             ranker=YesNo(template=template))
    result = bench.evaluate(Scheme.load(scheme_path).top(10))
    assert float(row["ndcg_original"]) == pytest.approx(result.comparison.ndcg_original, abs=1e-9)
    assert float(row["drop_percent"]) == pytest.approx(result.drop_percent, abs=1e-9)
    assert main(common[:1] + ["--model", "x", "--set", "P=fuse:", "--template", template,
                              "--out", str(tmp_path / "b")]) == 2
