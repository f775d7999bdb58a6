"""The engine under stress (issue 13): out-of-memory recovery, the memory model of
``step_batch="auto"``, the first-token cut's hygiene and thread safety, devices, length limits."""
from __future__ import annotations

import functools
import threading
import warnings

import pytest
import torch
from tiny_models import PAIRS, make_model, make_tokenizer

import fastnig
from fastnig.engine import attribute as attribution
from fastnig.engine import first_token, memory, rankers, scoring
from fastnig.engine import model as cross_encoder
from fastnig.engine.memory import chunk_memory
from fastnig.engine.model import linear_modules

CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
           "you tried to allocate 1073741824 bytes.")


@pytest.fixture(scope="module")
def unchunked(tiny_bert, tokenizer):
    return fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, step_batch=21, pair_batch=2,
                             progress=False)


def _assert_same(result, reference):
    for name, ref in reference.scores.items():
        torch.testing.assert_close(result.scores[name], ref, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(result.delta, reference.delta, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(result.f_input, reference.f_input)
    torch.testing.assert_close(result.f_baseline, reference.f_baseline)


def _no_hooks_left(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------ out of memory
def _oom_warnings(caught):
    return [w for w in caught if issubclass(w.category, RuntimeWarning) and "out of memory" in str(w.message)]


@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [[18], [18, 40]], ids=["once", "twice"])
def test_out_of_memory_mid_backward_is_undone_and_redone_in_halves(tiny_bert, tokenizer, unchunked, monkeypatch,
                                                                   fail_at):
    """A CUDA-style OOM raised from inside the gradient hooks after some layers of the second
    chunk were already accumulated (the call numbers count every accumulation: 12 layers + the
    input per chunk): the chunk is undone, redone in halves, and the result equals the unchunked
    run; one warning, however many halvings."""
    calls = {"n": 0}
    real = attribution.accumulate_conductance

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(attribution, "accumulate_conductance", flaky)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, step_batch=7, pair_batch=2,
                                   progress=False)
    assert calls["n"] > max(fail_at)
    _assert_same(result, unchunked)
    found = _oom_warnings(caught)
    assert len(found) == 1 and "with 7 path points" in str(found[0].message) and "with 4" in str(found[0].message)
    assert _no_hooks_left(tiny_bert)


@pytest.mark.slow
def test_cpu_allocation_failure_in_forward_is_redone(tiny_bert, tokenizer, unchunked, monkeypatch):
    """The host allocator's error (a RuntimeError naming DefaultCPUAllocator) raised in the
    forward of the third chunk of the first batch: redone, same result."""
    module = tiny_bert.bert.encoder.layer[1].intermediate
    forwards = {"n": 0}

    def fail_once(mod, inputs, output):
        forwards["n"] += 1
        if forwards["n"] == 3:
            raise RuntimeError(CPU_OOM)

    handle = module.register_forward_hook(fail_once)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fastnig.attribute(tiny_bert, PAIRS, tokenizer=tokenizer, steps=20, step_batch=7,
                                       pair_batch=2, progress=False)
    finally:
        handle.remove()
    _assert_same(result, unchunked)
    assert len(_oom_warnings(caught)) == 1
    assert _no_hooks_left(tiny_bert)


def test_other_errors_are_not_taken_for_out_of_memory(tiny_bert, tokenizer, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("some unrelated failure")

    monkeypatch.setattr(attribution, "accumulate_conductance", broken)
    with pytest.raises(RuntimeError, match="some unrelated failure"):
        fastnig.attribute(tiny_bert, PAIRS[:1], tokenizer=tokenizer, steps=4, progress=False)
    assert _no_hooks_left(tiny_bert)
    assert memory.is_out_of_memory(RuntimeError(CPU_OOM))
    assert memory.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert memory.is_out_of_memory(MemoryError())
    assert not memory.is_out_of_memory(RuntimeError("size mismatch"))


@pytest.mark.slow
def test_out_of_memory_with_one_point_per_forward_is_a_clear_error(tiny_bert, tokenizer, monkeypatch):
    def always(*args, **kwargs):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(attribution, "accumulate_conductance", always)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(MemoryError, match="even with one path point per forward.*pair_batch or max_length"):
            fastnig.attribute(tiny_bert, PAIRS[:1], tokenizer=tokenizer, steps=4, step_batch=4, progress=False)
    assert _no_hooks_left(tiny_bert)


# ------------------------------------------------------------- memory model
MINILM = dict(hidden=384, layers=6, heads=12, intermediate=1536)
LONG_PASSAGE = ("experimental results of heat transfer and pressure in the laminar boundary layer of supersonic "
                "wings show large effects of the shock wave on heating ") * 20


def _measured_peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes while ``fn`` runs: torch's profiler records every
    allocation and free of the CPU allocator, in order; the running sum's maximum is the peak.
    (RSS-based numbers also count glibc's arenas, freed pages not returned and thread
    stacks, and miss short peaks between samples; this counts exactly the tensors.)"""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    assert events, "the profiler recorded no allocation"
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.slow
@pytest.mark.parametrize("attention,dtype", [("sdpa", None), ("eager", torch.bfloat16)])
def test_memory_model_predicts_the_measured_peak_on_the_minilm_shape(attention, dtype):
    """MiniLM shape (6 layers, hidden 384, intermediate 1536, 12 heads), 128 tokens, 33 path
    points in 3 chunks of 11: the predicted peak of a chunk (carries of the earlier chunks
    included) is within 30 % of the allocator's measured peak."""
    tok = make_tokenizer()
    model = make_model("bert", vocab_size=tok.vocab_size, max_positions=512, init_range=0.02, **MINILM)
    model.set_attn_implementation(attention)
    pair = [("what is the effect of heat transfer on supersonic wings", LONG_PASSAGE)]

    def run():
        return fastnig.attribute(model, pair, tokenizer=tok, steps=32, step_batch=11, max_length=128,
                                 dtype=dtype, progress=False)

    tokens = int(run().num_tokens[0])  # warm-up (first-call allocations), and the real length
    assert tokens == 128
    measured = _measured_peak_bytes(run)
    predicted = chunk_memory(model, linear_modules(model), tokens, 1, dtype).total(11)
    print(f"{attention} {dtype}: predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert abs(predicted - measured) <= 0.30 * measured, (predicted / 2**20, measured / 2**20)


def test_auto_step_batch_counts_every_part_and_the_allocator_cache(tiny_bert, monkeypatch):
    modules = linear_modules(tiny_bert)
    estimate = chunk_memory(tiny_bert, modules, 64, 2)
    assert set(estimate.per_point) >= {"linear outputs", "layer norm inputs", "attention", "path and embeddings"}
    assert all(v > 0 for v in estimate.per_point.values()) and estimate.fixed["carries"] > 0
    with_autocast = chunk_memory(tiny_bert, modules, 64, 2, torch.bfloat16)
    assert with_autocast.per_point["linear outputs"] * 2 == estimate.per_point["linear outputs"]
    # layer norm inputs stay fp32 under autocast
    assert with_autocast.per_point["layer norm inputs"] == estimate.per_point["layer norm inputs"]
    assert with_autocast.fixed["weights cast by autocast"] > 0
    no_cut = chunk_memory(tiny_bert, modules, 64, 2, first_token_cut=False)
    assert no_cut.total(5) > estimate.total(5)
    # a pooler has one row per pair
    pooled = chunk_memory(tiny_bert, linear_modules(tiny_bert, include_pooler=True), 64, 2)
    assert pooled.fixed["carries"] - estimate.fixed["carries"] == 2 * 2 * 1 * tiny_bert.config.hidden_size * 4

    # what "auto" picks: exactly the points that fit in the budget, counted on CUDA with the allocator's cache
    points = 7
    free = (sum(estimate.fixed.values()) + points * sum(estimate.per_point.values())) / 0.5
    monkeypatch.setattr(memory, "free_memory", lambda device: free)
    assert memory.auto_step_batch(tiny_bert, modules, 64, 2, torch.device("cuda", 0)) == points
    monkeypatch.setattr(memory, "free_memory", lambda device: free - 1)
    assert memory.auto_step_batch(tiny_bert, modules, 64, 2, torch.device("cuda", 0)) == points - 1
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 5000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 700)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 200)
    assert memory.free_memory(torch.device("cuda", 0)) == 1500


# ------------------------------------------------------------- first-token cut
def _snapshot(model):
    """Every module's attributes (hook dicts by content) and its forward, to compare by identity."""
    state = {}
    for name, m in model.named_modules():
        attrs = {k: (tuple(v.items()) if isinstance(v, dict) else v) for k, v in vars(m).items()}
        state[name] = (attrs, type(m).forward, vars(m).get("forward"))
    return state


def _same_snapshot(a, b):
    assert a.keys() == b.keys()
    for name in a:
        (attrs_a, cls_a, own_a), (attrs_b, cls_b, own_b) = a[name], b[name]
        assert cls_a is cls_b and own_a is own_b, name
        assert attrs_a.keys() == attrs_b.keys(), name
        for key in attrs_a:
            va, vb = attrs_a[key], attrs_b[key]
            if isinstance(va, tuple) and isinstance(vb, tuple) and key.startswith("_"):
                assert len(va) == len(vb) and all(x[0] == y[0] and x[1] is y[1] for x, y in zip(va, vb)), \
                    (name, key)
            else:
                assert va is vb or va == vb, (name, key)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_attribute_leaves_every_module_as_it_was(tokenizer, attention):
    model = make_model("bert", vocab_size=tokenizer.vocab_size, seed=4)
    model.set_attn_implementation(attention)
    with torch.no_grad():  # anything transformers sets up on a first call is not ours
        model(**tokenizer(*PAIRS[0], return_tensors="pt"))
    before = _snapshot(model)
    fastnig.attribute(model, PAIRS[:2], tokenizer=tokenizer, steps=4, step_batch=2, pair_batch=2, progress=False)
    scoring.score_pairs(model, tokenizer, PAIRS[:2])
    _same_snapshot(before, _snapshot(model))


def test_an_instance_forward_is_kept_and_called(tokenizer):
    """accelerate-style: the last self-attention (and the model) carry their own ``forward``;
    it stays the same object, keeps being called (no query cut bypasses it), results unchanged."""
    model = make_model("bert", vocab_size=tokenizer.vocab_size, seed=5)
    reference = fastnig.attribute(model, PAIRS[:2], tokenizer=tokenizer, steps=6, pair_batch=2, progress=False)
    attention = model.bert.encoder.layer[-1].attention.self
    calls = {"attention": 0, "model": 0}

    def wrap(module, key):  # as accelerate's add_hook_to_module does it
        old_forward = module.forward

        def new_forward(module, *args, **kwargs):
            calls[key] += 1
            return old_forward(*args, **kwargs)
        return functools.update_wrapper(functools.partial(new_forward, module), old_forward)

    attention.forward = wrap(attention, "attention")
    model.forward = wrap(model, "model")
    own_attention, own_model = attention.forward, model.forward
    with torch.no_grad():
        model(**tokenizer(*PAIRS[0], return_tensors="pt"))
    assert first_token.query_cut_module(model) is None
    before = _snapshot(model)
    result = fastnig.attribute(model, PAIRS[:2], tokenizer=tokenizer, steps=6, pair_batch=2, progress=False)
    assert calls["attention"] > 0 and calls["model"] > 0
    assert attention.forward is own_attention and model.forward is own_model
    _same_snapshot(before, _snapshot(model))
    for name, ref in reference.scores.items():
        torch.testing.assert_close(result.scores[name], ref, rtol=1e-5, atol=1e-7, msg=name)


def _last_layer_rows(model, call):
    """Token rows the last layer's query and feed-forward output see during ``call()``."""
    last = model.bert.encoder.layer[-1]
    rows = {"query": set(), "ffn": set()}
    handles = [last.attention.self.query.register_forward_hook(lambda m, i, o: rows["query"].add(o.shape[1])),
               last.output.dense.register_forward_hook(lambda m, i, o: rows["ffn"].add(o.shape[1]))]
    try:
        out = call()
    finally:
        for h in handles:
            h.remove()
    return rows, out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cut_is_off_for_attentions_hidden_states_and_head_mask(tokenizer, attention):
    model = make_model("bert", vocab_size=tokenizer.vocab_size, seed=6)
    model.set_attn_implementation(attention)
    enc = tokenizer([q for q, _ in PAIRS[:3]], [p for _, p in PAIRS[:3]], return_tensors="pt", padding=True)
    T = enc["input_ids"].shape[1]
    with torch.no_grad():
        plain = model(**enc, output_attentions=True, output_hidden_states=True)
        cases = {
            "plain": {},
            "output_attentions": dict(output_attentions=True),
            "output_hidden_states": dict(output_hidden_states=True),
            "head_mask": dict(head_mask=torch.ones(model.config.num_hidden_layers, model.config.num_attention_heads)),
        }
        for case, kwargs in cases.items():
            with first_token.first_token_only(model):
                rows, out = _last_layer_rows(model, lambda: model(**enc, **kwargs))
            torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-6, msg=case)
            if case == "plain":
                assert rows == {"query": {1}, "ffn": {1}}
            else:
                assert rows == {"query": {T}, "ffn": {T}}, case
            if case == "output_attentions":
                for got, expected in zip(out.attentions, plain.attentions):
                    torch.testing.assert_close(got, expected)
            if case == "output_hidden_states":
                torch.testing.assert_close(out.hidden_states[-1], plain.hidden_states[-1])


@pytest.mark.parametrize("attention", ["eager"])  # transformers allows output_attentions with eager attention only
def test_output_attentions_in_the_config_turns_the_cut_off_and_changes_nothing(tokenizer, attention):
    model = make_model("bert", vocab_size=tokenizer.vocab_size, seed=7)
    model.set_attn_implementation(attention)
    cut = fastnig.attribute(model, PAIRS[:3], tokenizer=tokenizer, steps=6, pair_batch=3, progress=False)
    model.config.output_attentions = True
    try:
        rows, off = _last_layer_rows(model, lambda: fastnig.attribute(model, PAIRS[:3], tokenizer=tokenizer,
                                                                      steps=6, pair_batch=3, progress=False))
    finally:
        model.config.output_attentions = False
    assert 1 not in rows["ffn"] and 1 not in rows["query"]
    for name, expected in cut.scores.items():
        torch.testing.assert_close(off.scores[name], expected, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_unknown_attention_implementation_keeps_every_query(tokenizer):
    """flex_attention (forward only on CPU): no query cut, the feed-forward cut still exact."""
    model = make_model("bert", vocab_size=tokenizer.vocab_size, seed=8)
    enc = tokenizer([q for q, _ in PAIRS[:2]], [p for _, p in PAIRS[:2]], return_tensors="pt", padding=True)
    T = enc["input_ids"].shape[1]
    with torch.no_grad():
        expected = model(**enc).logits
    try:
        model.set_attn_implementation("flex_attention")
    except (ValueError, ImportError) as exc:  # pragma: no cover - depends on the installed transformers
        pytest.skip(f"flex_attention unavailable: {exc}")
    assert first_token.query_cut_module(model) is None
    assert first_token.first_token_cut(model) is not None
    with torch.no_grad(), first_token.first_token_only(model):
        rows, out = _last_layer_rows(model, lambda: model(**enc))
    assert rows == {"query": {T}, "ffn": {1}}
    torch.testing.assert_close(out.logits, expected, rtol=1e-5, atol=1e-6)


def test_switches_turn_the_cut_off(tokenizer, monkeypatch):
    model = make_model("bert", vocab_size=tokenizer.vocab_size, seed=9)

    def run(**kwargs):
        return _last_layer_rows(model, lambda: fastnig.attribute(model, PAIRS[:1], tokenizer=tokenizer, steps=2,
                                                                 progress=False, **kwargs))[0]

    assert run() == {"query": {1}, "ffn": {1}}
    assert 1 not in run(first_token_cut=False)["ffn"]
    monkeypatch.setenv("FASTNIG_FIRST_TOKEN_CUT", "0")
    assert 1 not in run()["ffn"]
    with pytest.raises(TypeError, match="first_token_cut"):
        fastnig.attribute(model, PAIRS[:1], tokenizer=tokenizer, steps=2, progress=False, first_token_cut="no")


def test_another_thread_using_the_model_meanwhile_is_not_cut(tokenizer):
    """While one thread is inside ``attribute`` (cut installed, paused mid-forward), another
    thread's plain call of the same model runs uncut and gets the exact outputs."""
    model = make_model("bert", vocab_size=tokenizer.vocab_size, seed=10)
    reference = fastnig.attribute(model, PAIRS[:2], tokenizer=tokenizer, steps=4, pair_batch=2, progress=False)
    enc = tokenizer([q for q, _ in PAIRS[:2]], [p for _, p in PAIRS[:2]], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**enc)
    paused, resume = threading.Event(), threading.Event()
    result = {}

    def hold(module, inputs, output):
        if threading.current_thread().name == "attributor" and not paused.is_set():
            paused.set()
            resume.wait(60)

    handle = model.bert.encoder.layer[0].output.register_forward_hook(hold)

    def attributor():
        try:
            result["value"] = fastnig.attribute(model, PAIRS[:2], tokenizer=tokenizer, steps=4, pair_batch=2,
                                                progress=False)
        except BaseException as exc:  # pragma: no cover - reported below
            result["error"] = exc

    thread = threading.Thread(target=attributor, name="attributor")
    thread.start()
    try:
        assert paused.wait(60), "the attributing thread never reached the model"
        with torch.no_grad():
            rows, out = _last_layer_rows(model, lambda: model(**enc))
    finally:
        resume.set()
        thread.join(60)
        handle.remove()
    T = enc["input_ids"].shape[1]
    assert rows == {"query": {T}, "ffn": {T}}
    torch.testing.assert_close(out.logits, expected.logits)
    assert "error" not in result, result.get("error")
    for name, ref in reference.scores.items():
        torch.testing.assert_close(result["value"].scores[name], ref, rtol=1e-5, atol=1e-7, msg=name)
    assert "forward" not in vars(model.bert.encoder.layer[-1].attention.self)
    assert _no_hooks_left(model)


# ------------------------------------------------------------------ devices
def test_device_none_computes_where_the_model_is_without_moving_it(tiny_bert, tokenizer, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was moved")

    monkeypatch.setattr(tiny_bert, "to", refuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastnig.attribute(tiny_bert, PAIRS[:1], tokenizer=tokenizer, steps=2, progress=False)
        fastnig.attribute(tiny_bert, PAIRS[:1], tokenizer=tokenizer, steps=2, progress=False, device="cpu")
    monkeypatch.undo()
    assert not [w for w in caught if "moving the model" in str(w.message)]
    assert {p.device.type for p in tiny_bert.parameters()} == {"cpu"}


def test_device_moves_the_model_and_says_so(tokenizer, monkeypatch):
    model = make_model("bert", vocab_size=tokenizer.vocab_size)
    moved = []
    real_to = model.to
    monkeypatch.setattr(model, "to", lambda *a, **k: moved.append(a) or real_to(*a, **k))
    # pretend the model sits on a GPU: attribute(device="cpu") then has to move it
    monkeypatch.setattr(cross_encoder, "model_devices",
                        lambda m: [torch.device("cuda", 0)] if not moved else [torch.device("cpu")])
    with pytest.warns(UserWarning, match=r"moving the model from cuda:0 to cpu; it stays there"):
        fastnig.attribute(model, PAIRS[:1], tokenizer=tokenizer, steps=2, progress=False, device="cpu")
    assert moved == [(torch.device("cpu"),)]


def test_a_model_on_several_devices_is_refused_before_any_work(tokenizer, monkeypatch):
    model = make_model("bert", vocab_size=tokenizer.vocab_size)
    calls = []
    monkeypatch.setattr(rankers, "encode_pairs", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(cross_encoder, "model_devices", lambda m: [torch.device("cpu"), torch.device("cuda", 0)])
    with pytest.raises(ValueError, match=r"spread over several devices \(cpu, cuda:0\).*device_map"):
        fastnig.attribute(model, PAIRS[:1], steps=2, progress=False)  # no tokenizer: refused before loading one
    monkeypatch.undo()
    monkeypatch.setattr(rankers, "encode_pairs", lambda *a, **k: calls.append(a))
    model.hf_device_map = {"bert.embeddings": "cpu", "bert.encoder": 0, "classifier": 0}
    with pytest.raises(ValueError, match=r"spread over several devices \(cpu, cuda:0\)"):
        fastnig.attribute(model, PAIRS[:1], tokenizer=tokenizer, steps=2, progress=False)
    with pytest.raises(ValueError, match="dispatched over several devices"):
        fastnig.attribute(model, PAIRS[:1], tokenizer=tokenizer, steps=2, progress=False, device="cpu")
    del model.hf_device_map
    model.classifier.weight = torch.nn.Parameter(torch.empty_like(model.classifier.weight, device="meta"))
    with pytest.raises(ValueError, match="'meta' device"):
        fastnig.attribute(model, PAIRS[:1], tokenizer=tokenizer, steps=2, progress=False)
    assert calls == []
    assert _no_hooks_left(model)


# ------------------------------------------------------------ length limits
def test_max_length_beyond_the_position_embeddings_is_capped_with_one_warning(tokenizer):
    model = make_model("bert", vocab_size=tokenizer.vocab_size, max_positions=128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = fastnig.attribute(model, [("wing", LONG_PASSAGE)], tokenizer=tokenizer, steps=2, max_length=512,
                              progress=False)
    assert int(r.num_tokens[0]) == 128 and r.settings["max_length"] == 128
    notices = [w for w in caught if "position embeddings" in str(w.message)]
    assert len(notices) == 1 and "max_length=512" in str(notices[0].message)
    assert torch.isfinite(r.delta).all()
