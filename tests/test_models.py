"""Fine-tuning a cross-encoder and the cached offline demo model, on a tiny model and collection.

MiniLM is never fine-tuned here: the same code runs on a 2-layer BERT from
``tiny_models`` over a generated TREC-files collection, in a few seconds.
"""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from fastnig.data import load_collection
from fastnig.data.splits import split_queries
from fastnig.training import demo_model as models
from fastnig.training.demo_model import offline_demo_model
from fastnig.training.finetune import finetune_cross_encoder

TOPICS = [
    ("heat transfer", "heat transfer heating theory flow"),
    ("boundary layer", "boundary layer laminar turbulent flow"),
    ("supersonic wings", "supersonic wing wings shock wave pressure"),
    ("cancer diet", "cancer diet food vitamin risk patients"),
    ("protein gene", "protein gene genes cell cells"),
    ("information retrieval", "information retrieval search query documents index"),
    ("library books", "library books users system data"),
    ("blood disease", "blood disease patient brain acid"),
]
FILLER = "the study of results and methods in this case shows new values of large and small numbers".split()


def _write_collection(folder):
    """8 queries, 3 relevant docs each (their topic's words) and 16 distractors sharing only filler."""
    docs, queries, qrels = [], [], []
    for t, (query, words) in enumerate(TOPICS, start=1):
        queries.append(f"q{t}\t{query}")
        for j in range(3):
            did = f"d{t}-{j}"
            text = " ".join(words.split()[j:] + FILLER[j * 3:j * 3 + 6] + words.split()[:j])
            docs.append(f"{did}\t{text}")
            qrels.append(f"q{t} 0 {did} {1 + (j == 0)}")
    for k in range(16):
        other = TOPICS[k % len(TOPICS)][1].split()
        docs.append(f"x{k}\t{' '.join(FILLER[k % 5:k % 5 + 8])} {other[-1]}")
    (folder / "docs.tsv").write_text("\n".join(docs) + "\n")
    (folder / "queries.tsv").write_text("\n".join(queries) + "\n")
    (folder / "qrels.txt").write_text("\n".join(qrels) + "\n")
    return load_collection("trec", docs_tsv=str(folder / "docs.tsv"), queries_tsv=str(folder / "queries.tsv"),
                           qrels_trec=str(folder / "qrels.txt"), cache_dir=str(folder / "docstore"), offline=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads spin badly on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import make_model, make_tokenizer

    folder = tmp_path_factory.mktemp("tiny-ce")
    collection = _write_collection(folder)
    tokenizer = make_tokenizer("bert")
    base = folder / "base"
    model = make_model("bert", num_labels=1, vocab_size=tokenizer.vocab_size, init_range=0.02)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    return collection, tokenizer, base


FAST = dict(steps=40, batch_size=8, lr=2e-3, max_length=32, negative_depth=6, warmup=0.1, progress=False)


def _fresh(base):
    from fastnig.training.demo_model import load_cross_encoder

    torch.manual_seed(0)
    return load_cross_encoder(str(base), num_labels=1)


def test_split_queries_is_seeded_and_disjoint(tiny):
    collection = tiny[0]
    train, test = split_queries(collection, test_fraction=0.25, seed=3)
    assert len(test) == 2 and len(train) == 6
    assert not set(train) & set(test)
    assert (train, test) == split_queries(collection, test_fraction=0.25, seed=3)
    assert train == sorted(train, key=lambda q: int(q[1:]))
    with pytest.raises(ValueError, match="test_fraction"):
        split_queries(collection, test_fraction=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("random_negatives", [0.0, 0.5])
def test_finetune_lowers_the_loss_and_is_deterministic(tiny, tmp_path, random_negatives):
    collection, _, base = tiny
    model, tokenizer = _fresh(base)
    log = finetune_cross_encoder(model, tokenizer, collection, random_negatives=random_negatives,
                                 bm25_cache_dir=tmp_path / "bm25", **FAST)
    assert len(log.losses) == FAST["steps"] and all(map(lambda x: x == x, log.losses))
    assert statistics.mean(log.losses[-8:]) < 0.85 * statistics.mean(log.losses[:8])
    assert log.num_positives == 24 and log.num_negatives > 0
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())  # the frozen embeddings are released
    again, _ = _fresh(base)
    log2 = finetune_cross_encoder(again, tokenizer, collection, random_negatives=random_negatives,
                                  bm25_cache_dir=tmp_path / "bm25", **FAST)
    assert log2.losses == log.losses
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_finetune_head_lr_moves_the_head_only_and_random_negatives_need_no_bm25(tiny, tmp_path):
    collection, _, base = tiny
    model, tokenizer = _fresh(base)
    body = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    head = {n: p.detach().clone() for n, p in model.classifier.named_parameters()}
    finetune_cross_encoder(model, tokenizer, collection, random_negatives=1.0, bm25_cache_dir=tmp_path / "bm25",
                           **dict(FAST, steps=4, lr=1e-12, warmup=0.0), head_lr=1e-2)
    assert max((p - body[n]).abs().max().item() for n, p in model.base_model.named_parameters()) < 1e-9
    assert max((p - head[n]).abs().max().item() for n, p in model.classifier.named_parameters()) > 1e-4
    assert not (tmp_path / "bm25").exists()  # only random negatives: no BM25 index built


@pytest.mark.slow
def test_finetune_in_bf16_autocast_keeps_fp32_weights_and_learns(tiny, tmp_path):
    collection, _, base = tiny
    model, tokenizer = _fresh(base)
    seen = set()
    hook = model.base_model.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda module, args, out: seen.add(out.dtype))
    log = finetune_cross_encoder(model, tokenizer, collection, random_negatives=0.5, dtype=torch.bfloat16,
                                 bm25_cache_dir=tmp_path / "bm25", **FAST)
    hook.remove()
    assert seen == {torch.bfloat16}  # the matmuls ran in bf16 ...
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # ... the weights stayed fp32
    assert log.settings["dtype"] == "bfloat16" and all(map(lambda x: x == x, log.losses))
    fp32, _ = _fresh(base)
    reference = finetune_cross_encoder(fp32, tokenizer, collection, random_negatives=0.5,
                                       bm25_cache_dir=tmp_path / "bm25", **FAST)
    first, last = statistics.mean(log.losses[:8]), statistics.mean(log.losses[-8:])
    assert last < first - 0.05  # it learns ...
    assert abs(last - statistics.mean(reference.losses[-8:])) < 0.05  # ... about as fast as in fp32


def test_training_dtype_is_bf16_only_where_native(monkeypatch):
    for capabilities, expected in (({"avx512_bf16": True, "amx_bf16": False}, torch.bfloat16),
                                   ({"avx512_bf16": False, "amx_bf16": True}, torch.bfloat16),
                                   ({"avx512_bf16": False, "amx_bf16": False}, None), ({}, None)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda c=capabilities: c)
        assert models.training_dtype() is expected and models.training_dtype("cpu") is expected
    assert models.training_dtype("meta") is None


@pytest.mark.slow
def test_finetune_freezes_embeddings_and_ranks_relevant_higher(tiny, tmp_path):
    collection, _, base = tiny
    model, tokenizer = _fresh(base)
    before = model.get_input_embeddings().weight.detach().clone()
    finetune_cross_encoder(model, tokenizer, collection, query_ids=["q1", "q2", "q3", "q4", "q5", "q6"],
                           bm25_cache_dir=tmp_path / "bm25", **dict(FAST, steps=60))
    assert torch.equal(before, model.get_input_embeddings().weight)
    ev = models.evaluate_reranker(model, tokenizer, collection, ["q1", "q2", "q3", "q4", "q5", "q6"], depth=10,
                                  bm25_cache_dir=tmp_path / "bm25")
    assert ev["queries"] == 6 and 0 <= ev["ndcg"] <= 1 and 0 <= ev["bm25_ndcg"] <= 1
    assert ev["ndcg"] > 0.5  # the training queries: it has learnt their relevant docs
    assert ev["random_orders"] == 100 and 0 < ev["random_ndcg"] < ev["ndcg"]
    assert set(ev["per_query"]) == {"q1", "q2", "q3", "q4", "q5", "q6"}
    assert ev["random_ndcg"] == pytest.approx(statistics.mean(v[2] for v in ev["per_query"].values()))


def test_random_order_ndcg_is_the_mean_over_permutations(tiny, tmp_path):
    """The chance level equals its exact expectation: E[DCG@k] = mean gain x sum of discounts (linearity)."""
    import math

    from fastnig.evaluation.reranking import bm25_run

    collection, _, base = tiny
    model, tokenizer = _fresh(base)
    qids = ["q1", "q2", "q3", "q4"]
    ev = models.evaluate_reranker(model, tokenizer, collection, qids, depth=10, k=5, random_orders=2000,
                                  bm25_cache_dir=tmp_path / "bm25")
    run = bm25_run(collection, {q: collection.queries()[q] for q in qids}, k=10, cache_dir=tmp_path / "bm25",
                   progress=False)
    qrels = collection.qrels()
    for q in qids:
        gains = [qrels[q].get(d, 0) for d, _ in run[q]]
        expected_dcg = sum(gains) / len(gains) * sum(1 / math.log2(i + 2) for i in range(min(5, len(gains))))
        ideal = sorted(qrels[q].values(), reverse=True)[:5]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        assert ev["per_query"][q][2] == pytest.approx(expected_dcg / idcg, abs=0.02), q
    with pytest.raises(ValueError, match="random_orders"):
        models.evaluate_reranker(model, tokenizer, collection, qids, random_orders=0)
    with pytest.raises(ValueError, match="query_ids"):
        models.evaluate_reranker(model, tokenizer, collection, ["nope"])


def test_demo_model_quality_evaluates_the_held_out_queries(tiny, tmp_path):
    collection, _, base = tiny
    model, tokenizer = offline_demo_model(tmp_path / "models", dataset=collection, base=str(base),
                                          test_fraction=0.25, steps=10, batch_size=8, lr=FAST["lr"], max_length=32,
                                          progress=False)
    quality = models.demo_model_quality(model, tokenizer, dataset=collection, test_fraction=0.25, depth=10,
                                        max_length=32, bm25_cache_dir=tmp_path / "bm25")
    _, held_out = split_queries(collection, 0.25, 0)
    assert set(quality["per_query"]) == set(held_out) and quality["heldout_queries"] == 2
    assert quality["train_queries"] == 6 and quality["model"] == model.config.name_or_path
    assert quality["training"]["settings"]["steps"] == 10 and "train_query_ids" not in quality["training"]["settings"]
    assert quality["training"]["seconds"] > 0 and quality["dataset"].endswith("@heldout")
    json.dumps(quality)


def test_finetune_rejects_bad_settings(tiny):
    collection, _, base = tiny
    model, tokenizer = _fresh(base)
    for kwargs, match in ((dict(steps=0), "steps"), (dict(lr=-1.0), "lr"), (dict(head_lr=0.0), "head_lr"),
                          (dict(random_negatives=2.0), "random_"), (dict(dtype=torch.float16), "dtype"),
                          (dict(query_ids=["nope"]), "query_ids")):
        with pytest.raises(ValueError, match=match):
            finetune_cross_encoder(model, tokenizer, collection, progress=False, **kwargs)


@pytest.mark.slow
def test_offline_demo_model_caches_atomically_and_round_trips(tiny, tmp_path, monkeypatch):
    collection, _, base = tiny
    cache = tmp_path / "models"
    settings = dict(dataset=collection, base=str(base), test_fraction=0.25, evaluate=True,
                    steps=FAST["steps"], batch_size=8, lr=FAST["lr"], max_length=32, progress=False)

    # A run killed while saving leaves no model folder and no temporary one behind.
    real_save = type(tiny[1]).save_pretrained

    def boom(self, *a, **k):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(type(tiny[1]), "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        offline_demo_model(cache, **settings)
    assert [p.name for p in cache.iterdir()] == ["bm25"]
    monkeypatch.setattr(type(tiny[1]), "save_pretrained", real_save)

    model, tokenizer = offline_demo_model(cache, **settings)
    folders = [p for p in cache.iterdir() if p.name != "bm25"]
    assert len(folders) == 1 and str(folders[0]) == model.config.name_or_path
    record = json.loads((folders[0] / "fastnig_training.json").read_text())
    assert record["settings"]["steps"] == FAST["steps"] and len(record["training"]["losses"]) == FAST["steps"]
    assert record["evaluation"]["queries"] == 2  # the held-out queries
    assert record["settings"]["dtype"] == record["training"]["settings"]["dtype"] == \
        models._dtype_name(models.training_dtype())  # dtype="auto"

    def trained_is_forbidden(*a, **k):
        raise AssertionError("the cached model must be loaded, not trained again")

    monkeypatch.setattr(models, "finetune_cross_encoder", trained_is_forbidden)
    again, tok2 = offline_demo_model(cache, **settings)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    enc = tok2([("heat transfer", "heat transfer theory")][0][0], "heat transfer theory", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, again(**enc).logits)
    assert not again.training

    # Other settings, another folder (and a training run).
    monkeypatch.undo()
    offline_demo_model(cache, **dict(settings, seed=1, evaluate=False))
    assert len([p for p in cache.iterdir() if p.name != "bm25"]) == 2
