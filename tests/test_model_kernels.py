"""The model gives the same logits and gradients with the Triton kernels as with the references.

Runs the Triton kernels under the interpreter on CPU (``ops.use("triton")``),
for a tiny config of each family, on a packed batch of ragged sequences.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from testing_utils import assert_close

from llm_engine import ops
from llm_engine.config import ModelConfig
from llm_engine.model import AttentionMetadata, Transformer

CONFIGS = {
    "gpt2": ModelConfig(arch="gpt2", vocab_size=101, hidden_size=64, num_layers=2, num_heads=2,
                        intermediate_size=96, max_position_embeddings=64),
    "llama": ModelConfig(arch="llama", vocab_size=101, hidden_size=96, num_layers=2, num_heads=3,
                         num_kv_heads=1, head_dim=32, intermediate_size=80,
                         max_position_embeddings=64, tie_word_embeddings=False),
}
LENGTHS = [7, 1, 20]


def _loss_and_grads(model: Transformer, ids: torch.Tensor):
    model.zero_grad()
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    hidden = model(ids, positions, AttentionMetadata.for_lengths(LENGTHS, "cpu"))
    logits = model.compute_logits(hidden)
    loss = F.cross_entropy(logits, torch.roll(ids, -1))
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_triton_kernels_match_reference_ops_in_the_model(arch: str) -> None:
    model = Transformer(CONFIGS[arch])
    ids = torch.randint(0, model.config.vocab_size, (sum(LENGTHS),))
    with ops.use("torch"):
        ref_logits, ref_grads = _loss_and_grads(model, ids)
    with ops.use("triton"):
        logits, grads = _loss_and_grads(model, ids)
    assert_close(logits, ref_logits, torch.float32, what="logits")
    for name, g in grads.items():
        assert_close(g, ref_grads[name], torch.float32, grad=True, what=f"grad of {name}")
