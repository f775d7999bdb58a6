"""Per-dataset label mapping: which grades land in P_x and N_x, BM25 negatives, and paper.yaml's N_x."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastnig.data import (
    DATASETS,
    MissingJudgments,
    count_labels,
    known_grades,
    label_mapping,
    load_collection,
    sample_pairs,
)
from fastnig.study.config import ConfigError, attributed_labels, dataset_entry, load_config

# Six documents per query; grades 3, 2, 1, 0 and -1 (a "negative sample" grade, as in DPR's NQ), the rest unjudged.
TOPICS = {
    "q1": ("heat transfer wings", ["heat transfer in supersonic wings", "wings heat flow", "heat and wings data",
                                   "supersonic wings pressure", "heat transfer theory"]),
    "q2": ("cancer diet risk", ["diet and cancer risk", "cancer risk in patients", "diet study of food",
                                "cancer cells", "vitamin diet"]),
    "q3": ("library search users", ["library search for users", "search users", "library books",
                                    "library index", "users of the system"]),
}
QRELS = [("q1", "q1d0", 3), ("q1", "q1d1", 2), ("q1", "q1d2", 1), ("q1", "q1d3", 0), ("q1", "q1d4", -1),
         ("q2", "q2d0", 2), ("q2", "q2d1", 1), ("q2", "q2d2", 0),
         ("q3", "q3d0", 3), ("q3", "q3d1", 1)]
GRADE = {(q, d): g for q, d, g in QRELS}


@pytest.fixture()
def graded(tmp_path):
    """A local BEIR collection with grades -1..3 (5 judged + unjudged documents per query); its docstore in
    tmp_path (IR_DATASETS_HOME is left alone: ir_datasets reads it once, at import)."""
    folder = tmp_path / "graded"
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"{q}d{i}", "title": "", "text": text} for q, (_, texts) in TOPICS.items()
            for i, text in enumerate(texts)]
    docs += [{"_id": f"x{i}", "title": "", "text": f"unrelated document number {i} about numbers"} for i in range(6)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                                  for q, (t, _) in TOPICS.items()))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                               + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in QRELS))
    return load_collection(folder, cache_dir=tmp_path / "cache")


def grades_of(pairs):
    return sorted({p.grade for p in pairs})


def draw(collection, label, **kwargs):
    return sample_pairs(collection, label=label, num_pairs=50, seed=1, **kwargs)


@pytest.mark.filterwarnings("ignore:.*only .* pairs are available")
def test_which_grades_land_in_p_and_n(graded):
    # Default: relevant = grade >= 1, non-relevant = grade 0; -1 is in neither.
    assert grades_of(draw(graded, 1)) == [1, 2, 3] and grades_of(draw(graded, 0)) == [0]
    # TREC DL's convention: relevant {2, 3} -> non-relevant = the judged grades below 2: {0, 1}.
    assert grades_of(draw(graded, 1, relevant=[2, 3])) == [2, 3]
    assert grades_of(draw(graded, 0, relevant=[2, 3])) == [0, 1]
    assert len(draw(graded, 0, relevant=[2, 3])) == 5
    # A global threshold works the same way.
    assert grades_of(draw(graded, 0, relevance_threshold=3)) == [0, 1, 2]
    # Listed non-relevant grades: grade 1 is in neither label.
    assert grades_of(draw(graded, 0, relevant=[2, 3], nonrelevant=[0])) == [0]
    # Relevant {3} only: every other non-negative grade is non-relevant, never -1.
    assert grades_of(draw(graded, 0, relevant=[3])) == [0, 1, 2]
    every = {(p.query_id, p.doc_id) for p in draw(graded, 0, relevant=[3])}
    assert ("q1", "q1d4") not in every
    # Every drawn pair carries its qrel grade.
    for p in draw(graded, 1, relevant=[2, 3]) + draw(graded, 0, relevant=[2, 3]):
        assert GRADE[(p.query_id, p.doc_id)] == p.grade
    assert count_labels(graded, label_mapping([2, 3])) == {"relevant": 4, "non-relevant": 5}
    assert count_labels(graded) == {"relevant": 7, "non-relevant": 2}
    # No non-relevant grade left: label 0 cannot be sampled with judged negatives.
    with pytest.raises(MissingJudgments, match="no non-relevant judgments"):
        draw(graded, 0, nonrelevant=[])


def test_bad_label_mappings_are_refused(graded):
    for kwargs, message in ((dict(nonrelevant=[-1]), "negative grades are never non-relevant"),
                            (dict(relevant=[0]), "grade 0 means non-relevant"),
                            (dict(relevant=[]), "at least one grade"),
                            (dict(relevant=[2], nonrelevant=[0, 2]), "both relevant and non-relevant"),
                            (dict(relevant="2,3"), "list of integer grades"),
                            (dict(relevant=[2.5]), "not an int")):
        with pytest.raises(ValueError, match=message):
            draw(graded, 1, **kwargs)
    with pytest.raises(ValueError, match="needs ranker="):
        draw(graded, 0, negatives="bm25")


class FakeRanker:
    """A fixed ranking per query, recording its calls."""

    def __init__(self, ranking):
        self.ranking, self.calls = ranking, []

    def __call__(self, queries, k):
        self.calls.append((sorted(queries), k))
        return {q: self.ranking[q][:k] for q in queries}


@pytest.mark.filterwarnings("ignore:.*only .* pairs are available")
def test_bm25_negatives_fill_up_judged_ones_with_the_top_unjudged_passages(graded):
    ranking = {"q1": ["q1d0", "x3", "q1d3", "x1", "x2", "x4"], "q2": ["q2d1", "x5", "x0", "q2d2", "x4"],
               "q3": ["x2", "q3d0", "q3d2", "x1"]}
    ranker = FakeRanker(ranking)
    # Enough judged negatives: the ranker is never asked.
    judged = sample_pairs(graded, label=0, num_pairs=2, seed=1, negatives="bm25", ranker=ranker)
    assert ranker.calls == [] and {p.grade for p in judged} == {0}
    # Too few (2 judged grade-0 pairs): the rest are the best-ranked unjudged passages, rank by rank.
    pairs = sample_pairs(graded, label=0, num_pairs=7, seed=1, negatives="bm25", ranker=ranker)
    assert len(pairs) == 7
    assert {(p.query_id, p.doc_id) for p in pairs[:2]} == {("q1", "q1d3"), ("q2", "q2d2")}  # judged first
    fill = [(p.query_id, p.doc_id) for p in pairs[2:]]
    assert all((q, d) not in GRADE for q, d in fill) and all(p.label == 0 for p in pairs)
    first_unjudged = {"q1": "x3", "q2": "x5", "q3": "x2"}
    assert set(fill[:3]) == set(first_unjudged.items())          # every query's best unjudged passage first
    assert set(fill[3:]) <= {("q1", "x1"), ("q2", "x0"), ("q3", "q3d2")}  # then the second best
    # Only queries with a relevant document are ranked; depth = per query + its judged documents.
    (queries, k), = ranker.calls
    assert queries == ["q1", "q2", "q3"] and k == 2 + 1 + 5
    # Deterministic, and a larger draw extends a smaller one.
    assert sample_pairs(graded, label=0, num_pairs=7, seed=1, negatives="bm25", ranker=ranker) == pairs
    # Relevant {2, 3}: grades 0 and 1 are judged non-relevant; no fill needed for 5 pairs.
    five = sample_pairs(graded, label=0, num_pairs=5, seed=1, negatives="bm25", ranker=FakeRanker(ranking),
                        relevant=[2, 3])
    assert grades_of(five) == [0, 1] and all((p.query_id, p.doc_id) in GRADE for p in five)
    # A dataset without any judged non-relevant pair still gets N_x from BM25.
    only_bm25 = sample_pairs(graded, label=0, num_pairs=3, seed=1, negatives="bm25", ranker=FakeRanker(ranking),
                             nonrelevant=[])
    assert sorted((p.query_id, p.doc_id) for p in only_bm25) == sorted(first_unjudged.items())


@pytest.mark.slow
def test_bm25_negatives_from_real_bm25_through_the_pipeline(graded, tmp_path, saved_tiny_model, tokenizer):
    pytest.importorskip("bm25s")
    from transformers import AutoModelForSequenceClassification

    from fastnig.engine.settings import AttributionSettings
    from fastnig.evaluation.reranking import bm25_run
    from fastnig.study.attribution_job import attribute_dataset, bm25_ranker

    ranker = bm25_ranker(graded, tmp_path / "bm25")
    pairs = sample_pairs(graded, label=0, num_pairs=6, seed=2, negatives="bm25", ranker=ranker, relevant=[3],
                         nonrelevant=[0])
    judged = [p for p in pairs if (p.query_id, p.doc_id) in GRADE]
    assert {(p.query_id, p.doc_id) for p in judged} == {("q1", "q1d3"), ("q2", "q2d2")}
    queries = {q: t for q, (t, _) in TOPICS.items()}
    run = bm25_run(graded, queries, k=20, cache_dir=tmp_path / "bm25", progress=False)
    for p in pairs[len(judged):]:
        assert p.query_id in ("q1", "q3")  # the queries with a grade-3 document
        unjudged = [d for d, _ in run[p.query_id] if (p.query_id, d) not in GRADE]
        assert p.doc_id in unjudged[:2]    # among the query's two best-ranked unjudged passages
    # The same through `fastnig attribute`'s job: the scheme holds exactly these pairs.
    model = AutoModelForSequenceClassification.from_pretrained(saved_tiny_model(seed=4))
    scheme = attribute_dataset(model, tokenizer, graded, label="non-relevant", num_pairs=6, seed=2,
                               negatives="bm25", relevant=[3], nonrelevant=[0], bm25_cache_dir=tmp_path / "bm25",
                               agreement_filter=False, settings=AttributionSettings(steps=2, max_length=32),
                               out=tmp_path / "N_graded",
                               progress=False)
    assert scheme.seen_ids == {f"{p.query_id}\t{p.doc_id}" for p in pairs}
    assert scheme.extra["sampling"]["relevant"] == [3] and scheme.extra["sampling"]["negatives"] == "bm25"


# ------------------------------------------------------------------ configs
def test_paper_yaml_label_mapping_and_nx_without_downloading(no_network):
    cfg = load_config("paper")
    datasets = cfg.attribution["datasets"]
    # The relevance levels of the authors' configs.
    assert {name: e["relevant"] for name, e in datasets.items()} == {
        "ms": [2, 3], "f": [1], "tc": [2], "nf": [2], "nq": [2], "tn": [2, 4, 8, 16], "r": [1, 2], "b": [1]}
    assert datasets["nq"]["dataset"] == "dpr-w100/natural-questions/dev"
    assert all(e["negatives"] == "judged" for e in datasets.values())
    # N_x where the data has non-relevant judgments: every dataset but f and b (footnote 5, Table 3) ...
    labels = attributed_labels(cfg.attribution)
    assert [n for n, ls in labels.items() if "non-relevant" in ls] == ["ms", "tc", "nf", "nq", "tn", "r"]
    assert labels["f"] == labels["b"] == ["relevant"]
    # ... checked against the grades the datasets' qrels hold (ir_datasets' packaged metadata / the registry).
    expected_nonrelevant = {"ms": [0, 1], "tc": [0, 1], "nf": [1], "nq": [0], "tn": [0], "r": [0], "f": [], "b": []}
    for name, entry in datasets.items():
        grades = known_grades(entry["dataset"])
        assert grades is not None, name
        mapping = label_mapping(entry["relevant"], entry["nonrelevant"])
        resolved = mapping.resolve(grades)
        assert resolved["relevant"] == entry["relevant"], name
        assert resolved["nonrelevant"] == expected_nonrelevant[name], name
        assert all(grades[g] > 0 for g in resolved["nonrelevant"])
    assert known_grades("nq") == {1: 4201}  # why not beir/nq: it judges positives only
    assert known_grades(DATASETS["b"]) == {1: 0} and known_grades("/some/local/folder") is None
    assert -1 in known_grades("dpr-w100/natural-questions/dev")  # DPR's random negatives: never N


def test_config_dataset_mappings_and_errors(no_network):
    assert dataset_entry("x", "nf") == {"dataset": "nf", "relevant": None, "nonrelevant": None, "negatives": "judged"}
    assert dataset_entry("x", {"dataset": "nf", "relevant": [2], "negatives": "bm25"}, "judged") == {
        "dataset": "nf", "relevant": [2], "nonrelevant": None, "negatives": "bm25"}
    base = {"model": "demo", "output": "out", "attribution": {"datasets": {}}, "pruning": {}}
    for datasets, message in (
            ({"ms": {"relevant": [2]}}, "needs the key 'dataset'"),
            ({"ms": {"dataset": "ms", "grades": [2]}}, r"unknown key\(s\) \['grades'\]"),
            ({"ms": {"dataset": "ms", "nonrelevant": [-1]}}, "attribution.datasets.ms: .*never non-relevant"),
            ({"ms": {"dataset": "ms", "negatives": "random"}}, "attribution.datasets.ms.negatives"),
            ({"ms": ["ms"]}, "must be a dataset spec or a mapping")):
        cfg = json.loads(json.dumps(base))
        cfg["attribution"]["datasets"] = datasets
        with pytest.raises(ConfigError, match=message):
            load_config(cfg)
    # A set expression that needs an N_x the data cannot give is refused before any work.
    cfg = json.loads(json.dumps(base))
    cfg["attribution"]["datasets"] = {"f": {"dataset": "f"}, "ms": "ms"}
    cfg["pruning"] = {"sets": ["N_f"], "validation": {"ms-dev": "ms-dev"}}
    with pytest.raises(ConfigError, match="N_f needs"):
        load_config(cfg)
    # --dataset overrides replace the whole entry (the new dataset's own default labels).
    cfg = load_config("paper", datasets={"ms": "msmarco-passage/trec-dl-2020/judged"})
    assert cfg.attribution["datasets"]["ms"] == {"dataset": "msmarco-passage/trec-dl-2020/judged", "relevant": None,
                                                 "nonrelevant": None, "negatives": "judged"}
    # ... so an override whose data has no non-relevant judgment fails where the config needs N_ms.
    with pytest.raises(ConfigError, match="N_ms needs"):
        load_config("paper", datasets={"ms": "beir/scifact/test"})
    assert load_config("paper-zero").attribution["baseline"] == "zero"
    assert load_config("paper-zero").compare_with == Path("runs/paper")


def test_attribute_cli_label_options(capsys):
    from fastnig.cli import main

    base = ["attribute", "--model", "no-such-model", "--dataset", "ms", "--label", "non-relevant", "--out", "x"]
    # Bad grades stop before the model or the data is touched, with one line.
    assert main(base + ["--relevant", "2,three"]) == 2
    assert "--relevant '2,three': give integer grades" in capsys.readouterr().err
    assert main(base + ["--relevant", "2,3", "--nonrelevant=-1,0"]) == 2
    assert "never non-relevant" in capsys.readouterr().err
    assert main(base + ["--relevant", "2", "--nonrelevant", "1,2"]) == 2
    assert "both relevant and non-relevant" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--negatives", "random"])
    assert "invalid choice: 'random'" in capsys.readouterr().err
