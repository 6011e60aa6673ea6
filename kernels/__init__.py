"""Hand-written Triton kernels, each beside its plain-PyTorch reference.

Imported as ``llm_engine.kernels``, one module per op family::

    from llm_engine.kernels import layer_norm as norm_kernels
    norm_kernels.rms_norm(x, w)              # Triton
    norm_kernels.rms_norm_reference(x, w)    # plain PyTorch

Nothing here knows about models, configs or engines: only torch and triton.
Choosing between a kernel and its reference is ``llm_engine.ops``'s job; the names
without ``_reference`` always run Triton (on CPU tensors only under
``TRITON_INTERPRET=1``).
"""

from . import attention, cross_entropy, layer_norm, paged_attention, sampling
from ._utils import interpreting, resolve_softmax_scale

__all__ = [
    "attention",
    "cross_entropy",
    "interpreting",
    "layer_norm",
    "paged_attention",
    "resolve_softmax_scale",
    "sampling",
]
