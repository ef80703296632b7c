import contextlib
import os

# Triton kernels are tested on the CPU through the interpreter (no GPU on these machines).
# Must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pyengine import _ext  # noqa: E402

requires_ext = pytest.mark.skipif(_ext._C is None, reason=str(_ext.EXT_ERROR))
ISAS = ("scalar", "avx2", "avx512")  # _C.set_isa_cap values, weakest first


@pytest.fixture
def restore_isa():
    """Back to the best ISA (and AMX on) after a test that caps them."""
    yield
    if _ext._C is not None:
        _ext._C.set_isa_cap(_ext._C.best_isa())
        _ext._C.set_amx(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@contextlib.contextmanager
def num_threads(n):
    """torch.set_num_threads(n) inside the block (the C++ kernels take torch's count)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(saved)


@pytest.fixture
def one_thread():
    """Tiny models: thread hand-offs cost more than the work (and the CI box is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama HF directory (tests/tiny_hf.py), one per test module."""
    from tests.tiny_hf import make_llama
    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT HF directory (tests/tiny_hf.py), one per test module."""
    from tests.tiny_hf import make_bert
    return make_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}threads")
def threads(request):
    """Runs the test at 1, 2 and 3 threads whatever the machine: thread partitions differ."""
    with num_threads(request.param):
        yield request.param


def repeat_equal(fn, times):
    """fn() `times` times (a list of tensors each); assert every run gives the same bits.
    Repeats because a completion-order reduction differs only on some runs."""
    first = fn()
    for i in range(1, times):
        for k, (a, b) in enumerate(zip(fn(), first)):
            assert torch.equal(a, b), f"run {i} differs from run 0 in output {k}"
    return first


UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11,
                 torch.float64: 2.0 ** -53}


# roundings allowed per element beyond torch's: ours rounds low-precision results up to
# twice (kernel output, then the grad_output scale); fp32 differs from torch by summation
# order and exp approximation (a few ulps), far below any real bug
SLACK_ROUNDINGS = {torch.float32: 128, torch.bfloat16: 2, torch.float16: 2, torch.float64: 128}


def assert_within_torch_error(name, ours, plain, exact, dtype):
    """Per element: |ours - exact| <= 2 |plain - exact| + max |plain - exact| + a few
    roundings to `dtype` of the element (SLACK_ROUNDINGS).  `plain` is torch eager in the
    same dtype, `exact` an fp64 reference (flash-attention's rule; the max term covers
    elements where plain happens to be exact after cancellation).  A 10% error in any
    large element fails (test_cross_entropy / test_lora check that)."""
    o, p, e = ours.double(), plain.double(), exact.double()
    assert o.shape == e.shape, f"{name}: shape {tuple(o.shape)} != {tuple(e.shape)}"
    if e.numel() == 0:
        return
    plain_err = (p - e).abs()
    rounding = SLACK_ROUNDINGS[dtype] * UNIT_ROUNDOFF[dtype]
    allowed = 2 * plain_err + plain_err.max() + rounding * e.abs()
    excess = (o - e).abs() - allowed
    i = int(excess.argmax())
    assert excess.max() <= 0, (f"{name}: element {i}: ours {o.flatten()[i].item():.6g}, "
                               f"exact {e.flatten()[i].item():.6g}, torch {dtype} "
                               f"{p.flatten()[i].item():.6g}")
