"""rope: q and k rotated as HF's apply_rotary_pos_emb, every backend and ISA within torch's
own error vs fp64, strided (HF's transposed) inputs read without a copy, gradcheck +
opcheck, errors."""
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pyengine import _ext
from pyengine.ops.rope import reference_rope, rope, rope_kernel
from tests.conftest import ISAS, assert_within_torch_error

needs_ext = pytest.mark.skipif(_ext._C is None, reason="extension not built")


def inputs(B, Hq, Hk, S, D, dtype, seed=0, cos_batch=None):
    """q, k as HF makes them ([B, S, H, D] projections transposed to [B, H, S, D]), HF-style
    cos/sin of positions (halves equal) perturbed so a swapped half would show."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, Hq, D, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(B, S, Hk, D, generator=gen).to(dtype).transpose(1, 2)
    Bc = B if cos_batch is None else cos_batch
    pos = torch.arange(S)[None, :, None] + torch.arange(Bc)[:, None, None] * 3
    freqs = pos / (100.0 ** (torch.arange(D // 2) / (D // 2)))
    emb = torch.cat((freqs, freqs), -1)
    cos = emb.cos() + 0.1 * torch.randn(Bc, S, D, generator=gen)
    sin = emb.sin() + 0.1 * torch.randn(Bc, S, D, generator=gen)
    dq = torch.randn(B, Hq, S, D, generator=gen).to(dtype)
    dk = torch.randn(B, Hk, S, D, generator=gen).to(dtype)
    return q, k, cos.to(dtype), sin.to(dtype), dq, dk


def run(fn, q, k, cos, sin, dq, dk):
    """(q', k', grad q, grad k) of fn on fresh leaves (strides kept)."""
    ql, kl = (t.detach().clone(memory_format=torch.preserve_format).requires_grad_()
              for t in (q, k))
    qo, ko = fn(ql, kl, cos, sin)
    ((qo.double() * dq.double()).sum() + (ko.double() * dk.double()).sum()).backward()
    return [qo.detach(), ko.detach(), ql.grad, kl.grad]


def check(backend, dtype, shape=(2, 3, 1, 7, 10), cos_batch=None, seed=0):
    q, k, cos, sin, dq, dk = inputs(*shape, dtype, seed=seed, cos_batch=cos_batch)
    got = run(lambda *a: rope(*a, backend=backend), q, k, cos, sin, dq, dk)
    plain = run(apply_rotary_pos_emb, q, k, cos, sin, dq, dk)
    exact = run(apply_rotary_pos_emb, q.double(), k.double(), cos.double(), sin.double(), dq, dk)
    for name, g, p, e in zip(("q", "k", "dq", "dk"), got, plain, exact):
        assert g.dtype == p.dtype
        assert_within_torch_error(f"rope {backend} {name}", g, p, e, dtype)
    return got


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_isa_variants_within_torch_error_and_equal_to_scalar(dtype, restore_isa, threads):
    results = {}
    for isa in ISAS[:ISAS.index(_ext._C.best_isa()) + 1]:
        _ext._C.set_isa_cap(isa)
        results[isa] = check("cpu", dtype, shape=(2, 9, 3, 37, 64))
    for isa, got in results.items():  # fp32 differs by FMA contraction only
        for g, s in zip(got, results["scalar"]):
            torch.testing.assert_close(g, s, rtol=1e-6, atol=1e-6, msg=lambda m: f"{isa}: {m}")


@pytest.mark.parametrize("backend", ["ref", "cpu"])
def test_cos_broadcast_over_batch(backend):
    if backend == "cpu" and _ext._C is None:
        pytest.skip("extension not built")
    check(backend, torch.float32, cos_batch=1)


def test_triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for dtype in (torch.float32, torch.bfloat16):
        q, k, cos, sin, dq, dk = inputs(2, 3, 1, 5, 8, dtype, seed=1, cos_batch=1)
        for backward in (False, True):
            got = rope_kernel(q, k, cos, sin, backward, "triton")
            want = rope_kernel(q, k, cos, sin, backward, "ref")
            for g, w in zip(got, want):  # the interpreter's bf16 cast truncates: 2 ulps
                torch.testing.assert_close(g.float(), w.float(), rtol=2 ** -7, atol=1e-5)


@needs_ext
def test_strided_inputs_read_in_place_outputs_keep_layout():
    """HF's q/k are transposed views: read as they are (no contiguous copy), and the
    outputs get the same layout; a plain contiguous q gives the same values."""
    q, k, cos, sin, _, _ = inputs(2, 4, 2, 6, 16, torch.bfloat16, seed=2)
    qo, ko = rope(q, k, cos, sin, backend="cpu")
    assert qo.stride() == q.stride() and ko.stride() == k.stride()
    qc, kc = rope(q.contiguous(), k.contiguous(), cos, sin, backend="cpu")
    assert qc.is_contiguous() and torch.equal(qc, qo) and torch.equal(kc, ko)
    # an overlapping / padded layout (a slice of a wider head dim) works too
    wide = torch.randn(2, 4, 6, 40).bfloat16()
    qs = wide[..., 3:19]
    torch.testing.assert_close(rope(qs, k, cos, sin, backend="cpu")[0],
                               rope(qs.contiguous(), k, cos, sin, backend="cpu")[0], rtol=0, atol=0)


@needs_ext
def test_gradcheck_and_opcheck():
    q, k, cos, sin, _, _ = inputs(2, 3, 1, 5, 6, torch.float64, seed=3)
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: rope(a, b, cos, sin, backend="cpu"), (q, k))
    qf, kf = (t.detach().float().requires_grad_() for t in (q, k))
    for backward in (False, True):
        torch.library.opcheck(torch.ops.pyengine.rope.default,
                              (qf, kf, cos.float(), sin.float(), backward, "cpu"))


def test_reference_is_hf():
    q, k, cos, sin, _, _ = inputs(1, 2, 2, 4, 8, torch.bfloat16, seed=4)
    for a, b in zip(reference_rope(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(a, b)


@needs_ext
def test_mixed_dtypes_promote_like_hf():
    """bf16 q, k with fp32 cos/sin (HF under autocast) give fp32, as HF's does."""
    q, k, cos, sin, _, _ = inputs(1, 2, 1, 4, 8, torch.bfloat16, seed=5)
    got = rope(q, k, cos.float(), sin.float(), backend="cpu")
    want = apply_rotary_pos_emb(q, k, cos.float(), sin.float())
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_what_is_wrong():
    q, k, cos, sin, _, _ = inputs(2, 2, 1, 4, 8, torch.float32)
    with pytest.raises(ValueError, match=r"cos \(2, 3, 8\) and sin \(2, 3, 8\) must both be "
                                         r"\[2 or 1, 4, 8\]"):
        rope(q, k, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="even head dim"):
        rope(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="cos and sin get no gradient"):
        rope(q, k, cos.requires_grad_(), sin)
