"""Test configuration.

Without a CUDA GPU the Triton kernels run in the interpreter on CPU tensors;
``TRITON_INTERPRET`` must be set before triton is first imported, so it is
set here, at collection time. Tests marked ``gpu`` skip cleanly without CUDA.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One CPU thread for a module's tests: their tiny matmuls gain little from a second
    thread, which stalls badly on a shared machine (``pytest.mark.usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
