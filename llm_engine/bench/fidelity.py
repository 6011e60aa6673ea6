"""Fidelity of the quantized model: top-1 agreement with the dequantized fp32 model and
perplexity, over 1,000 next-token positions of a fixed text, beside llama.cpp's.

The text: CPython's ``pydoc_data.topics`` (the help topics shipped with the
interpreter), topics in sorted order, its first 1,001 tokens. The same token ids go
to every model; each predicts positions 1..1000 from the ones before in one forward.
"""

from __future__ import annotations

import numpy as np
import torch

from llm_engine.bench.common import OURS, Row
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
    got = _logits(quantized, inputs)
    agree = (got.argmax(-1) == ref_top1).float().mean().item()
    rel = ((got - ref).norm() / ref.norm()).item()
    out.append(Row(SUITE, CASE, f"{OURS}-quantized", "ppl", _ppl(got, targets), rel_err=rel,
                   note=f"top-1 agreement with fp32 {agree:.3f}", params=params))
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
