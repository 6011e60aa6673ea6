"""Hand-written Triton kernels, each beside its plain-PyTorch reference.

Imported as ``llm_engine.kernels``. Nothing here knows about models, configs or
engines: only torch and triton. Choosing between a kernel and its reference is
``llm_engine.ops``'s job; the names without ``_reference`` always run Triton
(on CPU tensors only under ``TRITON_INTERPRET=1``).
"""

from .attention import (
    attention_reference,
    attention_varlen_reference,
    flash_attention,
    flash_attention_varlen,
)
from .cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from .layer_norm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from .paged_attention import (
    paged_attention,
    paged_attention_reference,
    paged_prefill_attention,
    paged_prefill_attention_reference,
    store_kv_cache,
    store_kv_cache_reference,
)
from .quant_matmul import quant_matmul, quant_matmul_reference
from .sampling import filtered_probs_reference, sample, sample_reference

__all__ = [
    "attention_reference",
    "attention_varlen_reference",
    "filtered_probs_reference",
    "flash_attention",
    "flash_attention_varlen",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "layer_norm",
    "layer_norm_reference",
    "paged_attention",
    "paged_attention_reference",
    "paged_prefill_attention",
    "paged_prefill_attention_reference",
    "quant_matmul",
    "quant_matmul_reference",
    "rms_norm",
    "rms_norm_reference",
    "sample",
    "sample_reference",
    "store_kv_cache",
    "store_kv_cache_reference",
]
