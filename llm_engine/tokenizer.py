"""The tokenizer: a HF ``tokenizers`` BPE plus BOS/EOS ids and a jinja2 chat template."""

from __future__ import annotations

import json
import os
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

Message = dict[str, str]


class Tokenizer:
    """Text <-> token ids, and conversations -> prompt text through the chat template."""

    def __init__(
        self,
        hf_tokenizer: HFTokenizer,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
    ) -> None:
        self.hf = hf_tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template
        self.add_bos = add_bos
        self._template = None
        if chat_template is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(chat_template)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text are recognised."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        check_unicode(text, "text")
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """Render a conversation (``[{"role": ..., "content": ...}, ...]``) to prompt text."""
        if self._template is None:
            raise ValueError("this tokenizer has no chat template; pass plain prompts instead")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
            if isinstance(m["content"], str):
                check_unicode(m["content"], f"messages[{i}]['content']")
        special = {
            "bos_token": self._token_or_empty(self.bos_token_id),
            "eos_token": self._token_or_empty(self.eos_token_id),
        }
        return self._template.render(messages=messages,
                                     add_generation_prompt=add_generation_prompt, **special)

    def _token_or_empty(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.hf.id_to_token(token_id) or "")

    # -- persistence: tokenizer.json + tokenizer_config.json, HF-compatible names ----------
    def save(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        self.hf.save(os.path.join(directory, "tokenizer.json"))
        config = {
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "chat_template": self.chat_template,
            "add_bos_token": self.add_bos,
        }
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` if present) from a directory."""
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        hf = HFTokenizer.from_file(path)
        config: dict[str, Any] = {}
        config_path = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)
        return cls(
            hf,
            bos_token_id=_token_id(hf, config, "bos"),
            eos_token_id=_token_id(hf, config, "eos"),
            chat_template=config.get("chat_template"),
            add_bos=bool(config.get("add_bos_token", False)),
        )

    @classmethod
    def from_bpe(
        cls,
        tokens: list[str],
        merges: list[str],
        special_ids: list[int],
        bos_token_id: int | None,
        eos_token_id: int | None,
        chat_template: str | None,
        add_bos: bool = False,
    ) -> Tokenizer:
        """A byte-level BPE (GPT-2 style) from a vocabulary list and ``"a b"`` merge strings."""
        vocab = {tok: i for i, tok in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                    ignore_merges=False))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i in special_ids])
        return cls(hf, bos_token_id, eos_token_id, chat_template, add_bos)


def _token_id(hf: HFTokenizer, config: dict[str, Any], kind: str) -> int | None:
    """``<kind>_token_id`` from the config, else the id of its ``<kind>_token`` string."""
    if config.get(f"{kind}_token_id") is not None:
        return int(config[f"{kind}_token_id"])
    token = config.get(f"{kind}_token")
    if isinstance(token, dict):
        token = token.get("content")
    return hf.token_to_id(token) if isinstance(token, str) else None


def check_unicode(text: str, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``text`` holds a lone surrogate (a string
    that cannot be UTF-8 encoded, e.g. from a JSON ``"\\ud800"`` escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode: lone surrogate "
                         f"U+{ord(text[e.start]):04X} at index {e.start}") from None


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template error: {message}")
