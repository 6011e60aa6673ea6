"""When a completion ends: EOS, a stop token id, a stop string, max_tokens or the context.

The checks run in that order on a sequence's newest token. EOS and stop token ids
stay in the completion's token ids but not in its text; a matched stop string is
cut from the text.
"""

from __future__ import annotations

from llm_engine.engine.sequence import Sequence


class StopChecker:
    """Judges the newest token of a sequence against its request's stop conditions."""

    def __init__(self, eos_token_id: int | None, max_model_len: int) -> None:
        self.eos_token_id = eos_token_id
        self.max_model_len = max_model_len

    def check(self, seq: Sequence) -> tuple[str, str | int | None] | None:
        """``(finish_reason, stop_reason)`` if ``seq`` ends with its newest token, else None.

        Takes the token into the sequence's text unless it is EOS or a stop token id.
        ``finish_reason`` is ``"stop"`` (``stop_reason``: the stop token id, the stop
        string, or None for EOS) or ``"length"`` (max_tokens or the model's context).
        """
        params = seq.params
        token = seq.token_ids[-1]
        if token == self.eos_token_id and not params.ignore_eos:
            return "stop", None
        if params.stop_token_ids and token in params.stop_token_ids:
            return "stop", token
        matched = seq.detokenizer.advance()
        if matched is not None:
            return "stop", matched
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.detokenizer.flush()
            return "length", None
        return None
