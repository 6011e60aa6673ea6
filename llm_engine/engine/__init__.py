"""The generation engine, one question per module.

- ``llm``: the user-facing API (``LLM.generate / chat / stream``).
- ``engine``: the loop (add a request, run a step, abort) and engine metrics.
- ``scheduler``: which sequences run in the next step, and which of their tokens
  (continuous batching, chunked prefill, admission and preemption by KV blocks).
- ``model_runner``: a scheduled step through the model (inputs, attention metadata,
  CUDA graphs for decode).
- ``sampler``: the next token from logits (penalties, ``ops.sample``, logprobs).
- ``sequence``: per-request state and the outputs users get back.
- ``detokenizer``: token ids to text, one token at a time, with stop strings.
"""
