"""The next token of each sequence from its logits: penalties, sampling, logprobs.

Greedy rows take the argmax (lowest id among ties, as ``ops.sample`` does);
the other rows go to ``ops.sample`` in one call with per-row temperature,
top-k, top-p, min-p, seed and step (the index of the token being generated), so
a request with a seed gets the same tokens alone or in any batch.
"""

from __future__ import annotations

import torch

from llm_engine import ops
from llm_engine.engine.sequence import Sequence


class Sampler:
    """Chooses one token per row of a ``(rows, vocab)`` fp32 logits tensor."""

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]
                 ) -> tuple[list[int], list[dict[int, float] | None]]:
        """Tokens for ``seqs[i]`` from ``logits[i]``, and each row's logprobs dict (or None)."""
        device = logits.device
        penalised = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if penalised:
            logits = logits.clone()
            self._apply_penalties(logits, [seqs[i] for i in penalised], penalised)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=device)
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if greedy:
            rows = logits if len(greedy) == len(seqs) else logits[greedy]
            tokens[greedy] = rows.argmax(dim=-1)
        if sampled:
            rows = logits if len(sampled) == len(seqs) else logits[sampled]
            params = [seqs[i].params for i in sampled]

            def column(values: list, dtype: torch.dtype) -> torch.Tensor:
                return torch.tensor(values, dtype=dtype, device=device)

            tokens[sampled] = ops.sample(
                rows.contiguous(),
                temperature=column([p.temperature for p in params], torch.float32),
                top_k=column([p.top_k for p in params], torch.int64),
                top_p=column([p.top_p for p in params], torch.float32),
                min_p=column([p.min_p for p in params], torch.float32),
                seed=column([seqs[i].seed for i in sampled], torch.int64),
                step=column([seqs[i].num_output_tokens for i in sampled], torch.int64),
            )
        token_list = tokens.tolist()
        return token_list, self._logprobs(logits, seqs, token_list)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
        """Presence / frequency penalties over generated tokens and the repetition penalty
        over prompt and generated tokens, in place on ``logits[rows]``."""
        vocab = logits.shape[1]
        device = logits.device
        sub = logits[rows]
        for j, seq in enumerate(seqs):
            p = seq.params
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=device)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(sub.dtype)
            if p.repetition_penalty != 1:
                seen = torch.zeros(vocab, dtype=torch.bool, device=device)
                seen[torch.tensor(seq.token_ids, dtype=torch.long, device=device)] = True
                row = sub[j]
                penalised = torch.where(row > 0, row / p.repetition_penalty,
                                        row * p.repetition_penalty)
                sub[j] = torch.where(seen, penalised, row)
            sub[j] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(sub.dtype)
        logits[rows] = sub

    @staticmethod
    def _logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]
                  ) -> list[dict[int, float] | None]:
        """``{token: logprob}`` of the sampled token and the top ``params.logprobs`` tokens,
        from the log-softmax of the (penalised, untempered) logits."""
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        result: list[dict[int, float] | None] = [None] * len(seqs)
        if not want:
            return result
        logp = torch.log_softmax(logits[want], dim=-1)
        k = max(seqs[i].params.logprobs for i in want)
        top_v, top_i = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in want],
                                             device=logits.device)).squeeze(1)
        top_v, top_i, chosen = top_v.tolist(), top_i.tolist(), chosen.tolist()
        for j, i in enumerate(want):
            n = seqs[i].params.logprobs
            entry = dict(zip(top_i[j][:n], top_v[j][:n], strict=True))
            entry[tokens[i]] = chosen[j]
            result[i] = entry
        return result
