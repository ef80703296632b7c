"""pyengine.ops.lora_gather (batched gather-LoRA): cpu and triton against an fp64
computation, per element within torch's own fp32 error, on fresh random banks with rows of
mixed adapters (-1, repeated, adapters no row uses filled with NaN so reading one shows);
the C++ y-accumulate form; ISA variants vs the scalar build; same bits on 1, 2, 3 threads;
a shape fuzz; opcheck; autocast; errors."""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pyengine import _ext
from pyengine.ops import lora_gather, reference_lora_gather
from tests.conftest import ISAS, assert_within_torch_error, num_threads

needs_ext = pytest.mark.skipif(_ext._C is None, reason="C++ extension not built")
BACKENDS = ((["cpu"] if _ext._C is not None else [])
            + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else []))
UNUSED = 2  # the adapter no row picks in make()


def make(R, K, N, rank, n_adapters=5, seed=0):
    """x, a bank whose adapter UNUSED is all NaN, idx repeating a shuffle of -1, 0, 1, 3, 4,
    3, 0 (adapters 0 and 3 on several rows, UNUSED on none)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, K, generator=g)
    a = torch.randn(n_adapters, rank, K, generator=g) / K ** 0.5
    b = torch.randn(n_adapters, N, rank, generator=g)
    a[UNUSED], b[UNUSED] = float("nan"), float("nan")
    picks = torch.tensor([-1, 0, 1, 3, 4, 3, 0])
    idx = picks[torch.randperm(len(picks), generator=g)].repeat(R // len(picks) + 1)[:R]
    return x, a, b, idx.contiguous()


def exact(x, a, b, idx):
    """fp64 row by row (the rows' adapters only)."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64)
    for r, i in enumerate(idx.tolist()):
        if i >= 0:
            out[r] = b[i].double() @ (a[i].double() @ x[r].double())
    return out


def assert_like_torch(name, got, x, a, b, idx, y0=None):
    """got (= y0 + delta when y0 is given) per element within torch fp32's error vs fp64."""
    plain, ex = reference_lora_gather(x, a, b, idx), exact(x, a, b, idx)
    if y0 is not None:
        plain, ex = y0 + plain, y0.double() + ex
    assert got.dtype == torch.float32
    assert_within_torch_error(name, got, plain, ex, torch.float32)


def cpu_add(y, x, a, b, idx):
    """The C++ entry point itself: y += deltas in place."""
    n_adapters, rank, k = a.shape
    _ext._C.lora_gather_add(x.data_ptr(), x.shape[0], k, idx.data_ptr(), a.data_ptr(),
                            b.data_ptr(), n_adapters, rank, b.shape[1], y.data_ptr(),
                            _ext.num_threads())
    return y


# ---------------------------------------------------------------------------- values
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("R", [1, 3, 8, 13])
@pytest.mark.parametrize("rank", [1, 8, 48])
def test_matches_fp64_within_torch_error(backend, R, rank):
    shapes = [(16, 32), (37, 45), (64, 17), (5, 48)]  # K, N: multiples of 16 and not
    K, N = shapes[(R + rank) % len(shapes)]
    if backend == "triton":
        K, N = min(K, 24), min(N, 20)  # the interpreter is slow
    x, a, b, idx = make(R, K, N, rank, seed=R * 100 + rank)
    got = lora_gather(x, a, b, idx, backend=backend)
    assert_like_torch(f"{backend} R={R} rank={rank}", got, x, a, b, idx)
    assert torch.equal(got[idx < 0], torch.zeros_like(got[idx < 0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_chunk_many_rows_of_one_adapter(backend):
    """21 rows of adapter 3 (several row blocks of one group) and two base rows."""
    x, a, b, _ = make(23, 40, 33, 8, seed=13)
    idx = torch.full((23,), 3)
    idx[[0, 17]] = -1
    got = lora_gather(x, a, b, idx, backend=backend)
    assert_like_torch(f"{backend} prefill", got, x, a, b, idx)


@pytest.mark.parametrize("factor", [1.01, 0.99])
def test_tolerance_rule_rejects_a_1_percent_error_in_one_adapter(factor):
    x, a, b, idx = make(13, 37, 45, 8)
    got = lora_gather(x, a, b, idx, backend="cpu" if _ext._C is not None else "ref")
    assert_like_torch("unchanged", got, x, a, b, idx)
    bad = b.clone()
    bad[4] *= factor
    with pytest.raises(AssertionError):
        assert_like_torch("1% off", lora_gather(x, a, bad, idx, backend="ref"), x, a, b, idx)


@needs_ext
@pytest.mark.parametrize("rank", [1, 8, 48])
def test_cpu_adds_into_y(rank):
    """lora_gather_add accumulates: y0 + delta, rows with idx -1 keep y0's bits."""
    x, a, b, idx = make(13, 37, 45, rank, seed=7)
    y0 = torch.randn(13, 45)
    got = cpu_add(y0.clone(), x, a, b, idx)
    assert_like_torch("cpu add", got, x, a, b, idx, y0=y0)
    assert torch.equal(got[idx < 0], y0[idx < 0])


@pytest.mark.skipif("triton" not in BACKENDS, reason="TRITON_INTERPRET=1 not set")
def test_triton_adds_into_y():
    from pyengine.kernels.lora_gather import lora_gather_add
    x, a, b, idx = make(8, 20, 19, 8, seed=8)
    y0 = torch.randn(8, 19)
    got = lora_gather_add(y0.clone(), x, idx, a, b)
    assert_like_torch("triton add", got, x, a, b, idx, y0=y0)
    assert torch.equal(got[idx < 0], y0[idx < 0])


@needs_ext
def test_isa_variants_within_torch_error_and_close_to_scalar(restore_isa):
    x, a, b, idx = make(13, 100, 70, 48, seed=9)
    results = {}
    for isa in ISAS[:ISAS.index(_ext._C.best_isa()) + 1]:
        _ext._C.set_isa_cap(isa)
        results[isa] = lora_gather(x, a, b, idx, backend="cpu")
        assert_like_torch(isa, results[isa], x, a, b, idx)
    for isa, got in results.items():  # summation order / FMA contraction only
        torch.testing.assert_close(got, results["scalar"], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{isa}: {m}")


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_same_bits_on_any_thread_count(isa, restore_isa):
    """Shapes where both sides split over threads (24 A tasks, 300 columns); a 1-thread call
    on -x before each run, so no run can reuse an earlier run's scratch."""
    if ISAS.index(isa) > ISAS.index(_ext._C.best_isa()):
        pytest.skip(f"this CPU has no {isa}")
    _ext._C.set_isa_cap(isa)
    x, a, b, idx = make(13, 576, 300, 48, seed=10)
    y0 = torch.randn(13, 300)
    runs = []
    for n in (1, 2, 3, 2, 1):
        with num_threads(1):
            cpu_add(y0.clone(), -x, a, b, idx)
        with num_threads(n):
            runs.append(cpu_add(y0.clone(), x, a, b, idx))
    for n, got in zip((2, 3, 2, 1), runs[1:]):
        assert torch.equal(got, runs[0]), f"{n} threads differ from 1 thread"


@settings(max_examples=40, deadline=None, derandomize=True)
@given(R=st.integers(0, 20), K=st.integers(1, 70), N=st.integers(1, 70),
       rank=st.integers(0, 20), n_adapters=st.integers(0, 4), seed=st.integers(0, 2 ** 16))
def test_fuzz_shapes(R, K, N, rank, n_adapters, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, K, generator=g)
    a = torch.randn(n_adapters, rank, K, generator=g)
    b = torch.randn(n_adapters, N, rank, generator=g)
    idx = torch.randint(-1, n_adapters, (R,), generator=g)
    for backend in ["ref"] + BACKENDS[:1]:  # triton: too slow in the interpreter to fuzz
        got = lora_gather(x, a, b, idx, backend=backend)
        assert got.shape == (R, N)
        assert_like_torch(backend, got, x, a, b, idx)


# ---------------------------------------------------------------------------- torch glue
@pytest.mark.parametrize("backend", ["ref"] + BACKENDS[:1])
def test_opcheck(backend):
    x, a, b, idx = make(8, 24, 20, 8, seed=11)
    torch.library.opcheck(torch.ops.pyengine.lora_gather.default, (x, a, b, idx, backend))


@pytest.mark.parametrize("backend", ["ref"] + BACKENDS[:1])
def test_autocast_runs_in_fp32(backend):
    """Under bf16 autocast the op (also called directly) reads x as fp32, not its bytes."""
    x, a, b, idx = make(8, 24, 20, 8, seed=12)
    xb = x.bfloat16()
    want = reference_lora_gather(xb.float(), a, b, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        direct = torch.ops.pyengine.lora_gather(xb, a, b, idx, backend)
        public = lora_gather(xb, a, b, idx, backend=backend)
    for got in (direct, public):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- errors
def _bad_inputs():
    x, a, b, idx = make(4, 8, 6, 2)
    return [
        ((x[0], a, b, idx), r"x \(8,\).*\[R, K\]"),
        ((x, a[0], b, idx), r"lora_a \(2, 8\)"),
        ((x, a[:, :, :7], b, idx), r"need lora_a \[n_adapters, rank, 8\]"),
        ((x, a, b[:4], idx), r"lora_b \[5, N, 2\]"),
        ((x, a, b[:, :, :1], idx), r"lora_b \[5, N, 2\]"),
        ((x, a, b, idx[:3]), r"idx \(3,\) must have one entry per row of x \(4\)"),
        ((x.double(), a, b, idx), r"x torch.float64"),
        ((x, a.bfloat16(), b, idx), r"lora_a torch.bfloat16"),
        ((x, a, b.half(), idx), r"lora_b torch.float16"),
        ((x, a, b, idx.int()), r"idx dtype torch.int32"),
        ((x, a, b, torch.tensor([0, 1, 5, -1])), r"idx\[2\] = 5 is outside \[-1, 5\)"),
        ((x, a, b, torch.tensor([0, -2, 1, -1])), r"idx\[1\] = -2 is outside \[-1, 5\)"),
        ((x, a.requires_grad_(), b, idx), r"inference only"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_errors_name_what_is_wrong(case):
    args, pattern = _bad_inputs()[case]
    with pytest.raises(ValueError, match=pattern):
        lora_gather(*args, backend="ref")


@needs_ext
def test_cpu_rejects_out_of_range_index_and_writes_nothing():
    x, a, b, _ = make(4, 8, 6, 2)
    y0 = torch.randn(4, 6)
    y = y0.clone()
    with pytest.raises(ValueError, match=r"idx\[3\] = 5 is outside \[-1, 5\)"):
        cpu_add(y, x, a, b, torch.tensor([0, 1, -1, 5]))
    assert torch.equal(y, y0)
