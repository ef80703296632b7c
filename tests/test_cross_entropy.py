"""fused_linear_cross_entropy (cpu backend) against the fp64 plain-PyTorch reference."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import pyengine
from pyengine import _ext
from pyengine.ops import fused_linear_cross_entropy, reference_linear_cross_entropy
from tests.conftest import (UNIT_ROUNDOFF, assert_within_torch_error, num_threads, repeat_equal,
                            requires_ext)

pytestmark = requires_ext
OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 4.0},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"num_items": 100},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 2.5, "reduction": "none"},
]
SHAPES = [(47, 31, 123), (1, 8, 5), (130, 64, 1000)]


def make_inputs(n, h, v, dtype, bias=True, ignore_every=5):
    hidden = torch.randn(n, h).to(dtype)
    weight = (torch.randn(v, h) / h**0.5).to(dtype)
    b = torch.randn(v).to(dtype) if bias else None
    target = torch.randint(0, v, (n,))
    if ignore_every:  # rows k-1, 2k-1, ...: a single row (n = 1) stays live
        target[ignore_every - 1::ignore_every] = -100
    return hidden, weight, target, b


def loss_and_grads(fn, hidden, weight, target, bias, grad_seed=0, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    b = leaves[2] if bias is not None else None
    loss = fn(leaves[0], leaves[1], target, bias=b, **kw)
    g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(grad_seed)).to(loss.dtype)
    (loss * g).sum().backward()
    return [loss.detach()] + [t.grad for t in leaves]


def ref(hidden, weight, target, bias=None, **kw):
    return reference_linear_cross_entropy(hidden, weight, target, bias, **kw)


def max_err(xs, ys):
    return [(x.double() - y.double()).abs().max().item() for x, y in zip(xs, ys)]


def exact_inputs(inputs):
    return [t.double() if t is not None and t.is_floating_point() else t for t in inputs]


NAMES = ("loss", "d_hidden", "d_weight", "d_bias")


def assert_like_torch(inputs, dtype, fn=fused_linear_cross_entropy, **opts):
    """ours vs fp64 per element, within 2x plain torch's error in `dtype` (+ one rounding)."""
    exact = loss_and_grads(ref, *exact_inputs(inputs), **opts)
    plain = loss_and_grads(ref, *inputs, **opts)
    ours = loss_and_grads(fn, *inputs, backend="cpu", **opts)
    for name, o, p, e in zip(NAMES, ours, plain, exact):
        assert_within_torch_error(name, o, p, e, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_fp64_reference(shape, opts, dtype):
    assert_like_torch(make_inputs(*shape, dtype), dtype, **opts)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tolerance_rule_rejects_a_10_percent_error(reduction, dtype):
    """The rule of test_matches_fp64_reference is tight enough: ours with any one output
    (loss, d_hidden, d_weight, d_bias) scaled by 0.9 or 0.75 fails it."""
    inputs = make_inputs(47, 31, 123, dtype)
    opts = dict(reduction=reduction, label_smoothing=0.1)
    exact = loss_and_grads(ref, *exact_inputs(inputs), **opts)
    plain = loss_and_grads(ref, *inputs, **opts)
    ours = loss_and_grads(fused_linear_cross_entropy, *inputs, backend="cpu", **opts)
    for name, o, p, e in zip(NAMES, ours, plain, exact):
        assert_within_torch_error(name, o, p, e, dtype)
        for factor in (0.9, 0.75):
            with pytest.raises(AssertionError):
                assert_within_torch_error(name, o.double() * factor, p, e, dtype)


def test_bf16_grad_weight_across_vocab_blocks(monkeypatch):
    """bf16 grad_W is accumulated in fp32 per GW_BLOCK vocab rows and per chunk of tokens:
    V = 2 blocks + a ragged tail, 3 token chunks (the last ragged), every element checked."""
    from pyengine.ops import cross_entropy
    vocab = 2 * cross_entropy.GW_BLOCK + 123
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 7 * vocab * 2)  # 7 bf16 rows per chunk
    for opts in ({}, {"reduction": "sum", "z_loss": 1e-3}, {"reduction": "none"}):
        assert_like_torch(make_inputs(17, 16, vocab, torch.bfloat16), torch.bfloat16, **opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_on_several_threads(dtype, threads):
    """Same inputs and thread count -> same bits, forward and backward (grad_W included:
    bf16 takes the C++ fp32 accumulation across vocab blocks)."""
    from pyengine.ops.cross_entropy import GW_BLOCK
    inputs = make_inputs(200, 32, GW_BLOCK + 300, dtype)
    repeat_equal(lambda: loss_and_grads(fused_linear_cross_entropy, *inputs, backend="cpu",
                                        label_smoothing=0.1), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_row_kernels_equal_on_any_thread_count(dtype):
    """The C++ halves (row kernel, fp32 accumulation) give the same bits on 1, 2 and 3
    threads (torch's own GEMMs around them need not)."""
    from pyengine.ops.cross_entropy import _accumulate_f32, _cpu_rows
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(301, 777, generator=gen) * 4).to(dtype)
    target = torch.randint(0, 777, (301,), generator=gen)
    target[::7] = -100
    part = torch.randn(100003, generator=gen).to(dtype)
    acc0 = torch.randn(100003, generator=gen)

    def once():
        g, loss, acc = logits.clone(), torch.empty(301), acc0.clone()
        _cpu_rows(g, target, loss, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3,
                  softcap=5.0, scale=0.3, row_scale=None, write_grad=True)
        _accumulate_f32(acc, part)
        return g, loss, acc
    results = []
    for n in (1, 2, 3):
        with num_threads(n):
            results.append(once())
    for n, got in zip((2, 3), results[1:]):
        for a, b in zip(got, results[0]):
            assert torch.equal(a, b), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_row_kernel_strided_rows(dtype):
    """Rows of a wider buffer (row stride > V): same losses and gradient bits as the same
    rows packed contiguously, and the columns past V are left untouched."""
    from pyengine.ops.cross_entropy import _cpu_rows
    gen = torch.Generator().manual_seed(6)
    n, vocab, pad = 37, 301, 19
    wide = (torch.randn(n, vocab + pad, generator=gen) * 4).to(dtype)
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[::5] = -100
    packed, strided = wide[:, :vocab].clone(), wide.clone()
    opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, scale=0.3,
                row_scale=torch.rand(n, generator=gen), write_grad=True)
    loss_packed, loss_strided = torch.empty(n), torch.empty(n)
    _cpu_rows(packed, target, loss_packed, **opts)
    _cpu_rows(strided[:, :vocab], target, loss_strided, **opts)
    assert torch.equal(loss_strided, loss_packed)
    assert torch.equal(strided[:, :vocab], packed)
    assert torch.equal(strided[:, vocab:], wide[:, vocab:])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_fp64(reduction):
    h, w, t, b = make_inputs(7, 5, 11, torch.float64, ignore_every=3)
    for kw in ({}, {"label_smoothing": 0.2, "z_loss": 0.01, "softcap": 3.0}):
        assert torch.autograd.gradcheck(
            lambda h, w, b: fused_linear_cross_entropy(h, w, t, bias=b, reduction=reduction,
                                                       backend="cpu", **kw),
            tuple(x.requires_grad_() for x in (h, w, b)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_gives_zero_loss_and_grads(reduction):
    """DESIGN.md: all targets ignored -> loss 0 and zero grads (mean: denominator 1)."""
    h, w, t, b = make_inputs(9, 16, 33, torch.float32)
    t[:] = -100
    loss, gh, gw, gb = loss_and_grads(fused_linear_cross_entropy, h, w, t, b, reduction=reduction,
                                      backend="cpu")
    assert loss.shape == ((9,) if reduction == "none" else ())
    for x, like in ((loss, loss), (gh, h), (gw, w), (gb, b)):
        assert torch.equal(x, torch.zeros_like(like))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_row_not_ignored_gives_only_its_loss_and_grads(reduction):
    """The counterpart of the case above: one live row among ignored ones carries exactly
    the reference's non-zero loss and gradients, and every other row stays exactly 0."""
    h, w, t, b = make_inputs(9, 16, 33, torch.float32, ignore_every=0)
    t[torch.arange(9) != 4] = -100
    ours = loss_and_grads(fused_linear_cross_entropy, h, w, t, b, reduction=reduction,
                          backend="cpu")
    exact = loss_and_grads(ref, *exact_inputs((h, w, t, b)), reduction=reduction)
    for name, o, e in zip(NAMES, ours, exact):
        assert bool((e != 0).any()), name
        torch.testing.assert_close(o.double(), e, rtol=1e-5, atol=1e-6, msg=name)
    others = torch.arange(9) != 4
    assert torch.equal(ours[1][others], torch.zeros(8, 16))
    if reduction == "none":
        assert torch.equal(ours[0][others], torch.zeros(8))


def test_reference_is_torch_cross_entropy():
    """The spec (which the other tests trust) against torch's own loss: a custom
    ignore_index and label smoothing, every reduction."""
    h, w, t, b = make_inputs(30, 16, 40, torch.float64, ignore_every=0)
    t[::3] = 7
    logits = torch.nn.functional.linear(h, w, b)
    for reduction in ("mean", "sum", "none"):
        kw = dict(ignore_index=7, label_smoothing=0.1, reduction=reduction)
        torch.testing.assert_close(ref(h, w, t, b, **kw),
                                   torch.nn.functional.cross_entropy(logits, t, **kw))


def test_custom_ignore_index_and_3d_inputs():
    h, w, t, b = make_inputs(24, 16, 40, torch.float32, ignore_every=0)
    t[::4] = 7  # ignore a real class id
    kw = dict(ignore_index=7)
    ours = fused_linear_cross_entropy(h.view(2, 3, 4, 16), w, t.view(2, 3, 4), bias=b,
                                      reduction="none", backend="cpu", **kw)
    assert ours.shape == (2, 3, 4)
    torch.testing.assert_close(ours.view(-1), ref(h, w, t, b, reduction="none", **kw))


def test_gradient_accumulation_with_num_items_equals_full_batch():
    h, w, t, _ = make_inputs(64, 32, 77, torch.float32, ignore_every=3)
    full = loss_and_grads(fused_linear_cross_entropy, h, w, t, None, backend="cpu")
    total = int((t != -100).sum())
    halves = [loss_and_grads(fused_linear_cross_entropy, h[s], w, t[s], None, num_items=total,
                             backend="cpu") for s in (slice(0, 30), slice(30, 64))]
    torch.testing.assert_close(halves[0][0] + halves[1][0], full[0])
    torch.testing.assert_close(halves[0][2] + halves[1][2], full[2])  # d_weight sums
    torch.testing.assert_close(torch.cat([halves[0][1], halves[1][1]]), full[1])


def test_frozen_weight_gets_no_grad_and_no_grad_mode_returns_loss():
    h, w, t, _ = make_inputs(20, 16, 50, torch.float32)
    hr = h.clone().requires_grad_()
    fused_linear_cross_entropy(hr, w, t, backend="cpu").backward()
    assert w.grad is None and hr.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, t, backend="cpu"),
                                   ref(h, w, t))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bf16_grad_output_scales_in_fp32(reduction):
    """backward(c) scales the bf16 grads by c in fp32 with one rounding, not by a
    bf16-rounded c (0.4% off for c = 1/3)."""
    h, w, t, b = make_inputs(20, 16, 50, torch.bfloat16)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    one = torch.autograd.grad(fused_linear_cross_entropy(*leaves[:2], t, bias=leaves[2],
                                                         reduction=reduction, backend="cpu"),
                              leaves)
    c = torch.tensor(1 / 3)
    third = torch.autograd.grad(fused_linear_cross_entropy(*leaves[:2], t, bias=leaves[2],
                                                           reduction=reduction, backend="cpu"),
                                leaves, grad_outputs=c)
    for g1, gc in zip(one, third):
        assert torch.equal(gc, (g1.float() * c).bfloat16())


def test_does_not_modify_inputs():
    h, w, t, b = make_inputs(20, 16, 50, torch.float32)
    copies = [x.clone() for x in (h, w, t, b)]
    loss_and_grads(fused_linear_cross_entropy, h, w, t, b, backend="cpu")
    for x, c in zip((h, w, t, b), copies):
        assert torch.equal(x, c)


def test_retain_graph_backward_twice_is_consistent():
    h, w, t, _ = make_inputs(20, 16, 50, torch.float32)
    h.requires_grad_()
    loss = fused_linear_cross_entropy(h, w, t, backend="cpu")
    (g1,) = torch.autograd.grad(loss, h, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 3, h)
    torch.testing.assert_close(g2, 3 * g1)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_isa_variants_agree_with_scalar(isa, dtype, threads):
    levels = ["scalar", "avx2", "avx512"]
    if levels.index(_ext._C.best_isa()) < levels.index(isa):
        pytest.skip(f"CPU lacks {isa}")
    h, w, t, b = make_inputs(33, 24, 517, dtype)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0, backend="cpu")
    try:
        _ext._C.set_isa_cap("scalar")
        scalar = loss_and_grads(fused_linear_cross_entropy, h, w, t, b, **kw)
        _ext._C.set_isa_cap(isa)
        vector = loss_and_grads(fused_linear_cross_entropy, h, w, t, b, **kw)
    finally:
        _ext._C.set_isa_cap("avx512")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for s, v in zip(scalar, vector):
        torch.testing.assert_close(v.float(), s.float(), rtol=tol, atol=tol)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(1, 40), h=st.integers(1, 24), v=st.integers(2, 200),
       ignored=st.sampled_from(["none", "all", "some", "all_but_one"]),
       smoothing=st.sampled_from([0.0, 0.2]), z_loss=st.sampled_from([0.0, 1e-2]),
       softcap=st.sampled_from([None, 2.0]), reduction=st.sampled_from(["mean", "sum", "none"]),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       num_items=st.sampled_from([None, 37]), ignore_index=st.sampled_from([-100, 1]),
       seed=st.integers(0, 2 ** 16))
def test_fuzz_every_option(n, h, v, ignored, smoothing, z_loss, softcap, reduction, bias, dtype,
                           num_items, ignore_index, seed):
    """Every option of the op at once, each output element against fp64 within 2x torch's
    own error in the same dtype."""
    torch.manual_seed(seed)
    inputs = make_inputs(n, h, v, dtype, bias=bias, ignore_every=0)
    target = inputs[2]
    target[target == ignore_index] = 0  # 1 is a class id: ignored only where set below
    if ignored == "some":
        target[torch.rand(n) < 0.3] = ignore_index
    elif ignored != "none":
        target[1 if ignored == "all_but_one" and n > 1 else 0:] = ignore_index
    assert_like_torch(inputs, dtype, label_smoothing=smoothing, z_loss=z_loss, softcap=softcap,
                      reduction=reduction, num_items=num_items, ignore_index=ignore_index)


def test_small_chunks_cover_every_row(monkeypatch):
    from pyengine.ops import cross_entropy
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 3 * 4 * 100)  # 3 rows per chunk
    inputs = make_inputs(11, 8, 100, torch.float32)
    ours = loss_and_grads(fused_linear_cross_entropy, *inputs, backend="cpu")
    for o, e in zip(ours, loss_and_grads(ref, *inputs)):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-6)


def test_opcheck():
    h, w, t, b = make_inputs(10, 8, 30, torch.float32)
    op = torch.ops.pyengine.linear_cross_entropy.default
    for reduction in ("mean", "none"):
        for filter_eps in (None, 1e-3):
            args = (h.requires_grad_(), w.requires_grad_(), t, b.requires_grad_(), -100, 0.1,
                    1e-3, 0.0, reduction, 0.0, "cpu", True, True, True, filter_eps)
            torch.library.opcheck(op, args)


def test_torch_compile_model_runs():
    lm_head = torch.nn.Linear(16, 40, bias=False)
    loss_fn = pyengine.nn.FusedLinearCrossEntropyLoss(backend="cpu")
    h, _, t, _ = make_inputs(12, 16, 40, torch.float32)
    h.requires_grad_()

    def step(h, t):
        return loss_fn(torch.tanh(h), lm_head.weight, t)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(h, t)
    loss.backward()
    expected = ref(torch.tanh(h.detach()), lm_head.weight.detach(), t)
    torch.testing.assert_close(loss.detach(), expected)
    assert lm_head.weight.grad is not None and h.grad is not None


@pytest.mark.parametrize("bad, match", [
    (lambda h, w, t, b: (h[:, :-1], w, t, b), "does not end in H"),
    (lambda h, w, t, b: (h, w, t[:-1], b), "target shape"),
    (lambda h, w, t, b: (h, w, t.float(), b), "integer"),
    (lambda h, w, t, b: (h, w.double(), t, b), "weight dtype"),
    (lambda h, w, t, b: (h, w, t, b[:-1]), "bias must be"),
    (lambda h, w, t, b: (h.int(), w, t, b), "not supported"),
    (lambda h, w, t, b: (h, w, t.clamp_min(0) + 1000, b), r"target\[0\] = 10"),
])
def test_bad_input_raises_clear_error(bad, match):
    h, w, t, b = bad(*make_inputs(6, 8, 20, torch.float32, ignore_every=0))
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear_cross_entropy(h, w, t, bias=b, backend="cpu")


@pytest.mark.parametrize("kw, match", [
    ({"reduction": "avg"}, "reduction"), ({"label_smoothing": 1.5}, "label_smoothing"),
    ({"softcap": -1.0}, "softcap"), ({"num_items": 0}, "num_items"),
    ({"backend": "gpu"}, "not implemented"),
])
def test_bad_options_raise(kw, match):
    h, w, t, b = make_inputs(6, 8, 20, torch.float32)
    with pytest.raises((ValueError, RuntimeError), match=match):
        fused_linear_cross_entropy(h, w, t, **kw)


def test_backends_report_and_env_selection(monkeypatch):
    report = pyengine.backends()["fused_linear_cross_entropy"]
    assert report["ref"] == "available" and report["cpu"] == "available"
    monkeypatch.setenv("PYENGINE_BACKEND", "ref")
    h, w, t, _ = make_inputs(6, 8, 20, torch.float32)
    torch.testing.assert_close(fused_linear_cross_entropy(h, w, t), ref(h, w, t))


# ------------------------------------------------------------------ gradient filtering
def peaked_inputs(n, h, v, dtype):
    """Every third live row's hidden points at its target's weight row (softmax p_t > 0.99,
    so its target gradient is below any eps >= 0.01), the others are spread; every 5th row
    ignored; no bias."""
    hidden, weight, target, _ = make_inputs(n, h, v, torch.float32, bias=False)
    peaked = torch.zeros(n, dtype=torch.bool)
    peaked[::3] = True
    peaked &= target != -100
    hidden[peaked] += 12 * h**0.5 * weight[target[peaked]] / weight[target[peaked]].norm(dim=1,
                                                                                   keepdim=True)
    return hidden.to(dtype), weight.to(dtype), target, None


def filter_spec(hidden, weight, target, eps, block, row_scale):
    """The filter's definition in fp64: G = d(sum_i s_i loss_i)/d logits; per block of
    `block` rows keep the columns where some row has |G_ij| > eps * (smallest live |s_i| of
    the block), plus the block's live targets; grads from G restricted to those columns.
    Returns (grad_hidden, grad_weight, fraction of G's entries dropped)."""
    h, w = hidden.double(), weight.double()
    logits = (h @ w.t()).requires_grad_()
    loss = reference_linear_cross_entropy(logits, torch.eye(w.shape[0], dtype=torch.float64),
                                          target, reduction="none")
    (loss * row_scale).sum().backward()
    g = logits.grad
    keep = torch.zeros_like(g, dtype=torch.bool)
    for s in range(0, g.shape[0], block):
        rows, t = slice(s, s + block), target[s:s + block]
        live = t != -100
        thr = eps * row_scale[rows][live].abs().min() if live.any() else 0.0
        cols = (g[rows].abs() > thr).any(0)
        cols[t[live]] = True
        keep[rows] = cols
    gm = g * keep
    return gm @ w, gm.t() @ h, 1 - keep.double().mean().item()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_filter_keeps_exactly_the_columns_it_defines(reduction, threads, monkeypatch):
    """fp32 filtered grads equal the fp64 spec (filter_spec) within fp32 noise, per block of
    8 rows (chunks of 16 rows, so blocks restart per chunk; a ragged last block), ignored
    rows, and peaked rows whose target gradient is below eps but kept; and the spec
    differs from exact grads far beyond that noise."""
    from pyengine.ops import cross_entropy
    monkeypatch.setattr(cross_entropy, "FILTER_ROWS", 8)
    monkeypatch.setattr(cross_entropy, "CHUNK_FRACTION", 1)
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", 16 * 203 * 4)
    hidden, weight, target, _ = peaked_inputs(37, 16, 203, torch.float32)
    live = (target != -100).double()
    if reduction == "none":
        row_scale = torch.randn(37, generator=torch.Generator().manual_seed(1)).double()
    else:
        row_scale = live / (live.sum() if reduction == "mean" else 1.0)
    eps = 0.01
    want_h, want_w, dropped = filter_spec(hidden, weight, target, eps, 8, row_scale)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, target, reduction=reduction, filter_eps=eps,
                                      backend="cpu")
    loss.backward(row_scale.float() if reduction == "none" else None)
    exact = filter_spec(hidden, weight, target, 0.0, 8, row_scale)
    for ours, want, full in ((h.grad, want_h, exact[0]), (w.grad, want_w, exact[1])):
        atol = 1e-6 * want.abs().max().item()  # fp32 noise of sums over rows / columns
        torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=atol)
        assert (full - want).abs().max() > 100 * atol
    assert 0.05 < dropped < 0.95


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_filter_eps_zero_equals_exact(opts, monkeypatch):
    """eps = 0 drops only exact zeros: fp32 grads equal the exact path's within fp32
    noise (4 blocks of 32 rows + a ragged one, bias and ignored rows), the loss bit for bit."""
    from pyengine.ops import cross_entropy
    monkeypatch.setattr(cross_entropy, "FILTER_ROWS", 32)
    inputs = make_inputs(130, 64, 1000, torch.float32)
    exact = loss_and_grads(fused_linear_cross_entropy, *inputs, backend="cpu", **opts)
    zero = loss_and_grads(fused_linear_cross_entropy, *inputs, backend="cpu", filter_eps=0.0,
                          **opts)
    assert torch.equal(zero[0], exact[0])
    for name, z, e in zip(NAMES[1:], zero[1:], exact[1:]):
        torch.testing.assert_close(z, e, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype, eps", [(torch.bfloat16, "auto"), (torch.float32, 1e-3)],
                         ids=str)
def test_filter_auto_loss_exact_grads_within_the_filter_bound(dtype, eps, monkeypatch):
    """The loss is never filtered (same bits as exact); each dropped entry moves grad_h[i]
    by at most eps |s_i| |W_j| and grad_W[j] by eps |s_i| |h_i|, so per element
    |filtered - exact| <= eps (|s| @ |W|) resp. eps (|s|.T @ |h|) + the dtype's noise.
    Blocks of 4 rows and logits of spread ~3 so that whole columns of a block drop."""
    from pyengine.ops import cross_entropy
    from pyengine.ops.cross_entropy import resolve_filter_eps
    monkeypatch.setattr(cross_entropy, "FILTER_ROWS", 4)
    hidden, weight, target, _ = peaked_inputs(300, 32, 2000, torch.float32)
    hidden, weight = hidden.to(dtype), (3 * weight).to(dtype)
    exact = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, None,
                           backend="cpu", reduction="sum")
    filt = loss_and_grads(fused_linear_cross_entropy, hidden, weight, target, None,
                          backend="cpu", reduction="sum", filter_eps=eps)
    assert torch.equal(filt[0], exact[0])
    e = resolve_filter_eps(eps, dtype)
    assert e == (2.0 ** -12 if eps == "auto" else eps)
    s = (target != -100).double() * abs(torch.randn((), generator=torch.Generator().manual_seed(0)).item())
    bound_h = e * s[:, None] * weight.double().abs().sum(0)[None, :]
    bound_w = e * (s[:, None] * hidden.double().abs()).sum(0)[None, :].expand(weight.shape)
    noise = 2 * UNIT_ROUNDOFF[dtype] if dtype == torch.bfloat16 else 1e-5
    for f, x, bound in ((filt[1], exact[1], bound_h), (filt[2], exact[2], bound_w)):
        err = (f.double() - x.double()).abs()
        assert bool((err <= bound + noise * (x.double().abs() + bound) + 1e-12).all())
        assert err.max() > 0  # something was filtered


def test_filter_deterministic_on_several_threads(threads):
    inputs = peaked_inputs(200, 32, 1500, torch.bfloat16)
    repeat_equal(lambda: loss_and_grads(fused_linear_cross_entropy, *inputs, backend="cpu",
                                        filter_eps="auto"), 3)


@pytest.mark.parametrize("filter_eps", [None, "auto"])
def test_autocast_computes_like_linear_under_autocast(filter_eps):
    """Inside torch.autocast(cpu, bf16) with fp32 hidden and weight the op runs in bf16
    (as F.linear would; "auto" follows: bf16's eps) and the CE in fp32: same bits as
    calling it on bf16 copies, grads flowing back to the fp32 leaves."""
    hidden, weight, target, bias = make_inputs(40, 16, 300, torch.float32)
    ac = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ac = fused_linear_cross_entropy(ac[0], ac[1], target, bias=ac[2],
                                             filter_eps=filter_eps, backend="cpu")
    loss_ac.backward()
    bf = [t.bfloat16().requires_grad_() for t in (hidden, weight, bias)]
    loss_bf = fused_linear_cross_entropy(bf[0], bf[1], target, bias=bf[2],
                                         filter_eps=filter_eps, backend="cpu")
    loss_bf.backward()
    assert loss_ac.dtype == torch.float32 and torch.equal(loss_ac, loss_bf)
    for a, b in zip(ac, bf):
        assert a.grad.dtype == torch.float32 and torch.equal(a.grad, b.grad.float())


@pytest.mark.parametrize("bad", [-0.1, 1.0, "high", True, float("nan")])
def test_bad_filter_eps_raises(bad):
    h, w, t, _ = make_inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="filter_eps must be None, 'auto' or a float in"):
        fused_linear_cross_entropy(h, w, t, filter_eps=bad)


def test_filter_module_passes_filter_eps():
    from pyengine.nn import FusedLinearCrossEntropyLoss
    inputs = peaked_inputs(50, 16, 400, torch.float32)
    module = FusedLinearCrossEntropyLoss(filter_eps=1e-2, backend="cpu")
    ours = loss_and_grads(lambda h, w, t, bias: module(h, w, t, bias), *inputs)
    want = loss_and_grads(fused_linear_cross_entropy, *inputs, backend="cpu", filter_eps=1e-2)
    for o, x in zip(ours, want):
        assert torch.equal(o, x)
    assert "filter_eps=0.01" in repr(module)


def test_training_loss_passes_ce_filter_eps(monkeypatch):
    """The finetune config's ce_filter_eps reaches the op through models.training_loss."""
    import transformers
    from pyengine import models, patching
    seen = []
    real = patching.fused_linear_cross_entropy
    monkeypatch.setattr(patching, "fused_linear_cross_entropy",
                        lambda *a, **kw: seen.append(kw["filter_eps"]) or real(*a, **kw))
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    for eps in ("auto", None):
        models.training_loss("causal-lm", model, batch, 10, torch.float32, eps).backward()
    assert seen == ["auto", None]


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_keep_columns_isa_variants_equal_scalar(isa, dtype, threads):
    """The filter's C++ column selection and row accumulation give the same bits on every
    ISA and thread count as the torch formulation: a strided [13, V] block (V = 3 strips
    of 1024 columns + a ragged tail), entries exactly at the threshold not kept, ignored
    rows' targets not forced."""
    from pyengine.ops.cross_entropy import _accumulate_rows, _keep_columns
    levels = ["scalar", "avx2", "avx512"]
    if levels.index(_ext._C.best_isa()) < levels.index(isa):
        pytest.skip(f"CPU lacks {isa}")
    gen = torch.Generator().manual_seed(3)
    vocab = 3 * 1024 + 77
    g = (torch.randn(13, vocab + 5, generator=gen) * 1e-3).to(dtype)[:, :vocab]
    thr = float(torch.tensor(2.5e-3).to(dtype))  # ~2.5 sigma: a few % of columns kept
    g[:, 100] = 0
    g[4, 100] = thr  # at the threshold: dropped (strictly above is kept)
    g[7, 2000] = -0.5
    target = torch.randint(0, vocab, (13,), generator=gen)
    target[2] = -100
    want = torch.cat([(g.float().abs() > thr).any(0).nonzero().squeeze(1),
                      target[target != -100]]).unique()
    assert 100 not in want.tolist() and 2000 in want.tolist()
    part = torch.randn(want.numel(), 9, generator=gen).to(dtype)
    acc0 = torch.randn(vocab, 9, generator=gen)
    try:
        _ext._C.set_isa_cap(isa)
        cols = _keep_columns(g, target, thr, -100, cpp=True)
        acc = acc0.clone()
        _accumulate_rows(acc, cols, part, cpp=True)
    finally:
        _ext._C.set_isa_cap("avx512")
    assert torch.equal(cols, want)
    assert torch.equal(acc, acc0.index_add(0, want, part.float()))
