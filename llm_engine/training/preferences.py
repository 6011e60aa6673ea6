"""Preference data: JSONL pairs and rankings → tokenized (prompt, chosen, rejected) examples.

Two row kinds, one JSON object per line (blank lines are skipped):

- a pair: ``{"prompt": str | "messages": [...], "chosen": str, "rejected": str}``;
- a ranking: ``{"prompt" | "messages", "responses": [str, ...], "ranking": [int, ...]}``,
  ``ranking`` listing the indices of ``responses`` from best to worst; it expands to
  its k(k−1)/2 ordered pairs (every better answer against every worse one).

A prompt is rendered with the tokenizer's chat template as a user turn (``prompt``) or a
conversation (``messages``), with the generation prompt, exactly as SFT and the engine
render it; a response is its text plus the end-of-turn (EOS) token. A malformed row raises
``ValueError`` naming the file, the line and the field.

GRPO reads prompts alone (``--prompts FILE``): JSONL of ``{"prompt": str}`` or
``{"messages": [...]}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import torch

from llm_engine.tokenizer import Tokenizer
from llm_engine.training.data import IGNORE_INDEX

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` is the better answer to ``messages`` than ``rejected``."""

    messages: Messages
    chosen: str
    rejected: str


def ranking_to_pairs(responses: list[str], ranking: list[int]) -> list[tuple[str, str]]:
    """The k(k−1)/2 ``(better, worse)`` pairs of a ranking of ``k`` responses.

    ``ranking`` holds every index of ``responses`` once, best first.
    """
    if sorted(ranking) != list(range(len(responses))):
        raise ValueError(f"ranking must list each of the {len(responses)} response indices "
                         f"once, got {ranking}")
    ordered = [responses[i] for i in ranking]
    return [(ordered[a], ordered[b]) for a, b in combinations(range(len(ordered)), 2)]


def _where(path: str | os.PathLike, lineno: int) -> str:
    return f"{os.fspath(path)}:{lineno}"


def _string(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def _messages(record: dict, where: str) -> Messages:
    """The conversation a row asks about: ``messages``, or ``prompt`` as one user turn."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: field 'messages' must be a non-empty list of "
                             f"{{'role', 'content'}} objects, got {messages!r}")
        for i, m in enumerate(messages):
            if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
                    or not isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: field 'messages[{i}]' must be an object with "
                                 f"string 'role' and 'content', got {m!r}")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "prompt" in record:
        return [{"role": "user", "content": _string(record, "prompt", where)}]
    raise ValueError(f"{where}: field 'prompt' or 'messages' is missing")


def _records(path: str | os.PathLike):
    """``(where, object)`` of every non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = _where(path, lineno)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def read_preferences(path: str | os.PathLike) -> list[PreferencePair]:
    """Every preference pair of a JSONL file of pairs and rankings (rankings expanded)."""
    pairs: list[PreferencePair] = []
    for where, record in _records(path):
        messages = _messages(record, where)
        if "responses" in record or "ranking" in record:
            responses, ranking = record.get("responses"), record.get("ranking")
            if (not isinstance(responses, list) or len(responses) < 2
                    or not all(isinstance(r, str) and r for r in responses)):
                raise ValueError(f"{where}: field 'responses' must be a list of at least two "
                                 f"non-empty strings, got {responses!r}")
            if (not isinstance(ranking, list)
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)):
                raise ValueError(f"{where}: field 'ranking' must be a list of response "
                                 f"indices, got {ranking!r}")
            try:
                expanded = ranking_to_pairs(responses, ranking)
            except ValueError as e:
                raise ValueError(f"{where}: field 'ranking': {e}") from None
            pairs += [PreferencePair(messages, c, r) for c, r in expanded]
        else:
            pairs.append(PreferencePair(messages, _string(record, "chosen", where),
                                        _string(record, "rejected", where)))
    if not pairs:
        raise ValueError(f"{os.fspath(path)}: no preference rows")
    return pairs


def read_prompts(path: str | os.PathLike) -> list[Messages]:
    """The conversations of a JSONL file of ``{"prompt": str}`` or ``{"messages": [...]}``."""
    prompts = [_messages(record, where) for where, record in _records(path)]
    if not prompts:
        raise ValueError(f"{os.fspath(path)}: no prompts")
    return prompts


def render_prompt(tokenizer: Tokenizer, messages: Messages) -> str:
    """The prompt text the model answers: the chat template with the generation prompt."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def encode_prompt(tokenizer: Tokenizer, messages: Messages) -> list[int]:
    """Token ids of the rendered prompt (as the engine's ``LLM.chat`` encodes it)."""
    return tokenizer.encode(render_prompt(tokenizer, messages), add_bos=False)


def encode_response(tokenizer: Tokenizer, response: str) -> list[int]:
    """Token ids of an answer followed by the EOS (end-of-turn) token."""
    ids = tokenizer.encode(response, add_bos=False)
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


@dataclass
class SequenceBatch:
    """Right-padded prompt + response rows for a causal forward.

    ``inputs, targets: (N, S)`` int64 (targets are the next tokens on the response and
    ``IGNORE_INDEX`` elsewhere); ``last: (N,)`` int64, the index of each row's last real
    token (where a reward model reads its score).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    last: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def select(self, indices: np.ndarray | list[int]) -> SequenceBatch:
        """Rows ``indices``, trimmed to the longest of them."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        width = int(self.last[idx].max()) + 1
        return SequenceBatch(self.inputs[idx, :width], self.targets[idx, :width], self.last[idx])


def build_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                    max_len: int | None = None) -> SequenceBatch:
    """Rows of ``prompt + response`` token ids (the inputs drop the last token, the targets
    the first), responses cut so a row holds at most ``max_len`` input tokens."""
    rows = []
    for p, r in zip(prompts, responses, strict=True):
        if not p or not r:
            raise ValueError("every sequence needs at least one prompt and one response token")
        ids = p + r
        if max_len is not None:
            if len(p) >= max_len:
                raise ValueError(f"a prompt of {len(p)} tokens leaves no room for its response "
                                 f"within max_len={max_len}")
            ids = ids[:max_len + 1]
        rows.append((ids, len(p)))
    width = max(len(ids) - 1 for ids, _ in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    last = torch.empty(len(rows), dtype=torch.int64)
    for i, (ids, n_prompt) in enumerate(rows):
        n = len(ids) - 1
        inputs[i, :n] = torch.tensor(ids[:-1])
        targets[i, n_prompt - 1:n] = torch.tensor(ids[n_prompt:])
        last[i] = n - 1
    return SequenceBatch(inputs, targets, last)


@dataclass
class PairExamples:
    """Tokenized preference pairs: row ``i`` of ``chosen`` and of ``rejected`` share a prompt."""

    chosen: SequenceBatch
    rejected: SequenceBatch

    @property
    def num_choices(self) -> int:
        return len(self.chosen)


def build_pair_examples(pairs: list[PreferencePair], tokenizer: Tokenizer,
                        max_len: int) -> PairExamples:
    """Tokenize ``pairs`` (prompts through the chat template, answers + EOS), each row
    at most ``max_len`` input tokens."""
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    prompts = [encode_prompt(tokenizer, p.messages) for p in pairs]
    chosen = [encode_response(tokenizer, p.chosen) for p in pairs]
    rejected = [encode_response(tokenizer, p.rejected) for p in pairs]
    return PairExamples(build_sequences(prompts, chosen, pad, max_len),
                        build_sequences(prompts, rejected, pad, max_len))


def split_pairs(pairs: list[PreferencePair], val_fraction: float
                ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Hold out the last ``val_fraction`` of the prompts (all pairs of a prompt stay on one
    side, so held-out accuracy is measured on prompts never trained on)."""
    keys = list(dict.fromkeys(json.dumps(p.messages, sort_keys=True) for p in pairs))
    n_val = max(1, int(round(len(keys) * val_fraction))) if len(keys) > 1 else 0
    held = set(keys[len(keys) - n_val:])
    train = [p for p in pairs if json.dumps(p.messages, sort_keys=True) not in held]
    val = [p for p in pairs if json.dumps(p.messages, sort_keys=True) in held]
    return train, val or train
