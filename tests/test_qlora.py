"""QLoRA: lora_linear on a QuantizedWeight base against dequantize() + reference_lora_linear
(y and the grads of x, A, B), fp32 and bf16 activations, every format and backend;
quantize_base / apply_lora(quant=...) and merge_lora on a quantized base."""
import logging
import os

import pytest
import torch
from torch import nn

from pyengine import _ext
from pyengine.lora import apply_lora, lora_modules, merge_lora, quantize_base, save_adapter
from pyengine.ops import lora_linear, lora_mlp, reference_lora_linear, reference_lora_mlp
from pyengine.quant import quantize

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_mlp_quantized_bases_take_the_unfused_path(backend):
    g = torch.Generator().manual_seed(3)
    hidden, inter, r, scale = 64, 96, 3, 0.8
    x = torch.randn(7, hidden, generator=g)
    shapes = [(inter, hidden), (inter, hidden), (hidden, inter)]
    qws = [quantize(torch.randn(*s, generator=g) / s[1] ** 0.5, f)
           for s, f in zip(shapes, ("nf4", "q4_0", "q8_0"))]
    adapters = [(torch.randn(r, s[1], generator=g) / s[1] ** 0.5, torch.randn(s[0], r, generator=g))
                for s in shapes]
    gy = torch.randn(7, hidden, generator=g)

    def run(ws):
        xx = x.clone().requires_grad_()
        ad = [t.clone().requires_grad_() for pair in adapters for t in pair]
        args = [item for w, i in zip(ws, range(3)) for item in (w, ad[2 * i], ad[2 * i + 1])]
        y = (lora_mlp(xx, *args, scale, backend=backend) if ws is qws
             else reference_lora_mlp(xx, *args, scale))
        (y * gy).sum().backward()
        return [y.detach(), xx.grad] + [t.grad for t in ad]

    got, want = run(qws), run([q.dequantize() for q in qws])
    tol = 3e-2 if backend == "cpu" else 1e-4
    for i, (g_, w_) in enumerate(zip(got, want)):
        assert rel_err(g_, w_) < tol, (i, rel_err(g_, w_))


@pytest.mark.skipif(_ext._C is None, reason="C++ extension not built")
def test_opcheck_low_rank_term_alone():
    """The op with weight None (the QLoRA split) passes torch's custom-op checks."""
    from pyengine.ops.lora import _lora_fwd
    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, 24, generator=g).requires_grad_()
    a = torch.randn(4, 24, generator=g).requires_grad_()
    b = torch.randn(18, 4, generator=g).requires_grad_()
    torch.library.opcheck(_lora_fwd, (x, None, a, b, None, None, 0.5, 1.0, "cpu"))


def test_quantize_base_unfuses_fused_llama_mlps():
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers import LlamaConfig
    from pyengine.lora import fused_mlps
    torch.manual_seed(0)
    mlp = nn.Module()
    mlp.mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=128))
    apply_lora(mlp, r=4)
    assert len(fused_mlps(mlp)) == 1
    x = torch.randn(3, 64)
    dense = mlp.mlp(x).detach()
    quantize_base(mlp, "q8_0")
    assert fused_mlps(mlp) == [] and all(m.quant_fmt == "q8_0" for m in lora_modules(mlp).values())
    assert rel_err(mlp.mlp(x).detach(), dense) < 3e-2
