"""Fidelity of the quantized model: top-1 agreement with the dequantized fp32 model and
perplexity, over 1,000 next-token positions of a fixed text, beside llama.cpp's.

The text: CPython's ``pydoc_data.topics`` (the help topics shipped with the
interpreter), topics in sorted order, its first 1,001 tokens. The same token ids go
to every model; each predicts positions 1..1000 from the ones before in one forward
(the prompt's path). The quantized model also predicts them one decode step at a time
over its KV cache, the path every generated token takes (with int8 activations unless
``quantized_linear`` is forced to another implementation).
"""

from __future__ import annotations

import numpy as np
import torch

from llm_engine.bench.common import OURS, Row
from llm_engine.kv_cache import KVCache
from llm_engine.model import AttentionMetadata, Transformer

SUITE = "generate"
CASE = "fidelity-1000"
POSITIONS = 1000


def fixed_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)),
                       AttentionMetadata.for_lengths([len(ids)], "cpu"))
        return model.compute_logits(hidden).float()


def _decode_logits(model: Transformer, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """``(len(ids), vocab)`` fp32 logits, position ``i`` from a decode step of ``ids[i]``
    over the K/V of ``ids[:i]`` (one sequence in a fresh cache)."""
    c = model.config
    cache = KVCache(c.num_layers, c.num_kv_heads, c.head_dim, block_size, dtype=torch.float32,
                    num_blocks=-(-len(ids) // block_size))
    caches = [cache.layer(i) for i in range(c.num_layers)]
    decoder = model.decoder_stack(caches)
    table = torch.arange(cache.num_blocks, dtype=torch.int32)[None]
    cu = torch.tensor([0, 1], dtype=torch.int32)
    out = []
    with torch.inference_mode():
        for i, tok in enumerate(ids):
            attn = AttentionMetadata(cu, cu, 1, i + 1, slot_mapping=torch.tensor([i]),
                                     block_tables=table,
                                     context_lens=torch.tensor([i + 1], dtype=torch.int32),
                                     is_decode=True, has_cached_prefix=True)
            hidden = model(torch.tensor([tok]), torch.tensor([i]), attn, caches, decoder)
            out.append(model.compute_logits(hidden, decode=True).float())
    return torch.cat(out)


def _ppl(logits: torch.Tensor, targets: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits.double(), targets)
    return float(torch.exp(nll))


def rows(quantized: Transformer, fp32: Transformer, tokenizer, gguf_path: str) -> list[Row]:
    """Perplexity rows (``value``) with top-1 agreement against fp32 in ``note``."""
    ids = tokenizer.encode(fixed_text())[:POSITIONS + 1]
    inputs, targets = ids[:POSITIONS], torch.tensor(ids[1:POSITIONS + 1])
    ref = _logits(fp32, inputs)
    ref_top1 = ref.argmax(-1)
    params = {"positions": POSITIONS}
    out = [Row(SUITE, CASE, f"{OURS}-fp32", "ppl", _ppl(ref, targets), rel_err=0.0,
               note="the dequantized weights in fp32 (the reference)", params=params)]
    for impl, logits, path in (
            (f"{OURS}-quantized", _decode_logits(quantized, inputs),
             "decode steps (the path of generated tokens)"),
            (f"{OURS}-quantized-prompt", _logits(quantized, inputs),
             "one prompt forward, fp32 activations")):
        agree = (logits.argmax(-1) == ref_top1).float().mean().item()
        rel = ((logits - ref).norm() / ref.norm()).item()
        out.append(Row(SUITE, CASE, impl, "ppl", _ppl(logits, targets), rel_err=rel,
                       note=f"top-1 agreement with fp32 {agree:.3f}; {path}", params=params))
    try:
        from llama_cpp import Llama
    except ImportError:
        out.append(Row(SUITE, CASE, "llama.cpp", "ppl", None,
                       note="llama-cpp-python is not installed; install it with: "
                            "pip install llama-cpp-python"))
        return out
    peer = Llama(model_path=gguf_path, n_ctx=2048, n_batch=1024, logits_all=True,
                 n_threads=torch.get_num_threads(), verbose=False)
    peer.eval(inputs)
    scores = torch.from_numpy(np.array(peer.scores[:POSITIONS], dtype=np.float32))
    agree = (scores.argmax(-1) == ref_top1).float().mean().item()
    rel = ((scores - ref).norm() / ref.norm()).item()
    out.append(Row(SUITE, CASE, "llama.cpp", "ppl", _ppl(scores, targets), rel_err=rel,
                   note=f"top-1 agreement with our fp32 {agree:.3f}; same file, logits_all",
                   params=params))
    if hasattr(peer, "close"):
        peer.close()
    return out
