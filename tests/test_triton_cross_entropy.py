"""Triton backend of fused_linear_cross_entropy, run by the Triton interpreter on CPU.

The row kernel (pyengine.kernels.cross_entropy.ce_rows) is checked against the C++ row
kernel on identical logits, and the whole op (backend="triton") against the fp64
reference: its error must stay within ~2x plain PyTorch's error in the same dtype.
Shapes are small because the interpreter runs every tile in Python.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from pyengine import _ext  # noqa: E402
from pyengine.ops.cross_entropy import (  # noqa: E402
    _cpu_rows, fused_linear_cross_entropy, reference_linear_cross_entropy)

triton_ce = pytest.importorskip("pyengine.kernels.cross_entropy")
needs_cpu_ext = pytest.mark.skipif(_ext._C is None, reason="C++ extension not built")

ROW_OPTS = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, scale=0.37)


def _random_logits(n, vocab, dtype, gen, row_stride=None):
    """[n, vocab] logits with spread ~4, stored in a wider buffer when row_stride > vocab."""
    buf = torch.randn(n, row_stride or vocab, generator=gen).mul_(4).to(dtype)
    return buf, buf[:, :vocab]


def _rows_both(logits, target, row_scale, softcap, write_grad):
    """Run the Triton and the C++ row kernel on copies of the same logits, each on rows of
    its own copy of logits' whole buffer (a [:, :V] view keeps the row stride)."""
    out = {}
    for name, kernel in (("triton", triton_ce.ce_rows), ("cpu", _cpu_rows)):
        base = logits.as_strided((logits.shape[0], logits.stride(0)), (logits.stride(0), 1))
        buf = base.clone()
        x = buf[:, :logits.shape[1]]
        assert x.stride() == logits.stride()
        loss = torch.full((x.shape[0],), float("nan"))
        kernel(x, target, loss, softcap=softcap, row_scale=row_scale, write_grad=write_grad,
               **ROW_OPTS)
        out[name] = (x, loss, buf)
    return out


def _rows_reference(logits, target, row_scale, softcap):
    """fp64 per-row losses and d(sum_i s_i loss_i)/d logits from the op's spec (identity
    weight), s_i = scale * row_scale[i]."""
    z = logits.double().requires_grad_()
    eye = torch.eye(z.shape[1], dtype=torch.float64)
    opts = {k: ROW_OPTS[k] for k in ("ignore_index", "label_smoothing", "z_loss")}
    loss = reference_linear_cross_entropy(z, eye, target, softcap=softcap or None,
                                          reduction="none", **opts)
    s = ROW_OPTS["scale"] * (1.0 if row_scale is None else row_scale.double())
    (loss * s).sum().backward()
    return loss.detach(), z.grad


def _ulp(dtype):
    return {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]


@needs_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize("vocab,block", [(123, None), (1000, 256)])
def test_ce_rows_strided_match_reference(dtype, softcap, vocab, block, monkeypatch):
    """Both row kernels on rows with stride V + 7: loss and gradient per element against
    fp64 (math in fp32, one rounding to the logits dtype), the 7 extra columns untouched
    (each kernel writes into its own copy of the buffer)."""
    if block:
        monkeypatch.setattr(triton_ce, "MAX_BLOCK", block)
    gen = torch.Generator().manual_seed(vocab + int(softcap))
    n = 6
    buf, logits = _random_logits(n, vocab, dtype, gen, row_stride=vocab + 7)
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[1] = ROW_OPTS["ignore_index"]
    row_scale = torch.rand(n, generator=gen) + 0.5
    want_loss, want_grad = _rows_reference(logits, target, row_scale, softcap)
    for name, (grad, loss, out_buf) in _rows_both(logits, target, row_scale, softcap,
                                                  write_grad=True).items():
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5, msg=name)
        # one rounding to nearest (C++); the Triton interpreter casts toward zero: one ulp
        roundings = 2 if name == "triton" else 1
        tol = roundings * _ulp(dtype) * want_grad.abs() + 1e-6 * want_grad.abs().max()
        err = (grad.double() - want_grad).abs()
        assert bool((err <= tol).all()), (name, (err - tol).max().item())
        assert loss[1] == 0 and bool((grad[1] == 0).all()), name
        assert torch.equal(out_buf[:, vocab:], buf[:, vocab:]), name


@needs_cpu_ext
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 4), vocab=st.integers(1, 300), log2_block=st.integers(4, 8),
       softcap=st.sampled_from([0.0, 1.5, 30.0]), write_grad=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_ce_rows_any_vocab_and_block(n, vocab, log2_block, softcap, write_grad, seed):
    gen = torch.Generator().manual_seed(seed)
    _, logits = _random_logits(n, vocab, torch.float32, gen)
    target = torch.randint(0, vocab, (n,), generator=gen)
    saved = triton_ce.MAX_BLOCK
    triton_ce.MAX_BLOCK = 2 ** log2_block
    try:
        got = _rows_both(logits, target, None, softcap, write_grad)
    finally:
        triton_ce.MAX_BLOCK = saved
    (g_tri, l_tri, _), (g_cpu, l_cpu, _) = got["triton"], got["cpu"]
    torch.testing.assert_close(l_tri, l_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_tri, g_cpu, rtol=1e-5, atol=1e-6)
    if not write_grad:
        assert torch.equal(g_tri, logits)


def test_ce_rows_rejects_bad_input():
    logits, loss = torch.randn(3, 10), torch.empty(3)
    kw = dict(ROW_OPTS, softcap=0.0, row_scale=None, write_grad=True)
    with pytest.raises(ValueError, match="target must be contiguous"):
        triton_ce.ce_rows(logits, torch.zeros(3, dtype=torch.int32), loss, **kw)
    with pytest.raises(ValueError, match="inner dim must be contiguous"):
        triton_ce.ce_rows(torch.randn(10, 3).t(), torch.zeros(3, dtype=torch.long), loss, **kw)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        triton_ce.ce_rows(logits.double(), torch.zeros(3, dtype=torch.long), loss, **kw)
    with pytest.raises(ValueError, match="row_scale must be contiguous"):
        triton_ce.ce_rows(logits, torch.zeros(3, dtype=torch.long), loss,
                          **dict(kw, row_scale=torch.ones(4)))


# --------------------------------------------------------------------------- whole op
def _problem(n, hidden_size, vocab, dtype, seed, ignore_index=-100, ignored=(3, 10)):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * (2.0 / hidden_size ** 0.5)
    bias = torch.randn(vocab, generator=gen) * 0.5
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[[i for i in ignored if i < n]] = ignore_index
    grad_out = torch.rand(n, generator=gen) + 0.5  # for reduction="none"
    return [t.to(dtype) for t in (hidden, weight, bias)], target, grad_out


def _loss_and_grads(fn, hidden, weight, bias, target, grad_out, opts):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], target, bias=leaves[2], **opts)
    weighted = loss * grad_out.to(loss.dtype) if opts["reduction"] == "none" else loss
    weighted.sum().backward()
    return [loss.detach().double()] + [t.grad.double() for t in leaves]


def _triton(hidden, weight, target, **kw):
    return fused_linear_cross_entropy(hidden, weight, target, backend="triton", **kw)


def _assert_like_reference(dtype, tensors, target, grad_out, opts):
    """Triton's error vs the fp64 reference <= 2x plain PyTorch's error in `dtype`."""
    exact = _loss_and_grads(reference_linear_cross_entropy, *[t.double() for t in tensors],
                            target, grad_out, opts)
    plain = _loss_and_grads(reference_linear_cross_entropy, *tensors, target, grad_out, opts)
    ours = _loss_and_grads(_triton, *tensors, target, grad_out, opts)
    floor = _ulp(dtype)  # one rounding of the result, for when plain happens to be exact
    for name, e, p, o in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), exact, plain,
                             ours):
        assert o.shape == e.shape, name
        assert torch.isfinite(o).all(), name
        size = e.abs().max().item() + 1e-30
        err_ours = (o - e).abs().max().item() / size
        err_plain = (p - e).abs().max().item() / size
        assert err_ours <= 2 * err_plain + floor, (name, err_ours, err_plain)


CASES = {
    "mean": dict(reduction="mean"),
    "sum_smoothing": dict(reduction="sum", label_smoothing=0.1),
    "mean_zloss_num_items": dict(reduction="mean", z_loss=1e-3, num_items=70),
    "none_softcap": dict(reduction="none", softcap=3.0),
    "none_everything": dict(reduction="none", label_smoothing=0.2, z_loss=1e-2, softcap=2.0),
    "ignore_index_is_a_class": dict(reduction="mean", ignore_index=5, label_smoothing=0.05),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_reference(dtype, case):
    opts = dict(CASES[case])
    opts.setdefault("ignore_index", -100)
    tensors, target, grad_out = _problem(47, 31, 123, dtype, seed=len(case),
                                         ignore_index=opts["ignore_index"])
    _assert_like_reference(dtype, tensors, target, grad_out, opts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_vocab_spans_many_blocks(dtype, monkeypatch):
    monkeypatch.setattr(triton_ce, "MAX_BLOCK", 256)  # V=1000: three full tiles + a ragged one
    opts = dict(reduction="mean", ignore_index=-100, label_smoothing=0.1, z_loss=1e-3,
                softcap=4.0)
    tensors, target, grad_out = _problem(9, 24, 1000, dtype, seed=7)
    _assert_like_reference(dtype, tensors, target, grad_out, opts)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_op_all_rows_ignored(reduction):
    """All targets ignored: loss 0 and zero grads of the inputs' shapes (DESIGN.md)."""
    tensors, target, grad_out = _problem(5, 8, 37, torch.float32, seed=3)
    target[:] = -100
    opts = dict(reduction=reduction, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3)
    loss, *grads = _loss_and_grads(_triton, *tensors, target, grad_out, opts)
    assert torch.equal(loss, torch.zeros((5,) if reduction == "none" else (), dtype=torch.float64))
    for g, t in zip(grads, tensors):
        assert torch.equal(g, torch.zeros_like(t, dtype=torch.float64))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_op_one_row_not_ignored(reduction):
    """One live row among ignored ones: the reference's non-zero loss and grads, and the
    ignored rows exactly 0."""
    tensors, target, grad_out = _problem(5, 8, 37, torch.float32, seed=3, ignored=())
    target[[0, 1, 3, 4]] = -100
    opts = dict(reduction=reduction, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3)
    ours = _loss_and_grads(_triton, *tensors, target, grad_out, opts)
    exact = _loss_and_grads(reference_linear_cross_entropy, *[t.double() for t in tensors],
                            target, grad_out, opts)
    for o, e in zip(ours, exact):
        assert bool((e != 0).any())
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-6)
    assert torch.equal(ours[1][[0, 1, 3, 4]], torch.zeros(4, 8, dtype=torch.float64))


def test_op_gradient_accumulation_with_num_items():
    """Two halves with num_items = total give the loss and grads of the full batch."""
    tensors, target, grad_out = _problem(20, 16, 53, torch.float32, seed=11)
    total = int((target != -100).sum())
    opts = dict(reduction="mean", ignore_index=-100)
    full = _loss_and_grads(_triton, *tensors, target, grad_out, opts)
    halves = [_loss_and_grads(_triton, tensors[0][sl], tensors[1], tensors[2], target[sl],
                              grad_out[sl], dict(opts, num_items=total))
              for sl in (slice(0, 9), slice(9, 20))]
    torch.testing.assert_close(halves[0][0] + halves[1][0], full[0])
    torch.testing.assert_close(torch.cat([halves[0][1], halves[1][1]]), full[1])
    for k in (2, 3):
        torch.testing.assert_close(halves[0][k] + halves[1][k], full[k])


@needs_cpu_ext
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_op_filter_matches_cpu_filter(reduction, monkeypatch):
    """filter_eps on the triton backend (torch column selection and scatter) keeps the same
    columns as the cpu backend's C++ ones: grads equal within fp32 noise, loss bit for bit;
    blocks of 8 rows with a ragged one, ignored rows, and with eps 0.02 most entries
    dropped (the filtered grads differ from exact far beyond that noise)."""
    from pyengine.ops import cross_entropy
    monkeypatch.setattr(cross_entropy, "FILTER_ROWS", 8)
    tensors, target, grad_out = _problem(21, 16, 150, torch.float32, seed=5)
    opts = dict(reduction=reduction, ignore_index=-100, filter_eps=0.02)
    tri = _loss_and_grads(_triton, *tensors, target, grad_out, opts)
    cpu = _loss_and_grads(lambda *a, **k: fused_linear_cross_entropy(*a, backend="cpu", **k),
                          *tensors, target, grad_out, opts)
    exact = _loss_and_grads(_triton, *tensors, target, grad_out, dict(opts, filter_eps=None))
    torch.testing.assert_close(tri[0], cpu[0], rtol=1e-6, atol=1e-7)
    for t, c, e in zip(tri[1:], cpu[1:], exact[1:]):
        torch.testing.assert_close(t, c, rtol=1e-5, atol=1e-6)
    assert (tri[1] - exact[1]).abs().max() > 1e-3
