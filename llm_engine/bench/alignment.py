"""Alignment: GRPO rollout throughput (our engine against HF ``generate`` on the same policy)
and one GRPO step split into rollout, scoring and update.

- ``rollout``: ``prompts`` demo prompts × ``group`` answers each, sampled at temperature 1
  for exactly ``new`` tokens (EOS ignored, so both produce the same token count) with each
  sampled token's log-prob: ours is ``Engine`` with ``n = group`` (the prompt computed once,
  forked copy-on-write) on SmolLM2 in fp32; the peer is HF ``generate`` with
  ``num_return_sequences = group`` and ``compute_transition_scores`` on the same weights
  (``hf_from_ours``). Their runs take turns; each is the fastest of ``repeats``.
  ``value`` is generated tokens/s.
- ``grpo-step``: one :meth:`GRPOTrainer.train_step` of the ``smollm2-grpo`` preset's shape
  (the last ``train_layers`` blocks trained), reported as three rows, ``rollout``,
  ``scoring`` and ``update`` (``value``: seconds; ``ms`` the same).
- ``bitwise-step``: the cost of ``bitwise_logprobs`` (the ``rowwise`` ops in rollout and
  recomputation): GRPO steps of one prompt × 2 answers of 8 tokens, the default mode
  and the bitwise mode taking turns on one trainer, each the fastest of ``repeats``;
  rows ``default`` and ``bitwise`` (``value``: seconds per step), the bitwise row's note
  giving the ratio and each mode's log-prob mismatch.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from llm_engine.bench.common import OURS, Ceilings, Row
from llm_engine.bench.generate import _timed_in_turn, hf_from_ours

SUITE = "alignment"


@dataclass(frozen=True)
class _Sizes:
    prompts: int
    group: int
    new: int
    repeats: int


def _sizes(quick: bool) -> _Sizes:
    return _Sizes(2, 4, 8, 1) if quick else _Sizes(4, 4, 24, 2)


def iter_rows(device: str, quick: bool, ceilings: Ceilings) -> Iterator[Row]:
    from llm_engine import SamplingParams
    from llm_engine.loader import load_model
    from llm_engine.training import demo_data
    from llm_engine.training import preferences as pref
    from llm_engine.training.alignment import AlignConfig, freeze_bottom
    from llm_engine.training.grpo import GRPOTrainer

    del ceilings
    sizes = _sizes(quick)
    dtype = torch.float32
    model, tok = load_model("smollm2", device=device, dtype=dtype, quantization="none")
    _, train_prompts, _ = demo_data.demo_rows()
    messages = [[{"role": "user", "content": p["prompt"]}] for p in train_prompts]
    freeze_bottom(model, 4)
    cfg = AlignConfig(out_dir=os.devnull, method="grpo", batch_size=sizes.prompts,
                      group_size=sizes.group, max_new_tokens=sizes.new, progress=False,
                      plots=False, lr=1e-5, warmup_steps=1, steps=2, device=device)
    trainer = GRPOTrainer(cfg, model, tok, messages, reward_fn=demo_data.one_sentence_reward,
                          device=device)
    llm = trainer.engine()
    prompts = [pref.encode_prompt(tok, m) for m in messages[:sizes.prompts]]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    params = {"prompts": sizes.prompts, "group": sizes.group, "new_tokens": sizes.new}
    tokens = sizes.prompts * sizes.group * sizes.new

    def ours() -> list:
        sp = [SamplingParams(n=sizes.group, temperature=1.0, max_tokens=sizes.new,
                             ignore_eos=True, seed=i, logprobs=0) for i in range(len(prompts))]
        return llm.generate(prompts, sp, use_tqdm=False)

    fns = {OURS: (ours, None)}
    hf_note = ""
    try:
        hf = hf_from_ours(model)
    except Exception as e:  # transformers missing or incompatible: ours still runs
        hf, hf_note = None, f"HF transformers unavailable: {type(e).__name__}: {e}"
    if hf is not None:
        def peer() -> list:
            out = []
            for ids in prompts:
                x = torch.tensor([ids], device=device)
                with torch.inference_mode():
                    gen = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=True,
                                      temperature=1.0, top_k=None, top_p=None,
                                      num_return_sequences=sizes.group,
                                      max_new_tokens=sizes.new, min_new_tokens=sizes.new,
                                      output_scores=True, return_dict_in_generate=True,
                                      pad_token_id=0)
                    out.append(hf.compute_transition_scores(gen.sequences, gen.scores,
                                                            normalize_logits=True))
            return out

        fns["hf-transformers"] = (peer, None)
    timed = _timed_in_turn(fns, device, sizes.repeats)
    ours_s = timed[OURS][0]
    note = f"CPU fp32, {torch.get_num_threads()} threads, load average {load:.1f} at start"
    rows = [Row(SUITE, "rollout", OURS, "tok/s", tokens / ours_s, ms=ours_s * 1e3,
                note=note, params=params)]
    if hf is not None:
        hf_s = timed["hf-transformers"][0]
        rows[0].note += f"; {hf_s / ours_s:.2f}x HF"
        rows.append(Row(SUITE, "rollout", "hf-transformers", "tok/s", tokens / hf_s,
                        ms=hf_s * 1e3, note="generate(do_sample), compute_transition_scores",
                        params=params))
    elif hf_note:
        rows[0].note += f"; {hf_note}"
    yield from rows

    t0 = time.perf_counter()
    metrics = trainer.train_step()
    total = time.perf_counter() - t0
    step_params = {**params, "new_tokens": sizes.new, "step_s": total}
    for phase in ("rollout", "scoring", "update"):
        ms = metrics[f"{phase}_ms"]
        yield Row(SUITE, "grpo-step", phase, "s", ms / 1e3, ms=ms,
                  note=f"{ms / 1e3 / total:.0%} of a {total:.1f} s step; "
                       f"logprob mismatch {metrics['logprob_mismatch']:.2e}",
                  params=step_params)
    yield from _bitwise_rows(model, tok, messages, device, sizes.repeats)


def _bitwise_rows(model, tok, messages: list, device: str, repeats: int) -> Iterator[Row]:
    """GRPO steps in the default and the bitwise mode, in turn on one small trainer."""
    from llm_engine.training import demo_data
    from llm_engine.training.alignment import AlignConfig
    from llm_engine.training.grpo import GRPOTrainer

    cfg = AlignConfig(out_dir=os.devnull, method="grpo", batch_size=1, group_size=2,
                      max_new_tokens=8, progress=False, plots=False, lr=1e-5, warmup_steps=1,
                      steps=2 * repeats, device=device)
    trainer = GRPOTrainer(cfg, model, tok, messages, reward_fn=demo_data.one_sentence_reward,
                          device=device)
    best: dict[bool, float] = {}
    mismatch: dict[bool, float] = {}
    for _ in range(repeats):
        for bitwise in (False, True):
            trainer.cfg.bitwise_logprobs = bitwise
            t0 = time.perf_counter()
            metrics = trainer.train_step()
            best[bitwise] = min(best.get(bitwise, math.inf), time.perf_counter() - t0)
            mismatch[bitwise] = max(mismatch.get(bitwise, 0.0), metrics["logprob_mismatch_max"])
    params = {"prompts": 1, "group": 2, "new_tokens": 8}
    yield Row(SUITE, "bitwise-step", "default", "s", best[False], ms=best[False] * 1e3,
              note=f"max logprob mismatch {mismatch[False]:.2e}", params=params)
    yield Row(SUITE, "bitwise-step", "bitwise", "s", best[True], ms=best[True] * 1e3,
              note=f"{best[True] / best[False]:.1f}x the default step; max logprob mismatch "
                   f"{mismatch[True]:.2e}", params=params)


def run(device: str, quick: bool, ceilings: Ceilings) -> list[Row]:
    return list(iter_rows(device, quick, ceilings))
