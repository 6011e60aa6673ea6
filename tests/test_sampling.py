"""Fused sampling kernel: distribution, filters, ties, determinism, logprobs, input checks.

Statistical bound used below. With ``N`` independent draws from a distribution
``p`` over ``K`` tokens, the empirical distribution ``q`` satisfies
``E[TV(p, q)] = 1/2 Σ E|q_i - p_i| <= 1/2 Σ sqrt(p_i (1 - p_i) / N) <= 1/2 sqrt(K / N)``
(Cauchy-Schwarz), and since moving one draw changes TV by at most ``1/N``,
McDiarmid's inequality gives ``P(TV > E[TV] + ε) <= exp(-2 N ε²)``. The bound
``tv_bound(K, N) = 1/2 sqrt(K/N) + sqrt(ln(1/δ) / (2N))`` with ``δ = 1e-6``
therefore fails for a correct sampler with probability below one in a million
(and the tests are seeded, so they are deterministic). For N = 20,000 and
K = 32 it is about 0.039, while sampling from the wrong filtered set or an
unrenormalised distribution moves TV by far more (and draws outside the kept
set fail on their own).
"""

from __future__ import annotations

import math

import pytest
import torch
from llm_engine.kernels.sampling import filtered_probs_reference, sample, sample_reference
from testing_utils import assert_close, interpreter_or_cuda

DEVICE = interpreter_or_cuda()
VOCAB = 32
DRAWS = 20_000


def tv_bound(support: int, draws: int, delta: float = 1e-6) -> float:
    return 0.5 * math.sqrt(support / draws) + math.sqrt(math.log(1 / delta) / (2 * draws))


def one_row(vocab: int = VOCAB, scale: float = 1.0, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, vocab, generator=g) * scale).to(DEVICE)


def check_distribution(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """No draw outside the support of ``probs: (vocab,)``; TV within ``tv_bound``."""
    tokens, probs = tokens.cpu(), probs.cpu().double()
    outside = probs[tokens] == 0
    assert not outside.any(), f"drew tokens outside the kept set: {tokens[outside].unique()}"
    empirical = torch.bincount(tokens, minlength=probs.numel()).double() / tokens.numel()
    tv = 0.5 * (empirical - probs).abs().sum().item()
    support = int((probs > 0).sum())
    bound = tv_bound(support, tokens.numel())
    assert tv < bound, f"TV {tv:.4f} >= {bound:.4f} over {support} kept tokens"


COMBOS = {
    "plain": {"temperature": 1.0},
    "top_k": {"temperature": 1.0, "top_k": 8},
    "top_p": {"temperature": 0.8, "top_p": 0.7},
    "top_k_top_p": {"temperature": 1.2, "top_k": 12, "top_p": 0.8},
    "min_p": {"temperature": 1.0, "min_p": 0.15},
    "all_three": {"temperature": 1.5, "top_k": 14, "top_p": 0.9, "min_p": 0.05},
    # Under the interpreter a vocabulary of 32 is 4 blocks of 8 and the candidate
    # capacity 16 tokens: kept sets larger than that are cut and drawn on the full
    # vocabulary; the narrow top-p compacts only after the wide top-k.
    "wide_top_k": {"temperature": 1.0, "top_k": 24},
    "wide_top_k_top_p": {"temperature": 1.5, "top_k": 28, "top_p": 0.95},
    "wide_top_k_narrow_top_p": {"temperature": 1.0, "top_k": 28, "top_p": 0.6},
}


@pytest.mark.parametrize("combo", list(COMBOS))
def test_draws_match_filtered_distribution(combo: str) -> None:
    """20,000 draws of one row: 5,000 rows of the same logits at each of 4 steps."""
    kw = COMBOS[combo]
    row = one_row()
    probs = filtered_probs_reference(row, **kw)[0]
    support = int((probs > 0).sum())
    assert 1 < support <= VOCAB
    if "top_k" in kw:
        assert support <= kw["top_k"]
    steps = 4
    tokens = torch.cat([sample(row.expand(DRAWS // steps, VOCAB), seed=123, step=s, **kw)
                        for s in range(steps)])
    assert tokens.dtype == torch.int64 and tokens.shape == (DRAWS,)
    check_distribution(tokens, probs)


def test_reference_sampler_matches_filtered_distribution() -> None:
    kw = COMBOS["all_three"]
    row = one_row().cpu()
    tokens = sample_reference(row.expand(DRAWS, VOCAB), seed=5, **kw)
    check_distribution(tokens, filtered_probs_reference(row, **kw)[0])


def test_top_k_keeps_k_largest() -> None:
    row = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0, 2.9]], device=DEVICE)
    probs = filtered_probs_reference(row, 1.0, top_k=3)[0].cpu()
    assert (probs > 0).nonzero().flatten().tolist() == [1, 3, 5]
    tokens = sample(row.expand(500, 6), 1.0, top_k=3, seed=0)
    assert set(tokens.tolist()) == {1, 3, 5}


def test_top_k_ties_keep_lower_token_ids() -> None:
    row = torch.tensor([[1.0, 2.0, 1.0, 2.0, 1.0, 0.5, 2.0, 1.0]], device=DEVICE)
    probs = filtered_probs_reference(row, 1.0, top_k=5)[0].cpu()
    assert (probs > 0).nonzero().flatten().tolist() == [0, 1, 2, 3, 6]
    assert set(sample(row.expand(800, 8), 1.0, top_k=5, seed=3).tolist()) == {0, 1, 2, 3, 6}


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    row = probs.log()[None].to(DEVICE)
    for p, kept in ((0.5, [1]), (0.79, [1, 3]), (0.81, [1, 2, 3]), (0.96, [0, 1, 2, 3])):
        ref = filtered_probs_reference(row, 1.0, top_p=p)[0].cpu()
        assert (ref > 0).nonzero().flatten().tolist() == kept, p
        assert set(sample(row.expand(600, 4), 1.0, top_p=p, seed=1).tolist()) == set(kept), p


def test_top_p_ties_keep_lower_token_ids() -> None:
    row = torch.zeros(1, 8, device=DEVICE)
    ref = filtered_probs_reference(row, 1.0, top_p=0.5)[0].cpu()
    assert (ref > 0).nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert set(sample(row.expand(400, 8), 1.0, top_p=0.5, seed=2).tolist()) == {0, 1, 2, 3}


def test_top_p_applies_to_renormalised_top_k() -> None:
    # Top-2 keeps {0: 0.4, 1: 0.35} -> renormalised 0.533, 0.467; p = 0.5 then keeps only 0.
    row = torch.tensor([[0.4, 0.35, 0.25]], device=DEVICE).log()
    ref = filtered_probs_reference(row, 1.0, top_k=2, top_p=0.5)[0].cpu()
    assert (ref > 0).nonzero().flatten().tolist() == [0]
    assert set(sample(row.expand(300, 3), 1.0, top_k=2, top_p=0.5, seed=4).tolist()) == {0}


def test_min_p_keeps_tokens_above_fraction_of_max() -> None:
    probs = torch.tensor([0.5, 0.2, 0.04, 0.26])
    row = probs.log()[None].to(DEVICE)
    ref = filtered_probs_reference(row, 1.0, min_p=0.1)[0].cpu()
    assert (ref > 0).nonzero().flatten().tolist() == [0, 1, 3]
    assert_close(ref[[0, 1, 3]], torch.tensor([0.5, 0.2, 0.26]) / 0.96, torch.float32)
    assert set(sample(row.expand(600, 4), 1.0, min_p=0.1, seed=6).tolist()) == {0, 1, 3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_greedy_rows_equal_argmax_lowest_id_on_ties(dtype: torch.dtype) -> None:
    logits = torch.randn(40, 300).to(dtype)
    logits[::3, 17] = 9.0  # ties at the maximum in every third row
    logits[::3, 250] = 9.0
    logits = logits.to(DEVICE)
    tokens = sample(logits, 0.0, top_k=5, top_p=0.5, seed=0)
    expected = logits.float().argmax(dim=1)
    assert torch.equal(tokens, expected)
    assert (tokens[::3] == 17).all()


def test_top_k_1_equals_greedy() -> None:
    logits = torch.randn(64, 300, device=DEVICE)
    logits[::4, 5] = logits[::4].max(dim=1).values  # ties: the lower id wins
    greedy = sample(logits, 0.0)
    for seed in range(3):
        assert torch.equal(sample(logits, 0.7, top_k=1, seed=seed), greedy)


def test_per_row_params_behave_as_each_row_alone() -> None:
    batch, vocab = 12, 100
    logits = torch.randn(batch, vocab, device=DEVICE) * 2
    g = torch.Generator().manual_seed(0)
    temperature = (torch.rand(batch, generator=g) * 1.5).to(DEVICE)
    temperature[::5] = 0.0
    top_k = torch.randint(0, 40, (batch,), generator=g).to(DEVICE)
    top_p = (torch.rand(batch, generator=g) * 0.8 + 0.2).to(DEVICE)
    top_p[::4] = 1.0
    min_p = (torch.rand(batch, generator=g) * 0.2).to(DEVICE)
    min_p[::3] = 0.0
    seeds = torch.randint(0, 2**62, (batch,), generator=g).to(DEVICE)
    steps = torch.arange(batch, device=DEVICE) * 7
    tokens, logprobs = sample(logits, temperature, top_k, top_p, min_p, seed=seeds, step=steps,
                              return_logprobs=True)
    probs = filtered_probs_reference(logits, temperature, top_k, top_p, min_p)
    assert (probs.gather(1, tokens[:, None]) > 0).all()
    for r in range(batch):
        one = slice(r, r + 1)
        alone, alone_lp = sample(logits[one], temperature[one], top_k[one], top_p[one],
                                 min_p[one], seed=seeds[one], step=steps[one],
                                 return_logprobs=True)
        assert alone.item() == tokens[r].item(), f"row {r}"
        assert alone_lp.item() == logprobs[r].item(), f"row {r}"


def test_same_seed_same_tokens_different_seed_different_stream() -> None:
    logits = torch.randn(256, 64, device=DEVICE)
    kw = {"temperature": 1.0, "top_k": 50, "top_p": 0.95}
    a = sample(logits, seed=11, step=3, **kw)
    assert torch.equal(a, sample(logits, seed=11, step=3, **kw))
    assert (a != sample(logits, seed=12, step=3, **kw)).float().mean() > 0.5
    assert (a != sample(logits, seed=11, step=4, **kw)).float().mean() > 0.5
    ref = sample_reference(logits, seed=11, step=3, **kw)
    assert torch.equal(ref, sample_reference(logits, seed=11, step=3, **kw))
    assert (ref != sample_reference(logits, seed=12, step=3, **kw)).float().mean() > 0.5


def test_seed_none_follows_torch_manual_seed() -> None:
    logits = torch.randn(256, 100, device=DEVICE)
    torch.manual_seed(7)
    a = sample(logits, 1.0)
    torch.manual_seed(7)
    assert torch.equal(a, sample(logits, 1.0))
    assert not torch.equal(a, sample(logits, 1.0))


def test_scalar_seed_gives_rows_independent_streams() -> None:
    row = one_row(vocab=100)
    tokens = sample(row.expand(400, 100), 1.0, seed=3)
    assert tokens.unique().numel() > 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_logprobs_are_unfiltered_log_softmax(dtype: torch.dtype) -> None:
    logits = (torch.randn(96, 300) * 3).to(dtype).to(DEVICE)
    logits[5, :100] = float("-inf")
    tokens, logprobs = sample(logits, 0.6, top_k=20, top_p=0.9, seed=0, return_logprobs=True)
    expected = torch.log_softmax(logits.float(), dim=1).gather(1, tokens[:, None])[:, 0]
    assert logprobs.dtype == torch.float32
    assert_close(logprobs, expected, torch.float32, what="logprobs")
    ref_tokens, ref_logprobs = sample_reference(logits, 0.6, top_k=20, top_p=0.9, seed=0,
                                                return_logprobs=True)
    expected = torch.log_softmax(logits.float(), dim=1).gather(1, ref_tokens[:, None])[:, 0]
    assert_close(ref_logprobs, expected, torch.float32, what="reference logprobs")


def test_half_logits_sample_like_their_fp32_upcast() -> None:
    logits = torch.randn(128, 300).half().to(DEVICE)
    kw = {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "min_p": 0.01, "seed": 8}
    assert torch.equal(sample(logits, **kw), sample(logits.float(), **kw))


def test_masked_tokens_are_never_sampled() -> None:
    logits = torch.randn(300, 80, device=DEVICE)
    logits[:, ::2] = float("-inf")
    logits[0, 3:] = float("-inf")  # a single finite token: 1
    for kw in ({}, {"top_k": 60}, {"top_p": 0.999, "top_k": 79}, {"min_p": 0.0}):
        tokens = sample(logits, 1.0, seed=1, **kw)
        assert (tokens % 2 == 1).all()
        assert tokens[0] == 1


def _bad_inputs() -> list[tuple[str, dict, str]]:
    good = torch.randn(4, 10, device=DEVICE)
    nan = good.clone()
    nan[2, 3] = float("nan")
    masked = good.clone()
    masked[1] = float("-inf")
    return [
        ("nan_logits", {"logits": nan}, "NaN"),
        ("all_masked_row", {"logits": masked}, "finite"),
        ("1d_logits", {"logits": good[0]}, "logits"),
        ("3d_logits", {"logits": good[None]}, "logits"),
        ("int_logits", {"logits": good.long()}, "logits"),
        ("negative_temperature", {"temperature": -0.5}, "temperature"),
        ("nan_temperature", {"temperature": float("nan")}, "temperature"),
        ("negative_temperature_row",
         {"temperature": torch.tensor([1.0, 1.0, -1.0, 1.0], device=DEVICE)}, "temperature"),
        ("top_p_zero", {"top_p": 0.0}, "top_p"),
        ("top_p_above_one", {"top_p": 1.5}, "top_p"),
        ("top_p_row", {"top_p": torch.tensor([0.5, 1.2, 0.5, 0.5], device=DEVICE)}, "top_p"),
        ("negative_top_k", {"top_k": -1}, "top_k"),
        ("negative_top_k_row", {"top_k": torch.tensor([1, 2, -3, 4], device=DEVICE)}, "top_k"),
        ("float_top_k", {"top_k": 2.5}, "top_k"),
        ("min_p_above_one", {"min_p": 1.5}, "min_p"),
        ("negative_min_p", {"min_p": -0.1}, "min_p"),
        ("wrong_length", {"top_k": torch.tensor([1, 2, 3], device=DEVICE)}, "top_k"),
        ("wrong_length_temperature", {"temperature": torch.ones(5, device=DEVICE)},
         "temperature"),
        ("wrong_length_seed", {"seed": torch.ones(2, dtype=torch.int64, device=DEVICE)}, "seed"),
        ("negative_step", {"step": -1}, "step"),
    ]


@pytest.mark.parametrize("fn", [sample, sample_reference], ids=["kernel", "reference"])
@pytest.mark.parametrize(("case", "override", "match"), _bad_inputs(),
                         ids=[c[0] for c in _bad_inputs()])
def test_bad_input_raises_value_error(fn, case: str, override: dict, match: str) -> None:
    kw = {"logits": torch.randn(4, 10, device=DEVICE), "temperature": 1.0, "top_k": 3,
          "top_p": 0.9, "seed": 0, **override}
    with pytest.raises(ValueError, match=match):
        fn(**kw)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [128_256, 256_000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_large_vocab_on_gpu(vocab: int, dtype: torch.dtype) -> None:
    row = (torch.randn(1, vocab, device="cuda") * 3).to(dtype)
    for kw in ({"temperature": 1.0, "top_k": 50}, {"temperature": 0.8, "top_p": 0.9},
               {"temperature": 1.0, "top_k": 100, "top_p": 0.95, "min_p": 0.02}):
        probs = filtered_probs_reference(row, **kw)[0]
        tokens = sample(row.expand(DRAWS, vocab), seed=1, **kw)
        check_distribution(tokens, probs)
    logits = (torch.randn(64, vocab, device="cuda") * 2).to(dtype)
    tokens, logprobs = sample(logits, 1.0, top_p=0.9, seed=2, return_logprobs=True)
    probs = filtered_probs_reference(logits, 1.0, top_p=0.9)
    assert (probs.gather(1, tokens[:, None]) > 0).all()
    expected = torch.log_softmax(logits.float(), dim=1).gather(1, tokens[:, None])[:, 0]
    assert_close(logprobs, expected, torch.float32, what="logprobs")
    assert torch.equal(sample(logits, 0.0), logits.float().argmax(dim=1))
    assert torch.equal(sample(logits, 0.7, top_k=1, seed=3), logits.float().argmax(dim=1))


@pytest.mark.gpu
def test_bf16_logits_sample_like_their_fp32_upcast_on_gpu() -> None:
    logits = torch.randn(256, 49_152, device="cuda").bfloat16()
    kw = {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "min_p": 0.01, "seed": 8}
    assert torch.equal(sample(logits, **kw), sample(logits.float(), **kw))
