"""pyengine.ops.attention (flash-style training attention), its CPU kernel and the Hugging
Face integration (pyengine.nn.attention)."""
import copy
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pyengine import _ext
from pyengine.nn.attention import Attention, use_pyengine_attention
from pyengine.ops import attention, reference_attention
from tests.conftest import ISAS, assert_within_torch_error, num_threads, repeat_equal

needs_ext = pytest.mark.skipif(_ext._C is None, reason="extension not built")


def qkv(B, Hq, Hkv, S, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, S, D, generator=gen).to(dtype) for h in (Hq, Hkv, Hkv))
    dout = torch.randn(B, Hq, S, D, generator=gen).to(dtype)
    return q, k, v, dout


def pad_mask(B, S, left):
    """Row 0 padded by a third of S (left or right), the others full."""
    m = torch.ones(B, S, dtype=torch.bool)
    n = S // 3
    if n:
        if left:
            m[0, :n] = False
        else:
            m[0, S - n:] = False
    return m


def run(fn, q, k, v, dout):
    """(out, dq, dk, dv) of fn(q, k, v) with grad_output dout."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def sdpa(causal, mask, dtype=None):
    """torch's SDPA with the same masking (the 'plain torch in this dtype' peer)."""
    def fn(q, k, v):
        S = q.shape[2]
        allowed = torch.ones(S, S, dtype=torch.bool)
        allowed = allowed.tril() if causal else allowed
        allowed = allowed[None, None] & (mask[:, None, None, :] if mask is not None else True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    return fn


SHAPES = [  # S, D, Hq, Hkv, causal, padded
    (1, 32, 1, 1, True, False), (47, 64, 9, 3, True, True), (63, 32, 4, 2, False, True),
    (64, 64, 1, 1, True, False), (65, 32, 9, 3, False, False), (130, 64, 4, 2, True, True),
]


@needs_ext
@pytest.mark.parametrize("dtype,amx", [(torch.float32, True), (torch.bfloat16, True),
                                       (torch.bfloat16, False), (torch.float16, True)],
                         ids=["fp32", "bf16", "bf16-noamx", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "S{}-D{}-{}x{}-{}-{}".format(
    s[0], s[1], s[2], s[3], "causal" if s[4] else "full", "pad" if s[5] else "nopad"))
def test_attention_within_torch_error(shape, dtype, amx, restore_isa):
    """Every path (bf16: the AMX tiles where the machine has them, and the fp32 tiles)."""
    _ext._C.set_amx(amx)
    S, D, Hq, Hkv, causal, padded = shape
    q, k, v, dout = qkv(2, Hq, Hkv, S, D, dtype)
    mask = pad_mask(2, S, left=False) if padded else None  # every query row keeps a key
    ours = run(lambda a, b, c: attention(a, b, c, causal=causal, key_padding_mask=mask,
                                         backend="cpu"), q, k, v, dout)
    plain = run(sdpa(causal, mask), q, k, v, dout)
    exact = run(lambda a, b, c: reference_attention(a, b, c, causal, mask),
                *(t.double() for t in (q, k, v, dout)))
    for name, o, p, e in zip(("out", "dq", "dk", "dv"), ours, plain, exact):
        assert o.dtype == dtype
        assert_within_torch_error(name, o, p, e, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_without_keys_give_zero_output_and_gradients(dtype):
    """Left padding + causal: padded query rows see no key -> 0, zero grads, never NaN; the
    other rows match the fp64 reference."""
    S = 70
    q, k, v, dout = qkv(2, 4, 2, S, 32, dtype, seed=3)
    mask = pad_mask(2, S, left=True)
    out, dq, dk, dv = run(lambda a, b, c: attention(a, b, c, key_padding_mask=mask, backend="cpu"),
                          q, k, v, dout)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    n = S // 3
    assert torch.equal(out[0, :, :n], torch.zeros_like(out[0, :, :n]))
    assert torch.equal(dq[0, :, :n], torch.zeros_like(dq[0, :, :n]))
    assert torch.equal(dk[0, :, :n], torch.zeros_like(dk[0, :, :n]))  # padded keys: no grad
    assert torch.equal(dv[0, :, :n], torch.zeros_like(dv[0, :, :n]))
    exact = run(lambda a, b, c: reference_attention(a, b, c, True, mask),
                *(t.double() for t in (q, k, v, dout)))
    assert torch.equal(exact[0][0, :, :n], torch.zeros_like(exact[0][0, :, :n], dtype=torch.double))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for o, e in zip((out, dq, dk, dv), exact):
        torch.testing.assert_close(o.double(), e, rtol=tol, atol=tol)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_isa_variants_match_scalar(dtype, restore_isa):
    q, k, v, dout = qkv(2, 4, 2, 97, 64, dtype, seed=4)
    mask = pad_mask(2, 97, left=True)
    fn = lambda a, b, c: attention(a, b, c, key_padding_mask=mask, backend="cpu")
    out = {}
    _ext._C.set_amx(False)
    for isa in ISAS[:ISAS.index(_ext._C.best_isa()) + 1]:
        _ext._C.set_isa_cap(isa)
        out[isa] = run(fn, q, k, v, dout)
    if dtype == torch.bfloat16 and _ext._C.has_amx():
        _ext._C.set_amx(True)
        assert _ext._C.amx_active()
        out["amx"] = run(fn, q, k, v, dout)
        assert not all(torch.equal(a, s) for a, s in zip(out["amx"], out["avx512"]))
    # fp32 summation order; bf16: roundings of the results (and of P, dS with AMX)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    for isa, got in out.items():
        for g, s in zip(got, out["scalar"]):
            torch.testing.assert_close(g.float(), s.float(), rtol=tol, atol=tol,
                                       msg=lambda m: f"{isa}: {m}")


@needs_ext
@pytest.mark.parametrize("causal", [True, False])
def test_bitwise_same_on_any_thread_count(causal, threads):
    """bf16 runs the AMX tiles where the machine has them (the default)."""
    q, k, v, dout = qkv(2, 9, 3, 150, 64, torch.bfloat16, seed=5)
    mask = pad_mask(2, 150, left=True)
    fn = lambda: run(lambda a, b, c: attention(a, b, c, causal=causal, key_padding_mask=mask,
                                               backend="cpu"), q, k, v, dout)
    got = repeat_equal(fn, 3)
    with num_threads(1):
        one = fn()
    for g, o in zip(got, one):
        assert torch.equal(g, o)


@needs_ext
def test_amx_switches(restore_isa):
    """AMX only with avx512 and while allowed; only where CPUID, XCR0 and the OS allow."""
    C = _ext._C
    assert C.amx_active() == C.has_amx()
    C.set_amx(False)
    assert not C.amx_active()
    C.set_amx(True)
    C.set_isa_cap("avx2")
    assert not C.amx_active()
    flags = open("/proc/cpuinfo").read().split() if sys.platform == "linux" else []
    if "amx_bf16" in flags and "amx_tile" in flags:
        assert C.has_amx()


@needs_ext
def test_op_gradcheck_opcheck_and_compile():
    q, k, v, _ = qkv(2, 4, 2, 5, 4, torch.float64, seed=6)  # tiny: gradcheck is O(numel^2)
    mask = pad_mask(2, 5, left=True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: attention(a, b, c, key_padding_mask=mask, backend="cpu"), (q, k, v))
    q, k, v, _ = qkv(2, 4, 2, 9, 8, torch.float64, seed=6)
    mask = pad_mask(2, 9, left=True)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.pyengine.attention.default,
                          (qf, kf, vf, mask, True, 0.3, "cpu"))
    out, lse = torch.ops.pyengine.attention(qf.detach(), kf.detach(), vf.detach(), mask, True,
                                            0.3, "cpu")
    torch.library.opcheck(torch.ops.pyengine.attention_backward.default,
                          (torch.randn_like(out), qf.detach(), kf.detach(), vf.detach(), mask,
                           out, lse, True, 0.3, "cpu"))
    fn = torch.compile(lambda a, b, c: attention(a, b, c, key_padding_mask=mask, backend="cpu"),
                       fullgraph=True, backend="aot_eager")
    got = run(fn, qf, kf, vf, torch.ones_like(out))
    want = run(lambda a, b, c: attention(a, b, c, key_padding_mask=mask, backend="cpu"),
               qf, kf, vf, torch.ones_like(out))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@needs_ext
def test_backward_saves_no_score_matrix():
    """Autograd keeps q, k, v, the mask, out and lse only: no S x S tensor."""
    S = 256
    q, k, v, _ = qkv(1, 2, 1, S, 16, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                  lambda t: t):
        attention(q, k, v, backend="cpu")
    assert max(saved) == q.numel() and sum(saved) == 2 * q.numel() + 2 * k.numel() + 2 * S


@needs_ext
def test_scale_default_and_autocast():
    q, k, v, _ = qkv(1, 4, 2, 40, 32, torch.float32, seed=7)
    torch.testing.assert_close(attention(q, k, v, backend="cpu"),
                               attention(q, k, v, scale=1 / math.sqrt(32), backend="cpu"),
                               rtol=0, atol=0)
    assert not torch.equal(attention(q, k, v, backend="cpu"),
                           attention(q, k, v, scale=0.5, backend="cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k.bfloat16(), v, backend="cpu")
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="cpu"))


def test_bad_inputs_are_named():
    q, k, v, _ = qkv(2, 4, 2, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple of k/v heads 3"):
        attention(q, k.repeat(1, 2, 1, 1)[:, :3], v.repeat(1, 2, 1, 1)[:, :3])
    with pytest.raises(ValueError, match=r"k \(2, 2, 7, 16\)"):
        attention(q, k[:, :, :7], v[:, :, :7])
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match=r"key_padding_mask must be bool \[2, 8\]"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 8))


def test_module_matches_op():
    q, k, v, _ = qkv(1, 4, 2, 20, 16, torch.float32)
    mask = pad_mask(1, 20, left=False)
    torch.testing.assert_close(Attention(causal=False)(q, k, v, mask),
                               reference_attention(q, k, v, False, mask), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- Hugging Face
def tiny_llama(seed=0):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def tiny_bert(seed=0):
    import transformers
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=96,
                                  attn_implementation="sdpa")
    torch.manual_seed(seed)
    return transformers.BertModel(cfg)


def forward_backward(model, ids, am, dtype):
    """(per-position output, grads of every parameter) of sum(output * fixed weights)."""
    model = model.to(dtype)
    out = model(input_ids=ids, attention_mask=am)
    h = out.logits if hasattr(out, "logits") else out.last_hidden_state
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    grads = torch.autograd.grad((h * w).float().sum(), [p for p in model.parameters()],
                                allow_unused=True)
    return h.detach(), grads


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_hf_model_matches_sdpa(arch, dtype):
    """Forward + backward of a tiny model with padding (left for the decoder, right for the
    encoder) equal to the same model on SDPA; a second model instance stays on SDPA."""
    make = tiny_llama if arch == "llama" else tiny_bert
    sdpa_model, ours_model, untouched = make().train(), make().train(), make()
    for m in (sdpa_model, ours_model):
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    use_pyengine_attention(ours_model)
    assert ours_model.config._attn_implementation == "pyengine"
    assert untouched.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 97, (3, 37), generator=torch.Generator().manual_seed(1))
    am = torch.ones(3, 37, dtype=torch.long)
    if arch == "llama":
        am[0, :9] = 0  # left padding
        keep = am.bool()
    else:
        am[0, 30:] = 0  # right padding
        keep = torch.ones_like(am, dtype=torch.bool)
    exact_h, exact_g = forward_backward(copy.deepcopy(sdpa_model), ids, am, torch.float64)
    plain_h, plain_g = forward_backward(sdpa_model, ids, am, dtype)
    ours_h, ours_g = forward_backward(ours_model, ids, am, dtype)
    # padded decoder rows are don't-care (SDPA gives them a uniform average, we give 0)
    assert_within_torch_error("output", ours_h[keep], plain_h[keep], exact_h[keep], dtype)
    if arch == "llama":  # gradients only through real rows
        return
    for i, (o, p, e) in enumerate(zip(ours_g, plain_g, exact_g)):
        if e is not None:
            rtol = 0.05 if dtype == torch.bfloat16 else 1e-4
            torch.testing.assert_close(o.double(), e, rtol=rtol,
                                       atol=(p.double() - e).abs().max().item() * 4 + 1e-6,
                                       msg=lambda m: f"grad {i}: {m}")


@needs_ext
def test_hf_llama_training_grads_match_sdpa():
    """Causal LM loss with labels masked at padding: gradients equal SDPA's (fp32)."""
    sdpa_model, ours_model = tiny_llama(), tiny_llama()
    use_pyengine_attention(ours_model)
    ids = torch.randint(0, 97, (2, 29), generator=torch.Generator().manual_seed(2))
    am = torch.ones(2, 29, dtype=torch.long)
    am[1, :6] = 0
    labels = ids.masked_fill(am == 0, -100)
    grads = []
    for m in (sdpa_model, ours_model):
        loss = m(input_ids=ids, attention_mask=am, labels=labels).loss
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_importing_pyengine_registers_nothing_in_transformers():
    code = ("import pyengine, pyengine.nn.attention, pyengine.ops\n"
            "from transformers import AttentionInterface\n"
            "from transformers.masking_utils import AttentionMaskInterface\n"
            "print('pyengine' in AttentionInterface._global_mapping,"
            " 'pyengine' in AttentionMaskInterface._global_mapping)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_interpreter_matches_reference(causal, dtype, monkeypatch):
    """The Triton twin (TRITON_INTERPRET=1 on CPU): ragged S, GQA 4/2, D 24 (padded to 32),
    left padding so some rows have no key."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    S = 45
    q, k, v, dout = qkv(2, 4, 2, S, 24, dtype, seed=8)
    mask = pad_mask(2, S, left=True)
    ours = run(lambda a, b, c: attention(a, b, c, causal=causal, key_padding_mask=mask,
                                         backend="triton"), q, k, v, dout)
    exact = run(lambda a, b, c: reference_attention(a, b, c, causal, mask),
                *(t.double() for t in (q, k, v, dout)))
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: one rounding of each result
    for name, o, e in zip(("out", "dq", "dk", "dv"), ours, exact):
        assert torch.isfinite(o).all(), name
        torch.testing.assert_close(o.double(), e, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
