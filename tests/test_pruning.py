"""Pruning evaluation (docs/method.md §8, the paper's Table 4): fastnig.evaluation.pruning and ``fastnig prune``."""
from __future__ import annotations

import copy
import csv
import json
import random
import tempfile

import numpy as np
import pytest
import torch
from tiny_models import WORDS, make_model, write_vocab
from torch import nn

import fastnig
from fastnig.evaluation.pruning import PruningBenchmark, module_counts, prune, pruned, random_like
from fastnig.evaluation.reranking import bm25_run, build_candidates, compare_ndcg, ndcg_at_k
from fastnig.evaluation.table4 import CSV_COLUMNS, PruningTable
from fastnig.neurons.scheme import Scheme
from fastnig.neurons.sets import NeuronSet, neuron_universe


def word_tokenizer():
    """The tiny WordPiece tokenizer of tests/tiny_models.py, built with ``vocab=`` (transformers 5 ignores
    ``vocab_file=``, which would map every word to [UNK])."""
    from transformers import BertTokenizerFast

    with tempfile.TemporaryDirectory(prefix="fastnig-vocab-") as folder:
        tok = BertTokenizerFast(vocab=write_vocab(folder))
    assert tok.unk_token_id not in tok("heat flow")["input_ids"]
    return tok


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, saved) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from more threads; on a shared 2-core machine two OpenMP threads competing with
    another process made training ~30x slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ pruning
@pytest.fixture(scope="module")
def small():
    tok = word_tokenizer()
    model = make_model("bert", num_labels=2, vocab_size=tok.vocab_size, seed=3)
    enc = tok(["heat transfer of wings", "cancer risk diet"],
              ["the heat flow in boundary layers", "a study of diet and cancer in patients"],
              return_tensors="pt", padding=True)
    return model, tok, enc


def some_set(model, name="S"):
    sizes = neuron_universe(model)
    members = {"bert.encoder.layer.0.attention.self.value": [0, 5, 31],
               "bert.encoder.layer.0.intermediate.dense": [1, 2, 63],
               "bert.encoder.layer.1.output.dense": [7]}
    return NeuronSet.from_indices(members, sizes, name)


def linear_io(model, enc):
    """Run the model; per Linear module: (its input, its output)."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out)))
             for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            logits = model(**enc).logits
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


@pytest.mark.parametrize("how", ["copy", "in place"])
def test_pruned_neurons_output_exactly_zero_and_the_rest_of_the_layer_is_unchanged(small, how):
    model, _, enc = small
    nset = some_set(model)
    reference = copy.deepcopy(model)  # the unpruned weights
    saved = state_copy(model)
    ref_modules = dict(reference.named_modules())

    def check(pruned_model):
        io, logits = linear_io(pruned_model, enc)
        selected = nset.by_module()
        for name, (inputs, outputs) in io.items():
            units = selected.get(name, torch.empty(0, dtype=torch.long))
            others = torch.ones(outputs.shape[-1], dtype=torch.bool)
            others[units] = False
            # The selected units output exactly 0 for every token of every pair ...
            assert torch.all(outputs[..., units] == 0), name
            # ... and every other unit of the layer is what the unpruned layer gives for the same input.
            expected = ref_modules[name](inputs)
            assert torch.equal(outputs[..., others], expected[..., others]), name
        return logits

    if how == "copy":
        pruned_model = prune(model, nset)
        assert pruned_model is not model
        logits = check(pruned_model)
    else:
        with pruned(model, nset) as pruned_model:
            assert pruned_model is model
            logits = check(pruned_model)
    # Pruning changed the prediction, and the original model is back to (or stayed) bit-identical.
    assert not torch.equal(logits, linear_io(model, enc)[1])
    assert same_state(model, saved)


def test_pruning_an_empty_set_changes_nothing(small):
    model, _, enc = small
    empty = NeuronSet.empty(neuron_universe(model), "empty")
    before = linear_io(model, enc)[1]
    assert torch.equal(linear_io(prune(model, empty), enc)[1], before)
    with pruned(model, empty):
        assert torch.equal(linear_io(model, enc)[1], before)


def test_in_place_pruning_is_undone_after_an_exception(small):
    model, _, _ = small
    saved = state_copy(model)
    with pytest.raises(RuntimeError, match="boom"):
        with pruned(model, some_set(model)):
            assert not same_state(model, saved)
            raise RuntimeError("boom")
    assert same_state(model, saved)


def test_pruning_rejects_a_set_of_another_model(small):
    model, _, _ = small
    other = make_model("bert", num_labels=2, hidden=48, intermediate=96)
    foreign = NeuronSet.from_indices({"bert.encoder.layer.0.intermediate.dense": [90]}, neuron_universe(other))
    with pytest.raises(ValueError, match="another model"):
        prune(model, foreign)
    with pytest.raises(TypeError, match="NeuronSet"):
        prune(model, {"bert.encoder.layer.0.intermediate.dense": [1]})


def test_random_sets_keep_the_per_module_counts_and_follow_the_seed(small):
    model, _, _ = small
    nset = some_set(model, "P_x@1%")
    counts = module_counts(nset)
    assert counts == {"bert.encoder.layer.0.attention.self.value": 3, "bert.encoder.layer.0.intermediate.dense": 3,
                      "bert.encoder.layer.1.output.dense": 1}
    draws = [random_like(nset, seed=7, repetition=r) for r in range(6)]
    for draw in draws:
        assert isinstance(draw, NeuronSet) and draw.sizes == nset.sizes
        assert module_counts(draw) == counts
    assert random_like(nset, seed=7, repetition=2) == draws[2]  # reproducible
    assert len({tuple(d.mask.nonzero().flatten().tolist()) for d in draws}) == 6  # repetitions differ
    assert random_like(nset, seed=8, repetition=2) != draws[2]  # the seed matters
    # Over many draws every unit of a module can be picked (uniform within the module).
    picked = set()
    for r in range(200):
        picked.update(random_like(nset, seed=1, repetition=r).by_module()["bert.encoder.layer.0.intermediate.dense"]
                      .tolist())
    assert picked == set(range(64))
    with pytest.raises(ValueError, match="seed"):
        random_like(nset, seed=-1)


# ------------------------------------------------------------------ metrics
def test_ndcg_equals_pytrec_eval_on_cranfield_with_a_real_bm25_run(tmp_path):
    import pytrec_eval

    collection = fastnig.load_collection("cranfield")  # packaged; graded 1..4
    queries = collection.queries()
    qrels = collection.qrels()
    assert {g for docs in qrels.values() for g in docs.values()} == {1, 2, 3, 4}
    run = bm25_run(collection, queries, k=100, cache_dir=tmp_path / "bm25", progress=False)
    assert len(run) == 225 and all(len(hits) == 100 for hits in run.values())
    run_dict = {q: {d: s for d, s in hits} for q, hits in run.items()}

    ours = ndcg_at_k(run_dict, qrels, k=10)
    theirs = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10"}).evaluate(run_dict)
    assert set(ours) == set(theirs) == set(qrels)
    for qid in ours:
        assert ours[qid] == pytest.approx(theirs[qid]["ndcg_cut_10"], abs=1e-12), qid
    mean = float(np.mean(list(ours.values())))
    assert 0.3 < mean < 0.7  # BM25 on Cranfield (gains 1..4, source paper included), a real ranking

    # The index is cached on disk: the second run reads it and ranks the same.
    assert bm25_run(collection, queries, k=100, cache_dir=tmp_path / "bm25", progress=False) == run


def test_ndcg_breaks_ties_and_grades_like_trec_eval():
    import pytrec_eval

    qrels = {"q1": {"a": 1, "b": 2, "c": -1, "z": 0}, "q2": {"x": 3}, "q3": {"n": 0}, "q4": {"m": 1}}
    run = {"q1": {"a": 1.0, "b": 1.0, "c": 3.0, "d": 1.0, "z": 2.0}, "q2": {"y": 0.5}}
    ours = ndcg_at_k(run, qrels, k=4)
    theirs = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_4"}).evaluate(run)
    assert set(ours) == {"q1", "q2", "q4"}  # q3 has no relevant judgment
    # Ranking c, z, then the 1.0 ties by doc id descending: d, b (a is 5th); grades -1 and 0 gain nothing.
    assert ours["q1"] == pytest.approx((2 / np.log2(5)) / (2 + 1 / np.log2(3)), abs=1e-12)
    assert ours["q1"] == pytest.approx(theirs["q1"]["ndcg_cut_4"], abs=1e-12)
    assert ours["q2"] == ours["q4"] == 0.0  # nothing relevant retrieved / not in the run at all
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(run, qrels, k=0)


def test_drop_and_paired_t_test():
    from scipy.stats import ttest_rel

    original, after = [1.0, 0.5, 0.8, 0.2], [0.5, 0.5, 0.6, 0.1]
    c = compare_ndcg(original, after)
    assert c.drop_percent == pytest.approx((0.625 - 0.425) / 0.625 * 100)
    assert c.p_value == pytest.approx(ttest_rel(original, after).pvalue)
    assert c.significant == (c.p_value <= 0.05)
    assert compare_ndcg(after, original).drop_percent < 0  # better than the original: negative drop
    same = compare_ndcg(original, original)
    assert (same.drop_percent, same.p_value, same.significant) == (0.0, 1.0, False)
    with pytest.raises(ValueError, match="same length"):
        compare_ndcg([1.0, 0.5], [1.0])


# ------------------------------------------------------ synthetic overlap data
STOP = set("the a an of to in and or is are was be for on with by as at from that this which what how why when "
           "where who not no yes can does do about into over under between".split())
CONTENT = sorted(set(WORDS) - STOP)


class OverlapCollection:
    """Two-word queries over disjoint words; a passage's grade is how many query words it contains.

    Per query: passages with both words (x2), one word (x2), a word of another query (x4, hard negatives)
    and no query word (x12); filler words are never query words, so the qrels are exact.
    """

    def __init__(self, seed: int, num_queries: int = 25, name: str = "synthetic-overlap"):
        rng = random.Random(seed)
        pool = CONTENT[:]
        rng.shuffle(pool)
        words = [pool[2 * i:2 * i + 2] for i in range(num_queries)]
        filler = pool[2 * num_queries:]
        self.name = name
        self._queries = {f"q{i}": " ".join(w) for i, w in enumerate(words)}
        self._docs = {}

        def passage(chosen):
            text = chosen + rng.sample(filler, rng.randint(4, 8))
            rng.shuffle(text)
            return " ".join(text)

        for i, qw in enumerate(words):
            for j, overlap in enumerate([2, 2, 1, 1]):
                self._docs[f"d{i}-{j}"] = passage(rng.sample(qw, overlap))
            for j in range(4, 8):
                self._docs[f"d{i}-{j}"] = passage([rng.choice(words[rng.choice([k for k in range(num_queries)
                                                                                  if k != i])])])
            for j in range(8, 20):
                self._docs[f"d{i}-{j}"] = passage([])
        self._run = None

    def queries(self):
        return dict(self._queries)

    def qrels(self):
        out = {}
        for qid, text in self._queries.items():
            words = set(text.split())
            grades = {d: len(words & set(t.split())) for d, t in self._docs.items()}
            out[qid] = {d: g for d, g in grades.items() if g > 0}
        return out

    def doc_texts(self, doc_ids):
        return {d: self._docs[d] for d in doc_ids if d in self._docs}

    def iter_docs(self):
        return iter(self._docs.items())

    def scoreddocs(self, query_ids=None, depth=None):
        return self._run

    def relevant_pairs(self):
        qrels = self.qrels()
        return [(q, d) for q in self._queries for d in sorted(qrels[q])]

    def write_beir(self, folder):
        (folder / "qrels").mkdir(parents=True)
        with open(folder / "corpus.jsonl", "w") as f:
            for d, t in self._docs.items():
                f.write(json.dumps({"_id": d, "title": "", "text": t}) + "\n")
        with open(folder / "queries.jsonl", "w") as f:
            for q, t in self._queries.items():
                f.write(json.dumps({"_id": q, "text": t}) + "\n")
        with open(folder / "qrels" / "test.tsv", "w") as f:
            f.write("query-id\tcorpus-id\tscore\n")
            for q, docs in self.qrels().items():
                for d, g in docs.items():
                    f.write(f"{q}\t{d}\t{g}\n")
        return folder


def test_candidates_are_the_relevant_passages_plus_the_first_stage_top(tmp_path):
    col = OverlapCollection(seed=5)
    full = build_candidates(col, depth=5, cache_dir=tmp_path, progress=False)
    assert full.source == "bm25" and full.num_queries == 25
    qrels = col.qrels()
    run = bm25_run(col, col.queries(), k=5, cache_dir=tmp_path, progress=False)
    for qid, docs in full.docs.items():
        assert set(docs) == {d for d, _ in run[qid]} | set(qrels[qid])
        assert docs[:5] == [d for d, _ in run[qid]]  # first-stage order, then the relevant ones it missed
    assert all(full.passages[d] == col._docs[d] for d in full.passages)

    a = build_candidates(col, num_queries=10, seed=1, depth=5, cache_dir=tmp_path, progress=False)
    b = build_candidates(col, num_queries=10, seed=1, depth=5, cache_dir=tmp_path, progress=False)
    c = build_candidates(col, num_queries=10, seed=2, depth=5, cache_dir=tmp_path, progress=False)
    assert list(a.queries) == list(b.queries) and a.docs == b.docs
    assert len(a.queries) == 10 and set(a.queries) != set(c.queries)

    # A dataset with its own first-stage run uses it, not BM25.
    col._run = {q: [(f"d{i}-19", 3.0), (f"d{i}-18", 5.0)] for i, q in enumerate(col.queries())}
    own = build_candidates(col, depth=1, progress=False)
    assert own.source == "scoreddocs"
    assert own.docs["q3"] == ["d3-18"] + sorted(qrels["q3"])
    with pytest.raises(ValueError, match="num_queries"):
        build_candidates(col, num_queries=0)


# ------------------------------------------------------- end to end (trained)
def train_overlap_ranker(steps: int = 400, seed: int = 0):
    """A 2-layer BERT trained to score (query, passage) by how many of the 2 query words the passage holds.

    Layer 0's query/key projections start as (scaled) identities, so that equal tokens attend to each other,
    and positions start small; then ~400 Adam steps on soft labels (0, 1/2, 1) learn the rest (about 10 s on
    two cores).
    """
    tok = word_tokenizer()
    model = make_model("bert", num_labels=2, vocab_size=tok.vocab_size, hidden=32, layers=2, intermediate=64,
                       seed=seed, init_range=0.2)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    with torch.no_grad():
        attention = model.bert.encoder.layer[0].attention.self
        attention.query.weight.copy_(3 * torch.eye(32))
        attention.key.weight.copy_(torch.eye(32))
        attention.query.bias.zero_()
        attention.key.bias.zero_()
        model.bert.embeddings.word_embeddings.weight.normal_(0, 1.0)
        model.bert.embeddings.position_embeddings.weight.mul_(0.1)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        queries, passages, targets = [], [], []
        for _ in range(64):
            words = rng.sample(CONTENT, 2)
            overlap = rng.choice([0, 0, 1, 2])
            others = rng.sample([w for w in CONTENT if w not in words], rng.randint(4, 8))
            text = rng.sample(words, overlap) + others
            rng.shuffle(text)
            queries.append(" ".join(words))
            passages.append(" ".join(text))
            targets.append([1 - overlap / 2, overlap / 2])
        enc = tok(queries, passages, return_tensors="pt", padding=True)
        loss = nn.functional.cross_entropy(model(**enc).logits, torch.tensor(targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, tok


def scheme_of(model, tok, collection, label):
    """P_x (label relevant) or N_x (non-relevant) of the collection: mean NIG over its pairs of that label.

    Baseline ``pad-query``: for a lexical-overlap model an all-[PAD] pair is itself a perfect match (P(rel)
    ~ 0.85), so ``pad`` would not erase the relevance signal (docs/method.md §3's quality check), while removing the
    query does.
    """
    queries, docs = collection.queries(), collection._docs
    if label == "relevant":
        ids = collection.relevant_pairs()
    else:
        qrels = collection.qrels()
        ids = [(q, d) for q in queries for d in sorted(docs)[::9] if d not in qrels[q]][:150]
    attributions = fastnig.attribute(model, [(queries[q], docs[d]) for q, d in ids], tokenizer=tok, target=label,
                                     baseline="pad-query", steps=16, pair_batch=16, progress=False)
    return Scheme.from_attributions(attributions, [f"{q}\t{d}" for q, d in ids], collection.name,
                                    model="lexical-overlap-bert")


@pytest.fixture(scope="module")
def overlap_ranker():
    model, tok = train_overlap_ranker()
    return model, tok


@pytest.mark.slow
def test_pruning_the_top_nig_neurons_hurts_ranking_more_than_random_neurons(overlap_ranker, tmp_path):
    model, tok = overlap_ranker
    saved = state_copy(model)
    candidates = build_candidates(OverlapCollection(seed=1), depth=20, cache_dir=tmp_path, progress=False)
    bench = PruningBenchmark(model, tok, candidates, batch_size=128, progress=False)
    assert bench.original_ndcg.mean() > 0.9  # it learnt to rank by overlap

    # Neurons ranked by mean NIG over the relevant pairs of another sample; the top 5 %.
    scheme = scheme_of(model, tok, OverlapCollection(seed=2, num_queries=20), "relevant")
    top = scheme.top(5)
    assert len(top) == 22  # 5 % of 2 x (4 x 32 + 64 + 32) = 448 neurons

    result = bench.evaluate(top)
    random_runs = bench.random_baseline(top, repetitions=15, seed=0)
    print(f"top-NIG 5 %: drop {result.drop_percent:.2f} % (p={result.p_value:.2g}); random: "
          f"{random_runs.mean_drop:.2f} ± {random_runs.std_drop:.2f} % (max {random_runs.drop_percent.max():.2f}, "
          f"{random_runs.num_significant}/15 significant)")
    # Measured (seeds 0/1/2 of the training): top 10.8 / 15.7 / 11.9 %, random 0.7 / 0.6 / 0.5 % (max <= 2.4).
    assert result.significant
    assert result.drop_percent > 5 * max(random_runs.mean_drop, 1.0)
    assert result.drop_percent > random_runs.drop_percent.max() + 3
    assert same_state(model, saved)  # every pruned run was undone
    np.testing.assert_array_equal(bench.original_scores, bench.pruned_scores(NeuronSet.empty(top.sizes)))


# ------------------------------------------------------------- Table 4 / CLI
def test_table_marks_the_biggest_and_second_biggest_drop_per_level():
    rows = []
    for name, drops in (("A", (1.0, 30.0)), ("B", (2.0, 10.0)), ("C", (-1.0, 20.0))):
        for level, drop in zip((0.1, 1.0), drops):
            for dataset, group, shift, sig in (("d1", "G", 0.0, True), ("d2", "G", 2.0, False),
                                               ("ms", "MS", 0.0, False)):
                rows.append({"set": name, "level_percent": level, "dataset": dataset, "group": group,
                             "num_neurons": 3, "num_queries": 10, "num_candidates": 50, "ndcg_original": 0.5,
                             "ndcg_pruned": 0.4, "drop_percent": drop + shift, "p_value": 0.01 if sig else 0.5,
                             "significant": sig, "random_repetitions": 5, "random_ndcg_mean": 0.5,
                             "random_drop_mean": 0.5, "random_drop_std": 0.1, "random_significant": 0})
    md = PruningTable(rows).to_markdown()
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in md.splitlines()
             if line.startswith("|")}
    assert "| A | G | <u>2.00</u> (1) | **31.00** (1) |" in md  # mean of d1 and d2, one significant
    assert "|  | MS | <u>1.00</u> | **30.00** |" in md
    assert "| B | G | **3.00** (1) | 11.00 (1) |" in md
    assert "| C | G | 0.00 (1) | <u>21.00</u> (1) |" in md
    assert "| Random baseline | G | 0.50 | 0.50 |" in md
    assert lines[("Sets of neurons pruned", "Datasets")].count("%") == 2
    tex = PruningTable(rows).to_latex()
    assert r"\textbf{31.00} (1)" in tex and r"\underline{21.00} (1)" in tex and r"0.1\%" in tex


@pytest.mark.slow
def test_fastnig_prune_writes_table4_in_three_formats(overlap_ranker, tmp_path, monkeypatch):
    from fastnig.cli import main

    monkeypatch.setenv("IR_DATASETS_HOME", str(tmp_path / "irds"))
    model, tok = overlap_ranker
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    attribution_data = OverlapCollection(seed=2, num_queries=20)
    for label, name in (("relevant", "P_syn"), ("non-relevant", "N_syn")):
        scheme = scheme_of(model, tok, attribution_data, label)
        scheme.name = name
        scheme.save(tmp_path / "schemes" / name)
    first = OverlapCollection(seed=1).write_beir(tmp_path / "val1")
    second = OverlapCollection(seed=3).write_beir(tmp_path / "val2")

    code = main(["prune", "--model", str(model_dir),
                 "--set", f"{tmp_path / 'schemes' / 'P_syn.json'}", "--set", f"N_syn={tmp_path / 'schemes' / 'N_syn'}",
                 "--set", "F_syn=fuse:P_syn,N_syn", "--set", "I_syn=and:P_syn,N_syn",
                 "--levels", "5", "10", "--dataset", f"Synthetic={first}", "--dataset", f"Synthetic={second}",
                 "--queries", "12", "--repetitions", "3", "--seed", "4", "--batch-size", "64",
                 "--bm25-cache", str(tmp_path / "bm25"), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    out = tmp_path / "out"
    with open(out / "table4.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert [(r["set"], r["level_percent"]) for r in rows[:8]] == [
        (s, lv) for s in ("P_syn", "N_syn", "F_syn", "I_syn") for lv in ("5.0", "10.0")]
    assert len(rows) == 16 and {r["dataset"] for r in rows} == {str(first), str(second)}
    assert {r["group"] for r in rows} == {"Synthetic"}

    # The numbers are those of the Python API on the same sets and candidates.
    schemes = {n: Scheme.load(tmp_path / "schemes" / n) for n in ("P_syn", "N_syn")}
    expected_sets = {("P_syn", 10.0): schemes["P_syn"].top(10), ("N_syn", 5.0): schemes["N_syn"].top(5),
                     ("F_syn", 10.0): fastnig.fuse(schemes["P_syn"], schemes["N_syn"]).top(10),
                     ("I_syn", 10.0): schemes["P_syn"].top(10) & schemes["N_syn"].top(10)}
    collection = fastnig.load_collection(first)
    candidates = build_candidates(collection, num_queries=12, seed=4, depth=20, cache_dir=tmp_path / "bm25",
                                  progress=False)
    bench = PruningBenchmark(model, tok, candidates, batch_size=64, progress=False)
    for r in rows:
        assert int(r["num_queries"]) == 12 and int(r["random_repetitions"]) == 3
        assert int(r["num_candidates"]) >= 12 * 20
        assert 0 <= float(r["p_value"]) <= 1 and (r["significant"] == "True") == (float(r["p_value"]) <= 0.05)
        original, after = float(r["ndcg_original"]), float(r["ndcg_pruned"])
        assert float(r["drop_percent"]) == pytest.approx((original - after) / original * 100)
        key = (r["set"], float(r["level_percent"]))
        if r["dataset"] == str(first) and key in expected_sets:
            nset = expected_sets[key]
            assert int(r["num_neurons"]) == len(nset)
            result = bench.evaluate(nset)
            assert float(r["ndcg_original"]) == pytest.approx(result.comparison.ndcg_original, abs=1e-12)
            assert float(r["drop_percent"]) == pytest.approx(result.drop_percent, abs=1e-9)
            randoms = bench.random_baseline(nset, repetitions=3, seed=4)
            assert float(r["random_drop_mean"]) == pytest.approx(randoms.mean_drop, abs=1e-9)
            assert float(r["random_drop_std"]) == pytest.approx(randoms.std_drop, abs=1e-9)
            assert int(r["random_significant"]) == randoms.num_significant
    assert PruningTable.from_csv(out / "table4.csv").rows[0]["set"] == "P_syn"

    md = (out / "table4.md").read_text()
    tex = (out / "table4.tex").read_text()
    assert "| Sets of neurons pruned | Datasets | 5% | 10% |" in md
    for name in ("P_syn", "N_syn", "F_syn", "I_syn", "Random baseline"):
        assert f"| {name} | Synthetic |" in md
        assert name.replace("_", r"\_") in tex
    assert md.count("**") >= 4 and "<u>" in md  # a bold cell per level (more on ties), underlined ones
    assert tex.count(r"\textbf{") >= 2 and r"\begin{tabular}" in tex


def test_fastnig_prune_help_and_bad_arguments(capsys, tmp_path):
    from fastnig.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for words in ("--set", "fuse:", "and:", "--dataset", "--repetitions", "--adaptive", "table4.csv", "drop %",
                  "--ranker", "--template"):
        assert words in text
    assert main(["prune", "--model", "x", "--set", "P=fuse:", "--out", str(tmp_path), "--levels", "0"]) == 2
    assert "--levels" in capsys.readouterr().err
