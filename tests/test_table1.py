"""Table 1's protocol: mean P(rel) − P(non-rel) over relevant pairs the model judges relevant."""
from __future__ import annotations

import json

import pytest
import torch

from fastnig.analysis.table1 import baseline_table
from fastnig.data import load_collection, sample_pairs
from fastnig.engine.scoring import score_pairs
from fastnig.evaluation import table1 as baselines

TOPICS = [
    ("heat transfer wings", "heat transfer of supersonic wings in experimental tests"),
    ("cancer diet risk", "diet and cancer risk in a study of patients"),
    ("library search users", "library search systems for users of books"),
    ("blood pressure vitamin", "vitamin intake and blood pressure of patients"),
    ("shock waves pressure", "shock waves at high pressure in supersonic flow"),
    ("gene protein cells", "gene and protein analysis of brain cells"),
]
PAD_TEXT = " ".join(["[PAD]"] * 6)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny BERT cross-encoder trained in a few seconds: relevant = the passage of the query's topic;
    all-[PAD] inputs are neither (trained towards P(rel) = 0.5, as a baseline should be)."""
    from tiny_models import make_model

    model = make_model("bert", num_labels=2, vocab_size=tokenizer.vocab_size, seed=11, layers=1).train()
    examples = []
    for i, (query, passage) in enumerate(TOPICS):
        examples.append((query, passage, [0.0, 1.0]))
        for j in (1, 2, 3):
            examples.append((query, TOPICS[(i + j) % len(TOPICS)][1], [1.0, 0.0]))
        examples.append((PAD_TEXT[: 6 * len(query.split())], PAD_TEXT, [0.5, 0.5]))
    enc = tokenizer([e[0] for e in examples], [e[1] for e in examples], padding=True, return_tensors="pt")
    target = torch.tensor([e[2] for e in examples])
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and steadier on a shared machine
    try:
        for _ in range(200):
            optimizer.zero_grad()
            logits = model(**enc).logits
            loss = -(target * torch.log_softmax(logits, -1)).sum(-1).mean()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture()
def collection(tmp_path):
    """Each query: its topic passage (grade 2, the model agrees), another topic's passage also judged 2
    (the model disagrees), and a grade-0 passage; its docstore in tmp_path."""
    folder = tmp_path / "t1"
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "", "text": p} for i, (_, p) in enumerate(TOPICS)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": q}) + "\n"
                                                  for i, (q, _) in enumerate(TOPICS)))
    n = len(TOPICS)
    qrels = [(f"q{i}", f"d{i}", 2) for i in range(n)] + [(f"q{i}", f"d{(i + 1) % n}", 2) for i in range(n)]
    qrels += [(f"q{i}", f"d{(i + 2) % n}", 0) for i in range(n)]
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n"
                                               + "".join(f"{q}\t{d}\t{g}\n" for q, d, g in qrels))
    return load_collection(folder, cache_dir=tmp_path / "cache")


def test_table1_uses_agreeing_relevant_pairs_only(trained, tokenizer, collection):
    every = sample_pairs(collection, label=1, num_pairs=12, seed=3)
    p_rel = score_pairs(trained, tokenizer, [p.text_pair for p in every], output="probability").tolist()
    # The case is built as intended: the on-topic pairs agree, the off-topic "relevant" ones do not.
    agree = [p for p, prob in zip(every, p_rel) if prob > 0.5]
    assert {(p.query_id, p.doc_id[1:]) for p in agree} == {(f"q{i}", str(i)) for i in range(len(TOPICS))}

    pairs, info = baselines.table1_pairs(trained, tokenizer, collection, 4, seed=3)
    # The first 4 agreeing pairs in sampling order: drawn 4, then 8 (the draw is extended until 4 agree).
    assert pairs == agree[:4] and all(p.label == 1 and p.grade == 2 for p in pairs)
    first_draw_with_4 = next(n for n in (4, 8, 12) if len([p for p in every[:n] if p in agree]) >= 4)
    assert first_draw_with_4 > 4  # the case needs a second draw
    assert info == {"dataset": collection.name, "drawn": first_draw_with_4, "agreeing": 4, "requested": 4}
    # Asking for more than exist: every agreeing pair, with a warning.
    with pytest.warns(UserWarning, match="only 6 of 12 relevant pairs"):
        all_pairs, info = baselines.table1_pairs(trained, tokenizer, collection, 10, seed=3)
    assert all_pairs == agree and info["agreeing"] == 6


def test_table1_original_near_one_and_pad_below(trained, tokenizer, collection, tmp_path):
    pairs, _ = baselines.table1_pairs(trained, tokenizer, collection, 6, seed=0)
    diffs = baselines.baseline_differences(trained, tokenizer, [p.text_pair for p in pairs])
    assert diffs["original"] > 0.9          # the paper's "original embedding = 1"
    assert diffs["pad"] < diffs["original"] - 0.3
    rows = baseline_table(diffs, tmp_path, pairs=len(pairs), dataset="t1")
    assert all(r["original_difference"] == diffs["original"] for r in rows)
    # Over every relevant-graded pair instead (the old protocol), the input's value is far from 1.
    mixed = sample_pairs(collection, label=1, num_pairs=12, seed=0)
    assert baselines.baseline_differences(trained, tokenizer, [p.text_pair for p in mixed],
                                         baselines=[])["original"] < 0.5
