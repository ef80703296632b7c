"""rms_norm / layer_norm (+ residual): every backend and ISA against an fp64 reference
within torch's own error, determinism over thread counts, gradcheck + opcheck, errors."""
import pytest
import torch
import torch.nn.functional as F

from pyengine import _ext
from pyengine.ops.norms import (layer_norm, norm_backward, norm_forward, reference_layer_norm,
                                reference_rms_norm, rms_norm)
from tests.conftest import ISAS, assert_within_torch_error, repeat_equal

needs_ext = pytest.mark.skipif(_ext._C is None, reason="extension not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def inputs(rows, cols, dtype, seed=0):
    """x, residual, weight, bias, dy: ragged, off-centre rows, non-trivial weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * 3 + 1
    res = torch.randn(rows, cols, generator=gen)
    w = torch.randn(cols, generator=gen) * 0.5 + 1
    b = torch.randn(cols, generator=gen) * 0.5
    dy = torch.randn(rows, cols, generator=gen)
    return [t.to(dtype) for t in (x, res, w, b, dy)]


def rms_plain(x, w, eps, res=None):
    """HF LlamaRMSNorm (+ the residual add), as written there."""
    s = x if res is None else x + res
    h = s.float() if s.dtype != torch.float64 else s
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(s.dtype)


def ln_plain(x, w, b, eps, res=None):
    return F.layer_norm(x if res is None else x + res, x.shape[-1:], w, b, eps)


def grads(fn, tensors, dy, ds=None):
    """(outputs..., grads of every tensor) of fn on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    loss = (outs[0].double() * dy.double()).sum()
    if ds is not None:
        loss = loss + (outs[1].double() * ds.double()).sum()
    loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves]


CASES = [("rms", False), ("rms", True), ("layer", False), ("layer", True)]


def case_fns(kind, residual, backend):
    """(ours, plain torch) callables over (x, [residual,] weight, [bias])."""
    if kind == "rms":
        if residual:
            return (lambda x, r, w: rms_norm(x, w, 1e-5, r, backend=backend),
                    lambda x, r, w: (rms_plain(x, w, 1e-5, r), x + r))
        return (lambda x, w: rms_norm(x, w, 1e-5, backend=backend),
                lambda x, w: rms_plain(x, w, 1e-5))
    if residual:
        return (lambda x, r, w, b: layer_norm(x, w, b, 1e-5, r, backend=backend),
                lambda x, r, w, b: (ln_plain(x, w, b, 1e-5, r), x + r))
    return (lambda x, w, b: layer_norm(x, w, b, 1e-5, backend=backend),
            lambda x, w, b: ln_plain(x, w, b, 1e-5))


def check_case(kind, residual, backend, dtype, rows=37, cols=131, seed=0):
    x, res, w, b, dy = inputs(rows, cols, dtype, seed)
    tensors = [x] + ([res] if residual else []) + [w] + ([b] if kind == "layer" else [])
    ds = dy.flip(0) if residual else None
    ours_fn, plain_fn = case_fns(kind, residual, backend)
    got = grads(ours_fn, tensors, dy, ds)
    plain = grads(plain_fn, tensors, dy, ds)
    exact = grads(plain_fn, [t.double() for t in tensors], dy, ds)
    for i, (g, p, e) in enumerate(zip(got, plain, exact)):
        assert g.dtype == p.dtype, (i, g.dtype, p.dtype)
        assert_within_torch_error(f"{kind} residual={residual} {backend} output {i}", g, p, e,
                                  dtype)
    return got


@needs_ext
@pytest.mark.parametrize("kind,residual", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_isa_variants_within_torch_error_and_near_scalar(kind, residual, dtype, restore_isa,
                                                             threads):
    results = {}
    for isa in ISAS[:ISAS.index(_ext._C.best_isa()) + 1]:
        _ext._C.set_isa_cap(isa)
        results[isa] = check_case(kind, residual, "cpu", dtype)
    ulp = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for isa, got in results.items():
        for g, s in zip(got, results["scalar"]):
            torch.testing.assert_close(g.float(), s.float(), rtol=ulp, atol=ulp,
                                       msg=lambda m: f"{isa} vs scalar: {m}")


@pytest.mark.parametrize("kind,residual", CASES)
def test_ref_backend_within_torch_error(kind, residual):
    check_case(kind, residual, "ref", torch.bfloat16, rows=5, cols=33)


@pytest.mark.parametrize("kind,residual", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_interpreter(kind, residual, dtype, monkeypatch):
    """Under TRITON_INTERPRET=1 (whose fp32 -> bf16 cast truncates, hence 2 bf16 ulps)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = kind == "layer"
    x, res, w, b, dy = inputs(9, 37, dtype, seed=5)
    r = res if residual else None
    got = norm_forward(layer, x, w, b if layer else None, r, 1e-5, "triton")
    want = norm_forward(layer, x, w, b if layer else None, r, 1e-5, "ref")
    s = want[1] if residual else x
    got += norm_backward(layer, dy, dy.flip(0) if residual else None, s, w, want[2], want[3],
                         "triton")
    want += norm_backward(layer, dy, dy.flip(0) if residual else None, s, w, want[2], want[3],
                          "ref")
    tol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}[dtype]
    for i, (g, e) in enumerate(zip(got, want)):
        torch.testing.assert_close(g.float(), e.float(), rtol=tol, atol=tol * 4,
                                   msg=lambda m: f"output {i}: {m}")


@needs_ext
@pytest.mark.parametrize("layer", [False, True])
def test_bf16_rms_forward_rounds_like_hf(layer):
    """HF rounds s * rstd to bf16 before the weight multiply (two roundings); layer_norm
    rounds once like torch: each matches its model to the last bit on most elements."""
    x, res, w, b, _ = inputs(64, 256, torch.bfloat16, seed=3)
    if layer:
        ours, hf = layer_norm(x, w, b, 1e-5, backend="cpu"), ln_plain(x, w, b, 1e-5)
    else:
        ours, hf = rms_norm(x, w, 1e-5, backend="cpu"), rms_plain(x, w, 1e-5)
    assert (ours == hf).float().mean() > 0.99
    assert ((ours.float() - hf.float()).abs() <= hf.float().abs() * 2 ** -7).all()


@needs_ext
@pytest.mark.parametrize("layer", [False, True])
def test_weight_grads_same_bits_on_any_thread_count(layer, threads):
    """dweight / dbias are reduced over fixed row blocks in block order (not per thread)."""
    x, res, w, b, dy = inputs(301, 70, torch.bfloat16, seed=4)

    def once():
        y, s, mean, rstd = norm_forward(layer, x, w, b if layer else None, res, 1e-5, "cpu")
        return [y, s, mean, rstd, *norm_backward(layer, dy, dy, s, w, mean, rstd, "cpu")]
    got = repeat_equal(once, 3)
    from tests.conftest import num_threads
    with num_threads(1):
        for a, c in zip(got, once()):
            assert torch.equal(a, c)


@needs_ext
@pytest.mark.parametrize("kind,residual", CASES)
def test_gradcheck_and_opcheck(kind, residual):
    layer = kind == "layer"
    x, res, w, b, _ = inputs(4, 9, torch.float64, seed=6)
    ours_fn, _ = case_fns(kind, residual, "cpu")
    tensors = [x] + ([res] if residual else []) + [w] + ([b] if layer else [])
    assert torch.autograd.gradcheck(ours_fn, [t.requires_grad_() for t in tensors])
    xf, rf, wf, bf = (t.detach().float().requires_grad_() for t in (x, res, w, b))
    torch.library.opcheck(torch.ops.pyengine.norm.default,
                          (layer, xf, wf, bf if layer else None, rf if residual else None, 1e-5,
                           "cpu"))


@needs_ext
def test_mixed_dtypes_promote_like_hf():
    """bf16 x with an fp32 weight (HF returns fp32 then); inside autocast the op keeps
    its inputs' dtypes (a norm is not autocast to bf16)."""
    x, res, w, b, _ = inputs(6, 40, torch.float32, seed=7)
    y = rms_norm(x.bfloat16(), w, 1e-5, backend="cpu")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, rms_norm(x.bfloat16().float(), w, 1e-5, backend="cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y2, s2 = rms_norm(x, w, 1e-5, res, backend="cpu")
    assert y2.dtype == s2.dtype == torch.float32
    assert torch.equal(y2, rms_norm(x, w, 1e-5, res, backend="cpu")[0])


def test_reference_is_hf_and_torch():
    x, res, w, b, _ = inputs(3, 17, torch.bfloat16, seed=8)
    assert torch.equal(reference_rms_norm(x, w, 1e-6), rms_plain(x, w, 1e-6))
    y, s = reference_layer_norm(x, w, b, 1e-5, res)
    assert torch.equal(s, x + res) and torch.equal(y, ln_plain(x, w, b, 1e-5, res))


def test_bad_inputs_name_what_is_wrong():
    x, res, w, b, _ = inputs(3, 8, torch.float32)
    with pytest.raises(ValueError, match=r"rms_norm: weight \(7,\) must be \[8\]"):
        rms_norm(x, w[:7], 1e-5)
    with pytest.raises(ValueError, match=r"layer_norm: residual \(2, 8\) != x \(3, 8\)"):
        layer_norm(x, w, b, 1e-5, res[:2])
    with pytest.raises(TypeError, match="rms_norm: dtypes"):
        rms_norm(x.int(), w.int(), 1e-5)


@needs_ext
@pytest.mark.parametrize("layer", [False, True])
def test_frozen_weight_skips_its_gradient_and_keeps_dx(layer):
    """A frozen norm (LoRA training) gets no weight gradient computed; dx is unchanged."""
    x, res, w, b, dy = inputs(50, 40, torch.bfloat16, seed=9)

    def run(train_weight):
        xl, wl, bl = x.clone().requires_grad_(), w.clone().requires_grad_(train_weight), \
            b.clone().requires_grad_(train_weight)
        y, s = (layer_norm(xl, wl, bl, 1e-5, res, backend="cpu") if layer
                else rms_norm(xl, wl, 1e-5, res, backend="cpu"))
        (y.float() * dy.float()).sum().backward()
        return xl.grad, wl.grad
    dx_frozen, dw_frozen = run(False)
    dx, dw = run(True)
    assert dw_frozen is None and dw is not None and torch.equal(dx_frozen, dx)
    dx2, _, _ = norm_backward(layer, dy, None, x + res, w, *norm_forward(
        layer, x, w, b if layer else None, res, 1e-5, "cpu")[2:], "cpu", want_dw=False)
    assert torch.equal(dx2, dx)


@needs_ext
def test_torch_compile_fullgraph_with_grad():
    """The ops trace as single graph nodes (fake + autograd registrations) under compile."""
    from pyengine.ops import rope
    x, res, w, b, _ = inputs(2 * 5, 16, torch.float32, seed=10)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)

    def block(x, res, w, b):
        y, s = rms_norm(x, w, 1e-5, res, backend="cpu")
        q = y.view(2, 5, 2, 8).transpose(1, 2)
        q, k = rope(q, q * 2, cos, sin, backend="cpu")
        z = (q + k).transpose(1, 2).reshape(10, 16)
        return layer_norm(z, w, b, 1e-5, s, backend="cpu")[0]
    leaves = [t.clone().requires_grad_() for t in (x, res, w, b)]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    compiled(*leaves).square().sum().backward()
    eager = [t.clone().requires_grad_() for t in (x, res, w, b)]
    block(*eager).square().sum().backward()
    for a, e in zip(leaves, eager):
        torch.testing.assert_close(a.grad, e.grad)


@needs_ext
def test_modules_with_a_weight_of_another_dtype_behave_like_the_replaced_module():
    """A norm kept in fp32 inside a bf16 model: HF's RMSNorm returns fp32 (weight * bf16
    normalised row), nn.LayerNorm returns bf16; the modules reproduce both exactly."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from pyengine.nn import LayerNorm, RMSNorm
    x, res, w, b, _ = inputs(6, 40, torch.float32, seed=11)
    hf = LlamaRMSNorm(40, eps=1e-5)
    torch_ln = torch.nn.LayerNorm(40, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(w)
        torch_ln.weight.copy_(w)
        torch_ln.bias.copy_(b)
    xb, rb = x.bfloat16(), res.bfloat16()
    want = hf(xb + rb)
    got, s = RMSNorm.from_module(hf)(xb, rb)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    assert s.dtype == torch.bfloat16 and torch.equal(s, xb + rb)
    want = torch_ln(xb)
    got = LayerNorm.from_module(torch_ln)(xb)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
