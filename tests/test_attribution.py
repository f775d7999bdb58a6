"""fastnig.attribute against Captum, and its invariances."""
from __future__ import annotations

import pytest
import torch
from tiny_models import PAIRS, make_model, make_tokenizer

import fastnig
from fastnig.engine.model import linear_modules
from fastnig.engine.scoring import target_function

captum_attr = pytest.importorskip("captum.attr")

FAMILIES = [  # (model family, logits, tokenizer family)
    ("bert", 2, "bert"),
    ("electra", 1, "bert"),
    ("distilbert", 2, "distilbert"),
]


def _captum_conductance(model, tokenizer, query, passage, target, steps, names=None, per_token=False):
    """Captum LayerConductance (riemann_trapezoid) summed over tokens, per Linear
    (every encoder Linear, or ``names``); a ``[batch, features]`` output (the pooler) has no token axis.
    ``per_token``: ``[tokens, features]`` per Linear instead of the sum."""
    enc = tokenizer(query, passage, truncation="only_second", max_length=512, return_tensors="pt",
                    return_special_tokens_mask=True)
    ids = enc["input_ids"]
    special = enc["special_tokens_mask"].bool()
    emb = model.get_input_embeddings()
    with torch.no_grad():
        x = emb(ids)
        x_base = emb(torch.where(special, ids, torch.full_like(ids, tokenizer.pad_token_id)))  # 'pad' baseline
    extra = {"attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        extra["token_type_ids"] = enc["token_type_ids"]
    relevant = target == "relevant"

    def forward(inputs_embeds):
        n = inputs_embeds.shape[0]
        kwargs = {k: v.expand(n, -1) for k, v in extra.items()}
        logits = model(inputs_embeds=inputs_embeds, **kwargs).logits
        return target_function(logits, torch.full((n,), relevant), "probability")

    result = {}
    modules = dict(model.named_modules())
    for name in names or linear_modules(model):
        lc = captum_attr.LayerConductance(forward, modules[name])
        attr = lc.attribute(x, baselines=x_base, n_steps=steps, method="riemann_trapezoid").detach()
        result[name] = attr[0] if per_token or attr.dim() == 2 else attr.sum(dim=1)[0]
    return result


# the fast lane keeps one family and target; `make test` runs them all
@pytest.mark.parametrize("family,logits,tok_family",
                         FAMILIES[:1] + [pytest.param(*f, marks=pytest.mark.slow) for f in FAMILIES[1:]])
@pytest.mark.parametrize("target", ["relevant", pytest.param("non-relevant", marks=pytest.mark.slow)])
def test_left_rule_equals_captum_layer_conductance(family, logits, tok_family, target):
    tok = make_tokenizer(tok_family)
    model = make_model(family, num_labels=logits, vocab_size=tok.vocab_size, seed=1)
    query, passage = PAIRS[0]
    steps = 16
    ours = fastnig.attribute(model, [(query, passage)], tokenizer=tok, target=target, steps=steps,
                             rule="left", progress=False)
    ref = _captum_conductance(model, tok, query, passage, target, steps)
    assert set(ours.scores) == set(ref)
    # every encoder Linear: q, k, v, attention output, intermediate, output dense per layer
    assert len(ref) >= 6 * model.config.num_hidden_layers if family != "distilbert" else len(ref) == 12
    for name, expected in ref.items():
        got = ours.scores[name][0]
        rel = (got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
        assert rel <= 1e-4, f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("how", ["include_pooler", "layers"])
def test_pooler_equals_captum_layer_conductance(how):
    """The pooler's output is [batch, features]: one "token" per pair; Captum LayerConductance agrees."""
    tok = make_tokenizer("bert")
    model = make_model("bert", num_labels=2, vocab_size=tok.vocab_size, seed=3)
    query, passage = PAIRS[1]
    steps = 16
    kwargs = dict(include_pooler=True) if how == "include_pooler" else dict(layers=["bert.pooler.dense"])
    ours = fastnig.attribute(model, [(query, passage)], tokenizer=tok, steps=steps, rule="left", step_batch=5,
                             progress=False, **kwargs)
    ref = _captum_conductance(model, tok, query, passage, "relevant", steps, names=["bert.pooler.dense"])
    got, expected = ours.scores["bert.pooler.dense"][0], ref["bert.pooler.dense"]
    assert got.shape == (model.config.hidden_size,)
    assert expected.abs().max() > 0
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel <= 1e-4, f"relative error {rel:.2e}"
    # completeness over the pooler: its conductance sums to F(x) - F(x') up to the integration error
    total = got.sum()
    assert total.item() == pytest.approx((ours.f_input - ours.f_baseline)[0].item(), abs=0.05)


@pytest.mark.parametrize("family,tok_family,attention", [
    ("bert", "bert", "sdpa"), ("bert", "bert", "eager"), ("electra", "bert", "sdpa"),
    ("roberta", "roberta", "sdpa"), ("distilbert", "distilbert", "sdpa")])
def test_first_token_cut_skips_the_last_layers_other_rows_and_changes_nothing(family, tok_family, attention):
    """The head reads the last layer at token 0 only: the cut runs its feed-forward block (and,
    for the BERT family, its queries) on that token alone, and every attribution equals the
    uncut run's, with batch padding (boolean or additive attention masks)."""
    from fastnig.engine import first_token

    tok = make_tokenizer(tok_family)
    model = make_model(family, vocab_size=tok.vocab_size, seed=2)
    model.set_attn_implementation(attention)
    assert first_token.first_token_cut(model) is not None
    names = list(linear_modules(model))
    last_query, last_ffn = names[-6], names[-1]  # the last layer's query and output projections
    rows = {last_query: set(), last_ffn: set()}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: rows[n].add(o.shape[1])) for n in rows]
    cut = fastnig.attribute(model, PAIRS[:3], tokenizer=tok, steps=8, pair_batch=3, progress=False)
    for h in handles:
        h.remove()
    assert rows[last_ffn] == {1}
    assert (rows[last_query] == {1}) == (family != "distilbert")
    rows = {last_query: set(), last_ffn: set()}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: rows[n].add(o.shape[1])) for n in rows]
    full = fastnig.attribute(model, PAIRS[:3], tokenizer=tok, steps=8, pair_batch=3, progress=False,
                             first_token_cut=False)
    for h in handles:
        h.remove()
    assert rows[last_ffn] == rows[last_query] and 1 not in rows[last_ffn]  # switched off: every token
    for name, expected in full.scores.items():
        torch.testing.assert_close(cut.scores[name], expected, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(cut.delta, full.delta, rtol=0, atol=1e-6)  # a difference of near-equal sums


def test_first_token_cut_only_for_heads_that_read_the_first_token(tiny_bert):
    import transformers

    from fastnig.engine.first_token import first_token_cut

    class MeanPoolingRanker(transformers.BertForSequenceClassification):
        pass  # an unknown head could read every token: nothing may be skipped

    assert first_token_cut(MeanPoolingRanker(tiny_bert.config)) is None
    assert first_token_cut(tiny_bert.bert) is None


def test_classifier_and_pooler_are_excluded_by_default(tiny_bert):
    names = list(linear_modules(tiny_bert))
    assert not any("classifier" in n or "pooler" in n for n in names)
    assert any("pooler" in n for n in linear_modules(tiny_bert, include_pooler=True))
    L = tiny_bert.config.num_hidden_layers
    assert len(names) == 6 * L


@pytest.fixture(scope="module")
def reference_run(tiny_bert, tokenizer):
    return fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, step_batch=21, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("step_batch", [1, 3, 7, 21])
def test_chunked_equals_unchunked(tiny_bert, tokenizer, reference_run, step_batch):
    chunked = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, step_batch=step_batch,
                                progress=False)
    for name, ref in reference_run.scores.items():
        torch.testing.assert_close(chunked.scores[name], ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chunked.delta, reference_run.delta, rtol=1e-3, atol=1e-6)


def test_batched_pairs_equal_one_by_one(tiny_bert, tokenizer, reference_run):
    batched = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, pair_batch=len(PAIRS),
                                progress=False)
    assert len(set(batched.num_tokens.tolist())) > 1, "the pairs must differ in length"
    for name, ref in reference_run.scores.items():
        torch.testing.assert_close(batched.scores[name], ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batched.f_input, reference_run.f_input, rtol=1e-5, atol=1e-6)


def test_delta_shrinks_with_steps_and_trapezoid_beats_left(tiny_bert, tokenizer):
    pairs = PAIRS[:2]
    deltas = {}
    for rule in ("left", "trapezoid"):
        for steps in (4, 16, 64):
            r = fastnig.attribute(tiny_bert, pairs, tokenizer=tokenizer, steps=steps, rule=rule, progress=False)
            deltas[rule, steps] = r.delta.abs()
    for rule in ("left", "trapezoid"):
        assert (deltas[rule, 16] < deltas[rule, 4]).all()
        assert (deltas[rule, 64] < deltas[rule, 16]).all()
    assert (deltas["trapezoid", 64] < deltas["left", 64]).all()


def test_completeness_of_the_input_sum(tiny_bert, tokenizer, reference_run):
    # f_input / f_baseline are F at the path ends; the model agrees.
    enc = tokenizer(*PAIRS[1], return_tensors="pt")
    with torch.no_grad():
        p = fastnig.relevance_probability(tiny_bert(**enc).logits)
    assert reference_run.f_input[1].item() == pytest.approx(p.item(), abs=1e-5)
    assert reference_run.relative_delta().max() < 1e-2


def test_settings_and_shapes(reference_run, tiny_bert):
    r = reference_run
    assert r.num_pairs == len(PAIRS)
    assert r.settings["steps"] == 20 and r.settings["rule"] == "richardson" and r.settings["baseline"] == "pad"
    for name, module in linear_modules(tiny_bert).items():
        assert r.scores[name].shape == (len(PAIRS), module.out_features)
        assert r.scores[name].dtype == torch.float32
    assert r.num_tokens[2] == 4  # "[CLS] boundary layer [SEP] [SEP]": empty passage is valid


@pytest.mark.parametrize("family,tok_family", [("roberta", "roberta"), ("distilbert", "distilbert")])
def test_models_without_token_type_ids(family, tok_family):
    tok = make_tokenizer(tok_family)
    model = make_model(family, num_labels=1, vocab_size=tok.vocab_size)
    r = fastnig.attribute(model, PAIRS[:2], tokenizer=tok, steps=32, progress=False)
    assert all(torch.isfinite(s).all() for s in r.scores.values())
    assert r.delta.abs().max() < 0.01
    enc = tok([PAIRS[0][0]], [PAIRS[0][1]], return_tensors="pt")
    assert "token_type_ids" not in enc
    with torch.no_grad():  # the embeddings path reproduces the model's own output on input_ids
        p = fastnig.relevance_probability(model(**enc).logits)
    assert r.f_input[0].item() == pytest.approx(p.item(), abs=1e-5)


@pytest.mark.parametrize("baseline", ["pad", "pad-query", "zero", "zero-query"])
def test_baselines_start_where_they_should(tiny_bert, tokenizer, baseline):
    r = fastnig.attribute(tiny_bert, PAIRS[:1], tokenizer=tokenizer, steps=4, baseline=baseline, progress=False)
    q, p = PAIRS[0]
    enc = tokenizer(q, p, return_tensors="pt", return_special_tokens_mask=True)
    ids, special = enc["input_ids"], enc["special_tokens_mask"].bool()
    replace = ~special
    if baseline.endswith("query"):
        replace &= enc["token_type_ids"] == 0
    emb = tiny_bert.get_input_embeddings()
    with torch.no_grad():
        if baseline.startswith("pad"):
            x = emb(torch.where(replace, torch.full_like(ids, tokenizer.pad_token_id), ids))
        else:
            x = emb(ids) * (~replace).unsqueeze(-1)
        expected = fastnig.relevance_probability(
            tiny_bert(inputs_embeds=x, attention_mask=enc["attention_mask"],
                      token_type_ids=enc["token_type_ids"]).logits)
    assert r.f_baseline[0].item() == pytest.approx(expected.item(), abs=1e-5)


def test_bf16_compute(tiny_bert, tokenizer, reference_run):
    r = fastnig.attribute(tiny_bert, PAIRS[:2], tokenizer=tokenizer, steps=20, dtype=torch.bfloat16,
                          progress=False)
    for name in reference_run.scores:
        got, ref = r.scores[name], reference_run.scores[name][:2]
        assert (got - ref).norm() / ref.norm() < 0.1, name


def test_tokenizer_and_model_load_from_a_saved_directory(tmp_path, tiny_bert, tokenizer, reference_run):
    from transformers import AutoModelForSequenceClassification

    tiny_bert.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    r = fastnig.attribute(model, PAIRS[:2], steps=20, progress=False)  # tokenizer from config.name_or_path
    assert r.settings["model"] == str(tmp_path)
    for name in reference_run.scores:
        torch.testing.assert_close(r.scores[name], reference_run.scores[name][:2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(pairs=[]), ValueError, "pairs is empty"),
    (dict(pairs=[(1, "x")]), TypeError, "query and passage must be strings"),
    (dict(pairs=("q", "p")), TypeError, "wrap a single pair"),
    (dict(baseline="unk"), ValueError, "baseline must be one of"),
    (dict(rule="simpson"), ValueError, "rule must be one of"),
    (dict(target="maybe"), ValueError, "target must be"),
    (dict(target=["relevant"]), ValueError, "target has 1 labels"),
    (dict(steps=0), ValueError, "steps must be"),
    (dict(steps="many"), ValueError, "or .auto."),
    (dict(nodes="gauss"), ValueError, "nodes must be one of"),
    (dict(steps="auto", tolerance=0), ValueError, "tolerance"),
    (dict(step_batch=0), ValueError, "step_batch"),
    (dict(layers=["nope"]), ValueError, "not nn.Linear"),
])
def test_bad_input_is_named(tiny_bert, tokenizer, kwargs, exc, words):
    args = dict(pairs=PAIRS[:2])
    args.update(kwargs)
    pairs = args.pop("pairs")
    with pytest.raises(exc, match=words):
        fastnig.attribute(tiny_bert, pairs, tokenizer=tokenizer, progress=False, **args)


def test_model_without_input_embeddings_is_refused(tokenizer):
    with pytest.raises(TypeError, match="get_input_embeddings"):
        fastnig.attribute(torch.nn.Linear(2, 2), PAIRS[:1], tokenizer=tokenizer, progress=False)


def test_non_finite_result_names_the_layer(tokenizer):
    model = make_model("bert", vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        model.bert.encoder.layer[1].intermediate.dense.bias[0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        fastnig.attribute(model, PAIRS[:1], tokenizer=tokenizer, steps=2, progress=False)


def test_over_long_passage_is_truncated(tiny_bert, tokenizer):
    long = " ".join(["heat transfer"] * 400)
    r = fastnig.attribute(tiny_bert, [("wing", long)], tokenizer=tokenizer, steps=2, max_length=64,
                          progress=False)
    assert r.num_tokens[0] == 64


def test_parameters_get_no_gradients_and_state_is_restored(tokenizer):
    model = make_model("bert", vocab_size=tokenizer.vocab_size).train()
    fastnig.attribute(model, PAIRS[:1], tokenizer=tokenizer, steps=2, progress=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("nodes", ["uniform", "chebyshev"])
def test_path_nodes_include_both_ends(nodes):
    from fastnig.engine.quadrature import path_nodes

    a = path_nodes(8, nodes)
    assert a[0] == 0 and a[-1] == 1 and (a.diff() > 0).all() and a.shape == (9,)
    if nodes == "chebyshev":
        assert a[1] < 1 / 8 and a[4] == pytest.approx(0.5)


def test_chebyshev_nodes_converge(tiny_bert, tokenizer):
    d = [fastnig.attribute(tiny_bert, PAIRS[:2], tokenizer=tokenizer, steps=s, nodes="chebyshev",
                           rule="trapezoid", progress=False).delta.abs() for s in (4, 16, 64)]
    assert (d[1] < d[0]).all() and (d[2] < d[1]).all()


def test_auto_steps_stop_at_the_tolerance_and_equal_fixed_runs(tiny_bert, tokenizer):
    tol, max_steps = 0.025, 64
    auto = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps="auto", tolerance=tol,
                             max_steps=max_steps, rule="left", pair_batch=2, progress=False)
    used = auto.steps_used.tolist()
    assert all(s in (16, 32, 64) for s in used) and max(used) <= max_steps
    assert len(set(used)) > 1, "the pairs should need different numbers of steps"
    rel = fastnig.engine.quadrature.relative_delta(auto.delta, auto.f_input, auto.f_baseline, floor=0.01)
    for i, s in enumerate(used):
        assert rel[i] <= tol or s == max_steps
        fixed = fastnig.attribute(tiny_bert, [PAIRS[i]], tokenizer=tokenizer, steps=s, rule="left", progress=False)
        if s > 16:  # it did not stop earlier: the previous level was above the tolerance
            coarse = fastnig.attribute(tiny_bert, [PAIRS[i]], tokenizer=tokenizer, steps=s // 2, rule="left",
                                       progress=False)
            assert fastnig.engine.quadrature.relative_delta(coarse.delta, coarse.f_input, coarse.f_baseline,
                                                      floor=0.01)[0] > tol
        for name, value in fixed.scores.items():
            torch.testing.assert_close(auto.scores[name][i], value[0], rtol=1e-4, atol=1e-6)
    assert auto.settings["steps"] == "auto" and auto.settings["tolerance"] == tol


def test_auto_steps_never_exceed_the_maximum(tiny_bert, tokenizer):
    auto = fastnig.attribute(tiny_bert, PAIRS[:2], tokenizer=tokenizer, steps="auto", tolerance=1e-12,
                             max_steps=20, progress=False)
    assert auto.steps_used.tolist() == [20, 20]


def test_auto_step_batch_fits_memory_and_changes_nothing(tiny_bert, tokenizer, reference_run):
    from fastnig.engine.memory import auto_step_batch

    modules = linear_modules(tiny_bert)
    n = auto_step_batch(tiny_bert, modules, tokens=128, pairs=1, device=torch.device("cpu"))
    assert n >= 1
    width = sum(m.out_features for m in modules.values())
    assert auto_step_batch(tiny_bert, modules, 128, 1, torch.device("cpu"), fraction=1e-9) == 1
    assert n * 128 * 4 * 4 * width <= 0.5 * 1e15  # finite, bounded by the host's memory estimate
    r = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, step_batch="auto", progress=False)
    for name, ref in reference_run.scores.items():
        torch.testing.assert_close(r.scores[name], ref, rtol=1e-4, atol=1e-6)


def test_bf16_error_within_twice_plain_pytorch_bf16(tiny_bert, tokenizer):
    """Flash-attention's rule: fastnig in bf16 (fp32 accumulation) vs fp32 is no worse than
    2x the error of the same computation done in plain PyTorch bf16 (bf16 accumulation)."""
    pairs, steps = PAIRS[:2], 16
    ref = fastnig.attribute(tiny_bert, pairs, tokenizer=tokenizer, steps=steps, progress=False)
    ours = fastnig.attribute(tiny_bert, pairs, tokenizer=tokenizer, steps=steps, dtype=torch.bfloat16,
                             progress=False)
    # plain PyTorch bf16: same autocast path, the sum taken in bf16 from the captured tensors
    from fastnig.engine.encoding import baseline_embeddings, encode_pairs
    from fastnig.engine.quadrature import path_nodes

    modules = linear_modules(tiny_bert)
    plain = {n: [] for n in modules}
    for q, p in pairs:
        enc = encode_pairs(tokenizer, [(q, p)], 512, "pad", True)
        with torch.no_grad():
            x, xb = baseline_embeddings(tiny_bert.get_input_embeddings(), enc, "pad", tokenizer.pad_token_id)
        alphas = path_nodes(steps).float()
        path = (xb + alphas.view(-1, 1, 1) * (x - xb)).requires_grad_(True)
        acts = {}
        def keep(name):
            def hook(module, inputs, output):
                output.retain_grad()
                acts[name] = output
            return hook

        hooks = [m.register_forward_hook(keep(n)) for n, m in modules.items()]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = tiny_bert(inputs_embeds=path, attention_mask=enc.attention_mask.expand(steps + 1, -1),
                               token_type_ids=enc.token_type_ids.expand(steps + 1, -1)).logits
        fastnig.target_function(logits, torch.ones(steps + 1, dtype=torch.bool)).sum().backward()
        for h in hooks:
            h.remove()
        for n, a in acts.items():
            a, g = a.detach().bfloat16(), a.grad.bfloat16()
            plain[n].append((0.5 * (g[:-1] + g[1:]) * (a[1:] - a[:-1])).sum(dim=(0, 1)))
    err_ours = max((ours.scores[n] - ref.scores[n]).abs().max().item() for n in modules)
    err_plain = max((torch.stack(plain[n]).float() - ref.scores[n]).abs().max().item() for n in modules)
    print("bf16 max error: fastnig", err_ours, "plain", err_plain)
    assert err_ours <= 2 * err_plain, (err_ours, err_plain)


def test_a_settings_object_and_keyword_overrides_give_the_same_run(tiny_bert, tokenizer):
    from fastnig.engine.settings import AttributionSettings

    base = AttributionSettings(steps=4, rule="trapezoid")
    by_object = fastnig.attribute(tiny_bert, PAIRS[:1], base.replace(baseline="zero"), tokenizer=tokenizer,
                                  progress=False)
    by_keyword = fastnig.attribute(tiny_bert, PAIRS[:1], base, tokenizer=tokenizer, baseline="zero", progress=False)
    assert by_object.settings == by_keyword.settings and by_keyword.settings["baseline"] == "zero"
    for name, value in by_object.scores.items():
        torch.testing.assert_close(by_keyword.scores[name], value)
    with pytest.raises(TypeError, match="settings must be an AttributionSettings"):
        fastnig.attribute(tiny_bert, PAIRS[:1], {"steps": 4}, tokenizer=tokenizer, baseline="zero")
    with pytest.raises(TypeError, match="unknown attribution setting"):
        fastnig.attribute(tiny_bert, PAIRS[:1], base, tokenizer=tokenizer, stepz=4)
