"""Preference training: data, losses against closed forms, reward model, DPO, GRPO with
engine rollouts, bitwise resume per method, engine-vs-trainer log-prob agreement."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm_engine.config import ModelConfig
from llm_engine.model import Transformer
from llm_engine.training import data as data_lib
from llm_engine.training import demo_data
from llm_engine.training import preferences as pref
from llm_engine.training.alignment import AlignConfig, freeze_bottom
from llm_engine.training.dpo import build_dpo_trainer
from llm_engine.training.grpo import build_grpo_trainer
from llm_engine.training.losses import (
    bradley_terry_loss,
    dpo_loss,
    group_advantages,
    grpo_loss,
    kl_estimate,
    token_logprobs,
)
from llm_engine.training.reward_model import RewardModel, RewardTrainer, build_reward_trainer, load_reward

TINY = dict(arch="llama", vocab_size=320, hidden_size=32, num_layers=2, num_heads=4,
            num_kv_heads=2, intermediate_size=64, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [json.dumps(r) for r in demo_data.demo_rows()[0][:40]]
    return data_lib.train_tokenizer(texts, 300)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small slice of the demo set (6 topics: 48 pairs, 16 + 8 prompts) keeps tests fast."""
    out = tmp_path_factory.mktemp("demo")
    rows, train, val = demo_data.demo_rows()
    paths = {"preferences": out / "preferences.jsonl", "prompts_train": out / "train.jsonl",
             "prompts_val": out / "val.jsonl"}
    for key, part in (("preferences", rows[:24]), ("prompts_train", train[:16]),
                      ("prompts_val", val[:8])):
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**TINY))


def _cfg(tmp_path: Path, method: str, **overrides) -> AlignConfig:
    settings = dict(steps=4, batch_size=4, eval_examples=4, progress=False, eval_every=0,
                    ckpt_every=2, log_every=1, warmup_steps=1, lr=3e-3, val_fraction=0.25,
                    max_new_tokens=6, eval_max_tokens=6, group_size=3, max_len=64, plots=False)
    return AlignConfig(out_dir=str(tmp_path), method=method, **{**settings, **overrides})


# -- losses ------------------------------------------------------------------------------

def test_bradley_terry_loss_is_mean_negative_log_sigmoid_of_the_margin():
    rc, rr = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.5, 0.5])
    loss, acc, margin = bradley_terry_loss(rc, rr)
    expected = sum(math.log1p(math.exp(-d)) for d in (1.0, -1.5, 0.0)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert acc.item() == pytest.approx(1 / 3) and margin.item() == pytest.approx(-0.5 / 3)


def test_dpo_and_ipo_losses_equal_their_closed_forms():
    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -19.0])
    rc, rr = torch.tensor([-11.0, -20.0]), torch.tensor([-11.0, -20.0])
    h = [(-10 + 11) - (-12 + 11), (-20 + 20) - (-19 + 20)]  # [2, -1]
    beta = 0.5
    loss, acc, margin = dpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(sum(math.log1p(math.exp(-beta * x)) for x in h) / 2)
    assert acc.item() == 0.5 and margin.item() == pytest.approx(beta * sum(h) / 2)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta, ipo=True)
    assert ipo.item() == pytest.approx(sum((x - 1 / (2 * beta)) ** 2 for x in h) / 2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, 0.0)


def test_group_advantages_standardise_within_each_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    adv = group_advantages(rewards, eps=0.0)
    std = torch.tensor([1, 0, 2.0]).sqrt() / math.sqrt(3)  # unbiased: sum of squares / 3
    assert torch.allclose(adv[0], torch.tensor([1.0, -1, -1, 1]) * 0.5 / std[0])
    assert torch.equal(group_advantages(rewards)[1], torch.zeros(4))  # all equal: no signal
    assert torch.allclose(adv[2], torch.tensor([1.0, -1, 0, 0]) / std[2])
    assert torch.allclose(group_advantages(rewards, scale=False)[2], torch.tensor([1.0, -1, 0, 0]))
    with pytest.raises(ValueError, match="prompts, n"):
        group_advantages(torch.ones(4))


def test_kl_estimator_is_k3_nonnegative_and_zero_on_equal_policies():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -2.0])
    kl = kl_estimate(logp, ref)
    d = ref - logp
    assert torch.allclose(kl, d.exp() - d - 1)
    assert kl[0] == 0 and (kl >= 0).all()


def test_grpo_loss_clips_the_ratio_on_the_side_the_advantage_favours():
    eps = 0.2
    old = torch.zeros(2, 3)
    # row 0 (A = +1): ratios 1.5 (clipped to 1.2), 1.0, 0.5 (not clipped: min keeps 0.5)
    # row 1 (A = −1): ratios 1.5 (not clipped: min keeps −1.5), 0.5 (clipped to −0.8), pad
    logp = torch.tensor([[math.log(1.5), 0.0, math.log(0.5)], [math.log(1.5), math.log(0.5), 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(logp, old, logp.clone(), adv, mask, eps, kl_coef=0.0)
    row0 = -(1.2 + 1.0 + 0.5) / 3
    row1 = -(-1.5 + -0.8) / 2
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert stats["clip_frac"].item() == pytest.approx(2 / 5)
    assert stats["kl"].item() == 0.0
    ref = torch.full((2, 3), -1.0)
    with_kl, stats = grpo_loss(logp, old, ref, adv, mask, eps, kl_coef=0.5)
    kl = kl_estimate(logp, ref)
    per_row = [(kl[0] * 1).sum() / 3, kl[1, :2].sum() / 2]
    assert with_kl.item() == pytest.approx(loss.item() + 0.5 * float(sum(per_row)) / 2, rel=1e-5)
    assert stats["kl"].item() == pytest.approx(float(kl[mask].mean()), rel=1e-6)


def test_token_logprobs_in_chunks_match_log_softmax_and_its_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.tensor([3, -100, 49, 0, 7, -100, 12])
    got = token_logprobs(hidden, weight, targets, chunk=3)
    logp = F.log_softmax(hidden @ weight.T, dim=-1)
    want = torch.where(targets == -100, 0.0, logp.gather(1, targets.clamp(min=0)[:, None])[:, 0])
    assert torch.allclose(got, want, atol=1e-5)
    g1 = torch.autograd.grad(got.sum(), (hidden, weight))
    g2 = torch.autograd.grad(want.sum(), (hidden, weight))
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


# -- data --------------------------------------------------------------------------------

def test_ranking_of_k_answers_expands_to_k_choose_2_ordered_pairs():
    pairs = pref.ranking_to_pairs(["a", "b", "c", "d"], [2, 0, 3, 1])
    assert pairs == [("c", "a"), ("c", "d"), ("c", "b"), ("a", "d"), ("a", "b"), ("d", "b")]
    with pytest.raises(ValueError, match="once"):
        pref.ranking_to_pairs(["a", "b"], [0, 0])


def test_preference_file_mixes_pairs_and_rankings(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "q1", "chosen": "good", "rejected": "bad"}) + "\n\n"
        + json.dumps({"messages": [{"role": "user", "content": "q2"}],
                      "responses": ["x", "y", "z"], "ranking": [1, 2, 0]}) + "\n")
    pairs = pref.read_preferences(path)
    assert len(pairs) == 1 + 3
    assert pairs[0] == pref.PreferencePair([{"role": "user", "content": "q1"}], "good", "bad")
    assert [(p.chosen, p.rejected) for p in pairs[1:]] == [("y", "z"), ("y", "x"), ("z", "x")]


@pytest.mark.parametrize("row, field", [
    ({"chosen": "a", "rejected": "b"}, "'prompt' or 'messages'"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen'"),
    ({"prompt": "q", "chosen": "a"}, "'rejected'"),
    ({"messages": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "'messages\\[0\\]'"),
    ({"prompt": "q", "responses": ["a"], "ranking": [0]}, "'responses'"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 2]}, "'ranking'"),
    ("not an object", "JSON object"),
])
def test_malformed_row_error_names_file_line_and_field(tmp_path, row, field):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    path.write_text(good + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{field}"):
        pref.read_preferences(path)


def test_invalid_json_line_is_reported_with_its_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "q"\n')
    with pytest.raises(ValueError, match="p.jsonl:1: not valid JSON"):
        pref.read_prompts(path)


def test_pair_rows_target_only_the_answer_and_its_eos(tokenizer):
    pair = pref.PreferencePair([{"role": "user", "content": "What is salt?"}],
                               "Salt is a mineral.", "Salt is a mineral. It is good.")
    ex = pref.build_pair_examples([pair], tokenizer, max_len=128)
    prompt = pref.encode_prompt(tokenizer, pair.messages)
    answer = pref.encode_response(tokenizer, pair.chosen)
    row = ex.chosen
    targets = row.targets[0][row.targets[0] != data_lib.IGNORE_INDEX].tolist()
    assert targets == answer and answer[-1] == tokenizer.eos_token_id
    assert row.inputs[0, :len(prompt)].tolist() == prompt
    assert int(row.last[0]) == len(prompt) + len(answer) - 2


def test_demo_reward_prefers_one_finished_sentence():
    got = demo_data.one_sentence_reward(["q"] * 5, ["The moon is a rock.", "It is. Yes it is.",
                                                    "The moon is", "", "A! B? C."])
    assert got == [1.0, 0.5, 0.5, 0.0, pytest.approx(1 / 3)]
    rows, train, val = demo_data.demo_rows()
    assert rows == demo_data.demo_rows()[0]  # deterministic
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in val}
    for r in rows:
        if "chosen" in r:
            assert demo_data.count_sentences(r["chosen"]) < demo_data.count_sentences(r["rejected"])


# -- methods: bitwise resume ---------------------------------------------------------------

def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _log_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def _build(method: str, cfg: AlignConfig, tokenizer, demo):
    val = pref.read_prompts(demo["prompts_val"])
    if method == "rm":
        return build_reward_trainer(cfg, _model(), tokenizer)
    if method == "dpo":
        return build_dpo_trainer(cfg, _model(), tokenizer, eval_prompts=val,
                                 reward_fn=demo_data.one_sentence_reward)
    model = _model()
    freeze_bottom(model, cfg.train_layers)
    return build_grpo_trainer(cfg, model, tokenizer, demo_data.one_sentence_reward,
                              eval_prompts=val)


@pytest.mark.parametrize("method, train_layers", [("rm", None), ("dpo", None), ("grpo", None),
                                                  ("grpo", 1)])
def test_resume_continues_bit_for_bit(tmp_path, tokenizer, demo, method, train_layers):
    """Stopped after 2 of 4 steps and resumed: the weights and the log equal an
    uninterrupted run's bit for bit (GRPO with ``train_layers`` too: its reference then
    shares the frozen bottom with the policy)."""
    data = dict(data=str(demo["preferences"]), prompts=str(demo["prompts_train"]),
                train_layers=train_layers)
    full = _build(method, _cfg(tmp_path / "full", method, **data), tokenizer, demo)
    full.fit()
    half = _build(method, _cfg(tmp_path / "half", method, steps=2, **data), tokenizer, demo)
    half.fit()
    resumed = _build(method, _cfg(tmp_path / "half", method, **data), tokenizer, demo)
    assert resumed.resume() and resumed.step == 2
    resumed.fit()
    _assert_same(_state(full.model), _state(resumed.model))
    strip = [{k: v for k, v in r.items() if not k.endswith(("_ms", "_per_s"))}
             for r in _log_rows(tmp_path / "full")]
    strip_resumed = [{k: v for k, v in r.items() if not k.endswith(("_ms", "_per_s"))}
                     for r in _log_rows(tmp_path / "half")]
    assert strip[-3:] == strip_resumed[-3:]


def test_reward_model_fits_pairs_saves_loads_and_scores(tmp_path, tokenizer, demo):
    pairs = pref.read_preferences(demo["preferences"])[:8]
    examples = pref.build_pair_examples(pairs, tokenizer, 64)
    cfg = _cfg(tmp_path, "rm", steps=10, batch_size=8, lr=1e-2, eval_examples=8, plots=True)
    trainer = RewardTrainer(cfg, RewardModel(_model(), tokenizer), tokenizer, examples, examples)
    summary = trainer.fit()
    rows = _log_rows(tmp_path)
    assert {"step", "loss", "accuracy", "margin"} <= rows[1].keys()
    assert summary["first_eval"]["val_loss"] > summary["last_eval"]["val_loss"]
    assert summary["last_eval"]["val_accuracy"] >= 0.75 > summary["first_eval"]["val_accuracy"]
    loaded = load_reward(f"rm:{tmp_path}")
    prompts = [pairs[0].messages[0]["content"]] * 2
    answers = [pairs[0].chosen, pairs[0].rejected]
    want = trainer.model.score(prompts, answers)
    assert loaded(prompts, answers) == want and len(want) == 2
    assert (tmp_path / "metrics.png").is_file()
    with pytest.raises(ValueError, match="not a reward-model checkpoint"):
        RewardModel.load(tmp_path / "nothing")


def test_train_layers_freezes_all_but_the_top_blocks_and_final_norm():
    model = _model()
    freeze_bottom(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("layers.1.", "norm.")) for n in trainable)
    assert "norm.weight" in trainable and not model.embed_tokens.weight.requires_grad


def test_dpo_logs_and_caches_reference_logprobs(tmp_path, tokenizer, demo):
    trainer = _build("dpo", _cfg(tmp_path, "dpo", data=str(demo["preferences"]), steps=2),
                     tokenizer, demo)
    trainer.fit()
    rows = _log_rows(tmp_path)
    assert {"loss", "accuracy", "margin"} <= rows[1].keys()
    assert {"val_accuracy", "val_margin", "val_reward_mean"} <= rows[0].keys()
    assert rows[0]["val_accuracy"] == 0.0 and rows[0]["val_margin"] == 0.0  # policy = reference
    evaluated = data_lib.eval_indices(trainer.val_data.num_choices, 4)
    assert not torch.isnan(trainer.ref["val"][:, evaluated]).any()  # cached once computed


# -- GRPO rollouts from the engine -------------------------------------------------------------

def test_grpo_step_logs_reward_kl_and_logprob_mismatch(tmp_path, tokenizer, demo):
    trainer = _build("grpo", _cfg(tmp_path, "grpo", prompts=str(demo["prompts_train"]), steps=2,
                                  ckpt_every=0), tokenizer, demo)
    trainer.fit()
    rows = _log_rows(tmp_path)
    step = rows[1]
    for key in ("step", "reward_mean", "reward_std", "kl", "response_len", "clip_frac",
                "logprob_mismatch", "rollout_ms", "scoring_ms", "update_ms"):
        assert key in step
    # default mode: the engine's decode path and the full forward differ by rounding only
    assert 0 <= step["logprob_mismatch"] < 1e-4 and step["logprob_mismatch_max"] < 1e-3


def test_engine_sees_each_optimizer_update_without_a_reload(tmp_path, tokenizer, demo):
    from llm_engine import SamplingParams

    trainer = _build("grpo", _cfg(tmp_path, "grpo", prompts=str(demo["prompts_train"])),
                     tokenizer, demo)
    llm = trainer.engine()
    ids = pref.encode_prompt(tokenizer, [{"role": "user", "content": "What is salt?"}])
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=0)
    before = llm.generate([ids], params, use_tqdm=False)[0].outputs[0]
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.mul_(1.5)
    after = llm.generate([ids], params, use_tqdm=False)[0].outputs[0]
    fresh = trainer.engine()
    assert fresh is llm
    assert before.logprobs[0] != after.logprobs[0]
    batch = pref.build_sequences([ids], [list(after.token_ids)], 0)
    from llm_engine.training.losses import sequence_logprobs

    with torch.no_grad():
        logp, mask = sequence_logprobs(trainer.model, batch.inputs, batch.targets)
    engine_lp = [lp[t] for t, lp in zip(after.token_ids, after.logprobs, strict=True)]
    assert torch.allclose(logp[mask], torch.tensor(engine_lp), atol=1e-4)


def _rollout_and_recompute(trainer):
    """One rollout batch: the engine's sampling log-probs and the trainer's recomputation
    (the log-probs the GRPO loss uses), over the response tokens."""
    from llm_engine.training import batch_invariant
    from llm_engine.training.losses import sequence_logprobs

    indices = trainer.train_data.num_choices and [0, 1]
    p_ids, r_ids, r_lps, _ = trainer.rollout(indices)
    batch = pref.build_sequences(p_ids, r_ids, 0)
    with batch_invariant.enabled(trainer.cfg.bitwise_logprobs):
        logp, mask = sequence_logprobs(trainer.model, batch.inputs, batch.targets)
    engine = torch.tensor([lp for lps in r_lps for lp in lps], dtype=torch.float32)
    return logp.detach()[mask], engine


@pytest.mark.parametrize("bitwise", [False, True])
def test_engine_and_trainer_logprobs_agree_bitwise_or_within_bound(tmp_path, tokenizer, demo,
                                                                     bitwise):
    cfg = _cfg(tmp_path, "grpo", prompts=str(demo["prompts_train"]), max_new_tokens=10,
               bitwise_logprobs=bitwise)
    trainer = _build("grpo", cfg, tokenizer, demo)
    trainer.train_step()  # the weights have moved: the engine runs the updated ones
    trainer_lp, engine_lp = _rollout_and_recompute(trainer)
    assert trainer_lp.numel() == engine_lp.numel() > 10
    if bitwise:
        assert torch.equal(trainer_lp.view(torch.int32), engine_lp.view(torch.int32))
    else:
        assert (trainer_lp - engine_lp).abs().max() < 1e-4


def test_policy_and_reference_logprobs_share_the_frozen_bottom_bit_for_bit():
    from llm_engine.training.losses import (
        policy_and_reference_logprobs,
        sequence_logprobs,
        shared_bottom,
    )

    torch.manual_seed(0)
    policy = Transformer(ModelConfig(**{**TINY, "num_layers": 3}))
    freeze_bottom(policy, 1)
    frozen = {id(p): p for p in policy.parameters() if not p.requires_grad}
    import copy

    reference = copy.deepcopy(policy, frozen).requires_grad_(False)
    assert shared_bottom(policy, reference) == 2
    assert shared_bottom(policy, copy.deepcopy(policy)) == 0
    with torch.no_grad():
        for p in policy.layers[2].parameters():
            p.add_(0.01)  # the policy has moved away from the reference
    inputs = torch.randint(0, 320, (3, 9))
    targets = inputs.roll(-1, 1)
    targets[:, :4] = data_lib.IGNORE_INDEX
    targets[1, 7:] = data_lib.IGNORE_INDEX
    logp, ref, mask = policy_and_reference_logprobs(policy, reference, inputs, targets, 2)
    want, want_mask = sequence_logprobs(policy, inputs, targets)
    with torch.no_grad():
        want_ref, _ = sequence_logprobs(reference, inputs, targets)
    assert torch.equal(mask, want_mask) and torch.equal(logp, want) and torch.equal(ref, want_ref)
    assert not torch.equal(logp, ref) and (logp[~mask] == 0).all()
    logp.sum().backward()
    assert policy.layers[2].mlp.down_proj.weight.grad is not None
    assert all(p.grad is None for p in policy.layers[0].parameters())


def test_bitwise_mode_forces_the_rowwise_implementations_in_this_thread_only():
    import threading

    from llm_engine import ops
    from llm_engine.training import batch_invariant

    x, w = torch.randn(3, 8), torch.randn(5, 8)
    reg = ops.registry()
    seen = {}
    with batch_invariant.enabled():
        assert {op: reg.choose(op, *args) for op, args in
                (("linear", (x, w)), ("rms_norm", (x, w[0], 1e-5)), ("silu_mul", (x,)))} \
            == dict.fromkeys(("linear", "rms_norm", "silu_mul"), "rowwise")
        thread = threading.Thread(target=lambda: seen.update(linear=reg.choose("linear", x, w)))
        thread.start()
        thread.join()
        assert torch.equal(ops.linear(x, w), torch.cat([ops.linear(r[None], w) for r in x]))
    assert seen == {"linear": "onednn"} and reg.choose("linear", x, w) == "onednn"
    with batch_invariant.enabled(False):
        assert reg.choose("linear", x, w) == "onednn"


@pytest.mark.parametrize("window, release", [(None, False), (3, True), (6, False)])
def test_rowwise_paged_attention_reads_only_the_window_and_matches_the_reference(window,
                                                                                release):
    from llm_engine.kernels import paged_attention as paged

    from llm_engine import ops

    torch.manual_seed(0)
    k_cache, v_cache = torch.randn(6, 4, 1, 8), torch.randn(6, 4, 1, 8)
    tables = torch.tensor([[2, 0, 5], [1, 3, 4]], dtype=torch.int32)
    lens = torch.tensor([7, 11], dtype=torch.int32)
    released = tables.clone()
    if release:  # sequence 1's first block is wholly before every query's window
        released[1, 0] = -1
    kw = {} if window is None else {"window": window}
    reg = ops.registry()
    q = torch.randn(2, 2, 8)
    got = reg.implementation("paged_attention", "rowwise")(q, k_cache, v_cache, released, lens,
                                                          **kw)
    want = paged.paged_attention_reference(q, k_cache, v_cache, tables, lens, **kw)
    torch.testing.assert_close(got, want)
    q, cu = torch.randn(5, 2, 8), torch.tensor([0, 2, 5], dtype=torch.int32)
    got = reg.implementation("paged_prefill_attention", "rowwise")(
        q, k_cache, v_cache, released, cu, lens, 3, **kw)
    want = paged.paged_prefill_attention_reference(q, k_cache, v_cache, tables, cu, lens, 3, **kw)
    torch.testing.assert_close(got, want)
