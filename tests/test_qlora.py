"""QLoRA: lora_linear on a QuantizedWeight base against dequantize() + reference_lora_linear
(y and the grads of x, A, B), fp32 and bf16 activations, every format and backend;
quantize_base / apply_lora(quant=...) and merge_lora on a quantized base."""
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyengine import _ext
from pyengine.lora import apply_lora, lora_modules, merge_lora, quantize_base, save_adapter
from pyengine.ops import lora_linear, lora_mlp, reference_lora_linear, reference_lora_mlp
from pyengine.quant import QuantizedWeight, quantize

BACKENDS = (["ref"] + (["cpu"] if _ext._C is not None else [])
            + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []))
FORMATS = ("nf4", "q4_0", "q8_0")


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def grads(fn, x, a, b, bias, gy):
    x, a, b = (t.clone().requires_grad_() for t in (x, a, b))
    y = fn(x, a, b, bias)
    (y.float() * gy).sum().backward()
    return y.detach(), x.grad, a.grad, b.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_base_matches_dequantized_reference(backend, fmt, dtype, monkeypatch):
    """dx crosses dequant chunks: W's 37 rows in chunks of 8 (4 full and a ragged 5)."""
    from pyengine.ops import quant as quant_ops
    g = torch.Generator().manual_seed(sum(map(ord, backend + fmt)))  # not hash(): salted
    n, d_in, d_out, r, scale = 13, 192, 37, 5, 1.7
    monkeypatch.setattr(quant_ops, "DEQUANT_CHUNK_BYTES", 8 * 4 * d_in)
    x = torch.randn(2, n, d_in, generator=g).to(dtype)
    qw = quantize(torch.randn(d_out, d_in, generator=g) / d_in ** 0.5, fmt)
    a = torch.randn(r, d_in, generator=g) / d_in ** 0.5
    b = torch.randn(d_out, r, generator=g)
    bias = torch.randn(d_out, generator=g).to(dtype)
    gy = torch.randn(2, n, d_out, generator=g)

    got = grads(lambda x, a, b, bias: lora_linear(x, qw, a, b, scale, bias=bias,
                                                  backend=backend), x, a, b, bias, gy)
    want = grads(lambda x, a, b, bias: reference_lora_linear(
        x.double(), qw.dequantize().double(), a.double(), b.double(), scale,
        bias=bias.double()), x, a, b, bias, gy)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    # cpu quant_matmul rounds x to int8 per block; bf16 rounds y and dx
    tol = {torch.float32: 2e-2 if backend == "cpu" else 1e-5, torch.bfloat16: 2e-2}[dtype]
    for name, g_, w_ in zip(("y", "dx", "dA", "dB"), got, want):
        assert rel_err(g_, w_) < tol, (name, rel_err(g_, w_))


def test_quantized_base_errors():
    qw = quantize(torch.randn(8, 64), "q8_0")
    a, b = torch.randn(2, 64), torch.randn(8, 2)
    with pytest.raises(ValueError, match="does not end in in_features = 64"):
        lora_linear(torch.randn(3, 32), qw, a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_b must be \[8, 2\]"):
        lora_linear(torch.randn(3, 64), qw, a, torch.randn(7, 2), 1.0)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96)
        self.odd = nn.Linear(96, 64)  # 96: a multiple of 32, not of nf4's 64-block
        self.head = nn.Linear(64, 3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_apply_lora_quant_forward_merge_and_adapter(fmt, tmp_path, caplog):
    torch.manual_seed(0)
    model = TwoLayer()
    plain = {n: p.detach().clone() for n, p in model.named_parameters()}
    with caplog.at_level(logging.INFO, logger="pyengine"):
        apply_lora(model, r=4, target_modules=["up", "odd"], quant=fmt)
    mods = lora_modules(model)
    assert mods["up"].quant_fmt == fmt and "weight" not in dict(mods["up"].named_parameters())
    assert (mods["odd"].quant_fmt is None) == (fmt == "nf4")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ([f"quantize_base: odd left unquantized: in_features 96 is not a multiple "
                         f"of the nf4 block (64)"] if fmt == "nf4" else [])
    for m in mods.values():
        nn.init.normal_(m.lora_B.weight)
    x = torch.randn(5, 64)
    y = mods["up"](x)
    deq = quantize(plain["up.weight"], fmt).dequantize()
    want = reference_lora_linear(x, deq, mods["up"].lora_A.weight, mods["up"].lora_B.weight,
                                 mods["up"].scaling, bias=plain["up.bias"])
    assert rel_err(y.detach(), want.detach()) < 2e-2
    y.sum().backward()  # adapters train, nothing else does
    assert mods["up"].lora_A.weight.grad is not None
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "up.lora_A.weight", "up.lora_B.weight", "odd.lora_A.weight", "odd.lora_B.weight"]
    save_adapter(model, tmp_path)
    merged = merge_lora(model)
    assert isinstance(merged.up, nn.Linear) and merged.up.weight.dtype == torch.float32
    delta = mods["up"].scaling * mods["up"].lora_B.weight @ mods["up"].lora_A.weight
    torch.testing.assert_close(merged.up.weight, deq + delta.detach())


def test_quantize_base_unknown_format():
    with pytest.raises(ValueError, match="unknown format 'q2'"):
        quantize_base(apply_lora(TwoLayer(), r=2, target_modules=["up"]), "q2")


needs_ext = pytest.mark.skipif(_ext._C is None, reason="C++ extension not built")
MLP_FORMATS = [(f, f, f) for f in FORMATS] + [("nf4", "q4_0", "q8_0")]
GRAD_NAMES = ["y", "dx", "dA_gate", "dB_gate", "dA_up", "dB_up", "dA_down", "dB_down"]


def quantized_mlp(fmts, dtype, n=37, hidden=64, inter=128, r=3, seed=3):
    """x, the nine lora_mlp weights with QuantizedWeight bases, the same with the bases
    dequantized to x's dtype (what the fused op multiplies by), and dy."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
    qws = [quantize(torch.randn(*s, generator=g) / s[1] ** 0.5, f) for s, f in zip(shapes, fmts)]
    adapters = [(torch.randn(r, s[1], generator=g) / s[1] ** 0.5,
                 torch.randn(s[0], r, generator=g) / r ** 0.5) for s in shapes]
    quant = [t for w, (a, b) in zip(qws, adapters) for t in (w, a, b)]
    dense = [q.dequantize().to(dtype) if isinstance(q, QuantizedWeight) else q for q in quant]
    x = torch.randn(2, n, hidden, generator=g).to(dtype)
    return x, quant, dense, torch.randn(2, n, hidden, generator=g)


def mlp_grads(fn, x, weights, dy, **kw):
    x = x.clone().requires_grad_()
    weights = [w if i % 3 == 0 else w.clone().requires_grad_() for i, w in enumerate(weights)]
    y = fn(x, *weights, 0.8, **kw)
    y.backward(dy.to(y.dtype))
    return [y.detach(), x.grad] + [w.grad for i, w in enumerate(weights) if i % 3]


def native_mlp(x, wg, ag, bg, wu, au, bu, wd, ad, bd, scale):
    """PEFT's computation in x's dtype (the error yardstick)."""
    def proj(inp, w, a, b):
        return (F.linear(inp, w) + scale * F.linear(F.linear(inp.to(a.dtype), a), b)).to(inp.dtype)
    return proj(F.silu(proj(x, wg, ag, bg)) * proj(x, wu, au, bu), wd, ad, bd)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmts", MLP_FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("recompute", [False, True])
def test_fused_lora_mlp_quantized_matches_dequantized_reference(backend, fmts, dtype, threads,
                                                                recompute):
    """The fused op on quantized bases: within torch's own error of the fp64 reference on the
    dequantized weights, and (cpu) bit-equal to the fused op on those dense weights."""
    x, quant, dense, dy = quantized_mlp(fmts, dtype)
    got = mlp_grads(lora_mlp, x, quant, dy, backend=backend, recompute_projections=recompute)
    exact = mlp_grads(reference_lora_mlp, x.double(), [w.double() for w in dense], dy.double())
    plain = mlp_grads(native_mlp, x, dense, dy)
    for name, g_, p, e in zip(GRAD_NAMES, got, plain, exact):
        assert g_.dtype == p.dtype, name
        err, plain_err = rel_err(g_, e), rel_err(p, e)
        assert err <= 2 * plain_err + 1e-6, f"{name}: error {err:.2e} vs torch {plain_err:.2e}"
    if backend == "cpu":
        same = mlp_grads(lora_mlp, x, dense, dy, backend="cpu", recompute_projections=recompute)
        for name, g_, d in zip(GRAD_NAMES, got, same):
            assert torch.equal(g_, d), name


def saved_activations(fn, params):
    """(shape, dtype) of each tensor autograd saves while running fn(), parameters and
    quantized base buffers (storages in `params`) left out."""
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved.append((tuple(t.shape), t.dtype))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@needs_ext
@pytest.mark.parametrize("recompute", [False, True])
def test_fused_lora_mlp_quantized_saves_what_the_dense_op_saves(recompute):
    """No dequantized weight (nor anything else) is kept beyond the dense op's activations."""
    x, quant, dense, dy = quantized_mlp(("nf4", "q4_0", "q8_0"), torch.bfloat16)
    x.requires_grad_()
    bufs = [t for q in quant[::3] for t in (q.qs, q.scales)]
    params = {t.untyped_storage().data_ptr() for t in bufs + dense}
    adapters = [w.requires_grad_() for i, w in enumerate(quant) if i % 3]

    def run(ws):
        return lambda: lora_mlp(x, *ws, 0.8, backend="cpu", recompute_projections=recompute)
    want = saved_activations(run(dense), params)
    got = saved_activations(run(quant), params)
    assert got == want
    assert all(s[0] != (128, 64) and s[0] != (64, 128) for s in got)  # no [out, in] weight
    assert adapters


@needs_ext
def test_opcheck_quantized_bases():
    """lora_linear and lora_mlp (forward and backward ops) with quantized bases."""
    from pyengine.ops.lora import _lora_fwd
    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, 64, generator=g).requires_grad_()
    a = torch.randn(4, 64, generator=g).requires_grad_()
    b = torch.randn(18, 4, generator=g).requires_grad_()
    qw = quantize(torch.randn(18, 64, generator=g), "nf4")
    torch.library.opcheck(_lora_fwd, (x, qw.qs, a, b, None, None, 0.5, 1.0, "cpu", qw.scales,
                                      "nf4"))
    xm, quant, _, dy = quantized_mlp(("nf4", "q4_0", "q8_0"), torch.bfloat16, n=5)
    xm = xm.reshape(-1, 64)
    ws = [w.qs if i % 3 == 0 else w for i, w in enumerate(quant)]
    qargs = (quant[0].scales, quant[3].scales, quant[6].scales, "nf4,q4_0,q8_0")
    torch.library.opcheck(torch.ops.pyengine.lora_mlp.default,
                          (xm.requires_grad_(), *ws, 0.8, "cpu", True, *qargs))
    _, gt, up, xa, ha = torch.ops.pyengine.lora_mlp(xm.detach(), *ws, 0.8, "cpu", True, *qargs)
    torch.library.opcheck(torch.ops.pyengine.lora_mlp_backward.default,
                          (dy.reshape(-1, 64).bfloat16(), xm.detach(), *ws, gt, up, xa, ha, 0.8,
                           "cpu", True, *qargs))


@needs_ext
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_quantized_lora_linear_equals_dense_op_on_dequantized_weight(fmt, threads):
    """bf16 at training sizes (>= quant GEMM_MIN_ROWS rows), with dropout and a bias: the
    quantized base's y, dx, dA, dB, dbias are bit-equal to the dense-base op's on
    dequantize().to(bf16) -- the low-rank term lands in the base's output and dx (one
    rounding), not in separate tensors added afterwards."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(128, 64, generator=g).bfloat16()
    qw = quantize(torch.randn(40, 64, generator=g) / 8, fmt)
    a, b = torch.randn(4, 64, generator=g) / 8, torch.randn(40, 4, generator=g)
    bias, gy = torch.randn(40, generator=g).bfloat16(), torch.randn(128, 40, generator=g)

    def run(w):
        xx, aa, bb, bi = (t.clone().requires_grad_() for t in (x, a, b, bias))
        torch.manual_seed(11)  # the dropout mask
        y = lora_linear(xx, w, aa, bb, 1.5, bias=bi, dropout_p=0.25, backend="cpu")
        y.backward(gy.bfloat16())
        return y.detach(), xx.grad, aa.grad, bb.grad, bi.grad
    for name, got, want in zip(("y", "dx", "dA", "dB", "dbias"), run(qw),
                               run(qw.dequantize().bfloat16())):
        assert torch.equal(got, want), name


@needs_ext
def test_quantized_lora_linear_makes_no_extra_full_size_passes():
    """Forward + backward on a quantized base: no add / fill / zero over a [T, out] or
    [T, in] tensor outside the ops (the split base + low-rank form made 2 adds, 4 fills)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            seen.extend((str(func), o.numel()) for o in outs if isinstance(o, torch.Tensor))
            return out
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 64, generator=g).bfloat16().requires_grad_()
    qw = quantize(torch.randn(48, 64, generator=g), "nf4")
    a = torch.randn(4, 64, generator=g).requires_grad_()
    b = torch.randn(48, 4, generator=g).requires_grad_()
    with Record():
        lora_linear(x, qw, a, b, 2.0, backend="cpu").sum().backward()
    big = [f for f, n in seen if n in (100 * 48, 100 * 64)
           and any(k in f for k in ("add", "fill", "zero"))]
    assert big == [] and any("pyengine.lora_linear." in f for f, _ in seen)


def test_quantize_base_keeps_fused_llama_mlps():
    """apply_lora(quant=) and quantize_base after apply_lora: gated MLPs stay one fused op,
    now on quantized bases, and compute what the unfused quantized LoRALinear modules do."""
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers import LlamaConfig
    from pyengine.lora import fused_mlps
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128)
    models = {}
    for how in ("apply_quant", "then_quantize", "unfused"):
        m = nn.Module()
        m.mlp = LlamaMLP(cfg)
        models[how] = m
    for m in models.values():
        m.load_state_dict(models["apply_quant"].state_dict())
    apply_lora(models["apply_quant"], r=4, quant="q8_0")
    quantize_base(apply_lora(models["then_quantize"], r=4), "q8_0")
    apply_lora(models["unfused"], r=4, quant="q8_0", fuse_mlp=False)
    x = torch.randn(3, 64)
    ys = {}
    for how, m in models.items():
        assert len(fused_mlps(m)) == (0 if how == "unfused" else 1), how
        assert all(lm.quant_fmt == "q8_0" for lm in lora_modules(m).values())
        for lm in lora_modules(m).values():  # the same adapters in every model
            gen = torch.Generator().manual_seed(lm.out_features)
            nn.init.normal_(lm.lora_A.weight, std=0.1, generator=gen)
            nn.init.normal_(lm.lora_B.weight, generator=gen)
        ys[how] = m.mlp(x).detach()
    torch.testing.assert_close(ys["apply_quant"], ys["then_quantize"], rtol=0, atol=0)
    assert rel_err(ys["apply_quant"], ys["unfused"]) < 3e-2
