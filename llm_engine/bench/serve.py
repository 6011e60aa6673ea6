"""Serving: ``llm-engine serve`` under load, in the manner of vLLM's serving benchmark.

Our server (a subprocess running ``llm-engine serve --model smollm2``) gets
streaming ``/v1/completions`` requests from an asyncio load generator: random-word
prompts of about ``prompt_words`` words, ``max_tokens`` new tokens each, greedy.
Two kinds of case:

- ``concurrency=C``: C clients, each sending its next request when the last one
  ends (a fixed number of requests in flight);
- ``rate=R/s``: requests arrive as a Poisson process of R per second (seeded), however
  many are then in flight.

``value``: output tokens per second over the case's wall time (tokens counted by
tokenizing each completion's text with the model's tokenizer, as vLLM does when a
server reports no usage). ``note`` and ``params`` carry the request throughput and
the TTFT, TPOT (time per output token after the first) and ITL (gap between
streamed chunks) percentiles in milliseconds.

Peer: llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server`` from
``llama-cpp-python[server]``) on the very same GGUF file, when it is installed;
ours and its cases take turns. Both servers get the same thread count and the same
context length (``--n_ctx`` there, ``--max-model-len`` here). llama-cpp-python's server
has one llama.cpp context and serves one request at a time (it has no parallel slots,
unlike llama.cpp's C++ ``llama-server``), so concurrent requests queue behind its
lock; it runs with ``--interrupt_requests False`` (by default a waiting request cuts
the stream in progress short) and its requests carry a ``logit_bias`` of -100 on the
tokenizer's special tokens, so that, like ours with ``ignore_eos``, it always
generates ``max_tokens`` tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from llm_engine.bench.common import OURS, Ceilings, Row

SUITE = "serve"
PEER = "llama.cpp"
PEER_INSTALL = "pip install 'llama-cpp-python[server]'"
_PEER_MODULES = ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context",
                 "pydantic_settings")
"""What ``python -m llama_cpp.server`` imports beyond the base package."""
CONTEXT_LEN = 2048
"""Tokens of context on both servers (requests use well under it)."""
_WORDS = ("time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part",
          "child", "eye", "woman", "place", "work", "week", "case", "point", "government",
          "company", "number", "group", "problem", "fact", "river", "light", "music", "story",
          "table", "window", "garden", "summer", "winter", "morning", "evening", "city", "country",
          "road")


@dataclass
class _Sizes:
    concurrency: tuple[int, ...]
    rates: tuple[float, ...]
    rate_requests: int
    prompt_words: int
    max_tokens: int


def _sizes(quick: bool) -> _Sizes:
    if quick:
        return _Sizes((1, 4), (2.0,), 4, 16, 8)
    return _Sizes((1, 4, 16), (2.0,), 12, 32, 32)


def _requests_for(concurrency: int) -> int:
    return max(4, 2 * concurrency)


@dataclass
class _Result:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    text: str = ""
    gaps: tuple[float, ...] = ()
    error: str = ""


class _Server:
    """A server subprocess on a free loopback port, up once ``/health`` (or
    ``/v1/models``) answers."""

    def __init__(self, name: str, argv: list[str], model: str, port: int,
                 env: dict[str, str] | None = None, extra: dict | None = None) -> None:
        self.name = name
        self.model = model
        self.extra = extra or {}  # fields added to every request body
        self.url = f"http://127.0.0.1:{port}"
        # A file, not a pipe: a pipe nobody reads could fill up and block the server.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop)
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-800:]

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} server did not come up in {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(count: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(words)) for _ in range(count)]


async def _one(http, server: _Server, prompt: str, max_tokens: int) -> _Result:
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, **server.extra}
    start = time.perf_counter()
    last, first, pieces, gaps = start, None, [], []
    try:
        async with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return _Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or []
                text = choices[0].get("text", "") if choices else ""
                if not text:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                pieces.append(text)
    except Exception as e:  # a failed request is counted, not fatal
        return _Result(False, error=f"{type(e).__name__}: {e}")
    if first is None:
        return _Result(False, error="no tokens")
    return _Result(True, first - start, last - start, "".join(pieces), tuple(gaps))


async def _run_case(server: _Server, prompts: list[str], max_tokens: int,
                    concurrency: int | None, rate: float | None, seed: int
                    ) -> tuple[list[_Result], float]:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        if concurrency is not None:
            queue = list(prompts)
            results: list[_Result] = []

            async def client() -> None:
                while queue:
                    results.append(await _one(http, server, queue.pop(), max_tokens))

            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:
            rng = np.random.default_rng(seed)
            tasks = []
            for p in prompts:
                tasks.append(asyncio.create_task(_one(http, server, p, max_tokens)))
                await asyncio.sleep(float(rng.exponential(1.0 / rate)))
            results = list(await asyncio.gather(*tasks))
        return results, time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


def _row(impl: str, case: str, params: dict, results: list[_Result], wall: float,
         tokenizer) -> Row:
    good = [r for r in results if r.ok]
    failed = len(results) - len(good)
    if not good:
        return Row(suite=SUITE, case=case, impl=impl, metric="tok/s", value=None,
                   note=f"every request failed: {results[0].error if results else 'none sent'}",
                   params=params)
    out_tokens = [len(tokenizer.encode(r.text)) for r in good]
    tpot = [(r.latency - r.ttft) / (n - 1) for r, n in zip(good, out_tokens, strict=True)
            if n > 1]
    ttft = [r.ttft for r in good]
    itl = [g for r in good for g in r.gaps]
    figures = {
        "req_per_s": len(good) / wall, "ttft_p50_ms": _pct(ttft, 50), "ttft_p90_ms": _pct(ttft, 90),
        "ttft_p99_ms": _pct(ttft, 99), "tpot_p50_ms": _pct(tpot, 50), "tpot_p90_ms": _pct(tpot, 90),
        "itl_p50_ms": _pct(itl, 50), "itl_p90_ms": _pct(itl, 90), "itl_p99_ms": _pct(itl, 99),
        "output_tokens": sum(out_tokens), "requests": len(results), "failed": failed,
    }
    note = (f"{figures['req_per_s']:.2f} req/s; TTFT p50/p90/p99 {figures['ttft_p50_ms']:.0f}/"
            f"{figures['ttft_p90_ms']:.0f}/{figures['ttft_p99_ms']:.0f} ms; TPOT p50/p90 "
            f"{figures['tpot_p50_ms']:.1f}/{figures['tpot_p90_ms']:.1f} ms; ITL p50/p90/p99 "
            f"{figures['itl_p50_ms']:.1f}/{figures['itl_p90_ms']:.1f}/"
            f"{figures['itl_p99_ms']:.1f} ms")
    if failed:
        note += f"; {failed} of {len(results)} requests failed ({results[0].error or 'see log'})"
    return Row(suite=SUITE, case=case, impl=impl, metric="tok/s", value=sum(out_tokens) / wall,
               ms=wall * 1e3, note=note, params={**params, **figures})


def _gguf_path() -> str:
    from llm_engine.loader import KNOWN_MODELS, _known_model_file

    return _known_model_file(next(iter(KNOWN_MODELS)))


def _peer_missing() -> list[str]:
    """The modules llama.cpp's server needs that are not installed."""
    return [m for m in _PEER_MODULES if importlib.util.find_spec(m) is None]


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)


def _start_peer(tokenizer, threads: int) -> _Server:
    """llama-cpp-python's server on the SmolLM2 GGUF (see the module docstring)."""
    path = _gguf_path()
    port = _free_port()
    special = sorted(i for i, t in tokenizer.hf.get_added_tokens_decoder().items() if t.special)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in special:
        special.append(tokenizer.eos_token_id)
    config = {"n_ctx": CONTEXT_LEN, "n_threads": threads, "n_threads_batch": threads,
              "n_batch": 512, "interrupt_requests": False}
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", path, "--host", "127.0.0.1",
            "--port", str(port), "--verbose", "False"]
    for name, value in config.items():
        argv += [f"--{name}", str(value)]
    return _Server(PEER, argv, path, port,
                   extra={"logit_bias": {str(i): -100.0 for i in special}},
                   env={"OMP_NUM_THREADS": str(threads)})


def iter_rows(device: str, quick: bool, ceilings: Ceilings) -> Iterator[Row]:
    from llm_engine.loader import load_model

    sizes = _sizes(quick)
    tokenizer = load_model("smollm2", device="cpu")[1]
    threads = _threads()
    servers: list[_Server] = []
    try:
        port = _free_port()
        ours = _Server(OURS, [sys.executable, "-m", "llm_engine.cli", "serve", "--model",
                              "smollm2", "--port", str(port), "--device", device,
                              "--log-level", "warning", "--max-waiting", "1024",
                              "--max-model-len", str(CONTEXT_LEN)],
                       "smollm2", port, env={"OMP_NUM_THREADS": str(threads)},
                       extra={"ignore_eos": True})
        servers.append(ours)
        peer = None
        peer_note = ""
        missing = _peer_missing()
        if not missing:
            peer = _start_peer(tokenizer, threads)
            servers.append(peer)
        else:
            peer_note = (f"llama.cpp peer not run: {', '.join(missing)} not installed "
                         f"({PEER_INSTALL})")
        ours.wait_ready()
        if peer is not None:
            try:
                peer.wait_ready()
            except RuntimeError as e:
                peer_note, peer = f"llama.cpp peer not run: {e}", None
        if peer_note:
            print(peer_note, file=sys.stderr)
            yield Row(suite=SUITE, case="(peer)", impl=PEER, metric="tok/s", value=None,
                      note=peer_note)
        cases = [(f"concurrency={c}", {"concurrency": c}, c, None, _requests_for(c))
                 for c in sizes.concurrency]
        cases += [(f"rate={r:g}/s", {"request_rate": r}, None, r, sizes.rate_requests)
                  for r in sizes.rates]
        active = (ours, peer) if peer is not None else (ours,)
        for server in active:  # warm-up: first requests pay for one-time setup
            asyncio.run(_run_case(server, _prompts(2, sizes.prompt_words, seed=-1),
                                  sizes.max_tokens, 2, None, 0))
        shared = {"max_tokens": sizes.max_tokens, "prompt_words": sizes.prompt_words,
                  "threads": threads, "context": CONTEXT_LEN}
        for i, (case, params, concurrency, rate, count) in enumerate(cases):
            prompts = _prompts(count, sizes.prompt_words, seed=i)
            for server in active:
                results, wall = asyncio.run(_run_case(server, prompts, sizes.max_tokens,
                                                      concurrency, rate, seed=i))
                row = _row(server.name, case, {**params, **shared}, results, wall, tokenizer)
                if server is peer:
                    row.note += "; one request at a time (llama-cpp-python server)"
                yield row
    finally:
        for server in servers:
            server.stop()
