"""Fused linear + cross-entropy: the LM head and its loss in one op.

    loss = CE(softcap(hidden @ weight.T + bias), target) (+ z_loss * lse^2 per token)

hidden [..., H], weight [V, H], target [...] (int), bias [V]; fp32, bf16, fp16.
The [N, V] logits are never materialised: tokens are processed in chunks of `rows`;
per chunk torch does logits = h @ W.T, one kernel pass per row turns them *in place* (in
our own chunk buffer) into d loss / d logits, and torch does grad_h = G @ W and
grad_W += G.T @ h (fp32 accumulator).  Forward therefore also produces the gradients
(3 GEMMs in all, the floor: 3 * 2*N*V*H flops); backward only scales them by grad_output.
With reduction="none" the per-token grad_output is unknown in forward, so forward
computes losses only and backward recomputes the chunk logits (4 GEMMs).

Gradient filtering (opt-in, `filter_eps`; the idea of Apple's Cut Cross-Entropy): in the two
gradient GEMMs, skip the vocab entries whose gradient is below eps relative to the row's
scale s_i (|g_ij| <= eps |s_i|: for plain CE, softmax p_j <= eps).  Per block of
FILTER_ROWS tokens the kept columns are those where any row is above eps, plus the block's
targets (their gradient is always kept); only those columns of the gradient block and rows
of W are gathered into the two GEMMs, so their cost scales with the kept fraction.  The
gather works per column, so no vocabulary sorting is needed for negligible entries to
drop out.  The loss is never filtered; each dropped entry changes grad_h by at most
eps |s_i| |W_j| and grad_W by eps |s_i| |h_i|.  eps "auto" = finfo(compute dtype).eps / 32
(as CCE defines it: 2^-12 for bf16); eps 0 drops only exact zeros.  For a trained model's
peaked softmax; a flat one (random init: p_j ~ 1/V < eps for V > 4096 in bf16) loses
nearly all of the normalisation gradient (sum_j p_j W_j), so training from scratch with it
diverges from exact (benchmarks/curve_ce_filter.py).

Backends: "ref" (plain PyTorch on fp32 logits: the spec and fallback), "cpu" (row kernel
in C++, csrc/cross_entropy.h), "triton" (row kernel in pyengine.kernels.cross_entropy).
Registered as torch.library custom ops pyengine::linear_cross_entropy(+_backward), so the
op composes with torch.compile.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from pyengine import _ext
from pyengine.backends import register_op, resolve

OP = "fused_linear_cross_entropy"
register_op(OP, ("ref", "cpu", "triton"))
REDUCTIONS = ("mean", "sum", "none")
# Logits chunk budget: big chunks keep the GEMMs efficient (96 MB measured 1.2x faster than
# 32 MB, fp32 N=2048 V=49152); in fp32 capped at 1/6 of the [N, V] logits so the op's extra
# memory stays under ~10% of what eager PyTorch holds (logits + their gradient).
CHUNK_BYTES = 96 << 20
CHUNK_FRACTION = 6
GW_BLOCK = 4096  # vocab rows per low-precision grad_W partial product (bounded temp)
FILTER_ROWS = 256  # tokens per filtered block: fewer rows keep fewer columns, smaller GEMMs


# --------------------------------------------------------------------------- reference
def reference_linear_cross_entropy(hidden, weight, target, bias=None, ignore_index=-100,
                                   label_smoothing=0.0, z_loss=0.0, softcap=None,
                                   reduction="mean", num_items=None):
    """The spec: plain PyTorch on fp32-upcast (fp64 stays fp64) logits; materialises [N, V]."""
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, weight.shape[0])
    target = target.reshape(-1)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction="none")
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + z_loss * lse.square() * (target != ignore_index)
    return _reduce(loss, target, ignore_index, reduction, num_items, hidden.shape[:-1])


def _reduce(loss, target, ignore_index, reduction, num_items, batch_shape):
    if reduction == "none":
        return loss.reshape(batch_shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / _denominator(target, ignore_index, num_items)


def _denominator(target, ignore_index, num_items):
    """Mean over non-ignored tokens, or over `num_items` (the whole accumulation window).
    All tokens ignored -> denominator 1, so loss 0 and zero grads (never NaN)."""
    if num_items is not None:
        return float(num_items)
    return (target != ignore_index).sum().clamp_min(1).float()


# --------------------------------------------------------------------------- row kernels
def _cpu_rows(logits, target, loss, *, ignore_index, label_smoothing, z_loss, softcap, scale,
              row_scale, write_grad):
    _ext._C.ce_rows(logits.data_ptr(), _ext.dtype_code(logits), logits.shape[0],
                    logits.shape[1], logits.stride(0), target.data_ptr(), ignore_index,
                    label_smoothing, z_loss, softcap, scale, _ext.ptr(row_scale),
                    loss.data_ptr(), 0, write_grad, _ext.num_threads())


def _accumulate_f32(acc, part):
    """acc += part, acc fp32 (contiguous rows block), part low precision."""
    if _ext._C is not None and acc.device.type == "cpu":
        _ext._C.accumulate_f32(acc.data_ptr(), part.data_ptr(), _ext.dtype_code(part),
                               part.numel(), _ext.num_threads())
    else:
        acc += part


def _triton_rows(logits, target, loss, **kw):
    from pyengine.kernels.cross_entropy import ce_rows
    ce_rows(logits, target, loss, **kw)


ROW_KERNELS = {"cpu": _cpu_rows, "triton": _triton_rows}


def _chunk_rows(n, vocab, itemsize):
    """Rows per chunk.  The memory cap applies to fp32; in bf16/fp16 the fp32 grad_W
    accumulator dominates the extra memory anyway, and the full budget measured 1.1x faster."""
    budget = CHUNK_BYTES
    if itemsize >= 4:
        budget = min(budget, n * vocab * 4 // CHUNK_FRACTION)
    return max(1, min(n, budget // (vocab * itemsize)))


def _filtered_grads(grad, h, weight, target, gh, gw, *, eps, row_scale, scale, ignore_index,
                    backend):
    """gh = grad @ W and gw += grad.T @ h over the columns kept by the filter (module doc),
    per block of FILTER_ROWS rows.  grad [rows, V] (d loss / d logits), h [rows, H].
    The column selection and the row accumulation run in C++ for the cpu backend, in
    torch (any device) otherwise."""
    cpp = backend == "cpu"
    for s in range(0, grad.shape[0], FILTER_ROWS):
        e = min(grad.shape[0], s + FILTER_ROWS)
        g, t = grad[s:e], target[s:e]
        thr = eps * abs(scale)  # times the block's smallest live |row_scale|: holds for each row
        if row_scale is not None:
            live = t != ignore_index
            thr *= float(row_scale[s:e][live].abs().min()) if bool(live.any()) else 0.0
        cols = _keep_columns(g, t, thr, ignore_index, cpp)
        gk = g.index_select(1, cols)
        if gh is not None:
            torch.mm(gk, weight.index_select(0, cols), out=gh[s:e])
        if gw is not None:
            _accumulate_rows(gw, cols, gk.t() @ h[s:e], cpp)


def _keep_columns(g, target, thr, ignore_index, cpp):
    """Increasing indices of the columns with some |g_ij| > thr, plus the live targets."""
    if cpp:
        cols = torch.empty(g.shape[1], dtype=torch.int64)
        k = _ext._C.ce_keep_columns(g.data_ptr(), _ext.dtype_code(g), g.shape[0], g.shape[1],
                                    g.stride(0), target.data_ptr(), ignore_index, thr,
                                    cols.data_ptr(), _ext.num_threads())
        return cols[:k]
    keep = (g.amax(0) > thr) | (g.amin(0) < -thr)
    keep[target[target != ignore_index]] = True
    return keep.nonzero().squeeze(1)


def _accumulate_rows(acc, idx, part, cpp):
    """acc[idx] += part (idx unique), acc fp32 (fp64 for gradcheck), part any float dtype."""
    if cpp and acc.dtype == torch.float32:
        part = part.contiguous()
        _ext._C.accumulate_rows_f32(acc.data_ptr(), idx.data_ptr(), part.data_ptr(),
                                    _ext.dtype_code(part), part.shape[0], part.shape[1],
                                    _ext.num_threads())
    else:
        acc.index_add_(0, idx, part.to(acc.dtype))


def _chunked(backend, hidden, weight, target, bias, opts, *, row_scale, scale,
             need_gh, need_gw, need_gb, filter_eps=None):
    """Per-token losses and, when asked, the gradients of sum_i s_i * loss_i.
    s_i = scale * row_scale[i].  hidden [N, H], target [N].  filter_eps: None = exact,
    else the gradient GEMMs skip entries below it (module doc)."""
    n, _ = hidden.shape
    vocab = weight.shape[0]
    write_grad = need_gh or need_gw or need_gb
    rows = _chunk_rows(n, vocab, hidden.element_size())
    buf = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)
    loss_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = torch.empty(n, dtype=loss_dtype, device=hidden.device)
    gh = torch.empty_like(hidden) if need_gh else None
    acc = dict(dtype=loss_dtype, device=hidden.device)  # fp32 (fp64) accumulators
    gw = torch.zeros(weight.shape, **acc) if need_gw else None
    gb = torch.zeros(vocab, **acc) if need_gb else None
    kernel = ROW_KERNELS[backend]
    wt = weight.t()
    for s in range(0, n, rows):
        e = min(n, s + rows)
        h, logits = hidden[s:e], buf[: e - s]
        if bias is None:
            torch.mm(h, wt, out=logits)
        else:
            torch.addmm(bias, h, wt, out=logits)
        kernel(logits, target[s:e], loss[s:e], scale=scale,
               row_scale=None if row_scale is None else row_scale[s:e],
               write_grad=write_grad, **opts)
        if filter_eps is not None and (need_gh or need_gw):
            _filtered_grads(logits, h, weight, target[s:e], gh[s:e] if need_gh else None, gw,
                            eps=filter_eps, scale=scale, ignore_index=opts["ignore_index"],
                            backend=backend,
                            row_scale=None if row_scale is None else row_scale[s:e])
        elif need_gh or need_gw:
            _exact_grads(logits, h, weight, gh[s:e] if need_gh else None, gw)
        if need_gb:
            gb += logits.sum(0, dtype=gb.dtype)
    return loss, gh, gw, gb


def _exact_grads(logits, h, weight, gh, gw):
    """gh = grad @ W, gw += grad.T @ h (fp32 accumulation of low-precision products)."""
    if gh is not None:
        torch.mm(logits, weight, out=gh)
    if gw is not None:
        vocab = weight.shape[0]
        if logits.dtype == gw.dtype:
            gw.addmm_(logits.t(), h)
        else:  # low-precision GEMM per vocab block (small temp), fp32 accumulation
            for v in range(0, vocab, GW_BLOCK):
                _accumulate_f32(gw[v:v + GW_BLOCK], logits[:, v:v + GW_BLOCK].t() @ h)


# --------------------------------------------------------------------------- custom ops
def _empty(like):
    return like.new_empty(0)


def _grad_outputs(gh, gw, gb, hidden, weight, bias):
    """Op outputs for the grads: in the parameters' dtypes, empty when not computed."""
    return (gh if gh is not None else _empty(hidden),
            gw.to(weight.dtype) if gw is not None else _empty(weight),
            gb.to(bias.dtype) if gb is not None else _empty(hidden))


def _check_target_range(target, vocab, ignore_index):
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"fused_linear_cross_entropy: target[{i}] = {int(target[i])} is outside "
                         f"[0, {vocab}) and is not ignore_index ({ignore_index})")


def _opts(ignore_index, label_smoothing, z_loss, softcap):
    return dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                softcap=softcap)


@torch.library.custom_op("pyengine::linear_cross_entropy", mutates_args=())
def _flce(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
          ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
          reduction: str, num_items: float, backend: str, need_gh: bool, need_gw: bool,
          need_gb: bool, filter_eps: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias); the grads are those of the reduced loss
    for grad_output = 1 (empty when not asked for, and always for reduction="none")."""
    _check_target_range(target, weight.shape[0], ignore_index)
    if reduction == "none":
        need_gh = need_gw = need_gb = False
    scale = 1.0
    if reduction == "mean":
        scale = 1.0 / float(_denominator(target, ignore_index, num_items if num_items > 0 else None))
    loss, gh, gw, gb = _chunked(backend, hidden, weight, target, bias,
                                _opts(ignore_index, label_smoothing, z_loss, softcap),
                                row_scale=None, scale=scale, need_gh=need_gh,
                                need_gw=need_gw, need_gb=need_gb, filter_eps=filter_eps)
    loss = loss if reduction == "none" else loss.sum() * (scale if reduction == "mean" else 1.0)
    return (loss, *_grad_outputs(gh, gw, gb, hidden, weight, bias))


@_flce.register_fake
def _(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, reduction,
      num_items, backend, need_gh, need_gw, need_gb, filter_eps):
    none = reduction == "none"
    loss_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    loss = hidden.new_empty(hidden.shape[:1] if none else (), dtype=loss_dtype)
    gh = hidden.new_empty(hidden.shape if need_gh and not none else (0,))
    gw = weight.new_empty(weight.shape if need_gw and not none else (0,))
    gb = hidden.new_empty(bias.shape if need_gb and not none else (0,),
                          dtype=bias.dtype if bias is not None else hidden.dtype)
    return loss, gh, gw, gb


@torch.library.custom_op("pyengine::linear_cross_entropy_backward", mutates_args=())
def _flce_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor, target: Tensor,
                   bias: Optional[Tensor], ignore_index: int, label_smoothing: float,
                   z_loss: float, softcap: float, backend: str, filter_eps: Optional[float],
                   need_gh: bool, need_gw: bool, need_gb: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for reduction="none": recompute logits, rows scaled by grad_loss."""
    _, gh, gw, gb = _chunked(backend, hidden, weight, target, bias,
                             _opts(ignore_index, label_smoothing, z_loss, softcap),
                             row_scale=grad_loss.float().contiguous(), scale=1.0,  # C++ takes fp32
                             need_gh=need_gh, need_gw=need_gw, need_gb=need_gb,
                             filter_eps=filter_eps)
    return _grad_outputs(gh, gw, gb, hidden, weight, bias)


@_flce_backward.register_fake
def _(grad_loss, hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap,
      backend, filter_eps, need_gh, need_gw, need_gb):
    return (hidden.new_empty(hidden.shape if need_gh else (0,)),
            weight.new_empty(weight.shape if need_gw else (0,)),
            hidden.new_empty(bias.shape if need_gb else (0,),
                             dtype=bias.dtype if bias is not None else hidden.dtype))


def _setup_context(ctx, inputs, output):
    (hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, reduction,
     _num_items, backend, need_gh, need_gw, need_gb, filter_eps) = inputs
    ctx.reduction = reduction
    ctx.needs = (need_gh, need_gw, need_gb)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # else autograd allocates zeros shaped like the grads
    ctx.args = (ignore_index, label_smoothing, z_loss, softcap, backend, filter_eps)
    ctx.num_items = _num_items if _num_items > 0 else None
    ctx.grads_used = reduction == "none"  # "none": no grads from forward, always recompute
    ctx.save_for_backward(hidden, weight, target, bias)
    # plain attribute, not save_for_backward: backward scales these in place (our buffers)
    ctx.grads = output[1:]


def _flce_grad(ctx, grad_loss, *_unused):
    need_gh, need_gw, need_gb = ctx.needs
    if grad_loss is None:  # the loss did not reach the output being differentiated
        return (None,) * 15
    hidden, weight, target, bias = ctx.saved_tensors
    if ctx.grads_used:  # reduction "none", or a second backward through a retained graph
        row_scale = grad_loss.reshape(-1)
        if ctx.reduction != "none":  # one scalar for every row, as in forward
            if ctx.reduction == "mean":
                row_scale = row_scale / _denominator(target, ctx.args[0], ctx.num_items)
            row_scale = row_scale.expand(target.shape[0])
        gh, gw, gb = _flce_backward(row_scale, hidden, weight, target, bias, *ctx.args,
                                    need_gh, need_gw, need_gb)
    else:  # forward produced the grads for grad_output = 1: scale our own buffers in place
        ctx.grads_used = True  # (out of place while being traced by torch.compile)
        traced = torch._guards.detect_fake_mode(grad_loss) is not None
        gh, gw, gb = ((g * grad_loss) if traced else g.mul_(grad_loss)
                      for g in ctx.grads)
        ctx.grads = None
    return (gh if need_gh else None, gw if need_gw else None, None,
            gb if need_gb and ctx.has_bias else None) + (None,) * 11


_flce.register_autograd(_flce_grad, setup_context=_setup_context)


# Autocast: like F.linear (hidden, weight, bias cast to bf16, the dtype pyengine's autocast
# regions use; torch.library's rule is one fixed dtype), then the CE in fp32 as always.
AUTOCAST_DTYPE = torch.bfloat16
for _device in ("cpu", "cuda"):
    torch.library.register_autocast(_flce, _device, AUTOCAST_DTYPE)


def _autocasting(hidden):
    return (hidden.is_floating_point() and hidden.device.type in ("cpu", "cuda")
            and torch.is_autocast_enabled(hidden.device.type))


def _compute_dtype(hidden):
    """The dtype the GEMMs run in (filter_eps "auto" follows it)."""
    return AUTOCAST_DTYPE if _autocasting(hidden) else hidden.dtype


# --------------------------------------------------------------------------- public API
def _validate(hidden, weight, target, bias, label_smoothing, softcap, reduction, num_items,
              filter_eps):
    name = "fused_linear_cross_entropy"
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: hidden {tuple(hidden.shape)} does not end in H = "
                         f"{weight.shape[1]} of weight {tuple(weight.shape)}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{name}: target shape {tuple(target.shape)} must equal hidden's "
                         f"leading shape {tuple(hidden.shape[:-1])}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"{name}: target must be an integer tensor, got {target.dtype}")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"{name}: hidden dtype {hidden.dtype} not supported "
                        "(float32, bfloat16, float16; float64 for gradcheck)")
    if weight.dtype != hidden.dtype and not _autocasting(hidden):
        raise TypeError(f"{name}: weight dtype {weight.dtype} != hidden dtype {hidden.dtype}")
    tensors = {"weight": weight, "target": target, "bias": bias}
    for k, t in tensors.items():
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: {k} is on {t.device}, hidden on {hidden.device}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or (
            bias.dtype != hidden.dtype and not _autocasting(hidden))):
        raise ValueError(f"{name}: bias must be [{weight.shape[0]}] of {hidden.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}: softcap must be None or > 0, got {softcap}")
    if num_items is not None and not float(num_items) > 0:
        raise ValueError(f"{name}: num_items must be > 0, got {num_items}")
    if not (filter_eps is None or filter_eps == "auto" or (
            isinstance(filter_eps, (int, float)) and not isinstance(filter_eps, bool)
            and 0 <= filter_eps < 1)):
        raise ValueError(f"{name}: filter_eps must be None, 'auto' or a float in [0, 1), "
                         f"got {filter_eps!r}")


def resolve_filter_eps(filter_eps, dtype: torch.dtype) -> float | None:
    """None -> None (exact); "auto" -> finfo(dtype).eps / 32 (CCE's rule: 2^-12 in bf16,
    2^-28 in fp32); a number -> itself."""
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32
    return None if filter_eps is None else float(filter_eps)


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *,
                               bias: Tensor | None = None, ignore_index: int = -100,
                               label_smoothing: float = 0.0, z_loss: float = 0.0,
                               softcap: float | None = None, reduction: str = "mean",
                               num_items: int | float | Tensor | None = None,
                               backend: str | None = None,
                               filter_eps: float | str | None = None) -> Tensor:
    """Cross-entropy of `hidden @ weight.T + bias` against `target` without materialising
    the logits.  reduction "mean" divides by the non-ignored token count, or by
    `num_items` (tokens in the whole gradient-accumulation window) when given.
    filter_eps (None = exact, "auto", or a float): the gradients skip vocab entries whose
    softmax contribution is below it (module doc); the loss is always exact.  The "ref"
    backend (the exact spec) ignores it."""
    _validate(hidden, weight, target, bias, label_smoothing, softcap, reduction, num_items,
              filter_eps)
    if isinstance(num_items, Tensor):
        num_items = num_items.item()
    chosen = resolve(OP, backend, hidden.device)
    if chosen == "ref":
        return reference_linear_cross_entropy(hidden, weight, target.long(), bias, ignore_index,
                                              label_smoothing, z_loss, softcap, reduction,
                                              num_items)
    grad_on = torch.is_grad_enabled()
    loss, *_ = _flce(hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
                     target.reshape(-1).long().contiguous(),
                     None if bias is None else bias.contiguous(),
                     int(ignore_index), float(label_smoothing), float(z_loss),
                     float(softcap or 0.0), reduction,
                     float(num_items) if num_items is not None else 0.0, chosen,
                     grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                     grad_on and bias is not None and bias.requires_grad,
                     resolve_filter_eps(filter_eps, _compute_dtype(hidden)))
    return loss.reshape(hidden.shape[:-1]) if reduction == "none" else loss
