"""Generation: decode and offline throughput of the engine against HF transformers.

Both sides run SmolLM2-135M-Instruct with the very same weights (the HF
``LlamaForCausalLM`` is built from ours), greedy, ``ignore_eos`` so every request
produces exactly its token count. Our engine runs with prefix caching off, so
repeated timing runs of the same prompts do not hit the cache.

Cases
- ``decode-bs1``: one prompt, ``new`` tokens. Decode tokens/s is measured as
  ``(new - 1) / (t(new) - t(1))`` for both implementations (the prefill and first
  token cancel out). ``ceiling_frac``: the weights' bytes read per token times
  tokens/s over the measured copy bandwidth (decode at batch 1 is memory-bound).
- ``throughput-<N>x<in>+<out>``: N random-token prompts of ``in`` tokens, ``out``
  new tokens each, like vLLM's ``benchmark_throughput`` with its random dataset;
  the ``-ratio0.5`` case draws each request's input and output lengths uniformly
  within ±50% of those (vLLM's range ratio), as real requests differ. Ours gets all
  requests at once (continuous batching; each request stops at its own length);
  HF runs them through ``generate`` in static batches of ``hf_batch`` concurrent
  requests (32), left-padded, each batch running until its longest request
  is done. ``value``: requested output tokens/s; ``ceiling_frac``: matmul FLOPs
  (2 × body parameters per token, 2 × vocab × hidden per output token) per second
  over the measured matmul peak. TTFT / TPOT percentiles of our requests are in
  ``note`` and ``params``.
- CPU, quantized weights (the default for the GGUF file): llama.cpp on the same file
  (``llamacpp.py``: ``decode-bs1``, ``prefill-1000``, ``peak-rss``); ``decode throughput
  streams=<N>``: decode throughput at 1 to 64 concurrent streams for ours (quantized and fp32), HF
  and llama.cpp (one stream after another, up to 16); ``time to first token prompt=<L>``:
  time to first token (ms) of an ``L``-token prompt for the same four; ``fidelity-1000``
  (``fidelity.py``).
- CUDA only: ``decode-bs64`` (64 requests decoding together) and ``prefill``
  (16 × 1024-token prompts, one new token: prompt tokens/s); ``vllm`` rows when
  vLLM is installed.

``rel_err``: the fraction of generated tokens that differ from HF's greedy tokens
for the same prompts (0 for HF itself). Our CUDA rows use CUDA graphs for decode.

A/B mode (``ab=[(op, (impl, ...))]``, ``llm-engine bench generate --ab
rms_norm=cpp,reference``): instead of the cases above, ``ab-<op>-decode-bs1`` and
``ab-<op>-throughput-...`` run our engine once per named implementation of ``op``
(forced through ``ops.use``), the runs taking turns; each row's note gives its speed
over the first implementation's, ``rel_err`` the fraction of its greedy tokens that
differ from the first one's.

Sizes (``_sizes``) keep the full CUDA run within about a minute (the GPU script's
budget); on CPU every timing is the fastest of 3 runs, as a shared 2-core machine
is noisy, and the runs of ours and HF's take turns, so that both meet the same
moments of the machine. Rows are yielded as measured (``iter_rows``), most telling first.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from llm_engine.bench.common import INTERPRETER_NOTE, OURS, Ceilings, Row, synchronize
from llm_engine.model import Transformer

SUITE = "generate"
RANGE_RATIO = 0.5
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class _Sizes:
    decode_new: int
    tp_requests: int
    tp_in: int
    tp_out: int
    hf_batch: int
    repeats: int


def _sizes(device: str, quick: bool) -> _Sizes:
    if torch.device(device).type == "cuda":
        return _Sizes(32, 32, 128, 32, 32, 1) if quick else _Sizes(96, 64, 256, 96, 32, 1)
    return _Sizes(8, 4, 16, 8, 4, 1) if quick else _Sizes(64, 32, 64, 64, 32, 3)


def hf_from_ours(model: Transformer):
    """An HF ``LlamaForCausalLM`` holding the same weights as our Llama ``model``."""
    import transformers

    c = model.config
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
    )
    p = next(model.parameters())
    hf = transformers.LlamaForCausalLM(cfg)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    state = {"model.embed_tokens.weight": model.embed_tokens.weight,
             "model.norm.weight": model.norm.weight}
    if not c.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}."
        wq, wk, wv = layer.attn.qkv_proj.weight.split([q, kv, kv])
        gate, up = layer.mlp.up_proj.weight.chunk(2)
        state.update({
            pre + "input_layernorm.weight": layer.attn_norm.weight,
            pre + "post_attention_layernorm.weight": layer.mlp_norm.weight,
            pre + "self_attn.q_proj.weight": wq, pre + "self_attn.k_proj.weight": wk,
            pre + "self_attn.v_proj.weight": wv,
            pre + "self_attn.o_proj.weight": layer.attn.o_proj.weight,
            pre + "mlp.gate_proj.weight": gate, pre + "mlp.up_proj.weight": up,
            pre + "mlp.down_proj.weight": layer.mlp.down_proj.weight,
        })
    missing, unexpected = hf.load_state_dict({k: v.detach().float().cpu()
                                              for k, v in state.items()}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"weights do not map onto LlamaForCausalLM: missing {missing}, "
                         f"unexpected {unexpected}")
    if c.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(device=p.device, dtype=p.dtype).eval()


def _timed(fn: Callable[[], object], device: str, repeats: int,
           warmup: Callable[[], object] | None = None) -> tuple[float, object]:
    """Fastest of ``repeats`` runs (seconds) after a warm-up (``warmup``, else ``fn``),
    and the last result."""
    return _timed_in_turn({"": (fn, warmup)}, device, repeats)[""]


def _timed_in_turn(fns: dict[str, tuple[Callable[[], object], Callable[[], object] | None]],
                   device: str, repeats: int) -> dict[str, tuple[float, object]]:
    """:func:`_timed` for several implementations ``name -> (fn, warmup or None)``, their
    runs taking turns (a, b, a, b, ...): on a shared machine whose speed drifts, each
    then meets the same moments, and their ratio holds still."""
    results = {name: (warmup or fn)() for name, (fn, warmup) in fns.items()}
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, (fn, _) in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            results[name] = fn()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: (best[name], results[name]) for name in fns}


def _hf_generate(hf, prompts: list[list[int]], new: int | list[int],
                 batch: int) -> list[list[int]]:
    """Greedy tokens per prompt through ``generate`` in static batches of ``batch``, past
    EOS like ``ignore_eos``. ``new``: tokens per prompt (one int for all, or one each).
    Shorter prompts of a batch are left-padded; a batch runs until its longest request
    is done and each request keeps its own count."""
    wanted = [new] * len(prompts) if isinstance(new, int) else list(new)
    out: list[list[int]] = []
    device = next(hf.parameters()).device
    for i in range(0, len(prompts), batch):
        chunk, counts = prompts[i:i + batch], wanted[i:i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                            device=device)
        with torch.inference_mode():
            gen = hf.generate(ids, attention_mask=mask, max_new_tokens=max(counts),
                              do_sample=False, top_p=None, top_k=None, temperature=None,
                              eos_token_id=None, pad_token_id=0)
        out += [row[:k] for row, k in zip(gen[:, width:].tolist(), counts, strict=True)]
    return out


def _ours_generate(llm, prompts: list[list[int]], new: int | list[int]) -> list:
    from llm_engine import SamplingParams

    wanted = [new] * len(prompts) if isinstance(new, int) else new
    params = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in wanted]
    return llm.generate(prompts, params, use_tqdm=False)


def _mismatch(a: list[list[int]], b: list[list[int]]) -> float:
    total = sum(len(x) for x in b)
    diff = sum(sum(u != v for u, v in zip(x, y, strict=True)) for x, y in zip(a, b, strict=True))
    return diff / total if total else 0.0


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _flops(model: Transformer, in_tokens: int, out_tokens: int) -> float:
    c = model.config
    head = c.vocab_size * c.hidden_size
    body = model.num_parameters() - c.vocab_size * c.hidden_size
    if not c.tie_word_embeddings:
        body -= head
    return 2.0 * body * (in_tokens + out_tokens) + 2.0 * head * out_tokens


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab, size=(n, length)).tolist()


def _lengths(n: int, mean: int, ratio: float, seed: int) -> list[int]:
    """``n`` lengths uniform in ``[mean·(1−ratio), mean·(1+ratio)]`` (vLLM's range ratio)."""
    rng = np.random.default_rng(seed)
    lo, hi = max(1, round(mean * (1 - ratio))), max(1, round(mean * (1 + ratio)))
    return rng.integers(lo, hi + 1, size=n).tolist()


def iter_rows(device: str, quick: bool, ceilings: Ceilings,
              ab: list[tuple[str, tuple[str, ...]]] | None = None) -> Iterator[Row]:
    """The suite's rows, each yielded as soon as it is measured (the most telling first),
    so a run stopped by its time budget keeps what it measured; with ``ab``, the A/B
    rows of each ``(op, implementations)`` instead."""
    from llm_engine import LLM

    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = _sizes(device, quick)
    llm = LLM("smollm2", device=device, dtype=dtype, max_num_seqs=256,
              enable_prefix_caching=False, kv_cache_memory=(1 << 32) if cuda else 1 << 29)
    model = llm.model
    if ab:
        for op, impls in ab:
            yield from _ab_rows(llm, device, sizes, op, impls)
        return
    fp32_model = model
    if model.quantized:  # HF, and the fp32 comparison, get the dequantized weights
        from llm_engine.loader import load_model

        fp32_model = load_model("smollm2", device=device, dtype=dtype, quantization="none")[0]
    try:
        hf = hf_from_ours(fp32_model)
        hf_note = ""
    except Exception as e:  # transformers missing or incompatible: ours still runs
        hf, hf_note = None, f"HF transformers unavailable: {type(e).__name__}: {e}"
    backend = ""
    if not cuda:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        backend = ("CPU: " + ("the GGUF file's quantized weights through the C++ quantized "
                              "linear, int8 activations in decode steps"
                              if model.quantized else "fp32 oneDNN linears on packed weights")
                   + ", C++ decode attention and layer ops, "
                   f"{torch.get_num_threads()} threads, "
                   f"load average {load:.1f} at start")
    yield from _decode_rows(llm, hf, hf_note, device, sizes, ceilings, 1, backend)
    if not cuda and model.quantized:
        from llm_engine.bench import fidelity, llamacpp
        from llm_engine.loader import _known_model_file

        path = _known_model_file("smollm2")
        peer = llamacpp.open_peer(path, torch.get_num_threads())
        try:
            yield from llamacpp.rows(llm, peer, path, llm.tokenizer.encode(PROMPT),
                                     sizes.decode_new, sizes.repeats, ceilings)
            yield from _concurrency_rows(llm, fp32_model, hf, peer, device, sizes, ceilings)
            yield from _ttft_rows(llm, fp32_model, hf, peer, device, sizes)
        finally:
            if peer is not None and hasattr(peer, "close"):
                peer.close()
        yield from fidelity.rows(model, fp32_model, llm.tokenizer, path)
    if cuda:
        yield from _decode_rows(llm, hf, hf_note, device, sizes, ceilings, 64, backend)
        yield from _prefill_rows(llm, hf, hf_note, device, sizes, ceilings)
    yield from _throughput_rows(llm, hf, hf_note, device, sizes, ceilings, backend)
    if cuda:
        yield from _vllm_rows(llm, device, sizes)


def run(device: str, quick: bool, ceilings: Ceilings,
        ab: list[tuple[str, tuple[str, ...]]] | None = None) -> list[Row]:
    return list(iter_rows(device, quick, ceilings, ab))


def _ab_rows(llm, device: str, sizes: _Sizes, op: str, impls: tuple[str, ...]) -> Iterator[Row]:
    """Decode at batch 1 and offline throughput with each implementation of ``op`` forced,
    the runs of the implementations taking turns."""
    from llm_engine import ops

    def forced(impl: str, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with ops.use(**{op: impl}):
                return fn()
        return run

    vocab = llm.model.config.vocab_size
    decode_prompt = [llm.tokenizer.encode(PROMPT)]
    tp_prompts = random_prompts(sizes.tp_requests, sizes.tp_in, vocab, seed=3)
    new = sizes.decode_new
    cases = {
        "decode-bs1": lambda n: _ours_generate(llm, decode_prompt, n),
        f"throughput-{sizes.tp_requests}x{sizes.tp_in}+{sizes.tp_out}":
            lambda n: _ours_generate(llm, tp_prompts, n),
    }
    for case, gen in cases.items():
        if case == "decode-bs1":
            def timed(n: int, gen=gen) -> dict[str, tuple[float, object]]:
                return _timed_in_turn({i: (forced(i, lambda: gen(n)), None) for i in impls},
                                      device, sizes.repeats)
            t1, tn = timed(1), timed(new)
            rates = {i: (new - 1) / max(tn[i][0] - t1[i][0], 1e-9) for i in impls}
        else:
            tn = _timed_in_turn({i: (forced(i, lambda gen=gen: gen(sizes.tp_out)), None)
                                 for i in impls}, device, sizes.repeats)
            rates = {i: sizes.tp_requests * sizes.tp_out / tn[i][0] for i in impls}
        tokens = {i: [o.outputs[0].token_ids for o in tn[i][1]] for i in impls}
        first = impls[0]
        for i in impls:
            note = f"{rates[i] / rates[first]:.2f}x {op}={first}"
            if i == "triton" and torch.device(device).type == "cpu":
                note = f"{INTERPRETER_NOTE}; {note}"
            yield Row(SUITE, f"ab-{op}-{case}", f"{op}={i}", "tok/s", rates[i], ms=tn[i][0] * 1e3,
                      rel_err=_mismatch(tokens[i], tokens[first]), note=note,
                      params={"new_tokens": new if case == "decode-bs1" else sizes.tp_out})


def _decode_rows(llm, hf, hf_note: str, device: str, sizes: _Sizes, ceilings: Ceilings,
                 batch: int, backend: str) -> list[Row]:
    model = llm.model
    base = llm.tokenizer.encode(PROMPT)
    prompts = [list(base) for _ in range(batch)] if batch == 1 else \
        random_prompts(batch, 32, model.config.vocab_size, seed=1)
    new = sizes.decode_new
    case = f"decode-bs{batch}"
    params = {"batch": batch, "new_tokens": new, "prompt_tokens": len(prompts[0])}
    weight_bytes = _weight_bytes(model)

    gens: dict[str, Callable[[int], object]] = {OURS: lambda n: _ours_generate(llm, prompts, n)}
    if hf is not None:
        gens["hf"] = lambda n: _hf_generate(hf, prompts, n, batch)

    def timed(n: int) -> dict[str, tuple[float, object]]:
        return _timed_in_turn({k: (lambda g=g: g(n), None) for k, g in gens.items()}, device,
                              sizes.repeats)

    t1, tn = timed(1), timed(new)
    rates = {k: batch * (new - 1) / max(tn[k][0] - t1[k][0], 1e-9) for k in gens}
    ours_rate, (ours_t, ours_out) = rates[OURS], tn[OURS]
    ours_tokens = [o.outputs[0].token_ids for o in ours_out]
    notes = [backend, hf_note, "CUDA graphs for decode" if device.startswith("cuda") else ""]
    ours = Row(SUITE, case, OURS, "tok/s", ours_rate, ms=ours_t * 1e3,
               ceiling_frac=_bw_frac(ours_rate / batch, weight_bytes, ceilings), params=params)
    rows = [ours]
    if hf is not None:
        hf_rate, (hf_t, hf_tokens) = rates["hf"], tn["hf"]
        rows.append(Row(SUITE, case, "hf-transformers", "tok/s", hf_rate, ms=hf_t * 1e3,
                        ceiling_frac=_bw_frac(hf_rate / batch, weight_bytes, ceilings),
                        rel_err=0.0, note="generate(), greedy, DynamicCache", params=params))
        ours.rel_err = _mismatch(ours_tokens, hf_tokens)
        notes.append(f"{ours_rate / hf_rate:.2f}x HF")
    ours.note = "; ".join(x for x in notes if x)
    return rows


def _weight_bytes(model: Transformer) -> int:
    """Bytes of the weights a decode step reads: parameters and quantized blocks."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


# Concurrency levels of the quantized-weights rows; llama.cpp's Llama runs one sequence
# at a time, so it is timed up to PEER_STREAMS (its aggregate rate stays its batch-1 rate).
STREAMS = (1, 4, 16, 32, 64)
PEER_STREAMS = 16
TTFT_LENGTHS = (32, 128, 512, 1024)


def _fp32_engine(llm, fp32_model: Transformer):
    from llm_engine import LLM

    return LLM.from_modules(fp32_model, llm.tokenizer, max_num_seqs=256,
                            enable_prefix_caching=False, kv_cache_memory=1 << 29)


def _concurrency_rows(llm, fp32_model: Transformer, hf, peer, device: str, sizes: _Sizes,
                      ceilings: Ceilings) -> list[Row]:
    """Decode throughput at each of :data:`STREAMS` concurrent streams (32-token prompts,
    32 new tokens each): the quantized engine, the same engine on the dequantized fp32
    weights, HF ``generate`` on those in one static batch, and llama.cpp (``peer``) on the
    file, one stream after another; the runs take turns."""
    from llm_engine.bench import llamacpp

    fp32 = _fp32_engine(llm, fp32_model)
    rows: list[Row] = []
    new = 32
    for streams in STREAMS:
        prompts = random_prompts(streams, 32, fp32_model.config.vocab_size, seed=7)
        fns = {name: (lambda e=e, p=prompts: _ours_generate(e, p, new),
                      lambda e=e, p=prompts: _ours_generate(e, p[:1], 2))
               for name, e in ((f"{OURS}-quantized", llm), (f"{OURS}-fp32", fp32))}
        if hf is not None:
            fns["hf-transformers"] = (lambda p=prompts, b=streams: _hf_generate(hf, p, new, b),
                                      lambda p=prompts: _hf_generate(hf, p[:1], 2, 1))
        if peer is not None and streams <= PEER_STREAMS:
            fns[llamacpp.IMPL] = (
                lambda p=prompts: [llamacpp.peer_generate(peer, ids, new) for ids in p],
                lambda p=prompts: llamacpp.peer_generate(peer, p[0], 2))
        timings = _timed_in_turn(fns, device, sizes.repeats)
        rate = {k: streams * new / v[0] for k, v in timings.items()}
        base = rate[f"{OURS}-quantized"]
        notes = {f"{OURS}-quantized": "; ".join(f"{base / rate[k]:.2f}x {k}" for k in rate
                                               if k != f"{OURS}-quantized"),
                 f"{OURS}-fp32": "the same engine on the dequantized weights",
                 "hf-transformers": f"generate(), one static batch of {streams}, fp32",
                 llamacpp.IMPL: "the same file, one stream after another"}
        for name, r in rate.items():
            model = llm.model if name == f"{OURS}-quantized" else fp32_model
            frac = _bw_frac(r / streams, _weight_bytes(model), ceilings) \
                if name != llamacpp.IMPL else _bw_frac(r, _weight_bytes(llm.model), ceilings)
            rows.append(Row(SUITE, f"decode throughput streams={streams}", name, "tok/s", r,
                            ms=timings[name][0] * 1e3, ceiling_frac=frac, note=notes[name],
                            params={"streams": streams, "new_tokens": new, "prompt_tokens": 32}))
    if peer is None:
        rows += llamacpp.missing_rows(tuple((f"decode throughput streams={n}", "tok/s") for n in STREAMS
                                            if n <= PEER_STREAMS))
    return rows


def _ttft_rows(llm, fp32_model: Transformer, hf, peer, device: str, sizes: _Sizes) -> list[Row]:
    """Time to first token (ms) of one prompt of each of :data:`TTFT_LENGTHS` tokens:
    the prompt's prefill and one new token, for the same four as :func:`_concurrency_rows`."""
    from llm_engine.bench import llamacpp

    fp32 = _fp32_engine(llm, fp32_model)
    rows: list[Row] = []
    for length in TTFT_LENGTHS:
        prompt = random_prompts(1, length, fp32_model.config.vocab_size, seed=11)
        fns = {name: (lambda e=e, p=prompt: _ours_generate(e, p, 1), None)
               for name, e in ((f"{OURS}-quantized", llm), (f"{OURS}-fp32", fp32))}
        if hf is not None:
            fns["hf-transformers"] = (lambda p=prompt: _hf_generate(hf, p, 1, 1), None)
        if peer is not None:
            fns[llamacpp.IMPL] = (lambda p=prompt: llamacpp.peer_generate(peer, p[0], 1), None)
        timings = _timed_in_turn(fns, device, sizes.repeats)
        ours = timings[f"{OURS}-quantized"][0]
        for name, (t, _) in timings.items():
            note = ("; ".join(f"{timings[k][0] / ours:.2f}x faster than {k}" for k in timings
                              if k != name) if name == f"{OURS}-quantized" else "")
            rows.append(Row(SUITE, f"time to first token prompt={length}", name, "ms", t * 1e3,
                            ms=t * 1e3, note=note, params={"prompt_len": length}))
    if peer is None:
        rows += llamacpp.missing_rows(tuple((f"time to first token prompt={n}", "ms")
                                            for n in TTFT_LENGTHS))
    return rows


def _bw_frac(tokens_per_s: float, weight_bytes: int, ceilings: Ceilings) -> float:
    """Weight bytes read per step × steps/s over the measured bandwidth."""
    return tokens_per_s * weight_bytes / (ceilings.bandwidth_gbps * 1e9)


def _throughput_rows(llm, hf, hf_note: str, device: str, sizes: _Sizes, ceilings: Ceilings,
                     backend: str) -> list[Row]:
    rows: list[Row] = []
    for ratio in (0.0, RANGE_RATIO):
        rows += _throughput_case(llm, hf, hf_note, device, sizes, ceilings, backend, ratio)
    return rows


def _throughput_case(llm, hf, hf_note: str, device: str, sizes: _Sizes, ceilings: Ceilings,
                     backend: str, ratio: float) -> list[Row]:
    model = llm.model
    vocab = model.config.vocab_size
    n, n_in, n_out = sizes.tp_requests, sizes.tp_in, sizes.tp_out
    in_lens = _lengths(n, n_in, ratio, seed=3)
    out_lens = _lengths(n, n_out, ratio, seed=4)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, vocab, size=k).tolist() for k in in_lens]
    case = f"throughput-{n}x{n_in}+{n_out}" + (f"-ratio{ratio:g}" if ratio else "")
    params = {"requests": n, "input_len": n_in, "output_len": n_out, "range_ratio": ratio,
              "hf_batch": sizes.hf_batch}
    n_output = sum(out_lens)
    flops = _flops(model, sum(in_lens), n_output)
    peak = ceilings.matmul_tflops * 1e12

    fns = {OURS: (lambda: _ours_generate(llm, prompts, out_lens),
                  lambda: _ours_generate(llm, prompts[:2], 2))}
    if hf is not None:
        fns["hf"] = (lambda: _hf_generate(hf, prompts, out_lens, sizes.hf_batch),
                     lambda: _hf_generate(hf, prompts[:2], 2, 2))
    timings = _timed_in_turn(fns, device, sizes.repeats)
    t, outs = timings[OURS]
    ours_tokens = [o.outputs[0].token_ids for o in outs]
    ttft = [o.metrics.ttft * 1e3 for o in outs]
    tpot = [o.metrics.tpot * 1e3 for o in outs if o.metrics.tpot is not None]
    pcts = {f"ttft_p{q}_ms": round(_pct(ttft, q), 2) for q in (50, 90, 99)}
    pcts.update({f"tpot_p{q}_ms": round(_pct(tpot, q), 2) for q in (50, 90, 99)})
    notes = [f"TTFT p50/p90/p99 {pcts['ttft_p50_ms']:.0f}/{pcts['ttft_p90_ms']:.0f}/"
             f"{pcts['ttft_p99_ms']:.0f} ms; TPOT p50/p90/p99 {pcts['tpot_p50_ms']:.1f}/"
             f"{pcts['tpot_p90_ms']:.1f}/{pcts['tpot_p99_ms']:.1f} ms", backend, hf_note]
    ours = Row(SUITE, case, OURS, "tok/s", n_output / t, ms=t * 1e3,
               ceiling_frac=flops / t / peak, params={**params, **pcts})
    rows = [ours]
    if hf is not None:
        hf_t, hf_tokens = timings["hf"]
        hf_note_row = f"generate() in static batches of {sizes.hf_batch}"
        if ratio:
            hf_note_row += " (left-padded; a batch runs until its longest request is done)"
        rows.append(Row(SUITE, case, "hf-transformers", "tok/s", n_output / hf_t,
                        ms=hf_t * 1e3, ceiling_frac=flops / hf_t / peak, rel_err=0.0,
                        note=hf_note_row, params=params))
        ours.rel_err = _mismatch(ours_tokens, hf_tokens)
        notes.append(f"{hf_t / t:.2f}x HF")
    ours.note = "; ".join(x for x in notes if x)
    return rows


def _prefill_rows(llm, hf, hf_note: str, device: str, sizes: _Sizes,
                  ceilings: Ceilings) -> list[Row]:
    model = llm.model
    n, length = 16, 1024
    prompts = random_prompts(n, length, model.config.vocab_size, seed=2)
    case = f"prefill-{n}x{length}"
    params = {"requests": n, "input_len": length}
    flops = _flops(model, n * length, 0)
    peak = ceilings.matmul_tflops * 1e12
    t, outs = _timed(lambda: _ours_generate(llm, prompts, 1), device, sizes.repeats)
    rows = [Row(SUITE, case, OURS, "tok/s", n * length / t, ms=t * 1e3,
                ceiling_frac=flops / t / peak, note="prompt tokens/s (one new token each)",
                params=params)]
    if hf is None:
        rows[0].note += f"; {hf_note}"
        return rows
    ids = torch.tensor(prompts, device=device)

    def hf_prefill():
        with torch.inference_mode():
            return hf(ids, logits_to_keep=1).logits[:, -1].argmax(-1).tolist()

    hf_t, hf_first = _timed(hf_prefill, device, sizes.repeats)
    ours_first = [[o.outputs[0].token_ids[0]] for o in outs]
    rows[0].rel_err = _mismatch(ours_first, [[t_] for t_ in hf_first])
    rows[0].note += f"; {hf_t / t:.2f}x HF"
    rows.append(Row(SUITE, case, "hf-transformers", "tok/s", n * length / hf_t, ms=hf_t * 1e3,
                    ceiling_frac=flops / hf_t / peak, rel_err=0.0, note="one forward, batch 16",
                    params=params))
    return rows


def _vllm_rows(llm, device: str, sizes: _Sizes) -> list[Row]:
    """vLLM on the same weights (saved as an HF directory), when vLLM is installed."""
    case = f"throughput-{sizes.tp_requests}x{sizes.tp_in}+{sizes.tp_out}"
    try:
        import vllm
    except ImportError:
        return [Row(SUITE, case, "vllm", "tok/s", None, note="vLLM is not installed")]
    hf = hf_from_ours(llm.model)
    prompts = random_prompts(sizes.tp_requests, sizes.tp_in, llm.model.config.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        llm.tokenizer.save(tmp)
        engine = vllm.LLM(model=tmp, dtype="bfloat16", gpu_memory_utilization=0.3,
                          enable_prefix_caching=False)
        params = vllm.SamplingParams(temperature=0, max_tokens=sizes.tp_out, ignore_eos=True)
        inputs = [{"prompt_token_ids": p} for p in prompts]

        def go():
            return engine.generate(inputs, params, use_tqdm=False)

        t, _ = _timed(go, device, sizes.repeats)
    rate = sizes.tp_requests * sizes.tp_out / t
    return [Row(SUITE, case, "vllm", "tok/s", rate, ms=t * 1e3, rel_err=None,
                note=f"vLLM {vllm.__version__}, same weights, prefix caching off",
                params={"requests": sizes.tp_requests})]

