"""llama.cpp as a peer of the generate suite: the same GGUF file, the same thread count.

Used when ``llama_cpp`` (llama-cpp-python) is importable; otherwise each case gets one
row with no value whose note gives the install command. Ours runs the file's quantized
weights (``quantization="auto"``); the runs of ours and llama.cpp take turns.

Cases
- ``decode-bs1``: greedy decode tokens/s, ``(new - 1) / (t(new) - t(1))`` for both.
- ``prefill-1000``: a 1,000-token prompt, prompt tokens/s (ours: the prompt and one
  new token; llama.cpp: ``eval`` of the prompt). Ours twice: by default (fp32
  activations: the dequantized model's results) and with ``quantized_linear=int8``
  forced (activations rounded to int8 as llama.cpp rounds them).
- ``peak-rss``: peak resident memory (MB, the kernel's ``VmHWM``: ``ru_maxrss`` would
  count the forked parent's pages) of a fresh process that loads the model and decodes
  16 tokens, for each, measured in subprocesses.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

from llm_engine.bench.common import OURS, Ceilings, Row

SUITE = "generate"
IMPL = "llama.cpp"
INSTALL = "pip install llama-cpp-python"
_RSS_SCRIPT = r"""
import json, sys
impl, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
if impl == "ours":
    import torch
    torch.set_num_threads(threads)
    from llm_engine import LLM, SamplingParams
    llm = LLM(path, device="cpu", max_num_seqs=1)
    llm.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=16,
                 ignore_eos=True), use_tqdm=False)
else:
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_threads=threads, n_ctx=2048, verbose=False)
    llm("Hello, my name is", max_tokens=16, temperature=0)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps(int(status["VmHWM"].split()[0]) * 1024))
"""


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _peak_rss(impl: str, path: str, threads: int) -> float:
    # A user's process: without the TRITON_INTERPRET=1 that `bench` sets on CPU for the
    # kernel suites (with it, importing our kernels imports Triton).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, impl, path, str(threads)],
                         capture_output=True, text=True, check=True, timeout=900, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1]) / 1e6


def open_peer(gguf_path: str, threads: int):
    """llama.cpp's ``Llama`` on ``gguf_path`` with ``threads`` threads, or None when
    llama-cpp-python is not installed."""
    if not available():
        return None
    from llama_cpp import Llama

    return Llama(model_path=gguf_path, n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                 n_batch=1024, verbose=False)


def peer_generate(peer, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``ids`` (a fresh context)."""
    peer.reset()
    out = []
    for tok in peer.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(tok)
        if len(out) == n:
            break
    return out


def missing_rows(cases: tuple[tuple[str, str], ...]) -> list[Row]:
    """One valueless row per ``(case, metric)`` whose note says how to install the peer."""
    note = f"llama-cpp-python is not installed; install it with: {INSTALL}"
    return [Row(SUITE, case, IMPL, metric, None, note=note) for case, metric in cases]


def rows(llm, peer, gguf_path: str, prompt_ids: list[int], new: int, repeats: int,
         ceilings: Ceilings) -> list[Row]:
    """Rows of ours (``llm``, loaded from ``gguf_path``) against llama.cpp (``peer``, from
    :func:`open_peer`; None: not installed) on that file."""
    from llm_engine import SamplingParams, ops

    threads = torch.get_num_threads()
    if peer is None:
        return missing_rows((("decode-bs1", "tok/s"), ("prefill-1000", "tok/s"),
                             ("peak-rss", "MB")))
    import llama_cpp

    def ours_gen(n: int, ids: list[int]):
        p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        return llm.generate([ids], p, use_tqdm=False)[0].outputs[0].token_ids

    def peer_gen(n: int, ids: list[int]):
        return peer_generate(peer, ids, n)

    ours_gen(2, prompt_ids)
    peer_gen(2, prompt_ids)
    times = {}
    for n in (1, new):
        for name, fn in ((OURS, ours_gen), (IMPL, peer_gen)):
            times[name, n] = _best(lambda fn=fn, n=n: fn(n, prompt_ids), repeats)
    # A machine busy with other work can make t(1) no shorter than t(new): no rate then.
    rate = {k: (new - 1) / (times[k, new] - times[k, 1]) if times[k, new] > times[k, 1]
            else float("nan") for k in (OURS, IMPL)}
    same = ours_gen(new, prompt_ids) == peer_gen(new, prompt_ids)
    version = getattr(llama_cpp, "__version__", "?")
    weight_bytes = sum(b.numel() for b in llm.model.buffers()) + sum(
        p.numel() * p.element_size() for p in llm.model.parameters())

    def bw(tok_s: float) -> float:
        return tok_s * weight_bytes / (ceilings.bandwidth_gbps * 1e9)

    ratio = rate[OURS] / rate[IMPL]
    params = {"batch": 1, "new_tokens": new, "prompt_tokens": len(prompt_ids), "threads": threads}
    out = [
        Row(SUITE, "decode-bs1", f"{OURS}-quantized", "tok/s", rate[OURS],
            ms=times[OURS, new] * 1e3, ceiling_frac=bw(rate[OURS]),
            note=(f"{ratio:.2f}x llama.cpp" if math.isfinite(ratio)
                  else "no rate: t(1) >= t(new) on a busy machine")
            + f"; same greedy tokens: {same}",
            params=params),
        Row(SUITE, "decode-bs1", IMPL, "tok/s", rate[IMPL], ms=times[IMPL, new] * 1e3,
            ceiling_frac=bw(rate[IMPL]), note=f"llama-cpp-python {version}, same file",
            params=params),
    ]
    long_ids = np.random.default_rng(5).integers(100, llm.model.config.vocab_size,
                                                 size=1000).tolist()

    def peer_prefill():
        peer.reset()
        peer.eval(long_ids)

    def ours_int8_prefill():
        with ops.use(quantized_linear="int8"):
            return ours_gen(1, long_ids)

    int8 = f"{OURS}-quantized-int8"
    ours_int8_prefill()
    t = {OURS: float("inf"), int8: float("inf"), IMPL: float("inf")}
    for _ in range(repeats):
        t[OURS] = min(t[OURS], _best(lambda: ours_gen(1, long_ids), 1))
        t[int8] = min(t[int8], _best(ours_int8_prefill, 1))
        t[IMPL] = min(t[IMPL], _best(peer_prefill, 1))
    params = {"input_len": 1000, "threads": threads}
    out += [
        Row(SUITE, "prefill-1000", f"{OURS}-quantized", "tok/s", 1000 / t[OURS], ms=t[OURS] * 1e3,
            note=f"{t[IMPL] / t[OURS]:.2f}x llama.cpp (prompt tokens/s); fp32 activations, "
                 "the default", params=params),
        Row(SUITE, "prefill-1000", int8, "tok/s", 1000 / t[int8], ms=t[int8] * 1e3,
            note=f"{t[IMPL] / t[int8]:.2f}x llama.cpp; --backend quantized_linear=int8: "
                 "activations rounded to int8 as llama.cpp does", params=params),
        Row(SUITE, "prefill-1000", IMPL, "tok/s", 1000 / t[IMPL], ms=t[IMPL] * 1e3,
            note=f"eval() of the prompt, n_batch 1024, llama-cpp-python {version}",
            params=params),
    ]
    rss = {name: _peak_rss(name, gguf_path, threads) for name in ("ours", "llama.cpp")}
    out += [
        Row(SUITE, "peak-rss", f"{OURS}-quantized", "MB", rss["ours"],
            note=f"{rss['ours'] / rss['llama.cpp']:.2f}x llama.cpp; fresh process, load + "
                 "16 tokens", params={"threads": threads}),
        Row(SUITE, "peak-rss", IMPL, "MB", rss["llama.cpp"], note="fresh process, n_ctx 2048",
            params={"threads": threads}),
    ]
    return out
