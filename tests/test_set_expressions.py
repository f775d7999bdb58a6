"""Set expressions against hand-built neuron sets."""
from __future__ import annotations

import pytest
import torch

from fastnig.neurons.expressions import PAPER_SETS, ExpressionError, check, evaluate, parse
from fastnig.neurons.scheme import Scheme

SIZES = {"m.layer.0.attention.self.query": 5, "m.layer.0.intermediate.dense": 5}


def _scheme(dataset, label, values):
    s = Scheme.empty(SIZES, {"model": "toy", "dataset": dataset, "label": label})
    from fastnig.engine.attribute import Attributions

    v = torch.tensor(values, dtype=torch.float32).view(1, 10)
    att = Attributions({"m.layer.0.attention.self.query": v[:, :5], "m.layer.0.intermediate.dense": v[:, 5:]},
                       torch.zeros(1), torch.ones(1), torch.zeros(1), [label], torch.tensor([3]),
                       {"steps": 1, "target": label, "model": "toy"})
    return s.add(att, [f"{dataset}-{label}"])


@pytest.fixture
def schemes():
    return {
        ("ms", "relevant"): _scheme("ms", "relevant", [9, 8, 7, 0, 0, 0, 0, 0, 0, 1]),
        ("ms", "non-relevant"): _scheme("ms", "non-relevant", [0, 0, 0, 0, 0, 9, 8, 7, 0, 1]),
        ("nf", "relevant"): _scheme("nf", "relevant", [9, 0, 7, 8, 0, 0, 0, 0, 0, 1]),
        ("nf", "non-relevant"): _scheme("nf", "non-relevant", [0, 0, 0, 0, 0, 9, 0, 7, 8, 1]),
        ("tc", "relevant"): _scheme("tc", "relevant", [9, 0, 0, 8, 7, 0, 0, 0, 0, 1]),
    }


def _flat(neuron_set):
    out = set()
    for module, idx in neuron_set.by_module().items():
        offset = 0 if "query" in module else 5
        out |= {offset + int(i) for i in idx}
    return out


def test_scheme_names_and_fusion(schemes):
    assert _flat(evaluate("P_ms", schemes, 30)) == {0, 1, 2}          # round(0.3 * 10) = 3
    assert _flat(evaluate("N_ms", schemes, 30)) == {5, 6, 7}
    # F_ms: mean of P_ms and N_ms = [4.5, 4, 3.5, 0, 0, 4.5, 4, 3.5, 0, 1]; top 4 -> 0, 5 (4.5), 1, 6 (4)
    assert _flat(evaluate("F_ms", schemes, 40)) == {0, 5, 1, 6}
    assert _flat(evaluate("fuse(P_ms, N_ms)", schemes, 40)) == {0, 5, 1, 6}


def test_intersections_over_groups(schemes):
    # O = {nf, tc}: P_nf top3 = {0, 3, 2}, P_tc top3 = {0, 3, 4} -> {0, 3}
    assert _flat(evaluate("inter(O, P)", schemes, 30, in_domain=["ms"])) == {0, 3}
    # A adds P_ms top3 = {0, 1, 2} -> {0}
    assert _flat(evaluate("inter(A, P)", schemes, 30, in_domain=["ms"])) == {0}
    # N exists for nf only among O
    assert _flat(evaluate("inter(O, N)", schemes, 30, in_domain=["ms"])) == {5, 8, 7}
    assert _flat(evaluate("P_ms & N_ms", schemes, 30)) == set()
    assert _flat(evaluate("(P_ms | N_ms) & P_nf", schemes, 30)) == {0, 2}


def test_paper_sets_parse():
    for text in PAPER_SETS:
        parse(text)


@pytest.mark.parametrize("text,words", [
    ("", "non-empty"),
    ("P_ms &", "expected more input"),
    ("inter(X, P)", "inter(O|A, P|N|F)"),
    ("Q_ms", "not a scheme name"),
    ("P_ms N_ms", "after a complete expression"),
    ("P_ms $ N_ms", "unexpected character"),
    ("fuse(F_ms)", "fuse() takes"),
])
def test_malformed_expressions_are_named(text, words):
    with pytest.raises(ExpressionError, match=words.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        parse(text)


def test_check_against_the_run():
    datasets, labels = ["ms", "nf"], {"ms": ["relevant", "non-relevant"], "nf": ["relevant"]}
    check("F_ms & P_nf", datasets, labels)
    with pytest.raises(ExpressionError, match="unknown dataset 'tc'"):
        check("P_tc", datasets, labels)
    with pytest.raises(ExpressionError, match="needs"):
        check("F_nf", datasets, labels)
