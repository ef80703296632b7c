"""The package imports and every op works on the reference backend when the C++
extension is missing, and `import pyengine` never imports triton (fresh interpreter)."""
import subprocess
import sys

SCRIPT = """
import sys
sys.modules["pyengine._C"] = None  # as if built with PYENGINE_NO_EXT=1
import torch, pyengine
from pyengine import ops
from pyengine.quant import quantize
assert "triton" not in sys.modules
assert pyengine.backends()["fused_linear_cross_entropy"]["cpu"].startswith("extension")
h = torch.randn(5, 64, requires_grad=True); w = torch.randn(11, 64); t = torch.randint(0, 11, (5,))
ops.fused_linear_cross_entropy(h, w, t).backward()
a = torch.randn(2, 64, requires_grad=True); b = torch.randn(11, 2, requires_grad=True)
ops.lora_linear(h, w, a, b, 1.0).sum().backward()
assert ops.quant_matmul(torch.randn(3, 64), quantize(w, "q4_0")).shape == (3, 11)
assert ops.lora_gather(torch.randn(3, 64), torch.randn(2, 4, 64), torch.randn(2, 11, 4),
                       torch.tensor([0, -1, 1])).shape == (3, 11)
assert h.grad is not None and a.grad is not None
print("ok")
"""


def test_reference_backend_without_extension():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
