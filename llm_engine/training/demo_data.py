"""A demo preference set a program can check: answers of exactly one sentence are preferred.

``write_demo(directory)`` writes, deterministically (no randomness beyond a fixed seed):

- ``preferences.jsonl``: per prompt a pair (one-sentence answer over the same answer
  followed by more sentences) or a ranking of three answers (fewer sentences ranked
  higher); the held-out prompts come last (``split_pairs`` holds them out);
- ``prompts_train.jsonl`` / ``prompts_val.jsonl``: prompts for GRPO (``--prompts``) and for
  measuring held-out reward, on topics disjoint from each other.

:func:`one_sentence_reward` is the program that checks the preference, usable as
``--reward python:llm_engine.training.demo_data:one_sentence_reward``.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

TOPICS: tuple[tuple[str, str], ...] = (
    ("the moon", "the natural satellite that orbits the Earth"),
    ("a volcano", "an opening in the ground where molten rock comes out"),
    ("coffee", "a drink made from roasted coffee beans"),
    ("a library", "a place that lends books to its visitors"),
    ("rain", "water that falls from clouds in drops"),
    ("a bicycle", "a vehicle with two wheels that you pedal"),
    ("the ocean", "the large body of salt water that covers most of the Earth"),
    ("a cat", "a small furry animal often kept as a pet"),
    ("bread", "a food baked from flour, water and yeast"),
    ("a river", "a stream of fresh water that flows to the sea"),
    ("the sun", "the star at the centre of our solar system"),
    ("a piano", "a musical instrument played by pressing keys"),
    ("snow", "frozen water that falls from the sky as flakes"),
    ("a bridge", "a structure that carries a road over an obstacle"),
    ("honey", "a sweet food that bees make from nectar"),
    ("a forest", "a large area covered with trees"),
    ("a clock", "a device that shows the time"),
    ("the wind", "air moving from one place to another"),
    ("a camera", "a device that takes photographs"),
    ("tea", "a drink made by soaking dried leaves in hot water"),
    ("a desert", "a dry region that gets very little rain"),
    ("a train", "a line of connected cars that runs on rails"),
    ("chocolate", "a sweet food made from cocoa beans"),
    ("a mountain", "a large natural rise of the land"),
    ("an island", "a piece of land surrounded by water"),
    ("a guitar", "a string instrument played by plucking"),
    ("a garden", "a piece of land where plants are grown"),
    ("the rainbow", "an arc of colours that appears when sunlight meets rain"),
    ("a computer", "a machine that processes information"),
    ("cheese", "a food made from pressed milk curds"),
    ("a lighthouse", "a tower with a bright light that guides ships"),
    ("the brain", "the organ that controls the body and thinking"),
    ("a bee", "a flying insect that makes honey"),
    ("a map", "a drawing of an area that shows where places are"),
    ("the desert fox", "a small fox with large ears that lives in the Sahara"),
    ("a kite", "a light frame covered with cloth that flies on the wind"),
    ("a candle", "a stick of wax with a wick that gives light when burned"),
    ("thunder", "the loud sound that follows a flash of lightning"),
    ("a whale", "a very large sea mammal"),
    ("a violin", "a small string instrument played with a bow"),
    ("an apple", "a round fruit that grows on trees"),
    ("the internet", "a network that connects computers around the world"),
    ("a glacier", "a slow river of ice"),
    ("a museum", "a building where objects of interest are shown"),
    ("salt", "a mineral used to flavour food"),
    ("a penguin", "a bird that swims but cannot fly"),
    ("a telescope", "an instrument that makes distant things look closer"),
    ("the heart", "the organ that pumps blood through the body"),
)
QUESTIONS = ("What is {t}?", "Tell me about {t}.", "Describe {t}.", "Explain what {t} is.")
EXTRA_SENTENCES = (
    "It is something many people find interesting.",
    "There is a lot more that could be said about it.",
    "People have talked about it for a very long time.",
    "You can read more about it in many books.",
    "Let me know if you would like more details.",
    "It appears in many stories and songs.",
    "Some people love it and others do not.",
    "It is worth learning about.",
)
HELD_OUT_TOPICS = 12  # the last topics: held out from training in every file
SEED = 16

_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")


def count_sentences(text: str) -> int:
    """Sentences in ``text``: runs of ``.``, ``!`` or ``?`` followed by a space or the end,
    plus an unfinished tail; 0 for blank text."""
    text = text.strip()
    if not text:
        return 0
    ends = list(_SENTENCE_END.finditer(text))
    tail = text[ends[-1].end():].strip() if ends else text
    return len(ends) + (1 if tail else 0)


def one_sentence_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """1 for an answer of exactly one finished sentence, ``1/n`` for ``n`` sentences (an
    unfinished one counts), 0 for an empty answer; a finished single sentence beats a
    cut-off one (0.5)."""
    del prompts  # the preference depends on the answer alone
    rewards = []
    for text in responses:
        n = count_sentences(text)
        finished = bool(_SENTENCE_END.search(text.strip()[-1:] + " ")) if text.strip() else False
        if n == 0:
            rewards.append(0.0)
        elif n == 1:
            rewards.append(1.0 if finished else 0.5)
        else:
            rewards.append(1.0 / n)
    return rewards


def _answer(topic: str, description: str, extra: list[str]) -> str:
    first = f"{topic[0].upper()}{topic[1:]} is {description}."
    return " ".join([first, *extra])


def demo_rows() -> tuple[list[dict], list[dict], list[dict]]:
    """``(preference rows, training prompts, held-out prompts)``; held-out topics last."""
    rng = random.Random(SEED)
    rows, train_prompts, val_prompts = [], [], []
    for index, (topic, description) in enumerate(TOPICS):
        held_out = index >= len(TOPICS) - HELD_OUT_TOPICS
        for q, question in enumerate(QUESTIONS):
            prompt = question.format(t=topic)
            (val_prompts if held_out else train_prompts).append({"prompt": prompt})
            extras = rng.sample(EXTRA_SENTENCES, 3)
            one = _answer(topic, description, [])
            two = _answer(topic, description, extras[:1])
            many = _answer(topic, description, extras[1:3] + extras[:1])
            if q % 2 == 0:
                rows.append({"prompt": prompt, "chosen": one,
                             "rejected": two if q == 0 else many})
            else:
                rows.append({"prompt": prompt, "responses": [many, one, two],
                             "ranking": [1, 2, 0]})
    return rows, train_prompts, val_prompts


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def write_demo(directory: str | os.PathLike) -> dict[str, Path]:
    """Write the demo files under ``directory``; returns their paths by name."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rows, train_prompts, val_prompts = demo_rows()
    paths = {"preferences": out / "preferences.jsonl", "prompts_train": out / "prompts_train.jsonl",
             "prompts_val": out / "prompts_val.jsonl"}
    _write_jsonl(paths["preferences"], rows)
    _write_jsonl(paths["prompts_train"], train_prompts)
    _write_jsonl(paths["prompts_val"], val_prompts)
    return paths
