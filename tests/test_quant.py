"""Quant formats (q8_0 / q4_0 / nf4), quant_matmul backends, QuantLinear, quantize_model."""
import logging
import math
import os

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from pyengine import _ext
from pyengine.nn import QuantLinear
from pyengine.ops import quant_matmul, reference_quant_matmul
from pyengine.ops.quant import FMT_CODES, _qmm
from pyengine.quant import (FORMATS, NF4_CODEBOOK, QuantizedWeight, quantize,
                            quantize_model)
from tests.conftest import num_threads, repeat_equal

FMTS = tuple(FORMATS)
HAS_EXT = _ext._C is not None
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="C++ extension not built")
GGUF_TYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


def rand_weight(n, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.1)
    w[:, ::7] *= 3.0  # uneven magnitudes inside blocks
    return w.to(dtype)


@pytest.fixture
def isa_cap():
    """Restore the best ISA after a test that caps it."""
    yield _ext._C.set_isa_cap if HAS_EXT else None
    if HAS_EXT:
        _ext._C.set_isa_cap(_ext._C.best_isa())


# ------------------------------------------------------------------ straightforward ggml
def ggml_q8_0(w):
    """ggml-quants.c quantize_row_q8_0_ref, one block at a time in numpy fp32."""
    out = []
    for blk in w.reshape(-1, 32).astype(np.float32):
        amax = np.float32(np.abs(blk).max())
        d = np.float32(amax / np.float32(127))
        idv = np.float32(1) / d if d else np.float32(0)
        q = [int(math.copysign(math.floor(abs(float(np.float32(v * idv))) + 0.5),
                               float(v))) for v in blk]
        out.append((np.float16(d), np.array(q, dtype=np.int8)))
    return out


def ggml_q4_0(w):
    out = []
    for blk in w.reshape(-1, 32).astype(np.float32):
        m = blk[np.argmax(np.abs(blk))]
        d = np.float32(m / np.float32(-8))
        idv = np.float32(1) / d if d else np.float32(0)
        q = [min(15, int(np.float32(np.float32(v * idv) + np.float32(8.5)))) for v in blk]
        out.append((np.float16(d), np.array(q, dtype=np.uint8)))
    return out


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
def test_gguf_formats_exact(fmt):
    w = rand_weight(5, 96, seed=1)
    w[1, :32] = 0.0  # an all-zero block: d = 0, q = 0 (q8_0) / 8 (q4_0)
    w[2, 32:64] = torch.arange(32) - 15.5  # with the 127 below, q8_0 d = 1: every
    w[2, 32] = 127.0                       # quant a tie, which ggml rounds away from zero
    qw = quantize(w, fmt)
    ref = (ggml_q8_0 if fmt == "q8_0" else ggml_q4_0)(w.numpy())
    codes = qw.codes().reshape(-1, 32).numpy()
    scales = qw.scales.reshape(-1).numpy()
    for i, (d, q) in enumerate(ref):
        assert scales[i].tobytes() == d.tobytes(), f"block {i} scale"
        np.testing.assert_array_equal(codes[i], q, err_msg=f"block {i} quants")
    # the gguf package writes the same bytes and dequantizes to the same values
    np.testing.assert_array_equal(gguf.quants.quantize(w.numpy(), GGUF_TYPES[fmt]),
                                  qw.gguf_blocks().numpy())
    deq = gguf.quants.dequantize(qw.gguf_blocks().numpy(), GGUF_TYPES[fmt])
    np.testing.assert_array_equal(deq.reshape(w.shape), qw.dequantize().numpy())


def test_q4_0_nibble_order():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 16], w[0, 5] = -8.0, 4.0, 1.0  # d = 1, q = w + 8
    qw = quantize(w, "q4_0")
    raw = qw.gguf_blocks()[0].numpy()
    assert raw[2] == (0 | (12 << 4))   # byte 0: q[0] low, q[16] high
    assert raw[2 + 5] == (9 | (8 << 4))
    assert torch.equal(qw.dequantize(), w)


def test_nf4_nearest_code():
    w = rand_weight(6, 192, seed=2)
    qw = quantize(w, "nf4")
    code = torch.tensor(NF4_CODEBOOK)
    blocks = w.reshape(-1, 64)
    d = blocks.abs().amax(-1).half().float()
    assert torch.equal(qw.scales.reshape(-1).float(), d)
    norm = blocks / d[:, None]
    q = qw.codes().reshape(-1, 64).long()
    dist = (norm[..., None] - code).abs()
    assert torch.all(dist.gather(-1, q[..., None]).squeeze(-1) <= dist.min(-1).values + 1e-7)
    assert torch.equal(qw.dequantize().reshape(-1, 64), code[q] * d[:, None])


def test_nf4_scale_is_the_fp16_absmax_codes_nearest_for_it():
    """Codes are nearest for the stored (fp16-rounded) scale: absmax 1.0003 is stored as
    1.0, so 0.0398 / 1.0 lies above the 0 / 0.0796 midpoint (0.03979) and takes code 8,
    while 0.0398 / 1.0003 would lie below it."""
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = 1.0003, 0.0398
    qw = quantize(w, "nf4")
    assert qw.scales.item() == 1.0
    assert qw.codes()[0, 0, :3].tolist() == [15, 8, 7]


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_bound(fmt, dtype):
    w = rand_weight(7, 320, seed=3, dtype=dtype)
    qw = quantize(w, fmt)
    wf = w.float()
    err = (qw.dequantize() - wf).abs().reshape(-1, qw.block_size)
    d = qw.scales.reshape(-1, 1).float().abs()
    fp16_slack = wf.abs().reshape(-1, qw.block_size).amax(-1, keepdim=True) * 2e-3
    bound = {"q8_0": d / 2, "q4_0": d, "nf4": d * (1.0 - 0.7229568362236023) / 2}[fmt]
    assert torch.all(err <= bound + fp16_slack), (err - bound).max()
    assert qw.nbytes == w.numel() * {"q8_0": 34 / 32, "q4_0": 18 / 32, "nf4": 34 / 64}[fmt]


@pytest.mark.parametrize("fmt", FMTS)
def test_gguf_blocks_and_file_round_trip(fmt, tmp_path):
    qw = quantize(rand_weight(9, 128, seed=4), fmt)
    back = QuantizedWeight.from_gguf_blocks(qw.gguf_blocks(), fmt, qw.shape)
    assert torch.equal(back.qs, qw.qs) and torch.equal(back.scales, qw.scales)
    path = tmp_path / "w.safetensors"
    qw.save(path)
    loaded = QuantizedWeight.load(path)
    assert (loaded.fmt, loaded.shape) == (fmt, qw.shape)
    assert torch.equal(loaded.dequantize(), qw.dequantize())


@needs_ext
def test_compiled_format_table_is_the_python_table():
    """The C++ templates take their constants from a header the build renders from
    pyengine.quant_formats: the extension's compiled table must equal FORMATS (a stale
    header, or constants typed into csrc/ again, would differ)."""
    want = {name: (s.code, s.block, s.bits, s.signed, s.zero, list(s.codebook or ()))
            for name, s in FORMATS.items()}
    assert _ext._C.quant_formats() == want
    assert FMT_CODES == {name: s.code for name, s in FORMATS.items()}


# ------------------------------------------------------------------ errors
def test_quantize_errors():
    with pytest.raises(ValueError, match="K=40 is not a multiple of the block size 32"):
        quantize(torch.randn(4, 40), "q8_0")
    with pytest.raises(ValueError, match="K=96 is not a multiple of the block size 64"):
        quantize(torch.randn(4, 96), "nf4")
    with pytest.raises(TypeError, match="dtype torch.int32 not supported"):
        quantize(torch.ones(4, 32, dtype=torch.int32), "q4_0")
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(32), "q4_0")
    with pytest.raises(ValueError, match="unknown quant format 'q5_0'"):
        quantize(torch.randn(4, 32), "q5_0")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([[float("nan")] * 32]), "q8_0")
    with pytest.raises(ValueError, match="needs 68 uint8 bytes"):
        QuantizedWeight.from_gguf_blocks(torch.zeros(67, dtype=torch.uint8), "q8_0", (2, 32))


def test_quant_matmul_errors():
    qw = quantize(torch.randn(8, 64), "q4_0")
    with pytest.raises(TypeError, match="x dtype torch.float16 not supported"):
        quant_matmul(torch.randn(2, 64).half(), qw)
    with pytest.raises(ValueError, match=r"does not end in K = 64"):
        quant_matmul(torch.randn(2, 63), qw)
    with pytest.raises(ValueError, match=r"bias must be a float \[8\]"):
        quant_matmul(torch.randn(2, 64), qw, bias=torch.randn(7))
    with pytest.raises(TypeError, match="QuantizedWeight"):
        quant_matmul(torch.randn(2, 64), torch.randn(8, 64))


def test_corrupt_files(tmp_path):
    qw = quantize(torch.randn(8, 64), "q8_0")
    good = tmp_path / "good.safetensors"
    qw.save(good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match="trunc.safetensors: not a readable safetensors"):
        QuantizedWeight.load(trunc)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors"):
        QuantizedWeight.load(garbage)
    from safetensors.torch import save_file
    nometa = tmp_path / "nometa.safetensors"
    save_file(qw.state_dict(), str(nometa))
    with pytest.raises(ValueError, match="nometa.safetensors: not a pyengine quantized weight"):
        QuantizedWeight.load(nometa)
    badshape = tmp_path / "badshape.safetensors"
    save_file(qw.state_dict(), str(badshape), metadata={"fmt": "q8_0", "shape": "[8, 96]"})
    with pytest.raises(ValueError, match=r"badshape.safetensors: .*qs must be uint8 \(8, 96\)"):
        QuantizedWeight.load(badshape)


# ------------------------------------------------------------------ kernels
NF4_CODE8 = torch.tensor([round(127 * c) for c in NF4_CODEBOOK], dtype=torch.float64) / 127


def emulate_cpu(x, qw, bias=None):
    """What the cpu kernel computes, in fp64: x rounded per weight block to int8 (d = absmax /
    127, round half to even), nf4 codes rounded to int8 / 127."""
    b = qw.block_size
    xb = x.float().reshape(-1, qw.shape[1] // b, b)
    d = xb.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, 1.0, d))
    xq = (torch.round(xb * inv).double() * d.double()).reshape(-1, qw.shape[1])
    if qw.fmt == "nf4":
        w = NF4_CODE8[qw.codes().long()] * qw.scales.double()[..., None]
        w = w.reshape(qw.shape)
    else:
        w = qw.dequantize().double()
    y = xq @ w.T
    return y if bias is None else y + bias.double()


def assert_matches_emulation(y, x, qw, bias=None):
    """Per element, |y - emulation| within fp32 rounding of the sum of |terms|."""
    want = emulate_cpu(x, qw, bias)
    mag = x.abs().double() @ qw.dequantize().abs().double().T
    err = (y.double() - want).abs()
    assert torch.all(err <= 2e-6 * mag), (err / mag).max()


def assert_matches_bf16_product(y, x, qw, bias=None):
    """The AMX prefill kernel: y = bf16(x) @ bf16(dequant(W)).T + bias with fp32 sums; per
    element within fp32 rounding of the sum of |terms| of the fp64 product."""
    xb, wb = x.bfloat16().double(), qw.dequantize(torch.bfloat16).double()
    want = xb @ wb.T + (0 if bias is None else bias.double())
    mag = xb.abs() @ wb.abs().T
    err = (y.double() - want).abs()
    assert torch.all(err <= 2e-6 * mag), (err / mag).max()


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@needs_ext
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m,n,k", [(1, 37, 320), (3, 70, 192), (17, 5, 4096), (64, 23, 128)])
def test_cpu_matches_emulation_and_reference(fmt, m, n, k):
    qw = quantize(rand_weight(n, k, seed=m + n), fmt)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    bias = torch.randn(n)
    y = quant_matmul(x, qw, bias=bias, backend="cpu")
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert_matches_emulation(y, x, qw, bias)
    assert rel_err(y, reference_quant_matmul(x, qw, bias)) < (0.015 if fmt == "nf4" else 0.01)


@needs_ext
@pytest.mark.parametrize("fmt", FMTS)
def test_cpu_bf16_activations(fmt):
    qw = quantize(rand_weight(33, 256, seed=5), fmt)
    x = torch.randn(2, 5, 256).bfloat16()
    y = quant_matmul(x, qw, backend="cpu")
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 33)
    assert rel_err(y, emulate_cpu(x.reshape(-1, 256), qw).reshape(2, 5, 33)) < 5e-3


@needs_ext
@pytest.mark.parametrize("fmt", FMTS)
def test_isa_variants_equal_scalar(fmt, isa_cap, threads):
    """Integer parts (the int8 activation buffer) and outputs are bit-identical across ISAs."""
    k, m = 64 * 21, 5  # 21 blocks (q8_0/q4_0: 42): partial chunk and group tails
    qw = quantize(rand_weight(150, k, seed=6), fmt)  # 64-row thread chunks: 2 + a ragged one
    x = torch.randn(m, k)
    code = FMT_CODES[fmt]
    row_bytes = _ext._C.quant_act_row_bytes(code, k)
    acts, outs = {}, {}
    for isa in ("scalar", "avx2", "avx512"):
        isa_cap(isa)
        buf = torch.empty(m * row_bytes + 64, dtype=torch.uint8)
        off = (-buf.data_ptr()) % 64
        act = buf[off: off + m * row_bytes]
        _ext._C.quant_quantize_activations(code, x.data_ptr(), 0, m, k, act.data_ptr(),
                                           threads)
        acts[isa] = act.clone()
        outs[isa] = torch.cat([quant_matmul(x, qw, backend="cpu"),       # GEMM tiles
                               quant_matmul(x[2:3], qw, backend="cpu")])  # GEMV
        outs[isa, "bf16"] = quant_matmul(x.bfloat16(), qw, backend="cpu")
    for isa in ("avx2", "avx512"):
        assert torch.equal(acts[isa], acts["scalar"]), isa
        assert torch.equal(outs[isa], outs["scalar"]), isa
        assert torch.equal(outs[isa, "bf16"], outs["scalar", "bf16"]), isa
    assert torch.equal(outs["scalar"][2], outs["scalar"][m])  # GEMV row == GEMM row


@needs_ext
@settings(max_examples=25, deadline=None)
@given(fmt=st.sampled_from(FMTS), m=st.integers(1, 64), n=st.integers(1, 67),
       kb=st.integers(1, 40), threads=st.sampled_from([1, 2]))
def test_cpu_hypothesis_shapes(fmt, m, n, kb, threads):
    k = kb * FORMATS[fmt].block
    qw = quantize(rand_weight(n, k, seed=kb), fmt)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * 1000 + n))
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = quant_matmul(x, qw, backend="cpu")
    finally:
        torch.set_num_threads(prev)
    assert_matches_emulation(y, x, qw)


@pytest.mark.parametrize("fmt", FMTS)
def test_ref_backend_is_dequantize_linear(fmt):
    qw = quantize(rand_weight(11, 128, seed=7), fmt)
    x = torch.randn(4, 128)
    torch.testing.assert_close(quant_matmul(x, qw, backend="ref"),
                               F.linear(x, qw.dequantize()), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("fmt", FMTS)
def test_triton_matches_reference(fmt):
    pytest.importorskip("triton")
    k = 64 * 21  # one full interleave group of 16 blocks and a partial one
    qw = quantize(rand_weight(19, k, seed=8), fmt)
    x = torch.randn(5, k)
    bias = torch.randn(19)
    y = quant_matmul(x, qw, bias=bias, backend="triton")
    torch.testing.assert_close(y, reference_quant_matmul(x, qw, bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpu", marks=needs_ext)])
def test_backward_x_and_bias(backend):
    qw = quantize(rand_weight(21, 128, seed=9), "nf4")
    x = torch.randn(3, 2, 128, requires_grad=True)
    bias = torch.randn(21, requires_grad=True)
    dy = torch.randn(3, 2, 21)
    quant_matmul(x, qw, bias=bias, backend=backend).backward(dy)
    torch.testing.assert_close(x.grad, dy @ qw.dequantize(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, dy.sum((0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FMTS)
def test_backward_across_dequant_chunks(fmt, dtype, backend, monkeypatch):
    """ref: grad_x = dy @ dequant(W) is summed over row chunks of W: 37 rows in chunks of 8
    (4 full and a ragged 5), every element against fp64 (fp32 accumulation, one rounding)."""
    from pyengine.ops import quant as quant_ops
    k = 128
    monkeypatch.setattr(quant_ops, "DEQUANT_CHUNK_BYTES", 8 * 4 * k)
    qw = quantize(rand_weight(37, k, seed=11), fmt)
    x = torch.randn(5, k).to(dtype).requires_grad_()
    dy = torch.randn(5, 37).to(dtype)
    quant_matmul(x, qw, backend=backend).backward(dy)
    w = qw.dequantize().double()
    want = dy.double() @ w
    rounding = 2.0 ** -8 if dtype == torch.bfloat16 else 0.0  # grad_x returned in x's dtype
    tol = 1e-6 * (dy.double().abs() @ w.abs()) + rounding * want.abs()
    assert x.grad.dtype == dtype
    assert bool(((x.grad.double() - want).abs() <= tol).all())


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FMTS)
def test_cpu_dequantize_bits_equal_torch_every_isa(fmt, dtype, isa_cap, threads):
    """The C++ dequantize (the GEMM path's weight) is dequantize().to(dtype) bit for bit, on
    every ISA and thread count: 21 blocks a row (a full 16-block group + a partial one; 42
    for the 32-blocks), a row range that does not start at 0, zero and huge blocks."""
    from pyengine.ops.quant import dequantize_cpu
    k = 64 * 21
    w = rand_weight(70, k, seed=13)
    w[4] = 0.0
    w[5, :64] *= 1e4
    qw = quantize(w, fmt)
    want = qw.dequantize(dtype)[3:]
    for isa in ("scalar", "avx2", "avx512"):
        isa_cap(isa)
        got = dequantize_cpu(qw.qs[3:], qw.scales[3:], fmt, k, dtype)
        assert got.dtype == dtype and torch.equal(got, want), isa


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FMTS)
def test_cpu_gemm_path_is_plain_torch_on_the_dequantized_weight(fmt, dtype):
    """bf16 x with >= GEMM_MIN_ROWS rows: y is F.linear on dequantize(bf16), bit for bit;
    fp32 x with as many rows takes the AMX kernel where AMX is on; fewer rows (and fp32 x
    without AMX) stay on the int8 kernel.  grad_x is dy @ dequantize(dy's dtype)
    bit for bit (one GEMM in dy's dtype, as plain torch computes it)."""
    from pyengine.ops.quant import GEMM_MIN_ROWS
    qw = quantize(rand_weight(37, 192, seed=14), fmt)
    bias = torch.randn(37).to(dtype)
    w = qw.dequantize(dtype)
    for m in (GEMM_MIN_ROWS - 1, GEMM_MIN_ROWS):
        x = torch.randn(m, 192).to(dtype).requires_grad_()
        dy = torch.randn(m, 37).to(dtype)
        y = quant_matmul(x, qw, bias=bias, backend="cpu")
        y.backward(dy)
        assert torch.equal(x.grad, dy @ w)
        if dtype == torch.bfloat16 and m >= GEMM_MIN_ROWS:
            assert torch.equal(y, F.linear(x, w, bias))
        elif m >= GEMM_MIN_ROWS and _ext._C.amx_active():  # fp32 x: the AMX kernel
            assert_matches_bf16_product(y, x.detach(), qw, bias)
        else:  # the int8 kernel: its emulation, to fp32 rounding (then y's own rounding)
            want = emulate_cpu(x.detach(), qw, bias.float())
            mag = x.detach().abs().double() @ w.abs().double().T
            rounding = 2.0 ** -8 if dtype == torch.bfloat16 else 0.0
            assert torch.all((y.double() - want).abs() <= 2e-6 * mag + rounding * want.abs())


@needs_ext
@pytest.mark.skipif(not (HAS_EXT and _ext._C.has_amx()), reason="needs AMX")
@pytest.mark.parametrize("fmt", FMTS)
def test_cpu_amx_prefill(fmt, restore_isa):
    """fp32 x with >= GEMM_MIN_ROWS rows on AMX: the bf16 product of x and W in fp32, per
    element; ragged everywhere: M not a multiple of 32, N = a 128-row panel + a partial one
    (not a multiple of 32), K = a 2048 chunk + one of 64; the same bits at 1, 2, 3 threads;
    more exact than the int8 kernel (set_amx(False)) it replaces."""
    from pyengine.ops.quant import GEMM_MIN_ROWS
    m, n, k = GEMM_MIN_ROWS + 5, 150, 2112
    qw = quantize(rand_weight(n, k, seed=16), fmt)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    outs = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            outs.append(quant_matmul(x, qw, bias=bias, backend="cpu"))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert_matches_bf16_product(outs[0], x, qw, bias)
    _ext._C.set_amx(False)
    int8 = quant_matmul(x, qw, bias=bias, backend="cpu")
    ref = reference_quant_matmul(x, qw, bias)
    assert rel_err(outs[0], ref) < 0.5 * rel_err(int8, ref)


@needs_ext
def test_cpu_training_step_dequantizes_once_each_way(monkeypatch):
    """A bf16 training-sized fwd+bwd dequantizes the whole weight exactly twice (forward,
    backward): not per chunk, not per row block, not again per call inside a step."""
    from pyengine.ops.quant import GEMM_MIN_ROWS
    calls = []
    real = _ext._C.quant_dequantize
    monkeypatch.setattr(_ext._C, "quant_dequantize",
                        lambda *a: (calls.append(a[5:7]), real(*a))[1])
    qw = quantize(rand_weight(150, 256, seed=15), "nf4")
    x = torch.randn(GEMM_MIN_ROWS + 3, 256).bfloat16().requires_grad_()
    quant_matmul(x, qw, backend="cpu").sum().backward()
    assert calls == [(0, 150), (0, 150)]


@needs_ext
def test_cpu_same_bits_on_repeat_and_any_thread_count():
    """Each output row is one thread's dot products: no reduction across threads."""
    qw = quantize(rand_weight(150, 256, seed=12), "q4_0")
    x = torch.randn(9, 256, requires_grad=True)
    dy = torch.randn(9, 150)

    def once():
        x.grad = None
        y = quant_matmul(x, qw, backend="cpu")
        y.backward(dy)
        return [y.detach(), x.grad]
    results = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            results.append(repeat_equal(once, 3))
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


@pytest.mark.parametrize("backend", ["ref", pytest.param("cpu", marks=needs_ext)])
def test_opcheck(backend):
    qw = quantize(rand_weight(9, 64, seed=10), "q4_0")
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(_qmm, (x, qw.qs, qw.scales, "q4_0", torch.randn(9), backend))
    torch.library.opcheck(_qmm, (x, qw.qs, qw.scales, "q4_0", None, backend))
    if backend == "cpu":  # the backward's dequantize
        from pyengine.ops.quant import _dequant_cpu
        for dtype in (torch.float32, torch.bfloat16):
            torch.library.opcheck(_dequant_cpu, (qw.qs, qw.scales, "q4_0", 64, dtype))


# ------------------------------------------------------------------ modules
def test_quantize_model_and_quant_linear(caplog):
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("up", torch.nn.Linear(64, 96))
    model.add_module("odd", torch.nn.Linear(96, 40))   # 96 % 64 != 0 for nf4: kept
    model.add_module("down", torch.nn.Linear(40, 64))   # 40 % 64 != 0: kept
    model.add_module("lm_head", torch.nn.Linear(64, 64))
    x = torch.randn(4, 64)
    want = model(x)
    with caplog.at_level(logging.INFO, logger="pyengine"):
        quantize_model(model, "nf4", backend="ref")
    assert isinstance(model.up, QuantLinear)
    assert type(model.odd) is torch.nn.Linear and type(model.down) is torch.nn.Linear
    assert type(model.lm_head) is torch.nn.Linear
    assert "odd" in caplog.text and "not a multiple of 64" in caplog.text
    assert rel_err(model(x).detach(), want.detach()) < 0.1
    sd = model.state_dict()
    assert sd["up.qs"].dtype == torch.uint8 and sd["up.scales"].dtype == torch.float16
    up = model.up
    torch.testing.assert_close(up(x), F.linear(x, up.qweight.dequantize(), up.bias))


@needs_ext
def test_torch_compile_fullgraph_with_grad():
    layer = QuantLinear(quantize(rand_weight(32, 64, seed=11), "q4_0"), torch.randn(32))
    x = torch.randn(3, 64, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    assert torch.equal(y, layer(x))
    torch.testing.assert_close(x.grad, torch.ones(3, 32) @ layer.qweight.dequantize())
