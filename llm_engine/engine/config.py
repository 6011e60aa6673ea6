"""The engine's arguments in one validated object, shared by ``LLM``, ``Engine`` and the CLI.

``EngineConfig`` checks every field when it is built and raises ``ValueError``
(or ``TypeError``) naming the field. :func:`add_engine_args` adds the same
fields to an ``argparse`` parser and :func:`engine_config_from_args` builds the
config from the parsed namespace, so every command that runs the engine takes
the same options.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace

import torch

from llm_engine.quant import QUANTIZE_TO

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model.

    Args:
        device, dtype: where and in which dtype ``LLM`` loads the weights (default
            CUDA + bf16 when available, else CPU + fp32); ``dtype`` may be a
            ``torch.dtype`` or a name such as ``"bf16"``. An engine over an already
            built model takes the model's device and dtype.
        max_num_seqs: most sequences running at once.
        max_num_batched_tokens: most tokens in one step (longer prompts are chunked);
            at least ``max_num_seqs``.
        max_model_len: longest sequence (prompt + output) in tokens; default and
            upper bound: the model's context.
        block_size: tokens per KV-cache block.
        kv_cache_memory: bytes for the KV cache, overriding the default size:
            enough blocks for ``max_num_seqs`` sequences of ``max_model_len`` tokens,
            capped on CUDA at ``gpu_memory_utilization`` of the device memory minus
            what the model needs, on CPU at a quarter of the available memory.
        gpu_memory_utilization: fraction of the CUDA device memory the engine may use.
        enable_prefix_caching: reuse the KV of prompt prefixes shared across requests.
        seed: seeds the requests that bring no seed of their own, so a run of the
            same requests is reproducible.
        enforce_eager: never use CUDA graphs for decode.
    """

    device: str | None = None
    dtype: torch.dtype | str | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("max_model_len", "kv_cache_memory"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}): every running sequence decodes one "
                f"token per step")
        util = self.gpu_memory_utilization
        if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {util!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        for name in ("enable_prefix_caching", "enforce_eager"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, "
                                 f"got {self.dtype!r}")
            object.__setattr__(self, "dtype", DTYPES[self.dtype])
        elif self.dtype is not None and self.dtype not in DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got "
                                 f"{self.device!r}") from e
            if device.type not in ("cpu", "cuda"):
                raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    def with_overrides(self, **kwargs) -> EngineConfig:
        """A copy with some fields changed (validated again); unknown names are a
        ``TypeError`` listing the valid ones."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(sorted(names))}")
        return replace(self, **kwargs)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def add_engine_args(parser: argparse.ArgumentParser, **defaults) -> None:
    """Add the :class:`EngineConfig` options (``--device``, ``--max-num-seqs``, ...) to
    ``parser``; ``defaults`` replaces the dataclass defaults for this command (e.g.
    ``max_num_seqs=1`` for a command that runs one sequence at a time)."""
    d = EngineConfig().with_overrides(**defaults)
    g = parser.add_argument_group("engine")
    g.add_argument("--device", default=d.device, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                   help="most sequences running at once (default: %(default)s)")
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens,
                   help="most tokens in one step (default: %(default)s)")
    g.add_argument("--max-model-len", type=int, default=d.max_model_len,
                   help="longest sequence in tokens (default: the model's context)")
    g.add_argument("--block-size", type=int, default=d.block_size,
                   help="tokens per KV-cache block (default: %(default)s)")
    g.add_argument("--kv-cache-memory", type=int, default=d.kv_cache_memory,
                   help="bytes for the KV cache (default: sized from --max-num-seqs and "
                        "--max-model-len, capped by the memory)")
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="fraction of the CUDA memory to use (default: %(default)s)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   default=d.enable_prefix_caching, help="do not reuse cached prompt prefixes")
    g.add_argument("--enforce-eager", action="store_true", default=d.enforce_eager,
                   help="no CUDA graphs for decode")


def add_quantization_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--quantization`` (how the weights are held in memory; see ``load_model``)."""
    parser.add_argument("--quantization", default="auto", choices=["auto", "none", *QUANTIZE_TO],
                        help="auto: a GGUF file's weights stay in their quantized types on the "
                             "CPU; none: full precision; q8_0/q4_0/q4_1: quantize at load")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The :class:`EngineConfig` of options added by :func:`add_engine_args`."""
    names = [f.name for f in fields(EngineConfig) if f.name != "seed"]
    return EngineConfig(**{name: getattr(args, name) for name in names})
