"""The one place that chooses an implementation for every op the model uses.

Triton kernels run on CUDA tensors. CPU tensors take the ``torch`` backend:
the plain-PyTorch references, except where the CPU has a faster path of its own:
linear layers through oneDNN; in fp32 inference (no gradient wanted), decode
attention, RMSNorm, the SwiGLU activation, the rotary embedding and the K/V cache
store through the C++ kernels of ``csrc/cpu/`` (``_C``); prefill and training
attention through ``scaled_dot_product_attention``. ``LLM_ENGINE_BACKEND=torch|triton``
overrides the choice (tests set ``triton`` together with ``TRITON_INTERPRET=1`` to run
the real kernels on CPU). The model calls only these functions and never branches on
device itself.
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F

from llm_engine import _C
from llm_engine.quant import QuantizedWeight

# Modules, not names: ``llm_engine.kernels`` re-exports functions that share their
# module's name (``layer_norm``, ``paged_attention``), so attribute import is ambiguous.
_attention = importlib.import_module("llm_engine.kernels.attention")
_cross_entropy = importlib.import_module("llm_engine.kernels.cross_entropy")
_layer_norm = importlib.import_module("llm_engine.kernels.layer_norm")
_paged = importlib.import_module("llm_engine.kernels.paged_attention")
_sampling = importlib.import_module("llm_engine.kernels.sampling")

BACKENDS = ("torch", "triton")


def backend_for(t: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"`` for an op whose main input is ``t``."""
    forced = os.environ.get("LLM_ENGINE_BACKEND", "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"LLM_ENGINE_BACKEND must be one of {BACKENDS}, got {forced!r}")
        return forced
    return "triton" if t.is_cuda else "torch"


def _triton(t: torch.Tensor) -> bool:
    return backend_for(t) == "triton"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           packed: PackedWeight | None = None) -> torch.Tensor:
    """``x (..., in) @ weight (out, in).T + bias (out,)``, in ``x``'s dtype.

    On CPU (fp32 or bf16) the matmuls go through oneDNN rather than PyTorch's
    default CPU GEMM (MKL): on the AMD EPYC CPU we measure on, oneDNN is 1.2-2.9x
    faster (about 2x typical) at every row count an LLM decodes or prefills (1 to
    2048), forward and backward (``llm-engine bench linear``). Elsewhere:
    ``F.linear`` (cuBLAS on CUDA).

    ``packed``: the weight's :class:`PackedWeight` cache, used when no gradient is
    needed (inference), where oneDNN applies. A :class:`~llm_engine.quant.QuantizedWeight`
    goes to :func:`quantized_linear`.
    """
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight, bias)
    if not _onednn_linear_ok(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _OneDNNLinear.apply(x, weight, bias)
    if packed is not None:
        weight = packed.get(weight)
    return _onednn_mm(x, weight, bias)


# oneDNN's linear op and its weight packing, resolved once (they are on the hot path:
# every projection of every layer); None where this PyTorch build lacks them.
_LINEAR_POINTWISE = (torch.ops.mkldnn._linear_pointwise.default
                     if torch.backends.mkldnn.is_available()
                     and hasattr(torch.ops.mkldnn, "_linear_pointwise") else None)
_REORDER_WEIGHT = (torch.ops.mkldnn._reorder_linear_weight.default
                   if _LINEAR_POINTWISE is not None
                   and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") else None)


# From this many rows on, a quantized linear on the CPU dequantizes its weight (in tiles
# of at most _QUANT_TILE floats) and runs oneDNN's fp32 GEMM, compute-bound there;
# below, the C++ kernel reads the quantized blocks directly (``llm-engine bench quant``).
QUANT_GEMM_MIN_ROWS = 64
_QUANT_TILE = 1 << 21


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., in) @ W.T + bias (out,)`` for a quantized ``W (out, in)``, in ``x``'s dtype.

    CPU fp32 inference: the C++ kernel ``_C.quant_matmul`` on the blocks for fewer than
    :data:`QUANT_GEMM_MIN_ROWS` rows, else the weight dequantized tile by tile into a
    scratch buffer and oneDNN's GEMM. Both keep ``x`` in fp32, so a row's result differs
    between them only by the order of its sums. Elsewhere (other dtypes, CUDA, a
    gradient wanted for ``x``): :func:`quantized_linear_reference`.
    """
    if x.dim() == 0 or x.shape[-1] != weight.in_features:
        raise ValueError(f"x must be (..., {weight.in_features}) for a weight of shape "
                         f"{weight.shape}, got {tuple(x.shape)}")
    if not (_native_ok(x, bias) and weight.blocks.is_cpu and not _triton(x)
            and (bias is None or bias.shape == (weight.out_features,))):
        return quantized_linear_reference(x, weight, bias)
    x2 = _rows(x)
    rows, n = x2.shape[0], weight.out_features
    threads = torch.get_num_threads()
    if rows >= QUANT_GEMM_MIN_ROWS and _LINEAR_POINTWISE is not None:
        tile = max(1, _QUANT_TILE // weight.in_features)
        out = None if n <= tile else x2.new_empty(rows, n)
        scratch = x2.new_empty(min(n, tile), weight.in_features)
        for a in range(0, n, tile):
            b = min(n, a + tile)
            w = scratch[:b - a]
            _C.quant_dequantize(w.numpy(), weight.blocks[a:b].numpy(), weight.qtype, threads)
            y = _onednn_mm(x2, w, None if bias is None else bias[a:b])
            if out is None:
                out = y
            else:
                out[:, a:b] = y
    else:
        out = x2.new_empty(rows, n)
        _C.quant_matmul(out.numpy(), x2.numpy(), weight.blocks.numpy(), weight.qtype, threads)
        if bias is not None:
            out += bias
    return out.view(*x.shape[:-1], n)


def quantized_linear_reference(x: torch.Tensor, weight: QuantizedWeight,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize (:func:`llm_engine.quant.dequantize`) then ``F.linear``, in ``x``'s dtype."""
    w = weight.dequantize().to(device=x.device, dtype=x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The fp32 ``(out, in)`` weight: the C++ kernel on the CPU, else the reference."""
    if not weight.blocks.is_cpu:
        return weight.dequantize()
    out = torch.empty(weight.shape, dtype=torch.float32)
    if out.numel():
        _C.quant_dequantize(out.numpy(), weight.blocks.numpy(), weight.qtype,
                            torch.get_num_threads())
    return out


class PackedWeight:
    """A linear weight in oneDNN's blocked layout, for CPU inference through :func:`linear`.

    oneDNN reorders a plain ``(out, in)`` weight on every call; a packed copy skips
    that: on SmolLM2's projections the matmul is 1.0-1.5x faster at 1 row and 1.2-1.4x
    at the 32 rows of a batched decode; at 2048 rows the body's are about the same and
    the LM head's has measured 0.7-0.9x, a size the engine never runs (it computes
    logits for the sampled rows only). See the ``linear`` benchmark suite. The cost is
    a second copy of the weight. The copy
    is made on first use and remade whenever the weight changes: an in-place update
    bumps the weight's version, and a new tensor has another storage (the cache holds
    the old one, so its address cannot be reused). Where oneDNN cannot pack the
    weight, :meth:`get` returns it unchanged.
    """

    # Rows the packed layout is tuned for; any row count works with it.
    ROWS_HINT = 32

    def __init__(self) -> None:
        self._source: torch.Tensor | None = None
        self._version = -1
        self._packed: torch.Tensor | None = None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        """The packed copy of ``weight (out, in)``, or ``weight`` itself where oneDNN
        cannot pack it (not a float32 CPU tensor, or no oneDNN packing in this build)
        or where changes to it cannot be seen (an inference-mode tensor has no version)."""
        if (_REORDER_WEIGHT is None or weight.device.type != "cpu" or weight.dtype != torch.float32
                or weight.dim() != 2 or weight.is_inference()):
            return weight
        src = self._source
        if (src is None or src.data_ptr() != weight.data_ptr() or src.shape != weight.shape
                or src.stride() != weight.stride() or weight._version != self._version):
            with torch.inference_mode(False), torch.no_grad():
                self._packed = _REORDER_WEIGHT(weight.detach(), self.ROWS_HINT)
            self._source, self._version = weight.detach(), weight._version
        return self._packed

    def __getstate__(self) -> dict:
        return {"_source": None, "_version": -1, "_packed": None}  # a copy packs anew


def _onednn_linear_ok(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (_LINEAR_POINTWISE is not None and x.device.type == "cpu"
            and x.dim() >= 2 and x.numel() > 0
            and x.dtype in (torch.float32, torch.bfloat16)
            and weight.dtype == x.dtype and weight.dim() == 2
            and (bias is None or bias.dtype == x.dtype)
            and not torch.is_autocast_enabled("cpu")  # autocast's casts belong to F.linear
            and torch.backends.mkldnn.enabled)


def _onednn_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN; has no autograd of its own."""
    return _LINEAR_POINTWISE(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """The CPU linear with its backward also through oneDNN:
    ``dx = dy @ W`` and ``dW = dy.T @ x`` are the same op on transposed views."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        dx = _onednn_mm(dy, weight.t(), None) if ctx.needs_input_grad[0] else None
        dw = _onednn_mm(dy2.t(), x2.t(), None) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim; with ``residual``: ``(norm(x + residual), x + residual)``."""
    fn = _layer_norm.layer_norm if _triton(x) else _layer_norm.layer_norm_reference
    return fn(x, weight, bias, eps=eps, residual=residual)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim; with ``residual``: ``(norm(x + residual), x + residual)``."""
    if _triton(x):
        fn = _layer_norm.rms_norm
    elif (_native_ok(x, weight, residual) and x.shape[-1:] == weight.shape
          and (residual is None or residual.shape == x.shape)):
        fn = _rms_norm_native
    else:
        fn = _layer_norm.rms_norm_reference
    return fn(x, weight, eps=eps, residual=residual)


def _native_ok(*tensors: torch.Tensor | None) -> bool:
    """Whether the C++ CPU kernels can take these tensors: fp32 on the CPU, no gradient
    wanted (they have no backward). A plain loop: this runs on every op of every layer."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (not t.is_cpu or t.dtype != torch.float32
                              or (grad and t.requires_grad)):
            return False
    return True


def _rows_apart(t: torch.Tensor) -> bool:
    """Whether ``t (rows, heads, d)`` is contiguous within each row, its rows possibly
    apart (a slice of the QKV output): the layout the C++ kernels read in place."""
    return t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a C-contiguous ``(rows, last dim)`` matrix (itself when it already is one:
    these wrappers run a few hundred times per decode step, so every call counts)."""
    return t if t.dim() == 2 and t.is_contiguous() else t.reshape(-1, t.shape[-1]).contiguous()


def _rms_norm_native(x: torch.Tensor, weight: torch.Tensor, eps: float,
                     residual: torch.Tensor | None = None
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    x2 = _rows(x)
    out = torch.empty_like(x2)
    threads = torch.get_num_threads()
    if residual is None:
        _C.rms_norm(out.numpy(), None, x2.numpy(), None, weight.contiguous().numpy(), eps, threads)
        return out.view(x.shape)
    res_out = torch.empty_like(x2)
    _C.rms_norm(out.numpy(), res_out.numpy(), x2.numpy(), _rows(residual).numpy(),
                weight.contiguous().numpy(), eps, threads)
    return out.view(x.shape), res_out.view(x.shape)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """The SwiGLU activation ``silu(gate) * up`` of ``h (..., 2·width) = [gate | up]``;
    returns ``(..., width)``. The C++ kernel on fp32 CPU inference, else PyTorch."""
    if h.dim() == 0 or h.shape[-1] % 2:
        raise ValueError(f"h must have an even last dimension [gate | up], got {tuple(h.shape)}")
    if not _triton(h) and _native_ok(h):
        h2 = _rows(h)
        out = h2.new_empty(h2.shape[0], h2.shape[1] // 2)
        _C.silu_mul(out.numpy(), h2.numpy(), torch.get_num_threads())
        return out.view(*h.shape[:-1], h.shape[-1] // 2)
    return silu_mul_reference(h)


def silu_mul_reference(h: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`silu_mul` (what CUDA, autograd and other dtypes run)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed sequences: ``q (total_q, heads, d)``, ``k, v (total_k, kv_heads, d)``.

    On CPU, when queries and keys cover the same tokens (prefill, training), it runs
    PyTorch's fused ``scaled_dot_product_attention`` per run of equal lengths;
    otherwise the PyTorch reference, which materialises the scores.
    """
    if _triton(q):
        fn = _attention.flash_attention_varlen
    elif cu_seqlens_q is cu_seqlens_k or torch.equal(cu_seqlens_q, cu_seqlens_k):
        fn = _attention_varlen_sdpa
    else:
        fn = _attention.attention_varlen_reference
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
              causal=causal, softmax_scale=softmax_scale)


def _attention_varlen_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool = True,
                           softmax_scale: float | None = None) -> torch.Tensor:
    """Self-attention of packed sequences (``cu_seqlens_q == cu_seqlens_k``) through SDPA:
    one batched call when every sequence has the same length, else one call each."""
    bounds = cu_seqlens_q.tolist()
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != q.shape[0] or k.shape[0] != q.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to total tokens {q.shape[0]}, got {bounds}")
    lengths = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    if min(lengths) < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds}")

    def attend(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        # (batch, len, heads, d) -> SDPA's (batch, heads, len, d) and back
        out = F.scaled_dot_product_attention(
            qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), is_causal=causal,
            scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2)

    if q.shape[0] == 0:
        return torch.empty_like(q)
    if len(set(lengths)) == 1:
        n, length = len(lengths), lengths[0]
        return attend(q.view(n, length, *q.shape[1:]), k.view(n, length, *k.shape[1:]),
                      v.view(n, length, *v.shape[1:])).reshape(q.shape)
    return torch.cat([attend(q[a:b][None], k[a:b][None], v[a:b][None])[0]
                      for a, b in zip(bounds, bounds[1:], strict=False) if b > a])


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write each token's K/V ``(tokens, kv_heads, d)`` into its cache slot (−1: skip)."""
    if _triton(k):
        fn = _paged.store_kv_cache
    elif (_native_ok(k, v, k_cache, v_cache) and slot_mapping.dtype == torch.int64
          and slot_mapping.device.type == "cpu" and k_cache.is_contiguous()
          and v_cache.is_contiguous()):
        fn = _store_kv_cache_native
    else:
        fn = _paged.store_kv_cache_reference
    fn(k, v, k_cache, v_cache, slot_mapping)


def _store_kv_cache_native(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    k, v = (t if _rows_apart(t) else t.contiguous() for t in (k, v))
    _C.store_kv(k_cache.numpy(), v_cache.numpy(), k.numpy(), v.numpy(),
                slot_mapping.contiguous().numpy())


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Decode attention: one query ``(seqs, heads, d)`` per sequence over its paged cache.

    On CPU in fp32 it runs the C++ kernel ``_C.paged_decode_attention``, which reads
    K/V straight from the cache blocks; otherwise the PyTorch reference.
    """
    if _triton(q):
        fn = _paged.paged_attention
    elif _native_decode_ok(q, k_cache, v_cache, block_tables, context_lens):
        fn = _paged_attention_native
    else:
        fn = _paged.paged_attention_reference
    return fn(q, k_cache, v_cache, block_tables, context_lens, softmax_scale=softmax_scale)


def _native_decode_ok(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, context_lens: torch.Tensor) -> bool:
    return (_native_ok(q, k_cache, v_cache) and block_tables.is_cpu and context_lens.is_cpu
            and block_tables.dtype == context_lens.dtype == torch.int32
            and q.dim() == 3 and k_cache.dim() == v_cache.dim() == 4
            and k_cache.is_contiguous() and v_cache.is_contiguous())


def _paged_attention_native(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, context_lens: torch.Tensor,
                            softmax_scale: float | None = None) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=q.dtype)
    scale = _paged._scale(softmax_scale, q.shape[-1])  # the checks the reference makes
    _C.paged_decode_attention(out.numpy(), q.contiguous().numpy(), k_cache.numpy(),
                              v_cache.numpy(), block_tables.contiguous().numpy(),
                              context_lens.contiguous().numpy(), scale, torch.get_num_threads())
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    max_seqlen_q: int,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """New tokens ``(total_q, heads, d)`` attending causally over cached + new K/V."""
    fn = (_paged.paged_prefill_attention if _triton(q)
          else _paged.paged_prefill_attention_reference)
    return fn(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, max_seqlen_q,
              softmax_scale=softmax_scale)


def sample(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
    seed: int | torch.Tensor | None = None,
    step: int | torch.Tensor = 0,
    return_logprobs: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of ``logits (batch, vocab)``; see ``kernels.sampling.sample``."""
    fn = _sampling.sample if _triton(logits) else _sampling.sample_reference
    return fn(logits, temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, step=step,
              return_logprobs=return_logprobs)


def cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden (T, H) @ weight (V, H).T`` against ``targets (T,)``.

    Chunked over tokens so the full ``(T, V)`` fp32 logits never exist at once.
    """
    fn = (_cross_entropy.fused_linear_cross_entropy if _triton(hidden)
          else _cross_entropy.fused_linear_cross_entropy_reference)
    return fn(hidden, weight, targets, ignore_index=ignore_index)


def rope_cos_sin(
    head_dim: int, max_positions: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables ``cos, sin: (max_positions, head_dim // 2)`` fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def rope_at(
    positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary factors at ``positions (tokens,)`` for :func:`apply_rope`, from the
    ``(max_positions, head_dim // 2)`` tables: ``(cos, cos)`` and ``(-sin, sin)`` side by
    side, each ``(tokens, 1, head_dim)``. Built once per forward, shared by every layer."""
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    return torch.cat((c, c), dim=-1), torch.cat((-s, s), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (tokens, heads, head_dim)`` by the factors of :func:`rope_at`
    (half-split layout).

    The first and second halves of the head dimension form the (real, imaginary)
    pairs, as in HF Llama: ``x * cos + swap_halves(x) * sin``, with the sign folded
    into ``sin``. Computed in fp32, returned in ``x``'s dtype; by the C++ kernel on fp32
    CPU inference.
    """
    if (not _triton(x) and _native_ok(x, cos, sin) and _rows_apart(x)
            and cos.shape == sin.shape == (x.shape[0], 1, x.shape[2])
            and cos.is_contiguous() and sin.is_contiguous()):
        out = torch.empty(x.shape, dtype=x.dtype)
        _C.rope(out.numpy(), x.numpy(), cos.numpy(), sin.numpy(), torch.get_num_threads())
        return out
    return apply_rope_reference(x, cos, sin)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch :func:`apply_rope` (what CUDA, autograd and other dtypes run)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.addcmul(xf * cos, torch.cat((x2, x1), dim=-1), sin).to(x.dtype)
