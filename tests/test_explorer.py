"""The neuron explorer (docs/explorer.md): exemplars kept by schemes, the per-token view, the page's data.

Browser checks of the page itself: tests/test_browser.py.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
from test_schemes import SIZES, chunk_attributions, make_attributions

from fastnig.neurons.scheme import Scheme

META = {"model": "tiny", "dataset": "ms", "label": "relevant"}


def _ids(k):
    return [f"q{k % 7}\td{k}-{i}" for i in range(5)]


def _whole(chunks=range(12)):
    whole = Scheme.empty(SIZES, META)
    for k in chunks:
        whole.add(chunk_attributions(k), _ids(k))
    return whole


def _brute_force(scheme: Scheme, chunks, k=5):
    """Per neuron the top k (pair id, value) by |value| desc, id asc, from every score."""
    rows = {m: [] for m in SIZES}
    for c in chunks:
        att = chunk_attributions(c)
        for m in SIZES:
            for i, pid in enumerate(_ids(c)):
                rows[m].append((pid, att.scores[m][i]))
    out = {}
    for m, n in SIZES.items():
        for u in range(n):
            cand = sorted(((float(v[u]), pid) for pid, v in rows[m]), key=lambda x: (-abs(x[0]), x[1]))[:k]
            out[(m, u)] = [(pid, v) for v, pid in cand]
    return out


def test_exemplars_are_the_top_k_by_abs_nig_with_ties_by_pair_id():
    whole = _whole()
    expected = _brute_force(whole, range(12))
    for (m, u), exp in expected.items():
        assert whole.exemplars.of(m, u, whole.pair_ids) == exp
    # ties: equal |NIG| on three pairs -> the smallest pair ids win, whatever the order they came in
    scheme = Scheme.empty({"m": 1}, META)
    scheme.add(make_attributions({"m": [[-2.0], [1.0], [2.0], [2.0]]}), ["d", "a", "c", "b"])
    ex = scheme.exemplars
    assert ex.of("m", 0, scheme.pair_ids)[:3] == [("b", 2.0), ("c", 2.0), ("d", -2.0)]


def test_fewer_pairs_than_k_leave_empty_slots():
    scheme = Scheme.empty({"m": 2}, META)
    scheme.add(make_attributions({"m": [[1.0, -3.0], [0.5, 4.0]]}), ["x", "y"])
    assert scheme.exemplars.of("m", 1, scheme.pair_ids) == [("y", 4.0), ("x", -3.0)]


@pytest.mark.parametrize("seed", range(4))
def test_exemplars_merge_exactly_across_shards_and_resume(tmp_path, seed):
    """Shards merged in any order, and a scheme saved, reloaded and resumed chunk by chunk, keep exactly
    the exemplars of one run over all pairs."""
    chunks = list(range(12))
    whole = _whole(chunks)
    rng = random.Random(seed)
    order = chunks[:]
    rng.shuffle(order)
    shards = [_whole(order[i::3]) for i in range(3)]
    rng.shuffle(shards)
    merged = shards[0].merge(shards[1]).merge(shards[2])
    assert merged.exemplars.same_as(whole.exemplars, merged.pair_ids, whole.pair_ids)
    # resume: save after every chunk, reload, continue
    path = tmp_path / "P_ms"
    for c in order:
        scheme = Scheme.load(path) if Scheme.exists(path) else Scheme.empty(SIZES, META)
        scheme.add(chunk_attributions(c), _ids(c))
        scheme.save(path)
    resumed = Scheme.load(path)
    assert resumed.exemplars.same_as(whole.exemplars, resumed.pair_ids, whole.pair_ids)
    # an early stop after the first r chunks equals a run of those r chunks
    first = _whole(chunks[:5])
    assert first.exemplars.same_as(_brute_force_scheme(chunks[:5]).exemplars, first.pair_ids,
                                   _brute_force_scheme(chunks[:5]).pair_ids)


def _brute_force_scheme(chunks):
    scheme = Scheme.empty(SIZES, META)
    for c in reversed(chunks):  # another order, same pairs
        scheme.add(chunk_attributions(c), _ids(c))
    return scheme


def test_exemplars_are_saved_and_older_files_load_without_them(tmp_path):
    whole = _whole(range(3))
    path = whole.save(tmp_path / "P_ms")
    meta = json.loads(path.read_text())
    assert meta["exemplars"] == {"k": 5, "order": "abs desc, pair id asc"}
    loaded = Scheme.load(path)
    assert loaded.exemplars.same_as(whole.exemplars, loaded.pair_ids, whole.pair_ids)
    del meta["exemplars"]  # a file saved before exemplars existed
    path.write_text(json.dumps(meta))
    old = Scheme.load(path)
    assert old.exemplars is None
    old.add(chunk_attributions(5), _ids(5))  # still resumes (without exemplars)
    assert old.exemplars is None and old.merge(_whole([6])).exemplars is None


def test_fusions_keep_no_exemplars(tmp_path):
    from fastnig.neurons.fusion import fuse

    p = _whole(range(2))
    n = Scheme.empty(SIZES, {**META, "label": "non-relevant"})
    n.add(make_attributions({m: torch.randn(3, s) for m, s in SIZES.items()}, "non-relevant"), ["a", "b", "c"])
    fused = fuse(p, n)
    loaded = Scheme.load(fused.save(tmp_path / "F_ms"))
    assert loaded.exemplars is None


# ------------------------------------------------------------- the per-token view
@pytest.mark.parametrize("rule, target", [("richardson", "relevant"), ("trapezoid", "non-relevant"),
                                          ("left", "relevant")])
def test_the_per_token_view_sums_to_the_neurons_nig(tiny_bert, tokenizer, rule, target):
    from fastnig import attribute
    from fastnig.analysis.token_conductance import token_conductance
    from fastnig.engine.settings import AttributionSettings

    pair = ("heat flow in a wing", "the boundary layer of supersonic wings shows heat transfer")
    settings = AttributionSettings(steps=8, rule=rule, baseline="pad")
    att = attribute(tiny_bert, [pair], settings, tokenizer=tokenizer, target=target, progress=False)
    modules = list(att.scores)
    neurons = {modules[0]: [0, 3], modules[-1]: [1], modules[len(modules) // 2]: [5, 2]}
    view = token_conductance(tiny_bert, tokenizer, pair, neurons, settings=settings, target=target, chunk=4)
    assert len(view.tokens) == len(view.segments) == int(att.num_tokens[0])
    assert view.tokens[0] == "[CLS]" and set(view.segments) == {0, 1, 2}
    for m, units in neurons.items():
        assert view.values[m].shape == (len(view.tokens), len(units))
        for u in units:
            assert view.nig(m, u) == pytest.approx(float(att.scores[m][0, u]), rel=1e-4, abs=1e-7)
    assert view.f_input == pytest.approx(float(att.f_input[0]), rel=1e-5)


# ------------------------------------------------------------------ the page's data
def test_explorer_data_holds_the_schemes_values_and_escapes_text(tmp_path):
    import base64

    import numpy as np

    from fastnig.report.explorer import explorer_data, explorer_html, token_payload

    p, n = _whole(range(3)), Scheme.empty(SIZES, {**META, "label": "non-relevant"})
    n.add(make_attributions({m: torch.randn(4, s) for m, s in SIZES.items()}, "non-relevant"), list("abcd"))
    payload, scale = token_payload([0.5, -1.0, 0.25])
    pairs = [{"id": "q\td", "dataset": "ms", "query": "</script><script>alert(1)</script>", "passage": "a & b",
              "tokens": ["[CLS]", "x"], "segments": [2, 0]}]
    data = explorer_data([p, n], title="t</script>", levels=[1, 10], default_level=10,
                         exemplars={3: [{"scheme": 0, "pair": 0, "value": 1.0, "tokens": payload, "scale": scale}]},
                         pairs=pairs)
    values = np.frombuffer(base64.b64decode(data["values"]), dtype=np.float32).reshape(2, -1)
    assert np.array_equal(values[0], p.mean_vector().numpy().astype(np.float32))
    assert data["topCounts"] == {"1": 0, "10": 1} and [s["name"] for s in data["sets"]] == ["P_ms", "N_ms",
                                                                                          "P_ms ∩ N_ms"]
    assert np.frombuffer(base64.b64decode(payload), dtype=np.int8).tolist() == [64, -127, 32]
    page = explorer_html(data)
    assert page.count("</script>") == 2  # the data's own and the code's: no text of the data closes a script
    assert "alert(1)" in page and "<script>alert" not in page and "http://" not in page and "https://" not in page
    body = page.split('id="fastnig-data">', 1)[1].split("</script>", 1)[0]
    assert json.loads(body)["pairs"][0]["query"] == pairs[0]["query"]


def test_parse_neuron_names_what_is_wrong():
    from fastnig.study.explore import parse_neuron

    sizes = {"bert.encoder.layer.0.intermediate.dense": 4}
    assert parse_neuron("bert.encoder.layer.0.intermediate.dense:3", sizes) == (
        "bert.encoder.layer.0.intermediate.dense", 3)
    with pytest.raises(ValueError, match="MODULE:UNIT"):
        parse_neuron("intermediate", sizes)
    with pytest.raises(ValueError, match="did you mean"):
        parse_neuron("layer.0.intermediate.dense:1", sizes)
    with pytest.raises(ValueError, match="has 4 units"):
        parse_neuron("bert.encoder.layer.0.intermediate.dense:4", sizes)


def test_explore_cli_refuses_a_folder_that_is_not_a_run(cli, tmp_path):
    code, _out, err = cli("explore", str(tmp_path))
    assert code == 2 and "not a fastnig run folder" in err
    (tmp_path / "config.json").write_text(json.dumps({"attribution": {"datasets": {}}}))
    code, _out, err = cli("explore", str(tmp_path), "--no-exemplars")
    assert code == 2 and "has no schemes" in err


def test_a_damaged_exemplar_entry_is_refused_naming_the_file(tmp_path):
    from fastnig.common import CorruptFile

    path = _whole(range(2)).save(tmp_path / "P_ms")
    meta = json.loads(path.read_text())
    meta["exemplars"] = {"k": 7, "order": "abs desc, pair id asc"}  # tensors of k = 5
    path.write_text(json.dumps(meta))
    with pytest.raises(CorruptFile, match="P_ms"):
        Scheme.load(path)
