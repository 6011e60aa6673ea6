"""A decode step through every decoder layer at once: the op ``decode_layers``.

A batch-1 decode step of a small model is mostly interpreter time: each layer makes
about ten op calls (norm, projections, rotary, cache store, attention, activation),
each a dispatch, a few tensor views and a native call. On the CPU, for Llama-style
layers (RMSNorm, RoPE, grouped-query attention, SwiGLU) whose projections are
quantized, ``cpp`` runs all of them in one native call (``_C.DecoderStack``,
``csrc/cpu/decoder.h``): the same C++ kernels in the same order as the per-op path, so
the same results. ``reference`` is that per-op path: each layer composed from the ops
of this package.

The projections of a decode step take int8 activations (each row rounded to int8 per
32-value block and integer dot products with the weight blocks, as llama.cpp does;
``quantized_linear=int8``) unless ``quantized_linear`` is forced to another
implementation: a decode step reads every weight once per token, and the integer dot
products read it about twice as fast as expanding each block to fp32. The LM head of a
decode step takes the same (:func:`decode_projection`). Everything
else, prefill included, keeps fp32 activations (``quantized_linear``'s own default),
so a prompt's K/V never depend on how it was batched. ``--backend
quantized_linear=cpp`` runs decode steps with fp32 activations too.

Implementations, in preference order:

- ``cpp``: fp32 CPU tensors without grad, every projection's blocks on the CPU;
- ``reference``: anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llm_engine import _C
from llm_engine.ops.attention import paged_attention, store_kv_cache
from llm_engine.ops.common import ANY, cpp_needs
from llm_engine.ops.dispatch import Op, registry, tensor_facts
from llm_engine.ops.elementwise import apply_rope, silu_mul
from llm_engine.ops.norms import rms_norm
from llm_engine.ops.quantized import INT8_TYPES, quantized_linear
from llm_engine.quant import QuantizedWeight


@dataclass(frozen=True)
class DecoderLayerWeights:
    """One Llama-style decoder layer, its projections quantized.

    Each projection is a list of :class:`QuantizedWeight` parts stacked along the output
    (one part unless its source tensors came in different types). ``attn_norm``,
    ``mlp_norm``: ``(hidden,)``; ``qkv``: hidden → ``(heads + 2·kv_heads)·head_dim``,
    ``[q | k | v]``, with ``qkv_bias`` ``(that,)`` or None; ``q_norm``, ``k_norm``:
    ``(head_dim,)`` RMSNorm weights of each q and k head (Qwen3) or None; ``o``:
    ``heads·head_dim`` → hidden; ``gate_up``: hidden → ``2·intermediate``, ``[gate | up]``;
    ``down``: intermediate → hidden; ``k_cache``, ``v_cache``: ``(num_blocks, block_size,
    kv_heads, head_dim)``; ``window``: a sliding window in tokens, or None.
    """

    attn_norm: torch.Tensor
    qkv: list[QuantizedWeight]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: list[QuantizedWeight]
    mlp_norm: torch.Tensor
    gate_up: list[QuantizedWeight]
    down: list[QuantizedWeight]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    window: int | None = None


@dataclass
class DecoderStack:
    """Every decoder layer of a model, over its KV cache, for :func:`decode_layers`.

    ``eps``: every RMSNorm's; ``scale``: the softmax scale. The native stack is built on
    first use by ``cpp`` and keeps the tensors alive; build a new stack when weights or
    caches are replaced (in-place updates are seen). ``on_cpu``: whether every weight
    and cache is a CPU tensor, the caches fp32 (what ``cpp`` reads)."""

    layers: list[DecoderLayerWeights]
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scale: float
    on_cpu: bool = field(init=False)
    _native: object | None = field(default=None, repr=False)

    def native(self) -> object:
        """The ``_C.DecoderStack`` over these tensors (built once)."""
        if self._native is None:
            first = self.layers[0]
            stack = _C.DecoderStack(first.attn_norm.shape[0], self.heads, self.kv_heads,
                                    self.head_dim, first.down[0].in_features, self.eps,
                                    self.scale)
            for layer in self.layers:
                stack.add_layer(
                    _np(layer.attn_norm), _parts(layer.qkv), _np(layer.qkv_bias),
                    _np(layer.q_norm), _np(layer.k_norm), _parts(layer.o), _np(layer.mlp_norm),
                    _parts(layer.gate_up), _parts(layer.down), layer.k_cache.numpy(),
                    layer.v_cache.numpy(), layer.window or 0)
            self._native = stack
        return self._native

    def __post_init__(self) -> None:
        # Read on every step (the op's signature): worked out once.
        self.on_cpu = all(
            p.blocks.is_cpu for layer in self.layers
            for proj in (layer.qkv, layer.o, layer.gate_up, layer.down) for p in proj
        ) and all(layer.k_cache.is_cpu and layer.k_cache.dtype == torch.float32
                  for layer in self.layers)


def _np(t: torch.Tensor | None):
    return None if t is None else t.detach().contiguous().numpy()


def _parts(parts: list[QuantizedWeight]) -> list[tuple]:
    return [(p.blocks.numpy(), p.qtype, p.layout) for p in parts]


def _signature(x: torch.Tensor, stack: DecoderStack, *rest) -> tuple:
    return (*tensor_facts("decode_layers", x), stack.on_cpu)


DECODE_LAYERS = registry().add(Op("decode_layers", _signature, {
    "cpu_stack": "every weight and cache on the CPU, caches fp32",
}, "every decoder layer of a decode step"))


def decode_layers(x: torch.Tensor, stack: DecoderStack, cos: torch.Tensor, sin: torch.Tensor,
                  slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of ``stack``: ``x (seqs, hidden)``, the embeddings of each
    sequence's newest token, through every layer, its K/V stored at ``slot_mapping
    (seqs,)`` int64. ``cos, sin (seqs, 1, head_dim)``: :func:`rope_at`'s factors;
    ``block_tables (seqs, max_blocks)``, ``context_lens (seqs,)`` int32 (the new token
    included). Returns ``(out, residual)``, both ``(seqs, hidden)``: the last MLP's
    output and the residual stream it adds to (the model's final norm takes both)."""
    return DECODE_LAYERS.pick(x, stack)(x, stack, cos, sin, slot_mapping, block_tables,
                                        context_lens)


def decode_int8_activations(x: torch.Tensor, weight: QuantizedWeight) -> bool:
    """Whether a decode step's projections (``x`` its rows, ``weight`` one of them) take
    int8 activations: ``quantized_linear`` forced to ``int8``, or not forced and ``int8``
    able to take them (see the module's docstring). Parts of other types stay fp32."""
    forced = registry().settings().forced.get("quantized_linear")
    if forced is None:
        return registry().eligible("quantized_linear", x, weight)["int8"] is None
    return forced == "int8"


def _decode_layers_cpp(x: torch.Tensor, stack: DecoderStack, cos: torch.Tensor,
                       sin: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                       context_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = x.contiguous().clone()
    residual = torch.empty_like(out)
    stack.native().forward(out.numpy(), residual.numpy(), cos.contiguous().numpy(),
                           sin.contiguous().numpy(), slot_mapping.contiguous().numpy(),
                           block_tables.contiguous().numpy(), context_lens.contiguous().numpy(),
                           decode_int8_activations(out, stack.layers[0].qkv[0]),
                           torch.get_num_threads())
    return out, residual


def _project(x: torch.Tensor, parts: list[QuantizedWeight], bias: torch.Tensor | None,
             int8_linear: Callable | None) -> torch.Tensor:
    """``x`` through the parts stacked along the output, each part of :data:`INT8_TYPES`
    through ``int8_linear`` where given (the C++ step's choice per part)."""
    outs = [int8_linear(x, p) if int8_linear is not None and p.qtype in INT8_TYPES
            else quantized_linear(x, p) for p in parts]
    out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
    return out if bias is None else out + bias


def _int8_linear(x: torch.Tensor, weight: QuantizedWeight) -> Callable | None:
    """``quantized_linear``'s ``int8`` implementation if a decode step's projections take
    int8 activations (:func:`decode_int8_activations`), else None."""
    if not decode_int8_activations(x, weight):
        return None
    return registry().implementation("quantized_linear", "int8")


def decode_projection(x: torch.Tensor, parts: list[QuantizedWeight],
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (rows, in) @ W.T + bias`` for the rows of a decode step outside the decoder
    layers (the LM head), ``W`` stacked from ``parts``: with the activations the layers'
    projections take (:func:`decode_int8_activations`)."""
    return _project(x, parts, bias, _int8_linear(x, parts[0]))


def decode_layers_reference(x: torch.Tensor, stack: DecoderStack, cos: torch.Tensor,
                            sin: torch.Tensor, slot_mapping: torch.Tensor,
                            block_tables: torch.Tensor,
                            context_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_layers` composed from this package's ops, layer by layer, its
    projections' activations chosen as ``cpp``'s are (:func:`decode_int8_activations`)."""
    T, H, KV, D = x.shape[0], stack.heads, stack.kv_heads, stack.head_dim
    int8_linear = _int8_linear(x, stack.layers[0].qkv[0])

    def project(x: torch.Tensor, parts: list[QuantizedWeight],
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return _project(x, parts, bias, int8_linear)

    residual = None
    for layer in stack.layers:
        if residual is None:
            h, residual = rms_norm(x, layer.attn_norm, stack.eps), x
        else:
            h, residual = rms_norm(x, layer.attn_norm, stack.eps, residual=residual)
        q, k, v = project(h, layer.qkv, layer.qkv_bias).split([H * D, KV * D, KV * D], dim=-1)
        q, k = q.reshape(T, H, D), k.reshape(T, KV, D)
        if layer.q_norm is not None:
            q, k = rms_norm(q, layer.q_norm, stack.eps), rms_norm(k, layer.k_norm, stack.eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        store_kv_cache(k, v.reshape(T, KV, D), layer.k_cache, layer.v_cache, slot_mapping)
        extra = {} if layer.window is None else {"window": layer.window}
        o = paged_attention(q, layer.k_cache, layer.v_cache, block_tables, context_lens,
                            softmax_scale=stack.scale, **extra)
        h, residual = rms_norm(project(o.reshape(T, H * D), layer.o), layer.mlp_norm, stack.eps,
                               residual=residual)
        x = project(silu_mul(project(h, layer.gate_up)), layer.down)
    return x, residual


DECODE_LAYERS.register("cpp", _decode_layers_cpp, cpp_needs(("cpu_stack",)),
                       "every layer in one C++ call (_C.DecoderStack); int8 activations "
                       "unless quantized_linear is forced to another implementation")
DECODE_LAYERS.register("reference", decode_layers_reference, ANY,
                       "the per-op path: each layer composed from the ops")
