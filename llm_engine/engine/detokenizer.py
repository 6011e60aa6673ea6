"""Token ids -> text, one token at a time, with stop strings.

Decoding the whole output after every token costs O(length) per token; instead
only a short window of recent tokens is decoded. A token that ends in the middle
of a multi-byte UTF-8 character decodes to U+FFFD; its text is held back until a
later token completes the character. Stop strings may span several tokens: the
text is searched from just before the new piece, and while streaming, any tail of
the text that could be the start of a stop string is held back.
"""

from __future__ import annotations

from llm_engine.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """Text of one completion, built token by token; ``text`` excludes a matched stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (),
                 incremental: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.incremental = incremental or bool(stop)
        self._max_stop = max((len(s) for s in stop), default=0)
        self.token_ids: list[int] = []
        self._text = ""
        self._prefix_offset = 0  # window start: the text before it is final
        self._read_offset = 0  # tokens whose text is already in self.text
        self._streamed = 0  # characters of self.text handed out by stream_delta

    def fresh(self) -> IncrementalDetokenizer:
        """An empty detokenizer with the same tokenizer, stop strings and mode."""
        return IncrementalDetokenizer(self.tokenizer, self.stop, self.incremental)

    @property
    def text(self) -> str:
        return self._text if self.incremental else self.tokenizer.decode(self.token_ids)

    def add_token(self, token_id: int) -> str | None:
        """Append a token; returns the stop string it completed, if any (then ``text``
        is cut just before that stop string)."""
        self.token_ids.append(token_id)
        if not self.incremental:
            return None
        new_text = self.tokenizer.decode(self.token_ids[self._prefix_offset:])
        old_text = self.tokenizer.decode(self.token_ids[self._prefix_offset:self._read_offset])
        if len(new_text) <= len(old_text) or new_text.endswith(_INCOMPLETE):
            return None  # no new complete character yet
        search_from = max(0, len(self._text) - self._max_stop + 1)
        self._text += new_text[len(old_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        return self._find_stop(search_from)

    def flush(self) -> None:
        """At the end of a completion: add the text of trailing tokens held back because
        they end inside a character (it decodes with U+FFFD, as a full decode would)."""
        if not self.incremental or self._read_offset == len(self.token_ids):
            return
        new_text = self.tokenizer.decode(self.token_ids[self._prefix_offset:])
        old_text = self.tokenizer.decode(self.token_ids[self._prefix_offset:self._read_offset])
        self._text += new_text[len(old_text):]
        self._prefix_offset = self._read_offset = len(self.token_ids)

    def _find_stop(self, search_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self._text.find(s, search_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        self._text = self._text[:best[0]]
        return best[1]

    def stream_delta(self, finished: bool) -> str:
        """Text not handed out yet; while running, a tail that could begin a stop string
        is held back."""
        end = len(self.text)
        if not finished:
            end -= self._held_back()
        if end <= self._streamed:
            return ""
        delta = self.text[self._streamed:end]
        self._streamed = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        text = self.text
        for k in range(min(self._max_stop - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
