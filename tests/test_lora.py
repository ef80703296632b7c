"""pyengine.ops.lora_linear: every backend against an fp64 computation of the math, on
fresh random adapters (B non-zero), ragged shapes and ranks 1..64; dropout; mixed bf16
base + fp32 adapters; gradcheck; opcheck; C++ ISA variants against the scalar build."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from pyengine import _ext
from pyengine.ops import lora_linear, reference_lora_linear
from pyengine.ops.lora import _lora_fwd, dropout_mask
from tests.conftest import assert_within_torch_error, num_threads, repeat_equal

BACKENDS = (["ref"] + (["cpu"] if _ext._C is not None else [])
            + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []))
needs_ext = pytest.mark.skipif(_ext._C is None, reason="C++ extension not built")


def make(n, d_in, d_out, r, dtype=torch.float32, adapter_dtype=None, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(n, d_in, generator=g).to(dtype)
    w = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(dtype)
    a = (torch.randn(r, d_in, generator=g) / d_in ** 0.5).to(adapter_dtype)
    b = torch.randn(d_out, r, generator=g).to(adapter_dtype)
    bb = torch.randn(d_out, generator=g).to(dtype) if bias else None
    return x, w, a, b, bb


def fp64_math(x, w, a, b, bias, scale, keep=None, p=0.0):
    """y and the grads of sum(y * gy) computed by hand in fp64."""
    x, w, a, b = (t.double() for t in (x, w, a, b))
    xd = x if keep is None else x * keep / (1 - p)
    u = xd @ a.T
    y = x @ w.T + scale * u @ b.T + (0 if bias is None else bias.double())
    return y, u, xd


def run(backend, x, w, a, b, bias, scale, p=0.0, seed=None, autocast=False):
    """y, gy and the grads of sum(y * gy); autocast: the forward inside bf16 autocast."""
    x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
    bias = None if bias is None else bias.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = lora_linear(x, w, a, b, scale, bias=bias, dropout_p=p, backend=backend)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype)
    (y.float() * gy.float()).sum().backward()
    return y, gy, x.grad, a.grad, b.grad, None if bias is None else bias.grad


def check_against_fp64(backend, x, w, a, b, bias, scale, tol, p=0.0, seed=None):
    y, gy, gx, ga, gb, gbias = run(backend, x, w, a, b, bias, scale, p, seed)
    keep = None
    if p > 0:
        torch.manual_seed(seed)
        keep = dropout_mask(x, p)
    y64, u64, xd64 = fp64_math(x, w, a, b, bias, scale, keep, p)
    gy64 = gy.double()
    v64 = gy64 @ b.double()
    dxd = scale * v64 @ a.double()
    gx64 = gy64 @ w.double() + (dxd if keep is None else dxd * keep / (1 - p))
    ga64 = scale * v64.T @ xd64
    gb64 = scale * gy64.T @ u64
    for name, got, want in [("y", y, y64), ("dx", gx, gx64), ("dA", ga, ga64), ("dB", gb, gb64)]:
        err = (got.double() - want).abs().max().item()
        ref = want.abs().max().item()
        assert err <= tol * ref, f"{backend} {name}: max err {err:.3g} vs scale {ref:.3g}"
    if bias is not None:
        torch.testing.assert_close(gbias.double(), gy64.sum(0), rtol=tol, atol=tol * gy64.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d_in,d_out,r", [(47, 31, 53, 1), (33, 70, 19, 3), (20, 129, 66, 16),
                                            (9, 40, 72, 64)])
def test_fp32_vs_fp64(backend, n, d_in, d_out, r):
    x, w, a, b, bias = make(n, d_in, d_out, r, seed=r)
    check_against_fp64(backend, x, w, a, b, bias, scale=2.0 / r ** 0.5 if r > 1 else 0.7,
                       tol=2e-5)


def plain_lora(x, w, a, b, scale, bias=None, keep=None, p=0.0):
    """What PEFT computes in x's / the adapters' dtypes (the error yardstick)."""
    xd = x if keep is None else x * keep / (1 - p)
    return F.linear(x, w, bias) + (scale * F.linear(F.linear(xd.to(a.dtype), a), b)).to(x.dtype)


def grads_of(fn, x, a, b, bias, gy):
    """[y, dx, dA, dB] of fn(x, a, b, bias) for the output gradient gy."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, a, b)]
    y = fn(*leaves, bias)
    y.backward(gy.to(y.dtype))
    return [y.detach()] + [t.grad for t in leaves]


def assert_like_torch(backend, x, w, a, b, bias, scale, p=0.0, seed=0, scales=(1, 1, 1, 1)):
    """y, dx, dA, dB of lora_linear per element vs fp64, within 2x PEFT-style torch's error
    in the same dtypes; `scales` multiplies ours (to check that the rule catches errors)."""
    gy = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(7))
    gy = gy.to(x.dtype)  # exact in y's dtype: the same output gradient for all three
    torch.manual_seed(seed)
    keep = dropout_mask(x, p) if p > 0 else None

    def ours(x, a, b, bias):
        torch.manual_seed(seed)  # the same keep-mask as above
        return lora_linear(x, w, a, b, scale, bias=bias, dropout_p=p, backend=backend)
    got = grads_of(ours, x, a, b, bias, gy)
    plain = grads_of(lambda x, a, b, bias: plain_lora(x, w, a, b, scale, bias, keep, p),
                     x, a, b, bias, gy)
    exact = grads_of(lambda x, a, b, bias: plain_lora(x, w.double(), a, b, scale,
                                                      None if bias is None else bias.double(),
                                                      keep, p),
                     x.double(), a.double(), b.double(), bias, gy.double())
    for name, g, pl, e, f, dt in zip(("y", "dx", "dA", "dB"), got, plain, exact, scales,
                                     (x.dtype, x.dtype, a.dtype, a.dtype)):
        assert g.dtype == pl.dtype, name
        assert_within_torch_error(name, g.double() * f, pl, e, dt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
def test_per_element_vs_torch_error(backend, dtype, adapter_dtype):
    """fp32, bf16 and bf16 base + fp32 adapters (the mixed setup): outputs in x's / the
    adapters' dtypes, each element within 2x plain torch's error."""
    x, w, a, b, bias = make(37, 96, 80, 8, dtype, adapter_dtype, seed=3)
    assert_like_torch(backend, x, w, a, b, bias, 1.5)
    assert_like_torch(backend, x, w, a, b, None, 0.5, p=0.2, seed=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", range(4))
def test_tolerance_rule_rejects_a_10_percent_error(dtype, which):
    """The rule above catches y, dx, dA or dB off by 10% (or 25%)."""
    x, w, a, b, bias = make(37, 96, 80, 8, dtype, seed=3)
    backend = "cpu" if _ext._C is not None else "ref"
    for factor in (0.9, 0.75):
        scales = [1.0] * 4
        scales[which] = factor
        with pytest.raises(AssertionError):
            assert_like_torch(backend, x, w, a, b, bias, 1.5, scales=scales)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 40), d_in=st.integers(1, 80), d_out=st.integers(1, 80),
       r=st.sampled_from([1, 2, 3, 8, 16]), p=st.sampled_from([0.0, 0.3]),
       dtypes=st.sampled_from([(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                               (torch.bfloat16, torch.float32)]),
       bias=st.booleans(), backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2 ** 16))
def test_fuzz_every_option(n, d_in, d_out, r, p, dtypes, bias, backend, seed):
    """Ragged in/out, ranks from 1, dropout, dtypes, bias: per element vs fp64."""
    x, w, a, b, bb = make(n, d_in, d_out, r, *dtypes, bias=bias, seed=seed)
    assert_like_torch(backend, x, w, a, b, bb, 0.8, p=p, seed=seed)


@needs_ext
def test_deterministic_and_equal_on_any_thread_count():
    """fwd + bwd (with dropout) give the same bits on repeat and on 1, 2, 3 and 4 threads:
    the C++ products split rows (down, up_add) or columns (outer), never a reduction."""
    x, w, a, b, bias = make(300, 257, 190, 8)
    results = []
    for threads in (1, 2, 3, 4):
        with num_threads(threads):
            results.append(repeat_equal(lambda: run("cpu", x, w, a, b, bias, 1.5, p=0.1,
                                                    seed=3)[2:5], 3))
    for threads, got in zip((2, 3, 4), results[1:]):
        for name, g, want in zip(("dx", "dA", "dB"), got, results[0]):
            assert torch.equal(g, want), (threads, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_matches_reference_mask(backend):
    """Same seed -> same keep-mask: the op equals the fp64 math with that mask, including
    the dropout factor in dx and dA; and no copy of x is needed (mask is bool)."""
    x, w, a, b, bias = make(29, 64, 41, 4)
    check_against_fp64(backend, x, w, a, b, bias, 1.0, tol=2e-5, p=0.3, seed=123)


def test_dropout_statistics():
    x = torch.randn(256, 200)
    torch.manual_seed(0)
    keep = dropout_mask(x, 0.25)
    assert keep.dtype == torch.bool
    frac = keep.float().mean().item()
    assert abs(frac - 0.75) < 0.01, frac  # 51200 draws: sd ~0.002
    # E[dropout(x) @ A.T] == x @ A.T: averaged over many masks, the low-rank output converges
    x, w, a, b, _ = make(4, 32, 8, 2, bias=False)
    torch.manual_seed(1)
    mean = sum(lora_linear(x, w, a, b, 1.0, dropout_p=0.25, backend="cpu" if _ext._C else "ref")
               for _ in range(400)) / 400
    exact = lora_linear(x, w, a, b, 1.0, backend="ref")
    spread = (x.abs() @ a.abs().T @ b.abs().T).max().item()
    assert (mean - exact).abs().max().item() < 0.1 * spread


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck_fp64(backend):
    x, w, a, b, bias = make(5, 7, 6, 3, torch.float64)
    x, a, b, bias = (t.requires_grad_() for t in (x, a, b, bias))
    assert torch.autograd.gradcheck(
        lambda x, a, b, bias: lora_linear(x, w, a, b, 0.8, bias=bias, backend=backend),
        (x, a, b, bias))


def test_batch_dims_and_no_bias():
    x, w, a, b, _ = make(24, 16, 12, 4, bias=False)
    x3 = x.reshape(2, 3, 4, 16)
    y = lora_linear(x3, w, a, b, 0.5, backend="cpu" if _ext._C else "ref")
    assert y.shape == (2, 3, 4, 12)
    torch.testing.assert_close(y.reshape(24, 12), reference_lora_linear(x, w, a, b, 0.5))


@needs_ext
def test_opcheck():
    """Also bf16 x with the fp32 W and bias: what the autocast rule hands the op."""
    x, w, a, b, bias = make(11, 24, 18, 4)
    xb, bias_b = x.bfloat16(), bias.bfloat16()
    for args in [(x, w, a, b, bias, None, 0.5, 1.0, "cpu"),
                 (x, w, a, b, None, dropout_mask(x, 0.2), 0.5, 1.25, "cpu"),
                 (xb, w, a, b, bias_b, dropout_mask(x, 0.2), 0.5, 1.25, "cpu")]:
        args = (args[0].requires_grad_(),) + args[1:2] + (args[2].requires_grad_(),
                                                          args[3].requires_grad_()) + args[4:]
        torch.library.opcheck(_lora_fwd, args)


def test_errors():
    x, w, a, b, bias = make(4, 8, 6, 2)
    with pytest.raises(ValueError, match=r"lora_b must be \[6, 2\]"):
        lora_linear(x, w, a, b.T.contiguous(), 1.0)
    with pytest.raises(ValueError, match=r"lora_a must be \[r, 8\]"):
        lora_linear(x, w, a[:, :5], b, 1.0)
    with pytest.raises(ValueError, match="does not end in in_features = 8"):
        lora_linear(x[:, :7], w, a, b, 1.0)
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, w.clone().requires_grad_(), a, b, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, a, b, 1.0, dropout_p=1.0)
    with pytest.raises(TypeError, match="weight dtype"):
        lora_linear(x, w.bfloat16(), a, b, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_autocast_casts_the_base_and_keeps_fp32_adapters(backend, base_dtype, p):
    """Inside torch.autocast bf16 an fp32 x and the base (fp32 or bf16) run as F.linear's
    inputs would, in bf16; the fp32 adapters stay fp32: the same bits as the bf16-base +
    fp32-adapter call outside autocast, y in bf16, fp32 gradients.  This used to raise
    "weight dtype torch.float32 != x dtype torch.bfloat16"."""
    x, w, a, b, bias = make(9, 24, 17, 4)
    w, bias = w.to(base_dtype), bias.to(base_dtype)
    got = run(backend, x, w, a, b, bias, 0.5, p, seed=1, autocast=True)
    want = run(backend, x.bfloat16(), w.bfloat16(), a, b, bias.bfloat16(), 0.5, p, seed=1)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert got[3].dtype == got[4].dtype == torch.float32
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_.to(g.dtype), atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the old error message's call
        mixed = lora_linear(x.bfloat16(), w.float(), a, b, 0.5, backend=backend)
    torch.testing.assert_close(mixed, lora_linear(x.bfloat16(), w.bfloat16(), a, b, 0.5,
                                                  backend=backend), atol=0, rtol=0)


def saved_under_hooks(fn):
    """The tensors autograd saves while fn() runs (fn's backward included)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "ref"])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_autocast_saves_the_frozen_base_itself(backend, base_dtype, p):
    """Under bf16 autocast backward keeps the model's own W (fp32 or bf16), never a bf16
    cast of an fp32 W (a [out, in] tensor the model does not hold: ~1.2 MB per projection
    at SmolLM width); dx's GEMM re-casts W.  Outputs and gradients stay the bits of the
    pre-cast bf16 W call (test_autocast_casts_the_base_and_keeps_fp32_adapters)."""
    x, w, a, b, bias = make(9, 24, 17, 4)
    w, bias = w.to(base_dtype), bias.to(base_dtype)
    saved = saved_under_hooks(lambda: run(backend, x, w, a, b, bias, 0.5, p, seed=1,
                                          autocast=True))
    kept = [(t.dtype, t.untyped_storage().data_ptr()) for t in saved
            if t.shape in (w.shape, w.t().shape)]
    assert kept == [(base_dtype, w.untyped_storage().data_ptr())]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "ref"])
def test_autocast_is_declared_on_the_ops(backend):
    """torch.ops.pyengine.lora_linear itself (no Python wrapper) follows the autocast rule,
    and its backward op run inside autocast keeps its fp32 math (same bits as outside;
    the triton backend's torch outer products would otherwise run in bf16)."""
    x, w, a, b, bias = make(6, 16, 10, 2)
    mask = dropout_mask(x, 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, u = torch.ops.pyengine.lora_linear(x, w, a, b, bias, mask, 0.5, 1.25, backend)
    want_y, want_u = _lora_fwd(x.bfloat16(), w.bfloat16(), a, b, bias.bfloat16(), mask, 0.5,
                               1.25, backend)
    assert y.dtype == torch.bfloat16 and u.dtype == torch.float32
    torch.testing.assert_close((y, u), (want_y, want_u), atol=0, rtol=0)
    args = (torch.randn_like(want_y), x.bfloat16(), u, w.bfloat16(), a, b, mask, 0.5, 1.25,
            backend, True, True, True, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.ops.pyengine.lora_linear_backward(*args)
    torch.testing.assert_close(grads, torch.ops.pyengine.lora_linear_backward(*args), atol=0,
                               rtol=0)


# --------------------------------------------------------------------------- C++ ISA variants
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", [1, 5, 16, 64])
def test_isa_variants_match_scalar(dtype, r, threads):
    """The low-rank engine (csrc/lowrank_rows.h) per ISA, every part at once: proj and grad
    over a masked src, then dst += alpha * (proj @ w) * mask chained onto this pass's proj
    (lora_linear's forward), src and dst of different widths; each against fp64 and each
    variant against the scalar build."""
    C = _ext._C
    n, k, m = 71, 157, 70  # ragged: row blocks of 8 and column tiles of 64 both have tails
    g = torch.Generator().manual_seed(r)
    x = torch.randn(n, k, generator=g).to(dtype)
    proj_w, add_w = torch.randn(r, k, generator=g), torch.randn(r, m, generator=g)
    coef = torch.randn(n, r, generator=g)
    out0 = torch.randn(n, m, generator=g).to(dtype)
    mask_k = torch.rand(n, k, generator=g) > 0.3
    mask_m = torch.rand(n, m, generator=g) > 0.3
    results = {}
    try:
        for isa in ["scalar", "avx2", "avx512"]:
            if isa == "avx512" and C.best_isa() != "avx512":
                continue
            C.set_isa_cap(isa)
            proj, grad, out = torch.empty(n, r), torch.zeros(r, k), out0.clone()
            C.lowrank_rows(_ext.dtype_code(x), n, k, x.data_ptr(), mask_k.data_ptr(), r,
                           proj_w.data_ptr(), proj.data_ptr(), 1.5, r, coef.data_ptr(),
                           grad.data_ptr(), r, 0, add_w.data_ptr(), 0.7, out.data_ptr(), m,
                           mask_m.data_ptr(), threads)
            results[isa] = (proj, grad, out)
    finally:
        C.set_isa_cap("avx512")
    xm = x.double() * mask_k
    proj64 = 1.5 * xm @ proj_w.double().T
    want = (proj64, coef.double().T @ xm,
            out0.double() + 0.7 * (proj64 @ add_w.double()) * mask_m)
    out_tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(dtype, 1e-5)
    tols = (1e-5, 1e-5, out_tol)
    for isa, got in results.items():
        for name, g_, w_, tol in zip(("proj", "grad", "add"), got, want, tols):
            err = (g_.double() - w_).abs().max().item() / w_.abs().max().item()
            assert err < tol, f"{isa} {name}: rel err {err:.3g}"
        if isa != "scalar":
            for g_, s_, tol in zip(got, results["scalar"], tols):
                diff = (g_.double() - s_.double()).abs().max().item()
                assert diff <= tol * s_.double().abs().max().item(), f"{isa} vs scalar: {diff:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["a", "b", "ab"])
def test_partial_grads(backend, which):
    """Frozen x (first layer) and one frozen adapter half take the other code paths."""
    x, w, a, b, _ = make(21, 40, 66, 5, bias=False)
    a_, b_ = a.clone().requires_grad_("a" in which), b.clone().requires_grad_("b" in which)
    lora_linear(x, w, a_, b_, 0.9, dropout_p=0.0, backend=backend).square().sum().backward()
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    (x.double() @ w.double().T + 0.9 * x.double() @ a64.T @ b64.T).square().sum().backward()
    for t, t64, name in ((a_, a64, "a"), (b_, b64, "b")):
        if name in which:
            torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-4, atol=1e-4 * t64.grad.abs().max().item())
        else:
            assert t.grad is None


def test_lora_linear_module_train_eval_and_merge():
    from pyengine.nn import LoRALinear
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 10)
    m = LoRALinear(base, r=4, alpha=8, dropout=0.5)
    assert m.weight.requires_grad is False and m.lora_A.weight.requires_grad
    assert torch.count_nonzero(m.lora_B.weight) == 0  # PEFT's init: a fresh adapter is a no-op
    x = torch.randn(6, 24)
    torch.testing.assert_close(m(x), base(x))
    with torch.no_grad():
        m.lora_B.weight.normal_()
    m.eval()  # no dropout in eval: deterministic and equal to the reference
    want = reference_lora_linear(x, base.weight, m.lora_A.weight, m.lora_B.weight, 2.0,
                                 bias=base.bias)
    torch.testing.assert_close(m(x), want)
    torch.testing.assert_close(m.merged()(x), want, rtol=1e-5, atol=1e-5)
    m.train()  # dropout on the adapter input only: outputs differ between calls
    assert not torch.equal(m(x), m(x))


# ----------------------------------------------------------------- pyengine.lora (no PEFT)
class Blocks(torch.nn.Module):
    """Paths that name matching must tell apart: up, block.up, block.lookup (ends in "up")."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.block = torch.nn.Module()
        self.block.up = torch.nn.Linear(16, 16)
        self.block.lookup = torch.nn.Linear(16, 8)


def test_target_module_names_match_whole_path_components():
    from pyengine.lora import apply_lora, lora_modules
    model = apply_lora(Blocks(), r=2, alpha=4, target_modules=["up"])
    assert sorted(lora_modules(model)) == ["block.up", "up"]


def test_rank_and_alpha_patterns_short_names_and_save_round_trip(tmp_path):
    """A PEFT config whose rank_pattern / alpha_pattern keys are short module names sets
    those modules' rank and scale; save_adapter writes patterns that reload the same."""
    import json
    from safetensors.torch import save_file
    from pyengine.lora import load_adapter, lora_modules, save_adapter
    shapes = {"up": (8, 16), "block.up": (16, 16), "block.lookup": (16, 8)}  # (in, out)
    ranks = {"up": 4, "block.up": 4, "block.lookup": 2}
    alphas = {"up": 8.0, "block.up": 8.0, "block.lookup": 3.0}
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=2, lora_alpha=3.0, target_modules=["up", "lookup"],
        rank_pattern={"up": 4}, alpha_pattern={"up": 8.0})))
    save_file({f"base_model.model.{p}.lora_{s}.weight": torch.randn(
        *((ranks[p], i) if s == "A" else (o, ranks[p]))) for p, (i, o) in shapes.items()
        for s in "AB"}, str(tmp_path / "a" / "adapter_model.safetensors"))
    model = load_adapter(Blocks(), tmp_path / "a")
    got = {p: (m.r, m.alpha, m.scaling) for p, m in lora_modules(model).items()}
    assert got == {p: (ranks[p], alphas[p], alphas[p] / ranks[p]) for p in shapes}
    save_adapter(model, tmp_path / "b")
    again = load_adapter(Blocks(), tmp_path / "b")
    assert {p: (m.r, m.alpha, m.scaling) for p, m in lora_modules(again).items()} == got
