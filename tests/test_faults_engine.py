"""Faults must not change an answer (issue 22), the engine's half: out of memory anywhere in a
chunk, during the carry refill, and in every chunk of every rule; fp16; bf16 weights; another
thread using the same model."""
from __future__ import annotations

import threading
import warnings

import pytest
import torch
from tiny_models import PAIRS, make_model

import fastnig
from fastnig.engine import attribute as attribution
from fastnig.engine import quadrature

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


class Faults:
    """Counts every accumulation of the fused op that :func:`fastnig.attribute` calls (one per
    attributed Linear and chunk, in its gradient hook, plus the input side's) and raises an
    out-of-memory error at the ones in ``fail_at`` (1-based)."""

    def __init__(self, monkeypatch, fail_at=()):
        self.fail_at, self.calls = set(fail_at), 0
        real = attribution.accumulate_conductance

        def counted(*args, **kwargs):
            self.calls += 1
            if self.calls in self.fail_at:
                raise torch.OutOfMemoryError(OOM)
            return real(*args, **kwargs)

        monkeypatch.setattr(attribution, "accumulate_conductance", counted)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the out-of-memory notice
        return fn(*args, **kwargs)


def _named(name):
    return lambda message: f"{name}: {message}"


def _assert_equal_runs(result, reference, rtol=1e-5, atol=1e-6):
    """The same attributions up to float rounding (scores, per-segment scores, error estimates, delta)."""
    for name, ref in reference.scores.items():
        torch.testing.assert_close(result.scores[name], ref, rtol=rtol, atol=atol, msg=_named(name))
        if reference.segment_scores is not None:
            torch.testing.assert_close(result.segment_scores[name], reference.segment_scores[name], rtol=rtol,
                                       atol=atol, msg=_named(name))
        if reference.error_estimate is not None:
            torch.testing.assert_close(result.error_estimate[name], reference.error_estimate[name], rtol=rtol,
                                       atol=atol, msg=_named(name))
    torch.testing.assert_close(result.delta, reference.delta, rtol=1e-4, atol=atol)
    torch.testing.assert_close(result.f_input, reference.f_input)
    torch.testing.assert_close(result.f_baseline, reference.f_baseline)
    assert torch.equal(result.steps_used, reference.steps_used)


# ------------------------------------------------- out of memory in the first chunk (item 1)
@pytest.mark.parametrize("rule", ["trapezoid", "richardson"])
def test_out_of_memory_in_the_first_chunks_backward_is_undone(tiny_bert, tokenizer, monkeypatch, rule):
    """21 points in chunks of 7, an OOM at the 3rd accumulation (inside the first chunk's backward,
    after two layers wrote their carries): the redo starts from fresh carries, and the result equals
    the unchunked run (it was off by 44 % of layer.1.intermediate.dense's largest score)."""
    options = dict(tokenizer=tokenizer, steps=20, pair_batch=2, rule=rule, progress=False)
    reference = fastnig.attribute(tiny_bert, PAIRS, step_batch=21, **options)
    faults = Faults(monkeypatch, fail_at=[3])
    result = _quiet(fastnig.attribute, tiny_bert, PAIRS, step_batch=7, **options)
    assert faults.calls > 3
    _assert_equal_runs(result, reference, rtol=1e-4)


# ------------------------------------------------- out of memory during the refill (item 2)
def _forwards(monkeypatch):
    """Path points per pair of every forward + backward, in order."""
    points = []
    real = attribution._forward_backward

    def recorded(run, state, path):
        points.append(path.shape[0] // run.pairs)
        return real(run, state, path)

    monkeypatch.setattr(attribution, "_forward_backward", recorded)
    return points


def test_the_richardson_refill_respects_the_halved_limit(tiny_bert, tokenizer, monkeypatch):
    """9 points in chunks of 2 ([0, 2), [2, 4), ...): an OOM in the second chunk (call 14 of the op:
    12 Linears + the input per chunk) halves the limit to 1; the carries need the even point 0 and
    point 1, which are replayed one per forward (not 2 in one), and the result equals the unchunked run."""
    options = dict(tokenizer=tokenizer, steps=8, rule="richardson", progress=False)
    reference = fastnig.attribute(tiny_bert, PAIRS[:1], step_batch=9, **options)
    Faults(monkeypatch, fail_at=[14])
    points = _forwards(monkeypatch)
    result = _quiet(fastnig.attribute, tiny_bert, PAIRS[:1], step_batch=2, **options)
    assert points[:2] == [2, 2] and set(points[2:]) == {1}, points
    _assert_equal_runs(result, reference)


def test_out_of_memory_during_the_richardson_refill_halves_and_retries(tiny_bert, tokenizer, monkeypatch):
    """11 points in chunks of 4 ([0, 4), [4, 8), ...): an OOM in the second chunk (call 14) halves the
    limit to 2 and replays points 2 and 3 (from the last even point) in one forward; an OOM there
    too (call 15) is handled like any other: halved to 1, replayed one point per forward."""
    options = dict(tokenizer=tokenizer, steps=10, rule="richardson", progress=False)
    reference = fastnig.attribute(tiny_bert, PAIRS[:1], step_batch=11, **options)
    Faults(monkeypatch, fail_at=[14, 15])
    points = _forwards(monkeypatch)
    result = _quiet(fastnig.attribute, tiny_bert, PAIRS[:1], step_batch=4, **options)
    assert points[:3] == [4, 4, 2] and set(points[3:]) == {1}, points
    _assert_equal_runs(result, reference)


def test_out_of_memory_during_the_refill_at_one_point_is_a_clear_error(tiny_bert, tokenizer, monkeypatch):
    """As above, but every accumulation from call 14 on fails: the replay at one point per forward
    ends in the clear ``MemoryError``, never a raw out-of-memory error."""
    Faults(monkeypatch, fail_at=range(14, 1000))
    with pytest.raises(MemoryError, match="even with one path point per forward"):
        _quiet(fastnig.attribute, tiny_bert, PAIRS[:1], tokenizer=tokenizer, steps=8, rule="richardson",
               step_batch=2, progress=False)


# ------------------------------------------------- the sweep: out of memory at every position
class Positions:
    """Every place of a run where memory can run out, in order: each attributed Linear's forward
    hook (``"forward"``), each accumulation of the fused op in a gradient hook and the input
    side's (``"backward"``), with the first path point and the size of the chunk it belongs to.  ``arm(k, ...)``
    makes the k-th, ... (1-based) raise a CUDA out-of-memory error; ``events`` lists what a run met."""

    def __init__(self, monkeypatch):
        self.fail_at, self.events = (), []
        real_forward, real_accumulate = attribution._HookState.on_forward, attribution.accumulate_conductance

        def on_forward(state, name, output):
            self._tick("forward", state.first_point, state.steps)
            return real_forward(state, name, output)

        def accumulate(*args, **kwargs):
            self._tick("backward", kwargs.get("first_point"), args[0].shape[1])
            return real_accumulate(*args, **kwargs)

        monkeypatch.setattr(attribution._HookState, "on_forward", on_forward)
        monkeypatch.setattr(attribution, "accumulate_conductance", accumulate)

    def arm(self, *fail_at):
        self.fail_at, self.events = fail_at, []
        return self

    def _tick(self, kind, first_point, points):
        self.events.append((kind, first_point, points))
        if len(self.events) in self.fail_at:
            raise torch.OutOfMemoryError(OOM)


SWEEP_PAIRS = PAIRS[:2]
# steps="auto" with levels 4, 8 (AUTO_START_STEPS patched): per rule, a tolerance between the two pairs'
# stopping statistics at N = 4 (left 0.057 / 0.081, trapezoid 0.019 / 0.036, richardson 0.0077 / 0.0027),
# so that one pair stops at 4 and the other goes on to 8
AUTO_TOLERANCE = {"left": 0.07, "trapezoid": 0.027, "richardson": 0.004}


def _sweep(model, tokenizer, monkeypatch, rule, segments, pair_batch, steps):
    """OOM at each position of a chunked run (9 points in chunks of 3, starting at 0, 3, 6: the redo
    of the second chunk replays one point, of the third two with ``richardson``), one run per
    position; each equals the unchunked run.  Returns the positions (kind, chunk start, chunk size)."""
    options = dict(tokenizer=tokenizer, rule=rule, segments=segments, pair_batch=pair_batch, progress=False)
    if steps == "auto":
        monkeypatch.setattr(quadrature, "AUTO_START_STEPS", 4)
        options.update(steps="auto", max_steps=8, tolerance=AUTO_TOLERANCE[rule])
    else:
        options.update(steps=steps)
    reference = fastnig.attribute(model, SWEEP_PAIRS, step_batch=9, **options)
    if steps == "auto":
        assert sorted(reference.steps_used.tolist()) == [4, 8]
    # the full garbage collection after each out-of-memory error (memory back before the redo) takes
    # ~0.3 s in a test process, 5x a tiny run; it does not change a result
    monkeypatch.setattr(attribution, "release_memory", lambda device: None)
    positions = Positions(monkeypatch)
    clean = fastnig.attribute(model, SWEEP_PAIRS, step_batch=4, **options)
    _assert_equal_runs(clean, reference)
    events = list(positions.events)
    for k, (kind, first_point, _) in enumerate(events, start=1):
        where = f"OOM at position {k} of {len(events)} ({kind}, chunk from point {first_point})"
        positions.arm(k)
        try:
            result = _quiet(fastnig.attribute, model, SWEEP_PAIRS, step_batch=4, **options)
        except Exception as exc:
            raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc
        assert len(positions.events) > k, where  # it fired, and the run went on
        try:
            _assert_equal_runs(result, reference)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
    positions.arm()
    return events


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest, and steady on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# the exhaustive cross product, every position each; the fast lane keeps the hardest case (half-step
# sums and their even-point carries, per-segment accumulators, two pairs per forward), the rest is slow
FAST_SWEEP = ("richardson", True, 2, 8)
SWEEP = [pytest.param(rule, segments, pair_batch, steps,
                      marks=() if (rule, segments, pair_batch, steps) == FAST_SWEEP else pytest.mark.slow,
                      id=f"{rule}-{'segments' if segments else 'tokens'}-pair_batch{pair_batch}-steps{steps}")
         for rule in ("left", "trapezoid", "richardson") for segments in (False, True)
         for pair_batch in (2, 1) for steps in (8, "auto")]


@pytest.mark.parametrize("rule, segments, pair_batch, steps", SWEEP)
def test_out_of_memory_at_every_position(tiny_bert, tokenizer, monkeypatch, one_thread, rule, segments, pair_batch,
                                         steps):
    events = _sweep(tiny_bert, tokenizer, monkeypatch, rule, segments, pair_batch, steps)
    assert {kind for kind, _, _ in events} == {"forward", "backward"}
    assert {0, 3, 6} <= {start for _, start, _ in events}  # first, middle and last chunk of a 9-point path


# ------------------------------------------------- float16: gradients must not underflow (item 4)
def _saturated(model, margin):
    """``model`` with its classifier's bias shifted so that every pair is scored ~e^-2·margin relevant."""
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([margin, -margin], dtype=model.classifier.bias.dtype))
    return model


def _largest_relative_error(result, reference):
    return max(float((result.scores[n].float() - ref).abs().max() / ref.abs().max())
               for n, ref in reference.scores.items())


def test_float16_autocast_keeps_the_gradients_of_a_saturated_pair(tokenizer):
    """F ~ 1e-5 for every pair: dF/dz = F (1 - F) is below fp16's normal range, and without loss
    scaling the deep gradients underflow (the largest error was 39 % of a layer's largest score).
    With each point's backward seeded by a power of two the fp16 result is as close to float32 as
    unsaturated pairs are (bf16, with its 8-bit mantissa, is the looser one here)."""
    model = _saturated(make_model("bert", vocab_size=tokenizer.vocab_size), 6.0)
    options = dict(tokenizer=tokenizer, steps=8, progress=False)
    reference = fastnig.attribute(model, PAIRS, **options)
    assert float(reference.f_input.max()) < 1e-4
    half = fastnig.attribute(model, PAIRS, dtype=torch.float16, **options)
    assert _largest_relative_error(half, reference) < 0.02
    assert half.settings["dtype"] == "float16"
    assert all(bool((s != 0).all()) for s in half.scores.values())


def test_the_gradient_scale_is_an_exact_power_of_two():
    f = torch.tensor([0.5, 1e-5, 0.99999, 1e-30, 0.0, 1.0, 0.25], dtype=torch.float32)
    scale = attribution._gradient_scale(f, "probability")
    mantissa, _ = torch.frexp(scale)
    assert torch.equal(mantissa, torch.full_like(scale, 0.5)) and bool((scale >= 1).all())
    moved = scale * f * (1 - f)
    inside = (f * (1 - f) > 2.0 ** -100)
    assert bool(((moved[inside] >= 1) & (moved[inside] < 2)).all()), moved
    assert torch.equal(scale * (1 / scale), torch.ones_like(scale))
    assert attribution._gradient_scale(f, "logit") is None


# ------------------------------------------------- bf16 and fp16 weights (item 10)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_model_with_half_precision_weights_is_attributed(tokenizer, dtype):
    """The path in the model's dtype, F and the accumulation in float32: close to the float32 model with
    the same (rounded) weights; ``dtype=`` equal to the weights' works too, a higher one is refused."""
    half = make_model("bert", vocab_size=tokenizer.vocab_size, dtype=dtype)
    full = make_model("bert", vocab_size=tokenizer.vocab_size, dtype=dtype).float()
    options = dict(tokenizer=tokenizer, steps=8, progress=False)
    reference = fastnig.attribute(full, PAIRS, **options)
    for extra in ({}, {"dtype": dtype}):
        result = fastnig.attribute(half, PAIRS, **options, **extra)
        assert all(s.dtype == torch.float32 for s in result.scores.values())
        assert _largest_relative_error(result, reference) < (0.1 if dtype == torch.bfloat16 else 0.02)
        assert torch.isfinite(result.delta).all() and (result.relative_delta() < 0.2).all()
        torch.testing.assert_close(result.f_input, reference.f_input, rtol=0.05, atol=1e-3)
        assert result.settings["dtype"] == str(dtype).replace("torch.", "")
    assert all(p.dtype == dtype for p in half.parameters())
    with pytest.raises(ValueError, match="dtype=float32 but the model's weights are"):
        fastnig.attribute(half, PAIRS[:1], dtype=torch.float32, **options)


# ------------------------------------------------- another thread using the same model (item 6)
def _paused_attribution(model, tokenizer, pairs, options):
    """Starts ``attribute`` in a thread that pauses inside its first forward (after layer 0's
    Linears ran, so its hooks hold activations); returns (thread, paused, resume, result)."""
    paused, resume, result = threading.Event(), threading.Event(), {}

    def hold(module, inputs, output):
        if threading.current_thread().name == "attributor" and not paused.is_set():
            paused.set()
            resume.wait(60)

    handle = model.bert.encoder.layer[0].output.register_forward_hook(hold)

    def attributor():
        try:
            result["value"] = fastnig.attribute(model, pairs, tokenizer=tokenizer, **options)
        except BaseException as exc:  # reported by the test
            result["error"] = exc
        finally:
            handle.remove()

    thread = threading.Thread(target=attributor, name="attributor", daemon=True)
    thread.start()
    assert paused.wait(60), "the attributing thread never reached the model"
    return thread, resume, result


def _finish(thread, resume, result):
    resume.set()
    thread.join(60)
    assert not thread.is_alive()
    if "error" in result:
        raise AssertionError(f"attribute in the other thread failed: {result['error']!r}") from result["error"]
    return result["value"]


def test_a_grad_enabled_forward_backward_in_another_thread_meanwhile(tokenizer):
    """While one thread is inside ``attribute`` (paused mid-forward, its hooks installed), another
    trains-style forward + backward of the same model: its parameter gradients are exact (no
    parameter lost ``requires_grad``, no hook of the attribution touched its forward), and the
    attribution equals one made alone."""
    model = make_model("bert", vocab_size=tokenizer.vocab_size, seed=11)
    options = dict(steps=4, pair_batch=2, progress=False)
    reference = fastnig.attribute(model, PAIRS[:2], tokenizer=tokenizer, **options)
    enc = tokenizer([q for q, _ in PAIRS[:2]], [p for _, p in PAIRS[:2]], return_tensors="pt", padding=True)

    def gradients():
        model.zero_grad(set_to_none=True)
        model(**enc).logits.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return grads

    expected = gradients()
    thread, resume, result = _paused_attribution(model, tokenizer, PAIRS[:2], options)
    try:
        got = gradients()
    finally:
        attributed = _finish(thread, resume, result)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, msg=_named(name))
    _assert_equal_runs(attributed, reference)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_two_attributions_of_one_model_in_two_threads(tokenizer):
    """One ``attribute`` paused mid-forward while another runs from start to end on the same model:
    both equal runs made alone, and the parameters keep ``requires_grad``."""
    model = make_model("bert", vocab_size=tokenizer.vocab_size, seed=12)
    options = dict(steps=4, pair_batch=2, progress=False)
    first = fastnig.attribute(model, PAIRS[:2], tokenizer=tokenizer, **options)
    second = fastnig.attribute(model, PAIRS[2:], tokenizer=tokenizer, rule="trapezoid", **options)
    thread, resume, result = _paused_attribution(model, tokenizer, PAIRS[:2], options)
    try:
        meanwhile = fastnig.attribute(model, PAIRS[2:], tokenizer=tokenizer, rule="trapezoid", **options)
    finally:
        attributed = _finish(thread, resume, result)
    _assert_equal_runs(meanwhile, second)
    _assert_equal_runs(attributed, first)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_a_second_out_of_memory_at_every_position_of_the_redo(tiny_bert, tokenizer, monkeypatch, one_thread):
    """An OOM at the first backward accumulation of the last chunk (points 6-8: halved to 2, the carries
    replayed from the even point 4, points 4 and 5), then a second one at every later position (the
    replay's forward and backward, the redone chunks'): each run equals the unchunked run, or, where
    the second lands in a chunk of one point, ends in the clear ``MemoryError``."""
    options = dict(tokenizer=tokenizer, rule="richardson", segments=True, pair_batch=2, steps=8, progress=False)
    reference = fastnig.attribute(tiny_bert, SWEEP_PAIRS, step_batch=9, **options)
    monkeypatch.setattr(attribution, "release_memory", lambda device: None)
    positions = Positions(monkeypatch)
    fastnig.attribute(tiny_bert, SWEEP_PAIRS, step_batch=4, **options)
    first = positions.events.index(("backward", 6, 3)) + 1
    _quiet(fastnig.attribute, tiny_bert, SWEEP_PAIRS, step_batch=4, **options)
    positions.arm(first)
    _quiet(fastnig.attribute, tiny_bert, SWEEP_PAIRS, step_batch=4, **options)
    events = list(positions.events)
    assert events[first] == ("forward", 4, 2)  # the replay
    for k in range(first + 1, len(events) + 1):
        positions.arm(first, k)
        where = f"second OOM at position {k} of {len(events)} ({events[k - 1]})"
        if events[k - 1][2] == 1:  # a chunk of one point cannot be halved
            with pytest.raises(MemoryError, match="even with one path point per forward"):
                _quiet(fastnig.attribute, tiny_bert, SWEEP_PAIRS, step_batch=4, **options)
            continue
        try:
            result = _quiet(fastnig.attribute, tiny_bert, SWEEP_PAIRS, step_batch=4, **options)
            _assert_equal_runs(result, reference)
        except Exception as exc:
            raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc
    positions.arm()


def test_a_switch_to_training_mode_meanwhile_is_an_error(tokenizer):
    """Eval mode is the one global state ``attribute`` needs (PyTorch keeps one ``training`` flag per
    module): another thread that switches the model to training mode meanwhile gets it a clear error,
    not attributions with dropout."""
    model = make_model("bert", vocab_size=tokenizer.vocab_size, seed=13)
    thread, resume, result = _paused_attribution(model, tokenizer, PAIRS[:2], dict(steps=4, progress=False))
    model.train()
    try:
        with pytest.raises(AssertionError, match="switched to training mode"):
            _finish(thread, resume, result)
        assert all(m.training for m in model.modules())  # the other thread's switch stands
    finally:
        model.eval()
    assert all(p.requires_grad for p in model.parameters())
