"""A thin decoder-only transformer for the GPT-2 and Llama families (and the Llama-like
Qwen2, Qwen3, Mistral, Phi-3, Mixtral and Qwen3-MoE, through config fields).

The forward takes a flat batch of tokens (``T`` tokens from any number of
sequences) with their positions and an :class:`AttentionMetadata`, so the
prefill of many prompts, the decode of many requests, or a training batch are
all one call. Every op with a kernel goes through :mod:`llm_engine.ops`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llm_engine import ops
from llm_engine.config import ModelConfig
from llm_engine.quant import ROWS8_GROUP, ROWS8_TYPES, QuantizedWeight, quantize
from llm_engine.rope import rope_cos_sin

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache): (blocks, block_size, kv_heads, d)


@dataclass
class AttentionMetadata:
    """Where each sequence starts in the flat batch and where its K/V live.

    - ``cu_seqlens_q``: ``(num_seqs + 1,)`` int32, offsets of each sequence's new tokens.
    - ``cu_seqlens_k``: ``(num_seqs + 1,)`` int32, offsets of each sequence's keys when
      attention runs over the new tokens only (no cache, or no cached prefix).
    - ``slot_mapping``: ``(T,)`` int64 cache slot of each new token (−1: don't store).
    - ``block_tables``: ``(num_seqs, max_blocks)`` int32 cache blocks of each sequence.
    - ``context_lens``: ``(num_seqs,)`` int32 total length (cached + new) of each sequence.
    - ``is_decode``: every sequence has exactly one new token.
    - ``has_cached_prefix``: some sequence attends to K/V already in the cache, so
      attention must read the paged cache rather than the new tokens alone.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    is_decode: bool = False
    has_cached_prefix: bool = False

    @staticmethod
    def for_batch(batch_size: int, seqlen: int, device: torch.device | str) -> AttentionMetadata:
        """Metadata for ``batch_size`` independent causal windows of ``seqlen`` tokens."""
        cu = torch.arange(0, (batch_size + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        return AttentionMetadata(cu, cu, seqlen, seqlen)

    @staticmethod
    def for_lengths(lengths: list[int], device: torch.device | str) -> AttentionMetadata:
        """Metadata for packed causal sequences of the given lengths (no cache)."""
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        cu = cu.to(device)
        return AttentionMetadata(cu, cu, max(lengths), max(lengths))


class Linear(nn.Linear):
    """``nn.Linear`` whose matmul goes through :func:`llm_engine.ops.linear`, with the
    packed copy of its weight when :meth:`Transformer.pack_weights` asked for one."""

    packed: ops.PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, packed=self.packed)


class _QuantizedBlocks(nn.Module):
    """A module whose weights are :class:`~llm_engine.quant.QuantizedWeight` ``parts``, their
    blocks registered as the uint8 buffers ``blocks0, blocks1...``."""

    def _register_parts(self, parts: list[QuantizedWeight]) -> None:
        for i, p in enumerate(parts):
            self.register_buffer(f"blocks{i}", p.blocks)
        self.parts = parts

    def _apply(self, fn, recurse: bool = True):  # .to() replaces the buffers: rewrap them
        super()._apply(fn, recurse)
        self.parts = [QuantizedWeight(p.qtype, getattr(self, f"blocks{i}"), p.in_features, p.layout)
                      for i, p in enumerate(self.parts)]
        return self

    def set_layout(self, layout: str) -> None:
        """Hold each part's blocks in ``layout`` (:data:`llm_engine.quant.LAYOUTS`) where its
        type has it: ``"rows8"``, which the CPU kernels read fastest, for Q8_0 / Q4_0 / Q4_1
        parts. The buffers are replaced, not copied; :meth:`state_dict` still gives GGUF's
        ``"rows"`` bytes."""
        for i, p in enumerate(self.parts):
            if layout == "rows8" and p.qtype not in ROWS8_TYPES:
                continue
            self.parts[i] = p.to_layout(layout)
            setattr(self, f"blocks{i}", self.parts[i].blocks)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for i, p in enumerate(self.parts):
            if p.layout != "rows":
                destination[f"{prefix}blocks{i}"] = p.to_layout("rows").blocks


class QuantizedLinear(_QuantizedBlocks):
    """A linear layer (inference only) whose weight stays quantized: one or more
    :class:`~llm_engine.quant.QuantizedWeight` parts stacked along the output dimension
    (a fused projection whose source tensors came in different types has several).
    Their blocks are the uint8 buffers ``blocks0, blocks1...``; no fp32 copy exists."""

    def __init__(self, parts: list[QuantizedWeight], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not parts or len({p.in_features for p in parts}) != 1:
            raise ValueError("parts must be one or more QuantizedWeights with the same in_features")
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self._register_parts(parts)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return ops.quantized_linear(x, self.parts[0], self.bias)
        out = torch.cat([ops.quantized_linear(x, p) for p in self.parts], dim=-1)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        types = "+".join(p.qtype for p in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={types}"


class QuantizedEmbedding(_QuantizedBlocks):
    """Token embedding kept quantized (``blocks0``: a :class:`QuantizedWeight` of shape
    ``(vocab, hidden)``); rows are dequantized as they are looked up. With tied
    embeddings it is also the LM head (:meth:`linear`)."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self._register_parts([weight])
        self.embedding_dim = weight.in_features

    @property
    def qweight(self) -> QuantizedWeight:
        return self.parts[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat, w = ids.reshape(-1), self.qweight
        if w.layout == "rows":
            rows = self.blocks0.index_select(0, flat)
            out = ops.dequantize(QuantizedWeight(w.qtype, rows, self.embedding_dim))
        else:  # rows8: the groups holding the ids, dequantized, then each id's row of its group
            g = ROWS8_GROUP
            whole = w.out_features // g * g
            inside = flat < whole
            picked = torch.where(inside, flat, 0)
            groups = self.blocks0[:whole].view(whole // g, -1).index_select(0, picked // g)
            values = ops.dequantize(QuantizedWeight(w.qtype, groups.view(-1, w.blocks.shape[1]),
                                                    self.embedding_dim, "rows8"))
            out = values.view(-1, g, self.embedding_dim)[torch.arange(len(flat)), picked % g]
            if whole < w.out_features:  # the last rows % 8 rows are in GGUF's layout
                tail = ops.dequantize(QuantizedWeight(
                    w.qtype, self.blocks0.index_select(0, torch.where(inside, whole, flat)),
                    self.embedding_dim))
                out = torch.where(inside[:, None], out, tail)
        return out.view(*ids.shape, self.embedding_dim)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., hidden) @ weight.T``: the tied LM head."""
        return ops.quantized_linear(x, self.qweight)


class Norm(nn.Module):
    """RMSNorm (Llama) or LayerNorm (GPT-2), optionally fused with the residual add."""

    def __init__(self, dim: int, eps: float, kind: str) -> None:
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layer" else None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "rms":
            return ops.rms_norm(x, self.weight, self.eps, residual=residual)
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = config.arch == "gpt2"
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                               bias=bias or config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=bias)
        # Qwen3: an RMSNorm over each query and key head, before the rotation.
        self.q_norm = Norm(self.head_dim, config.norm_eps, "rms") if config.qk_norm else None
        self.k_norm = Norm(self.head_dim, config.norm_eps, "rms") if config.qk_norm else None
        self.use_rope = config.arch == "llama"
        self.scale = self.head_dim**-0.5
        self.window = config.layer_window(layer)

    def forward(
        self,
        x: torch.Tensor,
        attn: AttentionMetadata,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: KVCache | None,
    ) -> torch.Tensor:
        T = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(T, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        if self.use_rope:
            qk = ops.apply_rope(qk, *rope)  # q and k heads rotate together
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            ops.store_kv_cache(k, v, k_cache, v_cache, attn.slot_mapping)
            if attn.is_decode:
                o = ops.paged_attention(q, k_cache, v_cache, attn.block_tables, attn.context_lens,
                                        softmax_scale=self.scale, **self._window_arg())
            elif attn.has_cached_prefix:
                o = ops.paged_prefill_attention(q, k_cache, v_cache, attn.block_tables,
                                                attn.cu_seqlens_q, attn.context_lens,
                                                attn.max_seqlen_q, softmax_scale=self.scale,
                                                **self._window_arg())
            else:
                o = self._attend_new_tokens(q, k, v, attn)
        else:
            o = self._attend_new_tokens(q, k, v, attn)
        return self.o_proj(o.reshape(T, self.q_size))

    def _attend_new_tokens(self, q, k, v, attn: AttentionMetadata) -> torch.Tensor:
        return ops.attention_varlen(q, k, v, attn.cu_seqlens_q, attn.cu_seqlens_k,
                                    attn.max_seqlen_q, attn.max_seqlen_k, causal=True,
                                    softmax_scale=self.scale, **self._window_arg())

    def _window_arg(self) -> dict[str, int]:
        """``{"window": n}`` on a sliding-window layer, else nothing (the ops' default)."""
        return {} if self.window is None else {"window": self.window}


class MLP(nn.Module):
    """SwiGLU (Llama) or GELU (GPT-2) feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gated = config.arch == "llama"
        bias = config.arch == "gpt2"
        width = config.intermediate_size * (2 if self.gated else 1)
        self.up_proj = Linear(config.hidden_size, width, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x)
        h = ops.silu_mul(h) if self.gated else F.gelu(h, approximate="tanh")
        return self.down_proj(h)


class MoE(nn.Module):
    """Mixture of SwiGLU experts (Mixtral, Qwen3-MoE): a linear router picks
    ``num_experts_per_tok`` experts per token by softmax weight; their outputs are summed
    with those weights, renormalised over the chosen experts when ``norm_topk_prob``.

    ``up_proj: (experts, 2·width, hidden)`` holds each expert's ``[gate | up]`` rows,
    ``down_proj: (experts, hidden, width)``.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, width, hidden = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.top_k, self.normalize = config.num_experts_per_tok, config.norm_topk_prob
        self.router = Linear(hidden, e, bias=False)
        self.up_proj = nn.Parameter(torch.empty(e, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(e, hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = ops.moe_route(self.router(x), self.top_k, self.normalize)
        return ops.moe(x, self.up_proj, self.down_proj, weights, experts)


class Block(nn.Module):
    """Pre-norm transformer block; the residual add is fused into the next norm."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        kind = "rms" if config.arch == "llama" else "layer"
        self.attn_norm = Norm(config.hidden_size, config.norm_eps, kind)
        self.attn = Attention(config, layer)
        self.mlp_norm = Norm(config.hidden_size, config.norm_eps, kind)
        self.mlp = MoE(config) if config.num_experts else MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        attn: AttentionMetadata,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: KVCache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            h, residual = self.attn_norm(x), x
        else:
            h, residual = self.attn_norm(x, residual)
        h = self.attn(h, attn, rope, kv_cache)
        h, residual = self.mlp_norm(h, residual)
        return self.mlp(h), residual


def _embedding(num: int, dim: int) -> nn.Embedding:
    """An ``nn.Embedding`` whose weight ``reset_parameters`` initialises: the module's own
    initialisation is skipped, as ``normal_`` on a meta tensor (the loader builds the model
    on the meta device) imports ``torch._dynamo``, and with it Triton."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


class Transformer(nn.Module):
    """Decoder-only transformer; ``config.arch`` picks GPT-2 or Llama flavour."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = _embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = (
            _embedding(config.max_position_embeddings, config.hidden_size)
            if config.arch == "gpt2" else None
        )
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = Norm(config.hidden_size, config.norm_eps,
                         "rms" if config.arch == "llama" else "layer")
        self.lm_head = (None if config.tie_word_embeddings
                        else Linear(config.hidden_size, config.vocab_size, bias=False))
        # RoPE tables stay fp32 whatever dtype the weights take, so they are not buffers.
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lm_head_packed: ops.PackedWeight | None = None
        self.gradient_checkpointing = False
        self.reset_parameters()

    def rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """fp32 ``(cos, sin)`` tables on ``device`` for Llama models, None for GPT-2."""
        c = self.config
        if c.arch != "llama":
            return None
        if self._rope is None or self._rope[0].device != device:
            self._rope = rope_cos_sin(c.head_dim, c.max_position_embeddings, c.rope_theta,
                                      c.rope_scaling, device=device)
        return self._rope

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), output projections scaled by 1/sqrt(2·layers)."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.is_meta:  # built on the meta device to load weights into: no values to set
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() < 2:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.num_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """``(vocab, hidden)``: the output projection (the embedding when tied)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        if isinstance(head, QuantizedLinear | QuantizedEmbedding):
            raise TypeError("this model's LM head is quantized (inference only): load it with "
                            "quantization='none' to train or to read its weight")
        return head.weight

    @property
    def quantized(self) -> bool:
        """Whether any layer keeps its weight quantized (such a model is inference only)."""
        return any(isinstance(m, QuantizedLinear | QuantizedEmbedding) for m in self.modules())

    def quantize(self, qtype: str) -> None:
        """Replace every linear layer's weight, and the token embedding's, by its
        ``qtype`` quantization (:func:`llm_engine.quant.quantize`: q8_0, q4_0, q4_1), in
        place; weights whose input size is not a multiple of 32 stay as they are."""
        for name, module in list(self.named_modules()):
            if isinstance(module, Linear) and module.in_features % 32 == 0:
                bias = None if module.bias is None else module.bias.detach()
                self.set_submodule(name, QuantizedLinear([quantize(module.weight, qtype)], bias))
        if self.embed_tokens.embedding_dim % 32 == 0 and isinstance(self.embed_tokens, nn.Embedding):
            self.embed_tokens = QuantizedEmbedding(quantize(self.embed_tokens.weight, qtype))
        self._lm_head_packed = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[KVCache] | None = None,
        decoder: ops.DecoderStack | None = None,
    ) -> torch.Tensor:
        """Hidden states after the final norm.

        ``input_ids, positions: (T,)`` int64; ``kv_caches``: one ``(k_cache, v_cache)``
        per layer, each ``(num_blocks, block_size, kv_heads, head_dim)``, or None to
        attend over the new tokens only; ``decoder``: :meth:`decoder_stack` over those
        caches, which a decode step then runs through :func:`ops.decode_layers`.
        Returns ``(T, hidden_size)``.
        """
        x = self.embed_tokens(input_ids)
        if self.embed_positions is not None:
            x = x + self.embed_positions(positions)
        rope = self.rope_tables(input_ids.device)
        if rope is not None:
            rope = ops.rope_at(positions, *rope)
        residual = None
        if decoder is not None and attn.is_decode:
            x, residual = ops.decode_layers(x, decoder, *rope, attn.slot_mapping,
                                            attn.block_tables, attn.context_lens)
            x, _ = self.norm(x, residual)
            return x
        for i, layer in enumerate(self.layers):
            cache = None if kv_caches is None else kv_caches[i]
            if self.gradient_checkpointing and self.training:
                x, residual = checkpoint(layer, x, residual, attn, rope, cache,
                                         use_reentrant=False)
            else:
                x, residual = layer(x, residual, attn, rope, cache)
        x, _ = self.norm(x, residual)
        return x

    def decoder_stack(self, kv_caches: list[KVCache]) -> ops.DecoderStack | None:
        """The decoder layers over ``kv_caches`` as one :class:`ops.DecoderStack` (for
        decode steps in one native call), or None where the layers do not fit it: only
        Llama-style dense layers whose every projection is quantized do."""
        c = self.config
        projections = [m for layer in self.layers if isinstance(layer.mlp, MLP)
                       for m in (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.up_proj,
                                 layer.mlp.down_proj)]
        if (c.arch != "llama" or len(projections) != 4 * len(self.layers)
                or not all(isinstance(m, QuantizedLinear) for m in projections)):
            return None

        def weight(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach()

        layers = []
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches, strict=True):
            a = layer.attn
            layers.append(ops.DecoderLayerWeights(
                attn_norm=weight(layer.attn_norm.weight), qkv=a.qkv_proj.parts,
                qkv_bias=weight(a.qkv_proj.bias),
                q_norm=None if a.q_norm is None else weight(a.q_norm.weight),
                k_norm=None if a.k_norm is None else weight(a.k_norm.weight),
                o=a.o_proj.parts, mlp_norm=weight(layer.mlp_norm.weight),
                gate_up=layer.mlp.up_proj.parts, down=layer.mlp.down_proj.parts,
                k_cache=k_cache, v_cache=v_cache, window=a.window))
        return ops.DecoderStack(layers, c.num_heads, c.num_kv_heads, c.head_dim, c.norm_eps,
                                c.head_dim**-0.5)

    def forward_batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(B*S, hidden)`` of ``idx: (B, S)`` int64 independent causal windows."""
        B, S = idx.shape
        positions = torch.arange(S, device=idx.device).repeat(B)
        attn = AttentionMetadata.for_batch(B, S, idx.device)
        return self(idx.reshape(-1), positions, attn)

    def compute_logits(self, hidden: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """``(T, vocab)`` logits of ``hidden: (T, hidden_size)``; ``decode``: the rows of a
        decode step, whose quantized LM head takes the activations of the step's
        projections (:func:`ops.decode_projection`)."""
        if isinstance(self.lm_head, QuantizedLinear):
            if decode:
                return ops.decode_projection(hidden, self.lm_head.parts, self.lm_head.bias)
            return self.lm_head(hidden)
        if self.lm_head is None and isinstance(self.embed_tokens, QuantizedEmbedding):
            if decode:
                return ops.decode_projection(hidden, self.embed_tokens.parts)
            return self.embed_tokens.linear(hidden)
        return ops.linear(hidden, self.lm_head_weight, packed=self._lm_head_packed)

    def pack_weights(self, enabled: bool = True) -> None:
        """Keep a packed copy of every linear weight for CPU inference
        (:class:`llm_engine.ops.PackedWeight`): oneDNN then reads the weight in the layout
        its GEMM wants instead of reordering it on every call, for a second copy of the
        weights in memory. Training and autograd use the weights
        themselves, and a copy follows every change to its weight. Quantized linear
        layers and embeddings on the CPU move their Q8_0 / Q4_0 / Q4_1 blocks into the
        ``"rows8"`` layout instead (:meth:`QuantizedLinear.set_layout`, no second copy). The engine
        turns this on for fp32 CPU models."""
        for m in self.modules():
            if isinstance(m, Linear):
                m.packed = ops.PackedWeight() if enabled else None
            elif isinstance(m, _QuantizedBlocks) and m.blocks0.is_cpu:
                m.set_layout("rows8" if enabled else "rows")
        tied_quantized = self.lm_head is None and isinstance(self.embed_tokens, QuantizedEmbedding)
        self._lm_head_packed = ops.PackedWeight() if enabled and not tied_quantized else None

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters, counting each quantized weight's values as parameters too."""
        n = sum(p.numel() for p in self.parameters())
        n += sum(q.out_features * q.in_features for m in self.modules()
                 if isinstance(m, QuantizedLinear) for q in m.parts)
        if isinstance(self.embed_tokens, QuantizedEmbedding):
            n += self.embed_tokens.qweight.out_features * self.embed_tokens.embedding_dim
        if exclude_embeddings:
            n -= self.config.vocab_size * self.config.hidden_size
            if self.embed_positions is not None:
                n -= self.embed_positions.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token: 6·N + 12·L·H·D·S (PaLM appendix B)."""
        c = self.config
        n = self.num_parameters()
        if self.embed_positions is not None:
            n -= self.embed_positions.weight.numel()
        return 6.0 * n + 12.0 * c.num_layers * c.num_heads * c.head_dim * seq_len
