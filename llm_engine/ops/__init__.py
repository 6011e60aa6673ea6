"""The one place that chooses an implementation for every op the model uses.

Each op has named implementations in preference order, each with an eligibility
check (device, dtype, gradient wanted, shape); the model calls only the functions
below and never branches on device. The default choice, per kind of input:

- CUDA tensors: the Triton kernels (``triton``).
- CPU tensors: linear layers through oneDNN (``onednn``), quantized ones through the
  C++ kernel or dequantized tiles into oneDNN (``quantized_linear``); in fp32 inference (no
  gradient wanted) decode attention, RMSNorm, the SwiGLU activation, the rotary
  embedding and the K/V cache store through the C++ kernels of ``csrc/cpu/`` (``cpp``);
  prefill and training attention through ``scaled_dot_product_attention`` (``sdpa``);
  everything else through the plain-PyTorch references (``reference``). A decode step
  of a model whose projections are quantized runs every layer in one C++ call
  (``decode_layers``).

Any op can be forced to an implementation by name: ``LLM_ENGINE_BACKENDS="rms_norm=reference"``
(``LLM_ENGINE_BACKEND=triton|torch``: Triton everywhere it exists / nowhere),
:func:`set_backends`, ``with ops.use(rms_norm="cpp"): ...``, or the CLI's
``--backend op=impl``. :func:`registry` lists the ops and their implementations, and
says which one a call would run (``llm-engine backends`` prints it as a table).
"""

from llm_engine.ops.attention import (
    attention_varlen,
    paged_attention,
    paged_prefill_attention,
    store_kv_cache,
)
from llm_engine.ops.decoder import (
    DecoderLayerWeights,
    DecoderStack,
    decode_int8_activations,
    decode_layers,
    decode_layers_reference,
    decode_projection,
)
from llm_engine.ops.dispatch import Impl, Needs, Op, Registry, registry, set_backends, use
from llm_engine.ops.elementwise import (
    apply_rope,
    apply_rope_reference,
    rope_at,
    rope_cos_sin,
    silu_mul,
    silu_mul_reference,
)
from llm_engine.ops.matmul import PackedWeight, linear
from llm_engine.ops.moe import moe, moe_route
from llm_engine.ops.norms import layer_norm, rms_norm
from llm_engine.ops.quantized import (
    QUANT_GEMM_MIN_ROWS,
    dequantize,
    quantized_linear,
    quantized_linear_reference,
)
from llm_engine.ops.sampling import cross_entropy, sample

__all__ = [
    "QUANT_GEMM_MIN_ROWS",
    "DecoderLayerWeights",
    "DecoderStack",
    "Impl",
    "Needs",
    "Op",
    "PackedWeight",
    "Registry",
    "apply_rope",
    "apply_rope_reference",
    "attention_varlen",
    "cross_entropy",
    "decode_int8_activations",
    "decode_projection",
    "decode_layers",
    "decode_layers_reference",
    "dequantize",
    "layer_norm",
    "linear",
    "moe",
    "moe_route",
    "paged_attention",
    "paged_prefill_attention",
    "quantized_linear",
    "quantized_linear_reference",
    "registry",
    "rms_norm",
    "rope_at",
    "rope_cos_sin",
    "sample",
    "set_backends",
    "silu_mul",
    "silu_mul_reference",
    "store_kv_cache",
    "use",
]
