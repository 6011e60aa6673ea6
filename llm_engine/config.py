"""One configuration dataclass for every model the engine runs.

The GPT-2 family (LayerNorm, GELU MLP, learned positions, biases, tied
embeddings) and the Llama family (RMSNorm, RoPE, SwiGLU, grouped-query
attention) differ only in the fields below; ``arch`` picks the family. The
Llama-like families differ from Llama in a few more fields: Qwen2 has biases on
the q/k/v projections (``qkv_bias``), Qwen3 an RMSNorm on each query and key head
(``qk_norm``), Mistral and Qwen2 may attend over a sliding window
(``sliding_window``), Phi-3 and Llama 3 scale their rotary embedding
(``rope_scaling``), and Mixtral and Qwen3-MoE replace the MLP with a mixture of
experts (``num_experts``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Arch = Literal["llama", "gpt2"]


@dataclass
class ModelConfig:
    """Shape and flavour of a decoder-only transformer.

    ``head_dim`` defaults to ``hidden_size // num_heads``; ``num_kv_heads``
    defaults to ``num_heads`` (plain multi-head attention).
    """

    arch: Arch = "llama"
    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 1536
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    # Llama-like variants (all off for Llama itself).
    qkv_bias: bool = False
    qk_norm: bool = False
    # HF's rope parameters besides the base: {"rope_type": "linear" | "dynamic" | "yarn" |
    # "llama3" | "longrope", "factor": ..., ...}; None for plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    # Query i attends to keys j with i - j < sliding_window on the layers listed in
    # window_layers (every layer when None); no window when sliding_window is None.
    sliding_window: int | None = None
    window_layers: list[int] | None = None
    # Mixture of experts: num_experts > 0 replaces every MLP by that many experts of
    # width moe_intermediate_size, of which each token uses num_experts_per_tok, their
    # softmax router weights renormalised over the chosen ones when norm_topk_prob.
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ("llama", "gpt2"):
            raise ValueError(f"arch must be 'llama' or 'gpt2', got {self.arch!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                    f"({self.num_heads}) when head_dim is not given"
                )
            self.head_dim = self.hidden_size // self.num_heads
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.arch == "gpt2" and (self.qkv_bias or self.qk_norm or self.rope_scaling
                                    or self.sliding_window or self.num_experts):
            raise ValueError("qkv_bias, qk_norm, rope_scaling, sliding_window and num_experts "
                             "are Llama-family fields; arch 'gpt2' takes none of them")
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"sliding_window must be a positive int or None, "
                             f"got {self.sliding_window!r}")
        if self.window_layers is not None:
            self.window_layers = [int(i) for i in self.window_layers]
            if any(not 0 <= i < self.num_layers for i in self.window_layers):
                raise ValueError(f"window_layers must be layer indices in [0, {self.num_layers}), "
                                 f"got {self.window_layers}")
        if self.rope_scaling is not None:
            from llm_engine.rope import check_rope_scaling

            check_rope_scaling(self.rope_scaling, self.head_dim)
        if self.num_experts:
            if self.moe_intermediate_size is None:
                self.moe_intermediate_size = self.intermediate_size
            if not (isinstance(self.num_experts, int) and self.num_experts > 0
                    and isinstance(self.num_experts_per_tok, int)
                    and 0 < self.num_experts_per_tok <= self.num_experts):
                raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}]"
                                 f", got {self.num_experts_per_tok!r}")
            if not isinstance(self.moe_intermediate_size, int) or self.moe_intermediate_size <= 0:
                raise ValueError(f"moe_intermediate_size must be a positive int, "
                                 f"got {self.moe_intermediate_size!r}")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (None: it attends to every earlier token)."""
        if self.sliding_window is None:
            return None
        if self.window_layers is None or layer in self.window_layers:
            return self.sliding_window
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict, rejecting unknown keys (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))
