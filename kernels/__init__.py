"""Hand-written Triton kernels, each beside its plain-PyTorch reference.

Imported as ``llm_engine.kernels``, one module per op family::

    from llm_engine.kernels import layer_norm as norm_kernels
    norm_kernels.rms_norm(x, w)              # Triton
    norm_kernels.rms_norm_reference(x, w)    # plain PyTorch

Nothing here knows about models, configs or engines: only torch and triton.
Choosing between a kernel and its reference is ``llm_engine.ops``'s job; the names
without ``_reference`` always run Triton (on CPU tensors only under
``TRITON_INTERPRET=1``).

The family modules load on first access (``llm_engine.kernels.attention``, or
``from llm_engine.kernels import attention``), so importing this package does not
import Triton: CPU inference, which runs only the references, never loads it. The
references themselves live in ``llm_engine.kernels.reference``, which imports only
torch; each family module re-exports its own.
"""

import importlib
from types import ModuleType

from . import _interpreter_compat
from ._utils import check_window, interpreting, resolve_softmax_scale

if interpreting():
    _interpreter_compat.install()

_FAMILIES = ("attention", "cross_entropy", "layer_norm", "moe", "paged_attention",
             "quant_matmul", "sampling")


def __getattr__(name: str) -> ModuleType:
    if name in _FAMILIES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "attention",
    "check_window",
    "cross_entropy",
    "interpreting",
    "layer_norm",
    "moe",
    "paged_attention",
    "quant_matmul",
    "resolve_softmax_scale",
    "sampling",
]
