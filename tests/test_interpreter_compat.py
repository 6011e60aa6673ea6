"""Kernel loops over runtime bounds in the Triton interpreter, whatever its version.

Triton 3.6's interpreter converts loop bounds with ``int(array)``, which numpy 2.4
refuses (``kernels/_interpreter_compat.py``); CI runs this file under Triton 3.6 too.
"""

import pytest
import torch
import triton
import triton.language as tl
from llm_engine.kernels._utils import interpreting


@triton.jit
def _sum_from_program_id_kernel(X, Out, n):
    pid = tl.program_id(0)
    acc = 0.0
    for i in range(pid, n):
        acc += tl.load(X + i)
    bound = tl.load(X + n)  # a loop bound loaded from memory
    for _ in range(0, bound.to(tl.int32)):
        acc += 1.0
    tl.store(Out + pid, acc)


@pytest.mark.skipif(not interpreting(), reason="checks the Triton interpreter")
def test_loops_over_program_id_argument_and_loaded_bounds_run_in_the_interpreter():
    n = 5
    x = torch.arange(n + 1, dtype=torch.float32)  # x[n] = 5: the loaded bound
    out = torch.empty(3)
    _sum_from_program_id_kernel[(3,)](x, out, n)
    expected = torch.tensor([x[p:n].sum().item() + n for p in range(3)])
    torch.testing.assert_close(out, expected)
