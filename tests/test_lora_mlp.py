"""lora_mlp (LoRA gated MLP op), its SwiGLU kernels and the LoRAMLP module."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from pyengine import _ext
from pyengine.nn import LoRAMLP
from pyengine.ops import lora_mlp, reference_lora_mlp, reference_swiglu, swiglu
from pyengine.ops.lora import low_rank_pass
from pyengine.ops.lora_mlp import _cpu_middle_backward
from pyengine.ops.swiglu import reference_swiglu_backward, swiglu_backward, swiglu_forward
from tests.conftest import ISAS, num_threads, repeat_equal

needs_ext = pytest.mark.skipif(_ext._C is None, reason="extension not built")
LOW = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-6}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------- SwiGLU
def swiglu_inputs(n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g, u, dh = (torch.randn(n, generator=gen) * 4 for _ in range(3))
    g[:4] = torch.tensor([-100.0, 100.0, 0.0, -20.0])  # saturated sigmoid and silu(0)
    return g.to(dtype), u.to(dtype), dh.to(dtype)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_isa_variants_match_scalar_and_reference(dtype, restore_isa, threads):
    n = 20011  # ragged: not a multiple of any vector width or thread grain
    g, u, dh = swiglu_inputs(n, dtype)
    ref_h = reference_swiglu(g, u)
    ref = reference_swiglu_backward(dh, g, u, want_h=True)
    out = {}
    for isa in ISAS:
        if ISAS.index(isa) > ISAS.index(_ext._C.best_isa()):
            continue
        _ext._C.set_isa_cap(isa)
        out[isa] = (swiglu_forward(g, u, "cpu"), *swiglu_backward(dh, g, u, "cpu", want_h=True))
    tol = LOW[dtype]
    for isa, (h, dg, du, h2) in out.items():
        for got, want in zip((h, dg, du, h2), (ref_h, *ref)):
            torch.testing.assert_close(got.float(), want.float(), rtol=2 * tol, atol=1e-5,
                                       msg=lambda m: f"{isa}: {m}")
        for got, want in zip((h, dg, du), out["scalar"][:3]):
            torch.testing.assert_close(got.float(), want.float(), rtol=2 * tol, atol=1e-6)


@needs_ext
def test_swiglu_backward_without_h_equals_with_h():
    g, u, dh = swiglu_inputs(1003, torch.bfloat16, seed=1)
    dg, du, h = swiglu_backward(dh, g, u, "cpu", want_h=False)
    dg2, du2, _ = swiglu_backward(dh, g, u, "cpu", want_h=True)
    assert h is None and torch.equal(dg, dg2) and torch.equal(du, du2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_triton_interpreter(dtype, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g, u, dh = swiglu_inputs(2500, dtype, seed=2)
    torch.testing.assert_close(swiglu_forward(g, u, "triton").float(),
                               reference_swiglu(g, u).float(), rtol=LOW[dtype], atol=1e-5)
    for got, want in zip(swiglu_backward(dh, g, u, "triton", want_h=True),
                         reference_swiglu_backward(dh, g, u, want_h=True)):
        torch.testing.assert_close(got.float(), want.float(), rtol=LOW[dtype], atol=1e-5)


@needs_ext
def test_swiglu_op_autograd_and_opcheck():
    g = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: swiglu(a, b, backend="cpu"), (g, u))
    gf, uf = (t.detach().float().requires_grad_() for t in (g, u))
    torch.library.opcheck(torch.ops.pyengine.swiglu.default, (gf, uf, "cpu"))
    with pytest.raises(ValueError, match="one shape"):
        swiglu(g, u[:, :3])


# --------------------------------------------------------------------------- lora_mlp
def mlp_tensors(n, hidden, inter, ranks, dtype, adapter_dtype, seed=0, lead=()):
    """x and the nine weights in lora_mlp's argument order, all non-zero."""
    gen = torch.Generator().manual_seed(seed)
    rg, ru, rd = ranks

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    x = rnd(*lead, n, hidden).to(dtype)
    base = [rnd(inter, hidden, std=hidden ** -0.5), rnd(inter, hidden, std=hidden ** -0.5),
            rnd(hidden, inter, std=inter ** -0.5)]
    adapters = [rnd(rg, hidden, std=hidden ** -0.5), rnd(inter, rg, std=rg ** -0.5),
                rnd(ru, hidden, std=hidden ** -0.5), rnd(inter, ru, std=ru ** -0.5),
                rnd(rd, inter, std=inter ** -0.5), rnd(hidden, rd, std=rd ** -0.5)]
    base = [w.to(dtype) for w in base]
    adapters = [a.to(adapter_dtype) for a in adapters]
    wg, wu, wd = base
    ag, bg, au, bu, ad, bd = adapters
    return x, [wg, ag, bg, wu, au, bu, wd, ad, bd]


def native_lora_mlp(x, wg, ag, bg, wu, au, bu, wd, ad, bd, scale):
    """What PEFT on a HF LlamaMLP computes in x's dtype (the error yardstick)."""
    def proj(inp, w, a, b):
        low = F.linear(F.linear(inp.to(a.dtype), a), b) * scale
        return (F.linear(inp, w) + low).to(inp.dtype)
    return proj(F.silu(proj(x, wg, ag, bg)) * proj(x, wu, au, bu), wd, ad, bd)


ADAPTERS = (1, 2, 4, 5, 7, 8)  # positions of the six adapters in the weight list


def run_with_grads(fn, x, weights, dy, scale, **kw):
    x = x.detach().clone().requires_grad_()
    weights = [w.detach().clone().requires_grad_(i - 1 in ADAPTERS) for i, w in
               enumerate(weights, 1)]
    y = fn(x, *weights, scale, **kw)
    y.backward(dy.to(y.dtype))
    return [y, x.grad] + [weights[i].grad for i in ADAPTERS]


CASES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
         (torch.bfloat16, torch.float32)]


@needs_ext
@pytest.mark.parametrize("dtype,adapter_dtype", CASES)
@pytest.mark.parametrize("ranks", [(1, 1, 1), (8, 3, 5), (64, 64, 64)])
@pytest.mark.parametrize("recompute", [False, True])
def test_lora_mlp_matches_fp64_reference(dtype, adapter_dtype, ranks, recompute):
    n, hidden, inter, scale = 47, 31, 123, 1.7
    x, ws = mlp_tensors(n, hidden, inter, ranks, dtype, adapter_dtype, lead=(2,))
    dy = torch.randn(2, n, hidden, generator=torch.Generator().manual_seed(9))
    want = run_with_grads(reference_lora_mlp, x.double(), [w.double() for w in ws], dy.double(),
                          scale)
    got = run_with_grads(lora_mlp, x, ws, dy, scale, backend="cpu",
                         recompute_projections=recompute)
    plain = run_with_grads(native_lora_mlp, x, ws, dy, scale)
    names = ["y", "dx", "dA_gate", "dB_gate", "dA_up", "dB_up", "dA_down", "dB_down"]
    for name, g, p, w in zip(names, got, plain, want):
        assert g.dtype == p.dtype, name
        err, plain_err = rel_err(g, w), rel_err(p, w)
        assert err <= 2 * plain_err + 1e-6, f"{name}: error {err:.2e} vs plain {plain_err:.2e}"


@needs_ext
@pytest.mark.parametrize("dtype,adapter_dtype", CASES)
def test_lora_mlp_fused_isa_variants_match_scalar(dtype, adapter_dtype, restore_isa, threads):
    """The fused LoRA-SwiGLU passes (csrc/swiglu_impl.h) per ISA vs the scalar build."""
    x, ws = mlp_tensors(37, 29, 150, (5, 17, 3), dtype, adapter_dtype, seed=3)
    dy = torch.randn(37, 29, generator=torch.Generator().manual_seed(4))
    results = {}
    for isa in ISAS[:ISAS.index(_ext._C.best_isa()) + 1]:
        _ext._C.set_isa_cap(isa)
        results[isa] = run_with_grads(lora_mlp, x, ws, dy, 1.3, backend="cpu")
    tol = max(LOW[dtype], 1e-4)  # fp32: summation order differs between vector widths
    for isa, got in results.items():
        for g, s in zip(got, results["scalar"]):
            torch.testing.assert_close(g.float(), s.float(), rtol=tol, atol=1e-4,
                                       msg=lambda m: f"{isa}: {m}")


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 40), hidden=st.integers(1, 24), inter=st.integers(1, 40),
       ranks=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
       backend=st.sampled_from(["cpu", "ref"]))
def test_lora_mlp_ragged_fp32(n, hidden, inter, ranks, backend):
    if backend == "cpu" and _ext._C is None:
        return
    x, ws = mlp_tensors(n, hidden, inter, ranks, torch.float32, torch.float32, seed=n)
    dy = torch.randn(n, hidden)
    want = run_with_grads(reference_lora_mlp, x.double(), [w.double() for w in ws],
                          dy.double(), 0.5)
    got = run_with_grads(lora_mlp, x, ws, dy, 0.5, backend=backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@needs_ext
@pytest.mark.parametrize("dtype,adapter_dtype", CASES)
@pytest.mark.parametrize("threads", [2, 3, 4])
def test_lora_mlp_deterministic_on_several_threads(dtype, adapter_dtype, threads):
    """Same inputs and thread count -> same bits for y, dx and all six adapter grads (the
    weight gradients are reductions over rows split between threads).  Many rows, so many
    tasks; repeated, as a completion-order reduction differs only on some runs."""
    x, ws = mlp_tensors(4000, 8, 24, (1, 2, 3), dtype, adapter_dtype, seed=2)
    dy = torch.randn(4000, 8, generator=torch.Generator().manual_seed(3))
    with num_threads(threads):
        repeat_equal(lambda: run_with_grads(lora_mlp, x, ws, dy, 1.3, backend="cpu"), 8)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_mlp_cpu_passes_equal_on_any_thread_count(dtype):
    """The C++ row passes (csrc/lowrank_rows.h with every part and both masks, and
    csrc/swiglu.h) cut rows into blocks that do not depend on the thread count: 1, 2 and 3
    threads give the same bits."""
    gen = torch.Generator().manual_seed(4)
    n, k, m, inter, r = 301, 70, 45, 150, 6

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)
    src, dst0 = rnd(n, k).to(dtype), rnd(n, m).to(dtype)
    src_mask, dst_mask = rnd(n, k) > 0, rnd(n, m) > 0
    proj_w, grad_coef, add_coef, add_w = rnd(r, k), rnd(n, r), rnd(n, r), rnd(r, m)
    g, u, dh0 = (rnd(n, inter).to(dtype) for _ in range(3))
    xa, p_down = rnd(n, 2 * r), rnd(n, r)
    a_down, b_gate, b_up = rnd(r, inter), rnd(inter, r), rnd(inter, r)

    def once():
        dst, dh = dst0.clone(), dh0.clone()
        proj, grad = low_rank_pass("cpu", src, src_mask=src_mask, proj_w=proj_w, scale=0.7,
                                   grad_coef=grad_coef, grad_scale=1.1, dst=dst,
                                   add_coef=add_coef, add_w=add_w, alpha=0.9, dst_mask=dst_mask)
        middle = _cpu_middle_backward(dh, g, u, xa, p_down, a_down, b_gate, b_up, 0.7, "cpu")
        return [proj, grad, dst, *middle]
    results = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            results.append(once())
    for threads, got in zip((2, 3), results[1:]):
        for i, (a, b) in enumerate(zip(got, results[0])):
            assert torch.equal(a, b), (threads, i)


def test_lora_mlp_triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, ws = mlp_tensors(19, 16, 40, (4, 2, 3), torch.float32, torch.float32)
    dy = torch.randn(19, 16)
    want = run_with_grads(reference_lora_mlp, x.double(), [w.double() for w in ws], dy.double(),
                          2.0)
    got = run_with_grads(lora_mlp, x, ws, dy, 2.0, backend="triton")
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@needs_ext
@pytest.mark.parametrize("recompute", [False, True])
def test_lora_mlp_gradcheck_fp64(recompute):
    x, ws = mlp_tensors(5, 4, 6, (2, 3, 2), torch.float64, torch.float64)
    x.requires_grad_()
    for i in ADAPTERS:
        ws[i].requires_grad_()

    def fn(x, ag, bg, au, bu, ad, bd):
        return lora_mlp(x, ws[0], ag, bg, ws[3], au, bu, ws[6], ad, bd, 0.7, backend="cpu",
                        recompute_projections=recompute)
    assert torch.autograd.gradcheck(fn, (x, *(ws[i] for i in ADAPTERS)))


@needs_ext
@pytest.mark.parametrize("adapter_dtype,base_dtype", [(torch.float32, torch.bfloat16),
                                                     (torch.bfloat16, torch.bfloat16),
                                                     (torch.float32, torch.float32)])
def test_lora_mlp_opcheck(adapter_dtype, base_dtype):
    """bf16 x; fp32 base weights with bf16 x are what the autocast rule hands the op."""
    x, ws = mlp_tensors(9, 8, 12, (2, 3, 4), torch.bfloat16, adapter_dtype)
    ws = [w.to(base_dtype) if i in (0, 3, 6) else w for i, w in enumerate(ws)]
    x.requires_grad_()
    for i in ADAPTERS:
        ws[i].requires_grad_()
    for keep in (True, False):
        torch.library.opcheck(torch.ops.pyengine.lora_mlp.default, (x, *ws, 2.0, "cpu", keep))
        _, g, u, xa, ha = torch.ops.pyengine.lora_mlp(x.detach(), *ws, 2.0, "cpu", keep)
        dy = torch.randn(9, 8, dtype=torch.bfloat16)
        torch.library.opcheck(torch.ops.pyengine.lora_mlp_backward.default,
                              (dy, x.detach(), *(w.detach() for w in ws), g, u, xa, ha, 2.0,
                               "cpu", True))


def saved_bytes(fn):
    """Bytes of the unique storages autograd saves while running fn()."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("recompute", [False, True])
def test_lora_mlp_autocast_saves_the_fp32_bases_not_bf16_copies(backend, recompute,
                                                                 monkeypatch):
    """Under bf16 autocast with fp32 base weights, backward keeps the model's three fp32
    weights themselves, no bf16 cast of them (each GEMM re-casts its weight); outputs and
    all gradients are the bits of the pre-cast bf16 base call, recomputed projections
    included."""
    if backend == "cpu" and _ext._C is None:
        pytest.skip("extension not built")
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, ws = mlp_tensors(13, 16, 24, (4, 2, 3), torch.float32, torch.float32)
    dy = torch.randn(13, 16, generator=torch.Generator().manual_seed(5)).bfloat16()
    saved, bases = [], []

    def in_autocast(*args, **kw):
        bases.extend(args[i] for i in (1, 4, 7))  # run_with_grads' copies of the weights
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                      lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return lora_mlp(*args, **kw)

    got = run_with_grads(in_autocast, x, ws, dy, 2.0, backend=backend,
                         recompute_projections=recompute)
    kept = {(t.dtype, t.untyped_storage().data_ptr()) for t in saved
            if t.shape in ((24, 16), (16, 24))}
    assert kept == {(torch.float32, w.untyped_storage().data_ptr()) for w in bases}
    want = run_with_grads(lora_mlp, x.bfloat16(), [w.bfloat16() if i in (0, 3, 6) else w
                                                   for i, w in enumerate(ws)], dy, 2.0,
                          backend=backend, recompute_projections=recompute)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), atol=0, rtol=0)


@needs_ext
def test_lora_mlp_saves_only_x_gate_up_and_low_rank():
    n, hidden, inter, r = 64, 32, 96, 4
    x, ws = mlp_tensors(n, hidden, inter, (r, r, r), torch.float32, torch.float32)
    x.requires_grad_()
    params = {w.untyped_storage().data_ptr() for w in ws}
    for i in ADAPTERS:
        ws[i].requires_grad_()
    for recompute, big in ((False, 2 * n * inter), (True, 0)):
        saved = saved_bytes(lambda: lora_mlp(x, *ws, 2.0, backend="cpu",
                                             recompute_projections=recompute))
        activations = sum(b for p, b in saved.items() if p not in params)
        assert activations == 4 * (n * hidden + big + 3 * n * r), (recompute, saved)


def test_lora_mlp_errors():
    x, ws = mlp_tensors(5, 4, 6, (2, 2, 2), torch.float32, torch.float32)
    with pytest.raises(ValueError, match="b_up has shape"):
        lora_mlp(x, *ws[:5], ws[5][:, :1], *ws[6:], 1.0)
    with pytest.raises(TypeError, match="w_down dtype"):
        lora_mlp(x, *ws[:6], ws[6].double(), *ws[7:], 1.0)
    with pytest.raises(TypeError, match="adapter dtype"):
        lora_mlp(x.bfloat16(), *[w.bfloat16() if i in (0, 3, 6) else w.double()
                                 for i, w in enumerate(ws)], 1.0)
    with pytest.raises(ValueError, match="w_gate requires grad"):
        lora_mlp(x, ws[0].requires_grad_(), *ws[1:], 1.0)


# --------------------------------------------------------------------------- LoRAMLP
def tiny_llama_mlp(hidden=24, inter=40, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu",
                                   num_attention_heads=4, num_key_value_heads=4)
    return LlamaMLP(cfg).to(dtype)


@pytest.mark.parametrize("rslora", [False, True])
def test_from_mlp_matches_reference(rslora):
    mlp = tiny_llama_mlp()
    mod = LoRAMLP.from_mlp(mlp, r=5, alpha=16, rslora=rslora, backend="cpu" if _ext._C else None)
    assert mod.scale == pytest.approx(16 / 5 ** 0.5 if rslora else 16 / 5)
    x = torch.randn(3, 7, 24)
    torch.testing.assert_close(mod(x), mlp(x), rtol=1e-5, atol=1e-5)  # B = 0: identity update
    for p in (mod.gate_proj, mod.up_proj, mod.down_proj):
        nn.init.normal_(p.lora_B.weight, std=0.3)
    ws = []
    for p in (mod.gate_proj, mod.up_proj, mod.down_proj):
        ws += [p.base_layer.weight, p.lora_A.weight, p.lora_B.weight]
    want = reference_lora_mlp(x.double(), *(w.double() for w in ws), mod.scale)
    torch.testing.assert_close(mod(x).double(), want, rtol=1e-5, atol=1e-5)
    trainable = {k for k, p in mod.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.lora_{ab}.weight" for p in ("gate_proj", "up_proj", "down_proj")
                         for ab in "AB"}
    assert "gate_proj.base_layer.weight" in mod.state_dict()


def test_from_lora_mlp_shares_peft_parameters_and_matches_peft():
    peft = pytest.importorskip("peft")

    class Holder(nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.mlp = mlp

        def forward(self, x):
            return self.mlp(x)

    model = peft.get_peft_model(Holder(tiny_llama_mlp()), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.3)
    mlp = model.base_model.model.mlp
    mod = LoRAMLP.from_lora_mlp(mlp)
    x = torch.randn(11, 24)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_peft, y_ours = model(xa), mod(xb)
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y_peft)
    grads_peft = torch.autograd.grad(y_peft, [xa, mlp.gate_proj.lora_A["default"].weight], dy)
    grads_ours = torch.autograd.grad(y_ours, [xb, mod.gate_proj.lora_A.weight], dy)
    assert mod.gate_proj.lora_A.weight is mlp.gate_proj.lora_A["default"].weight
    for a, b in zip(grads_ours, grads_peft):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_from_mlp_rejects_non_silu():
    mlp = tiny_llama_mlp()
    mlp.act_fn = nn.GELU()
    with pytest.raises(ValueError, match="SiLU"):
        LoRAMLP.from_mlp(mlp, r=2, alpha=4)


@needs_ext
def test_loramlp_under_torch_compile():
    mlp = tiny_llama_mlp(hidden=16, inter=24)
    mod = LoRAMLP.from_mlp(mlp, r=3, alpha=6, backend="cpu")
    for p in (mod.gate_proj, mod.up_proj, mod.down_proj):
        nn.init.normal_(p.lora_B.weight, std=0.3)
    x = torch.randn(2, 5, 16)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = mod(xe)
    ye.sum().backward()
    grad_eager = mod.up_proj.lora_A.weight.grad.clone()
    mod.zero_grad()
    yc = torch.compile(mod)(xc)
    yc.sum().backward()
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(mod.up_proj.lora_A.weight.grad, grad_eager)


@pytest.mark.parametrize("backend", ["ref"] + (["cpu"] if _ext._C is not None else []))
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_lora_mlp_autocast_casts_the_base_and_keeps_fp32_adapters(backend, base_dtype):
    """Inside torch.autocast bf16: x and the three base weights run in bf16 (as F.linear's
    inputs), the fp32 adapters stay fp32 with fp32 gradients: the same bits as the
    bf16-base + fp32-adapter call outside autocast; y in bf16; the op itself (torch.ops)
    follows the same rule.  An fp32 x used to raise "w_gate dtype ... != x dtype"."""
    x, ws = mlp_tensors(13, 16, 24, (4, 2, 3), torch.float32, torch.float32)
    ws = [w.to(base_dtype) if i in (0, 3, 6) else w for i, w in enumerate(ws)]
    dy = torch.randn(13, 16, generator=torch.Generator().manual_seed(5)).bfloat16()

    def in_autocast(*args, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lora_mlp(*args, **kw)

    got = run_with_grads(in_autocast, x, ws, dy, 2.0, backend=backend)
    want = run_with_grads(lora_mlp, x.bfloat16(), [w.bfloat16() if i in (0, 3, 6) else w
                                                   for i, w in enumerate(ws)], dy, 2.0,
                          backend=backend)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in got[2:])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), atol=0, rtol=0)
    if backend == "cpu":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.ops.pyengine.lora_mlp(x, *ws, 2.0, "cpu", True)[0]
        torch.testing.assert_close(y, want[0], atol=0, rtol=0)
