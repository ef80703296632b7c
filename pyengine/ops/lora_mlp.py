"""LoRA gated MLP (Llama family) as one autograd op that keeps only what backward needs.

    gate(x) = x @ Wg.T + scale * (x @ Ag.T) @ Bg.T         (likewise up with Wu, Au, Bu)
    h       = silu(gate(x)) * up(x)                          (fused SwiGLU, ops/swiglu.py)
    y       = h @ Wd.T + scale * (h @ Ad.T) @ Bd.T

x [..., H]; base weights Wg, Wu [I, H], Wd [H_out, I] (frozen: no gradient); adapters
Ag [rg, H], Bg [I, rg], Au [ru, H], Bu [I, ru], Ad [rd, I], Bd [H_out, rd].  Gradients
for x and all six adapters.  Dtypes: x and W fp32, bf16 or fp16; the adapters either in
x's dtype or fp32 (bf16 base + fp32 adapters, the usual mixed setup: every low-rank
product then runs in fp32, like PEFT).  fp64 works (gradcheck) with reference SwiGLU math.  B @ A is never formed.

Saved for backward (Unsloth's LoRA_MLP idea): x, the pre-activations g = gate(x) and
u = up(x), and the [N, r] intermediates x @ [Ag; Au].T and h @ Ad.T.  The activation h
and silu(g) are not stored: the SwiGLU backward kernel recomputes sigmoid(g) and hands
back h for the down adapter's gradient in the same pass.  PEFT on a HF LlamaMLP keeps
x, g, silu(g), u and h (4 N*I + N*H elements); this op keeps 2 N*I + N*H (+ small).
`recompute_projections=True` keeps only x (+ small) and recomputes g and u in backward:
2 more base GEMMs for N*I*2 fewer elements kept.

Floor: 6 base GEMMs (3 forward, 3 for dx in backward) = 12 N*H*I flops; everything else
is O(N*(H+I)*r) or elementwise (memory-bound, a few passes over N*I).

Backends: "ref" (plain PyTorch autograd: the spec); "cpu": torch does the six base GEMMs
and C++ does every low-rank product, fused into row passes that are made anyway: over
[N, I] one pass each way with the SwiGLU (csrc/swiglu.h), over [N, H] one pass for x and
one for y (forward), one for dy and one for x/dx (backward) (pyengine.ops.lora's
low_rank_pass, the engine lora_linear uses too: csrc/lowrank_rows.h); all low-rank math in
fp32, so a bf16 base needs no [N, *] dtype conversion.  "triton": torch GEMMs, the Triton
SwiGLU, low_rank_pass's Triton kernels (pyengine.kernels.lora) for the [N, H] side.

Autocast (as pyengine.ops.lora_linear): x and the base weights run as F.linear's inputs
would, in the autocast dtype; the adapters stay fp32 (fp32 low-rank math and gradients); y
in the autocast dtype.  x is cast before the op, the dense base weights inside it, each
just before its GEMM (`_Bases`): backward keeps the model's fp32 weights, no bf16 copies,
and re-casts each into a buffer freed after its GEMM (same bits).

QLoRA: any base weight may be a pyengine.quant.QuantizedWeight (formats may differ).  The
op then takes its qs and scales, and each base GEMM dequantizes its weight just before
(forward and backward; "cpu": the C++ dequantize to x's dtype, bit-equal to
dequantize().to(dtype); other backends: torch) into a transient buffer freed after that
GEMM, so at most one dequantized weight is alive and none is saved: backward keeps exactly
what it keeps for dense bases.  The math is the dense op's on dequant(W).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyengine import _ext
from pyengine.backends import register_op, resolve
from pyengine.ops.lora import (_f32, add_low_rank, autocast_cast, autocast_dtype, autocast_result_dtype,
                               low_rank_pass, register_base_autocast)
from pyengine.ops.quant import dequantize_cpu
from pyengine.quant import FORMATS, QuantizedWeight, dequantize_rows
from pyengine.ops.swiglu import DTYPES, KERNEL_DTYPES, swiglu_backward, swiglu_forward

OP = "lora_mlp"
register_op(OP, ("ref", "cpu", "triton"))
NAMES = ("w_gate", "a_gate", "b_gate", "w_up", "a_up", "b_up", "w_down", "a_down", "b_down")


# --------------------------------------------------------------------------- reference
def reference_lora_mlp(x, w_gate, a_gate, b_gate, w_up, a_up, b_up, w_down, a_down, b_down,
                       scale):
    """The spec: plain PyTorch autograd, math in fp32 (fp64 stays fp64), result in x's
    dtype."""
    ct = torch.promote_types(x.dtype, torch.float32)

    def proj(inp, w, a, b):
        inp = inp.to(ct)
        return F.linear(inp, w.to(ct)) + scale * F.linear(F.linear(inp, a.to(ct)), b.to(ct))

    h = F.silu(proj(x, w_gate, a_gate, b_gate)) * proj(x, w_up, a_up, b_up)
    return proj(h, w_down, a_down, b_down).to(x.dtype)


# --------------------------------------------------------------------------- middles
# The part between the base GEMMs: low-rank updates of the [N, I] tensors and SwiGLU.
# "cpu" runs it as one fused C++ pass each way (csrc/swiglu.h); other backends (and fp64)
# compose torch skinny GEMMs with the backend's SwiGLU kernel.

def _torch_middle_forward(g, u, xa, b_gate, b_up, a_down, scale, backend):
    """g, u (base products, updated in place) -> (g, u, h, scale * h @ Ad.T)."""
    rg = b_gate.shape[1]
    add_low_rank(g, xa[:, :rg], b_gate.t())
    add_low_rank(u, xa[:, rg:], b_up.t())
    h = swiglu_forward(g, u, backend)
    ha = h.to(a_down.dtype) @ a_down.t()
    return g, u, h, ha.mul_(scale)


def _torch_middle_backward(dh, g, u, xa, p_down, a_down, b_gate, b_up, scale, backend):
    """dh = dy @ Wd (updated in place) -> (dg, du, p_gu = scale * [dg @ Bg, du @ Bu],
    dAd, dBg, dBu)."""
    lr = a_down.dtype
    rg = b_gate.shape[1]
    add_low_rank(dh, p_down, a_down)
    dg, du, h = swiglu_backward(dh, g, u, backend, want_h=True)
    d_a_down = p_down.t() @ h.to(lr)
    dg_lr, du_lr = dg.to(lr), du.to(lr)
    d_b_gate, d_b_up = dg_lr.t() @ xa[:, :rg], du_lr.t() @ xa[:, rg:]
    p_gu = torch.cat([dg_lr @ b_gate, du_lr @ b_up], dim=1)
    return dg, du, p_gu.mul_(scale), d_a_down, d_b_gate, d_b_up


def _cpu_middle_forward(g, u, xa, b_gate, b_up, a_down, scale, backend):
    n, inter = g.shape
    rg, ru, rd = b_gate.shape[1], b_up.shape[1], a_down.shape[0]
    h = torch.empty_like(g)
    ha = g.new_empty(n, rd, dtype=torch.float32)
    keep = (_f32(xa), _f32(b_gate.t()), _f32(b_up.t()), _f32(a_down))
    _ext._C.lora_swiglu_forward(_ext.dtype_code(g), n, inter, rg, ru, rd, float(scale),
                                g.data_ptr(), u.data_ptr(), h.data_ptr(),
                                *(t.data_ptr() for t in keep), ha.data_ptr(),
                                _ext.num_threads())
    return g, u, h, ha.to(a_down.dtype)


def _cpu_middle_backward(dh, g, u, xa, p_down, a_down, b_gate, b_up, scale, backend):
    n, inter = g.shape
    rg, ru, rd = b_gate.shape[1], b_up.shape[1], a_down.shape[0]
    du = torch.empty_like(g)
    p_gu = g.new_empty(n, rg + ru, dtype=torch.float32)
    d_a_down = g.new_zeros(rd, inter, dtype=torch.float32)
    d_bg_t = g.new_zeros(rg, inter, dtype=torch.float32)
    d_bu_t = g.new_zeros(ru, inter, dtype=torch.float32)
    keep = (_f32(xa), _f32(b_gate.t()), _f32(b_up.t()), _f32(a_down), _f32(p_down))
    _ext._C.lora_swiglu_backward(_ext.dtype_code(g), n, inter, rg, ru, rd, float(scale),
                                 g.data_ptr(), u.data_ptr(), dh.data_ptr(), du.data_ptr(),
                                 *(t.data_ptr() for t in keep), p_gu.data_ptr(),
                                 d_a_down.data_ptr(), d_bg_t.data_ptr(), d_bu_t.data_ptr(),
                                 _ext.num_threads())
    lr = a_down.dtype
    return (dh, du, p_gu.to(lr), d_a_down.to(lr), d_bg_t.t().to(lr).contiguous(),
            d_bu_t.t().to(lr).contiguous())


def _middles(backend, dtype):
    """(forward middle, backward middle) for a backend and dtype."""
    if backend == "cpu" and dtype in KERNEL_DTYPES:
        return _cpu_middle_forward, _cpu_middle_backward
    return _torch_middle_forward, _torch_middle_backward


class _Bases:
    """The three base weights as dense [out, in] tensors in x's dtype, one at a time:
    `self[i]` (0 gate, 1 up, 2 down) is the weight itself when it has x's dtype, else a
    fresh buffer that the caller drops after its GEMM: the weight cast to x's dtype
    (autocast: an fp32 weight, bf16 x), or for a quantized base (fmts[i] not "":
    weights[i] is its qs, scales[i] its scales) dequantized."""

    def __init__(self, weights, scales, fmts: str, dtype, backend):
        self.weights, self.scales, self.fmts = weights, scales, fmts.split(",")
        self.dtype, self.backend = dtype, backend

    def __getitem__(self, i: int) -> Tensor:
        w, s, fmt = self.weights[i], self.scales[i], self.fmts[i]
        if not fmt:
            return w.to(self.dtype)
        k = s.shape[1] * FORMATS[fmt].block
        if self.backend == "cpu" and self.dtype in (torch.float32, torch.bfloat16):
            return dequantize_cpu(w, s, fmt, k, self.dtype)
        return dequantize_rows(fmt, w, s, k).to(self.dtype)


def _project(x, bases, xa, b_gate, b_up, a_down, scale, backend):
    """(g, u, h, ha): the gate/up base GEMMs, then the forward middle."""
    forward, _ = _middles(backend, x.dtype)
    return forward(x @ bases[0].t(), x @ bases[1].t(), xa, b_gate, b_up, a_down, scale, backend)


# --------------------------------------------------------------------------- custom ops
@torch.library.custom_op("pyengine::lora_mlp", mutates_args=())
def _lora_mlp(x: Tensor, w_gate: Tensor, a_gate: Tensor, b_gate: Tensor, w_up: Tensor,
              a_up: Tensor, b_up: Tensor, w_down: Tensor, a_down: Tensor, b_down: Tensor,
              scale: float, backend: str, keep_gate_up: bool, s_gate: Optional[Tensor] = None,
              s_up: Optional[Tensor] = None, s_down: Optional[Tensor] = None, fmts: str = ",,"
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, g, u, scale * x @ [Ag; Au].T, scale * h @ Ad.T); g and u are empty unless
    keep_gate_up.  x [N, H] contiguous.  fmts "gate,up,down" formats ("" dense): a
    quantized base is passed as its qs, its scales in s_<name> (see _Bases)."""
    bases = _Bases((w_gate, w_up, w_down), (s_gate, s_up, s_down), fmts, x.dtype, backend)
    xa, _ = low_rank_pass(backend, x, proj_w=torch.cat([a_gate, a_up]), scale=scale)
    g, u, h, ha = _project(x, bases, xa, b_gate, b_up, a_down, scale, backend)
    y = h @ bases[2].t()
    low_rank_pass(backend, dst=y, add_coef=ha, add_w=b_down.t())
    if not keep_gate_up:
        g, u = x.new_empty(0), x.new_empty(0)
    return y, g, u, xa, ha


@_lora_mlp.register_fake
def _(x, w_gate, a_gate, b_gate, w_up, a_up, b_up, w_down, a_down, b_down, scale, backend,
      keep_gate_up, s_gate=None, s_up=None, s_down=None, fmts=",,"):
    n, inter = x.shape[0], w_gate.shape[0]
    gu_shape = (n, inter) if keep_gate_up else (0,)
    return (x.new_empty(n, w_down.shape[0]), x.new_empty(gu_shape), x.new_empty(gu_shape),
            x.new_empty(n, a_gate.shape[0] + a_up.shape[0], dtype=a_gate.dtype),
            x.new_empty(n, a_down.shape[0], dtype=a_down.dtype))


@torch.library.custom_op("pyengine::lora_mlp_backward", mutates_args=())
def _lora_mlp_backward(dy: Tensor, x: Tensor, w_gate: Tensor, a_gate: Tensor, b_gate: Tensor,
                       w_up: Tensor, a_up: Tensor, b_up: Tensor, w_down: Tensor,
                       a_down: Tensor, b_down: Tensor, g: Tensor, u: Tensor, xa: Tensor,
                       ha: Tensor, scale: float, backend: str, need_dx: bool,
                       s_gate: Optional[Tensor] = None, s_up: Optional[Tensor] = None,
                       s_down: Optional[Tensor] = None, fmts: str = ",,"
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dAg, dBg, dAu, dBu, dAd, dBd); dx empty unless need_dx.  g and u empty means
    recompute them from x.  xa, ha carry the scale already.  s_*, fmts as in the forward."""
    rg = a_gate.shape[0]
    bases = _Bases((w_gate, w_up, w_down), (s_gate, s_up, s_down), fmts, x.dtype, backend)
    if g.numel() == 0:
        g, u, _, _ = _project(x, bases, xa, b_gate, b_up, a_down, scale, backend)
    _, backward = _middles(backend, x.dtype)
    p_down, d_b_down_t = low_rank_pass(backend, dy, proj_w=b_down.t(), scale=scale, grad_coef=ha)
    dg, du, p_gu, d_a_down, d_b_gate, d_b_up = backward(dy @ bases[2], g, u, xa, p_down, a_down,
                                                        b_gate, b_up, scale, backend)
    dx = x.new_empty(0)
    if need_dx:
        dx = dg @ bases[0]
        dx.addmm_(du, bases[1])
    _, d_a = low_rank_pass(backend, x, grad_coef=p_gu, dst=dx if need_dx else None,
                           add_coef=p_gu, add_w=torch.cat([a_gate, a_up]))
    return (dx, d_a[:rg].clone(), d_b_gate, d_a[rg:].clone(), d_b_up, d_a_down,
            d_b_down_t.t().contiguous())


@_lora_mlp_backward.register_fake
def _(dy, x, w_gate, a_gate, b_gate, w_up, a_up, b_up, w_down, a_down, b_down, g, u, xa, ha,
      scale, backend, need_dx, s_gate=None, s_up=None, s_down=None, fmts=",,"):
    return (x.new_empty(x.shape if need_dx else (0,)), torch.empty_like(a_gate),
            torch.empty_like(b_gate), torch.empty_like(a_up), torch.empty_like(b_up),
            torch.empty_like(a_down), torch.empty_like(b_down))


def _setup_context(ctx, inputs, output):
    (x, w_gate, a_gate, b_gate, w_up, a_up, b_up, w_down, a_down, b_down, scale, backend, _,
     *scales, fmts) = inputs
    _, g, u, xa, ha = output
    ctx.scale, ctx.backend, ctx.fmts = scale, backend, fmts
    ctx.need_dx = x.requires_grad
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero [N, I] grads for the saved-only outputs
    ctx.save_for_backward(x, w_gate, a_gate, b_gate, w_up, a_up, b_up, w_down, a_down, b_down,
                          g, u, xa, ha, *scales)


def _lora_mlp_grad(ctx, dy, *_unused):
    if dy is None:
        return (None,) * 17
    saved = ctx.saved_tensors
    dx, *d_adapters = _lora_mlp_backward(dy.contiguous(), *saved[:14], ctx.scale, ctx.backend,
                                         ctx.need_dx, *saved[14:], ctx.fmts)
    d_ag, d_bg, d_au, d_bu, d_ad, d_bd = d_adapters
    return (dx if ctx.need_dx else None, None, d_ag, d_bg, None, d_au, d_bu, None, d_ad, d_bd,
            None, None, None, None, None, None, None)


_lora_mlp.register_autograd(_lora_mlp_grad, setup_context=_setup_context)
register_base_autocast("lora_mlp", base_args=(0,))  # x (the base weights: cast in _Bases)
register_base_autocast("lora_mlp_backward")


# --------------------------------------------------------------------------- public API
def _validate(x, tensors, scale):
    """Shapes, devices and dtypes; x's and the base's as they are after autocast's cast."""
    name = "lora_mlp"
    ac = autocast_dtype(x.device)
    x_dtype = autocast_result_dtype(x, ac)
    w_gate, a_gate, b_gate, w_up, a_up, b_up, w_down, a_down, b_down = tensors
    if x.dim() < 1:
        raise ValueError(f"{name}: x must be [..., H], got a scalar")
    hidden, inter, out = x.shape[-1], w_gate.shape[0], w_down.shape[0]
    rg, ru, rd = a_gate.shape[0], a_up.shape[0], a_down.shape[0]
    expected = {"w_gate": (inter, hidden), "a_gate": (rg, hidden), "b_gate": (inter, rg),
                "w_up": (inter, hidden), "a_up": (ru, hidden), "b_up": (inter, ru),
                "w_down": (out, inter), "a_down": (rd, inter), "b_down": (out, rd)}
    for k, t in zip(NAMES, tensors):
        if tuple(t.shape) != expected[k]:
            raise ValueError(f"{name}: {k} has shape {tuple(t.shape)}, expected "
                             f"{expected[k]} (x {tuple(x.shape)}, w_gate {tuple(w_gate.shape)}, "
                             f"w_down {tuple(w_down.shape)})")
        if t.device != x.device:
            raise ValueError(f"{name}: {k} is on {t.device}, x on {x.device}")
    if x_dtype not in DTYPES:
        raise TypeError(f"{name}: x dtype {x_dtype} not supported {DTYPES}")
    for k in ("w_gate", "w_up", "w_down"):
        t = tensors[NAMES.index(k)]
        if isinstance(t, QuantizedWeight):
            continue
        if autocast_result_dtype(t, ac) != x_dtype:
            raise TypeError(f"{name}: {k} dtype {t.dtype} != x dtype {x.dtype}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name}: {k} requires grad, but base weights are frozen here "
                             "(no gradient is computed for them); detach it or set "
                             "requires_grad_(False)")
    lr = a_gate.dtype
    if lr not in (x_dtype, torch.float32):
        raise TypeError(f"{name}: adapter dtype {lr} must be x's dtype ({x_dtype}) or float32")
    for k in ("a_gate", "b_gate", "a_up", "b_up", "a_down", "b_down"):
        t = tensors[NAMES.index(k)]
        if t.dtype != lr:
            raise TypeError(f"{name}: {k} dtype {t.dtype} != a_gate dtype {lr} (all six "
                            "adapters must share one dtype)")
    if not isinstance(scale, (int, float)):
        raise TypeError(f"{name}: scale must be a Python number, got {type(scale).__name__}")


def lora_mlp(x: Tensor, w_gate: Tensor, a_gate: Tensor, b_gate: Tensor, w_up: Tensor,
             a_up: Tensor, b_up: Tensor, w_down: Tensor, a_down: Tensor, b_down: Tensor,
             scale: float, *, backend: str | None = None,
             recompute_projections: bool = False) -> Tensor:
    """down(silu(gate(x)) * up(x)) with LoRA on all three projections (see module doc).
    scale = alpha / r (or alpha / sqrt(r) for rsLoRA).  Base weights may be QuantizedWeight."""
    tensors = (w_gate, a_gate, b_gate, w_up, a_up, b_up, w_down, a_down, b_down)
    _validate(x, tensors, scale)
    chosen = resolve(OP, backend, x.device)
    bases = (w_gate, w_up, w_down)
    if chosen == "ref":  # quantized bases: dequantized to x's dtype, as the other backends do
        ac = autocast_dtype(x.device)
        x = autocast_cast(x, ac)
        dense = [w.dequantize().to(x.dtype) if isinstance(w, QuantizedWeight)
                 else autocast_cast(w, ac) for w in bases]
        with torch.autocast(x.device.type, enabled=False):
            return reference_lora_mlp(x, dense[0], a_gate, b_gate, dense[1], a_up, b_up,
                                      dense[2], a_down, b_down, scale)
    quantized = [isinstance(w, QuantizedWeight) for w in bases]
    ws = [w.qs if q else w for w, q in zip(bases, quantized)]
    y, *_ = _lora_mlp(x.reshape(-1, x.shape[-1]).contiguous(), ws[0].contiguous(),
                      a_gate.contiguous(), b_gate.contiguous(), ws[1].contiguous(),
                      a_up.contiguous(), b_up.contiguous(), ws[2].contiguous(),
                      a_down.contiguous(), b_down.contiguous(), float(scale), chosen,
                      not recompute_projections,
                      *(w.scales.contiguous() if q else None for w, q in zip(bases, quantized)),
                      ",".join(w.fmt if q else "" for w, q in zip(bases, quantized)))
    return y.reshape(*x.shape[:-1], w_down.shape[0])
