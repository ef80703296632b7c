import os

# Triton kernels are tested on the CPU through the interpreter (no GPU on these machines).
# Must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pyengine import _ext  # noqa: E402

requires_ext = pytest.mark.skipif(_ext._C is None, reason=str(_ext.EXT_ERROR))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
