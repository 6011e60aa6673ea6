"""Training data: text → token shards on disk, chat JSONL → masked examples, batch sampling.

Pretraining text (files, folders, or the built-in ``stdlib`` corpus) is tokenized
once into ``train.bin`` / ``val.bin`` (flat numpy token arrays, ``uint16`` when the
vocabulary fits, else ``uint32``) plus ``meta.json``, read back as memory maps.
A batch is a set of random contiguous windows of ``seq_len + 1`` tokens.

Supervised fine-tuning data is JSONL with one ``{"messages": [...]}`` per line,
rendered with the tokenizer's chat template; only the assistant turns' tokens
are trained on (the others get the target ``IGNORE_INDEX``).

Batches are drawn by :func:`global_batch_indices` from ``(seed, step)`` alone, for
the whole global batch, and each process takes its own slice of it: training
resumes exactly from a step number, and N processes see the same examples as
one process with the same global batch.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from llm_engine.tokenizer import Tokenizer

IGNORE_INDEX = -100
END_OF_TEXT = "<|endoftext|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = (END_OF_TEXT, "<|im_start|>", "<|im_end|>")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".c", ".h", ".js", ".html")
STDLIB_MAX_BYTES = 8 << 20


# -- sources of text ---------------------------------------------------------------------

def stdlib_files(max_bytes: int = STDLIB_MAX_BYTES) -> list[Path]:
    """The Python standard library's ``.py`` files on this machine, sorted, at most ``max_bytes``.

    Tests and site-packages are left out; the directory comes from ``sysconfig`` (falling
    back to the directory of ``os.py``), so the corpus needs no download.
    """
    root = Path(sysconfig.get_paths().get("stdlib") or os.path.dirname(os.__file__))
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        files.append(path)
        total += size
    if not files:
        raise FileNotFoundError(f"no Python standard library sources found under {root}")
    return files


def text_files(source: str | os.PathLike) -> list[Path]:
    """The text files of ``source``: ``"stdlib"``, one file, or a folder (searched recursively)."""
    if str(source) == "stdlib":
        return stdlib_files()
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if files:
            return files
        raise FileNotFoundError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {path}")
    raise FileNotFoundError(f"data source {str(source)!r} is neither 'stdlib', a file nor a folder")


def read_texts(files: Iterable[Path]) -> Iterator[str]:
    """Each file's text (UTF-8, undecodable bytes replaced)."""
    for path in files:
        yield path.read_text(encoding="utf-8", errors="replace")


# -- tokenizer ---------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    special_tokens: Iterable[str] = SPECIAL_TOKENS) -> Tokenizer:
    """A byte-level BPE with ``vocab_size`` tokens trained on ``texts`` (HF ``tokenizers``).

    The vocabulary starts from the 256 byte symbols, so any text can be encoded. The
    special tokens come first (ids 0, 1, ...); ``<|endoftext|>`` separates documents and
    is the EOS token, and a ChatML chat template (``<|im_start|>`` / ``<|im_end|>``) is set
    when those tokens are among the specials.
    """
    special_tokens = list(special_tokens)
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size must be at least {256 + len(special_tokens)} "
                         f"(256 bytes + special tokens), got {vocab_size}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(texts, trainer)
    chat = "<|im_start|>" in special_tokens and "<|im_end|>" in special_tokens
    eos = hf.token_to_id(END_OF_TEXT) if END_OF_TEXT in special_tokens else None
    return Tokenizer(hf, bos_token_id=None, eos_token_id=eos,
                     chat_template=CHATML_TEMPLATE if chat else None)


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits, else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


# -- pretraining shards ------------------------------------------------------------------

@dataclass
class TokenShards:
    """Token ids of the training and validation splits (memory-mapped, read-only)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int


def _is_val(name: str, val_fraction: float) -> bool:
    return zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000


def build_shards(files: list[Path], tokenizer: Tokenizer, out_dir: str | os.PathLike,
                 val_fraction: float = 0.05, progress: bool = True) -> TokenShards:
    """Tokenize ``files`` into ``out_dir/{train,val}.bin`` + ``meta.json`` and map them.

    Each document ends with the tokenizer's EOS token. A file goes to validation when a
    hash of its name says so (about ``val_fraction`` of the files); with too few files for
    that, the last ``val_fraction`` of the token stream is the validation split. Shards
    already built from the same files (names, sizes, mtimes) and tokenizer are reused.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    fingerprint = zlib.crc32(json.dumps(
        [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        + [tokenizer.hf.to_str(), val_fraction]).encode())
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint:
            return load_shards(out)
    eos = tokenizer.eos_token_id
    val_names = {str(f) for f in files if _is_val(str(f), val_fraction)}
    split_by_file = 0 < len(val_names) < len(files)
    paths = {split: out / f"{split}.bin.tmp" for split in ("train", "val")}
    counts = {"train": 0, "val": 0}
    with open(paths["train"], "wb") as train_f, open(paths["val"], "wb") as val_f:
        sinks = {"train": train_f, "val": val_f}
        batch: list[Path] = []
        for i, path in enumerate(tqdm(files, desc="tokenizing", unit="file", disable=not progress,
                                      file=sys.stderr)):
            batch.append(path)
            if len(batch) < 64 and i + 1 < len(files):
                continue
            encodings = tokenizer.hf.encode_batch(list(read_texts(batch)), add_special_tokens=False)
            for file_path, enc in zip(batch, encodings, strict=True):
                ids = enc.ids + ([eos] if eos is not None else [])
                split = "val" if split_by_file and str(file_path) in val_names else "train"
                np.asarray(ids, dtype=dtype).tofile(sinks[split])
                counts[split] += len(ids)
            batch = []
    if not split_by_file:
        stream = np.fromfile(paths["train"], dtype=dtype)
        n_val = max(1, int(len(stream) * val_fraction))
        stream[:-n_val].tofile(paths["train"])
        stream[-n_val:].tofile(paths["val"])
        counts = {"train": len(stream) - n_val, "val": n_val}
    for split, tmp in paths.items():
        os.replace(tmp, out / f"{split}.bin")
    meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "train_tokens": counts["train"],
            "val_tokens": counts["val"], "files": len(files), "fingerprint": fingerprint}
    tmp_meta = out / "meta.json.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, meta_path)
    return load_shards(out)


def load_shards(directory: str | os.PathLike) -> TokenShards:
    """Memory-map the shards written by :func:`build_shards`."""
    directory = Path(directory)
    meta = json.loads((directory / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    maps = {split: np.memmap(directory / f"{split}.bin", dtype=dtype, mode="r")
            for split in ("train", "val")}
    return TokenShards(train=maps["train"], val=maps["val"], vocab_size=meta["vocab_size"])


# -- supervised fine-tuning --------------------------------------------------------------

def read_chat_jsonl(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL file with one ``{"messages": [...]}`` object per line."""
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise ValueError(f"{path}:{lineno}: expected an object with a non-empty "
                                 f"'messages' list")
            conversations.append(messages)
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, str]]
                ) -> tuple[list[int], list[bool]]:
    """Token ids of a rendered conversation and, per token, whether it belongs to an
    assistant turn (its content and the template's end-of-turn text).

    The assistant spans are found by rendering incrementally: the conversation up to an
    assistant turn with the generation prompt is where the turn starts, the conversation
    including it is where it ends. The whole text is tokenized once and each token is
    assigned by its character offsets, so the ids are exactly the full rendering's.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) \
            if i else ""
        end_text = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (text.startswith(start_text) and text.startswith(end_text)):
            raise ValueError("the chat template does not render conversations incrementally; "
                             "cannot locate the assistant turns")
        spans.append((len(start_text), len(end_text)))
    enc = tokenizer.hf.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    mask = [any(lo <= start < hi for lo, hi in spans) for start, _ in enc.offsets]
    if tokenizer.add_bos and tokenizer.bos_token_id is not None and (
            not ids or ids[0] != tokenizer.bos_token_id):
        ids, mask = [tokenizer.bos_token_id, *ids], [False, *mask]
    return ids, mask


@dataclass
class SFTExamples:
    """Conversations as fixed-length ``(inputs, targets)`` rows; targets outside assistant
    turns, and on padding, are ``IGNORE_INDEX``. Longer conversations are truncated."""

    inputs: torch.Tensor  # (N, seq_len) int64
    targets: torch.Tensor  # (N, seq_len) int64

    @property
    def num_choices(self) -> int:
        return self.inputs.shape[0]

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return self.inputs[idx], self.targets[idx]


def build_sft_examples(conversations: list[list[dict[str, str]]], tokenizer: Tokenizer,
                       seq_len: int) -> SFTExamples:
    """Render, tokenize and mask each conversation into one padded row of ``seq_len``."""
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    inputs = torch.full((len(conversations), seq_len), pad, dtype=torch.int64)
    targets = torch.full((len(conversations), seq_len), IGNORE_INDEX, dtype=torch.int64)
    for row, messages in enumerate(conversations):
        ids, mask = encode_chat(tokenizer, messages)
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        n = len(ids) - 1
        if n < 1 or not any(mask[1:]):
            raise ValueError(f"conversation {row} has no assistant tokens within "
                             f"seq_len={seq_len}")
        inputs[row, :n] = torch.tensor(ids[:-1])
        tgt = torch.tensor(ids[1:])
        targets[row, :n] = torch.where(torch.tensor(mask[1:]), tgt, IGNORE_INDEX)
    return SFTExamples(inputs, targets)


# -- batches -----------------------------------------------------------------------------

@dataclass
class TokenWindows:
    """Random contiguous windows of a token stream: row i is ``tokens[o_i : o_i + seq_len + 1]``
    split into inputs and next-token targets."""

    tokens: np.ndarray
    seq_len: int

    def __post_init__(self) -> None:
        if len(self.tokens) < self.seq_len + 1:
            raise ValueError(f"only {len(self.tokens)} tokens, need at least seq_len + 1 = "
                             f"{self.seq_len + 1}; use more data or a shorter --seq-len")

    @property
    def num_choices(self) -> int:
        return len(self.tokens) - self.seq_len

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([np.asarray(self.tokens[o:o + self.seq_len + 1], dtype=np.int64)
                         for o in indices])
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


def global_batch_indices(seed: int, step: int, global_batch: int, num_choices: int
                         ) -> np.ndarray:
    """The ``global_batch`` example indices of optimizer step ``step``, from ``(seed, step)`` only."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, num_choices, size=global_batch)


def micro_batch_indices(indices: np.ndarray, micro_step: int, grad_accum: int, rank: int,
                        world_size: int) -> np.ndarray:
    """This process's slice for one micro-step: the global batch viewed as
    ``(grad_accum, world_size, per_rank)``, entry ``[micro_step, rank]``."""
    per_rank = len(indices) // (grad_accum * world_size)
    return indices.reshape(grad_accum, world_size, per_rank)[micro_step, rank]


def eval_indices(num_choices: int, count: int, seed: int = 1234) -> np.ndarray:
    """A fixed set of validation examples, the same at every evaluation: all of them when
    there are at most ``count``, else ``count`` drawn at random."""
    if num_choices <= count:
        return np.arange(num_choices)
    return np.random.default_rng(seed).integers(0, num_choices, size=count)
