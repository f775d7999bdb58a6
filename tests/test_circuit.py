"""The circuit of a scheme's top units (fastnig.analysis.circuit): edges are conditional NIG, mean over pairs."""
from __future__ import annotations

import json

import pytest
import torch
from tiny_models import PAIRS, make_model, make_tokenizer

import fastnig
from fastnig.analysis.circuit import circuit, top_heads, top_units, unit_layer
from fastnig.neurons.scheme import Scheme


def test_circuit_edges_are_mean_conditional_nig_between_top_units(tmp_path):
    pytest.importorskip("matplotlib")
    tok = make_tokenizer("bert")
    model = make_model("bert", vocab_size=tok.vocab_size, seed=6)
    pairs = PAIRS[:2]
    att = fastnig.attribute(model, pairs, tokenizer=tok, steps=4, progress=False)
    scheme = Scheme.from_attributions(att, ["a\t1", "b\t2"], "tiny", model="tiny-bert")
    neurons = top_units(scheme, 3)
    flat = torch.cat([s.mean(0) for s in att.scores.values()])
    assert float(att.scores[neurons[0].name].mean(0)[neurons[0].index]) == pytest.approx(float(flat.max()))
    heads = top_heads(model, tok, pairs, 2, steps=4)
    assert len(heads) == 2 and all(h.kind == "head" for h in heads)
    graph = circuit(model, tok, pairs, neurons + heads, steps=4)
    ids = {n["id"] for n in graph.nodes}
    assert len(ids) == 5
    for edge in graph.edges:
        assert edge["source"] in ids and edge["target"] in ids and edge["source"] != edge["target"]
    # one edge checked against its own conditional attribution
    upper = max(neurons + heads, key=unit_layer)
    lower = [u for u in neurons + heads if unit_layer(u) < unit_layer(upper)]
    if lower:
        toward = fastnig.attribute(model, pairs, tokenizer=tok, steps=4, target=upper, heads=True, progress=False)
        src = lower[0]
        value = (toward.head_scores[src.name][:, src.index] if src.kind == "head"
                 else toward.scores[src.name][:, src.index]).mean()
        edge = next(e for e in graph.edges if e["source"].endswith(f"{src.name}:{src.index}")
                    and e["target"].endswith(f"{upper.name}:{upper.index}"))
        assert edge["weight"] == pytest.approx(float(value), rel=1e-5, abs=1e-9)
    saved = json.loads(graph.save(tmp_path / "c.json").read_text())
    assert saved["nodes"] == graph.nodes and len(saved["edges"]) == len(graph.edges)
    assert graph.figure(tmp_path / "c.png").stat().st_size > 1000


@pytest.mark.slow
def test_head_ablation_zeroes_the_heads_and_is_compared_with_random_heads(tmp_path):
    pytest.importorskip("scipy")
    from test_pruning import OverlapCollection, word_tokenizer

    from fastnig.engine.heads import output_projections
    from fastnig.evaluation.head_ablation import ablated_heads, evaluate_head_ablation, random_heads
    from fastnig.evaluation.pruning import PruningBenchmark
    from fastnig.evaluation.reranking import build_candidates

    tok = word_tokenizer()
    model = make_model("bert", num_labels=2, vocab_size=tok.vocab_size, seed=7)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    name = "bert.encoder.layer.0.attention.output.dense"
    with ablated_heads(model, [(name, 1)]):
        weight = output_projections(model)[name][0].weight
        assert (weight[:, 8:16] == 0).all() and (weight[:, :8] != 0).any()
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert random_heads(model, 3, seed=1, repetition=2) == random_heads(model, 3, seed=1, repetition=2)
    with pytest.raises(ValueError, match="heads"):
        random_heads(model, 99)
    candidates = build_candidates(OverlapCollection(seed=1, num_queries=6), depth=10, cache_dir=tmp_path,
                                  progress=False)
    bench = PruningBenchmark(model, tok, candidates, batch_size=64, progress=False)
    result = evaluate_head_ablation(bench, [(name, 0), ("bert.encoder.layer.1.attention.output.dense", 2)],
                                    repetitions=3)
    row = result.row()
    assert row["heads"] == 2 and row["repetitions"] == 3 and result.random_drops.shape == (3,)
    assert 0 <= row["p_top"] <= 1 and 0 <= row["p_top_vs_random"] <= 1
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_head_schemes_reuse_the_neuron_machinery_and_draw_a_heat_map(tmp_path):
    pytest.importorskip("matplotlib")
    from fastnig.analysis.head_heatmap import write_head_heatmap
    from fastnig.neurons.head_schemes import head_attributions

    tok = make_tokenizer("bert")
    model = make_model("bert", vocab_size=tok.vocab_size, seed=8)
    att = fastnig.attribute(model, PAIRS[:3], tokenizer=tok, steps=4, heads=True, segments=True, progress=False)
    with pytest.raises(ValueError, match="heads=True"):
        head_attributions(fastnig.attribute(model, PAIRS[:1], tokenizer=tok, steps=2, progress=False))
    scheme = Scheme.from_attributions(head_attributions(att), ["a\t1", "b\t2", "c\t3"], "tiny", model="tiny")
    assert scheme.sizes == {n: 4 for n in att.head_scores} and scheme.total_neurons == 8
    for name, value in scheme.mean.items():
        torch.testing.assert_close(value.float(), att.head_scores[name].mean(0))
    assert scheme.has_segments and len(scheme.top(25)) == 2  # top-X % of all heads
    csv, png = write_head_heatmap(scheme, tmp_path, "P_tiny_heads")
    assert len(csv.read_text().splitlines()) == 9 and png.stat().st_size > 1000


def test_fastnig_circuit_writes_the_graph_and_its_figure_for_a_run_scheme(cli, saved_tiny_model, tokenizer, tmp_path):
    pytest.importorskip("matplotlib")
    from fastnig.data import load_collection

    folder = saved_tiny_model(9)
    collection = load_collection("cranfield")
    qrels = collection.qrels()
    ids = [(q, d) for q in sorted(qrels)[:2] for d in sorted(qrels[q])[:1]]
    queries, passages = collection.queries(), collection.doc_texts([d for _, d in ids])
    model, tok = fastnig.load_cross_encoder(str(folder))
    att = fastnig.attribute(model, [(queries[q], passages[d]) for q, d in ids], tokenizer=tok, steps=4,
                            max_length=48, progress=False)
    run = tmp_path / "run"
    Scheme.from_attributions(att, [f"{q}\t{d}" for q, d in ids], "cran", model=str(folder)).save(
        run / "schemes" / "P_cran.json")
    (run / "config.json").write_text(json.dumps({
        "name": "tiny", "model": str(folder), "output": str(tmp_path),
        "attribution": {"datasets": {"cran": {"dataset": "cranfield"}}, "steps": 4, "max_length": 48}}))
    code, out, err = cli("circuit", run, "--scheme", "P_cran", "--top", "2", "--pairs", "2")
    assert code == 0, err
    graph = json.loads((run / "circuits" / "P_cran.json").read_text())
    assert len(graph["nodes"]) == 4 and graph["meta"]["scheme"] == "P_cran" and graph["meta"]["pairs"] == 2
    assert (run / "circuits" / "P_cran.png").stat().st_size > 1000
    code, _, err = cli("circuit", run, "--scheme", "N_x")
    assert code == 2 and "no scheme 'N_x'" in err
