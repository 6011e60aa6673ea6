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
    """Text of one completion, built token by token; ``text`` excludes a matched stop string.

    ``token_ids`` is the completion's token list, owned by its sequence (the detokenizer
    reads it, never writes it); the text covers ``token_ids[start:]`` up to the last
    token taken with :meth:`advance`.
    """

    def __init__(self, tokenizer: Tokenizer, token_ids: list[int], start: int = 0,
                 stop: tuple[str, ...] = (), incremental: bool = True) -> None:
        self.tokenizer = tokenizer
        self.token_ids = token_ids
        self.stop = stop
        self.incremental = incremental or bool(stop)
        self._max_stop = max((len(s) for s in stop), default=0)
        self._start = start
        self._end = start  # tokens before it are taken into the text
        self._text = ""
        self._prefix_offset = start  # window start: the text before it is final
        self._read_offset = start  # tokens whose text is already in self.text
        self._streamed = 0  # characters of self.text handed out by stream_delta

    @property
    def text(self) -> str:
        if self.incremental:
            return self._text
        return self.tokenizer.decode(self.token_ids[self._start:self._end])

    def advance(self) -> str | None:
        """Take the next token of ``token_ids`` into the text; returns the stop string it
        completed, if any (then ``text`` is cut just before that stop string)."""
        if self._end >= len(self.token_ids):
            raise IndexError(f"no token to take: all {len(self.token_ids)} are in the text")
        self._end += 1
        if not self.incremental:
            return None
        new_text = self.tokenizer.decode(self.token_ids[self._prefix_offset:self._end])
        old_text = self.tokenizer.decode(self.token_ids[self._prefix_offset:self._read_offset])
        if len(new_text) <= len(old_text) or new_text.endswith(_INCOMPLETE):
            return None  # no new complete character yet
        search_from = max(0, len(self._text) - self._max_stop + 1)
        self._text += new_text[len(old_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = self._end
        return self._find_stop(search_from)

    def flush(self) -> None:
        """At the end of a completion: add the text of trailing tokens held back because
        they end inside a character (it decodes with U+FFFD, as a full decode would)."""
        if not self.incremental or self._read_offset == self._end:
            return
        new_text = self.tokenizer.decode(self.token_ids[self._prefix_offset:self._end])
        old_text = self.tokenizer.decode(self.token_ids[self._prefix_offset:self._read_offset])
        self._text += new_text[len(old_text):]
        self._prefix_offset = self._read_offset = self._end

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
