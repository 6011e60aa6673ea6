"""The ``llm-engine`` command: generate, chat, serve, train, bench, profile-kernel, backends."""

from __future__ import annotations

import argparse
import sys
import time

from llm_engine.backends import add_backend_arg, apply_backend_args
from llm_engine.engine.config import (
    DTYPES,
    add_engine_args,
    add_quantization_arg,
    engine_config_from_args,
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` and the engine's options; these commands run one sequence at a time."""
    p.add_argument("--model", default="smollm2", help="model name, .gguf file or checkpoint dir")
    add_engine_args(p, max_num_seqs=1)
    add_quantization_arg(p)
    add_backend_arg(p)


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 means off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and print the result")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the chat template")
    _add_model_args(gen)
    _add_sampling_args(gen, max_tokens=128)

    chat = sub.add_parser("chat", help="interactive chat; streams tokens as they come")
    chat.add_argument("--system", default=None, help="system prompt")
    _add_model_args(chat)
    _add_sampling_args(chat, max_tokens=512)

    backends = sub.add_parser("backends", help="list every op's implementations: which are "
                              "eligible on this machine and which runs")
    backends.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    backends.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                          help="default: bfloat16 on CUDA, float32 on CPU")
    add_backend_arg(backends)

    from llm_engine.bench.cli import add_bench_parsers
    from llm_engine.server.cli import add_serve_parser
    from llm_engine.training.cli import add_train_parser

    add_train_parser(sub)
    add_bench_parsers(sub)
    add_serve_parser(sub)
    return parser


def _load(args: argparse.Namespace):
    from llm_engine import LLM

    config = engine_config_from_args(args)
    apply_backend_args(args.backend)
    return LLM(model=args.model, config=config, quantization=args.quantization)


def _params(args: argparse.Namespace):
    from llm_engine import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          min_p=args.min_p, max_tokens=args.max_tokens, seed=args.seed)


def _backend_line(llm) -> str:
    from llm_engine import ops

    settings = ops.registry().settings()
    forced = [f"{k}={v}" for k, v in settings.forced.items()]
    if settings.shorthand:
        forced.insert(0, f"all={settings.shorthand}")
    return f"device {llm.device}, dtype {str(llm.dtype).removeprefix('torch.')}, " \
           f"ops: {', '.join(forced) if forced else 'default choice'}"


def _speed_line(out, load_s: float) -> str:
    """Load time, time to first token (prompt included) and decode speed, apart."""
    m = out.metrics
    n = len(out.outputs[0].token_ids)
    decode = f"decode {1 / m.tpot:.1f} tokens/s" if m.tpot else "decode: under 2 tokens"
    return (f"{n} tokens; load {load_s:.2f} s, first token {m.ttft:.2f} s "
            f"({m.num_prompt_tokens}-token prompt), {decode}")


def cmd_generate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    llm = _load(args)
    load_s = time.perf_counter() - start
    params = _params(args)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate([args.prompt], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    print(completion.text)
    print(f"\n[{_speed_line(out, load_s)}; finish: {completion.finish_reason}; "
          f"{_backend_line(llm)}]", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = _params(args)
    print(f"[{_backend_line(llm)}] type /reset to start over, /exit or Ctrl-D to quit",
          file=sys.stderr)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    system = list(history)
    while True:
        try:
            user = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            history = list(system)
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        prompt = llm.tokenizer.apply_chat_template(history, add_generation_prompt=True)
        pieces: list[str] = []
        try:
            for delta in llm.stream(prompt, params):
                pieces.append(delta)
                print(delta, end="", flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        print()
        history.append({"role": "assistant", "content": "".join(pieces)})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "chat":
            return cmd_chat(args)
        if args.command == "backends":
            from llm_engine.backends import backends_table

            apply_backend_args(args.backend)
            print(backends_table(args.device, DTYPES[args.dtype] if args.dtype else None))
            return 0
        if args.command == "serve":
            from llm_engine.server.cli import handle
        elif args.command == "train":
            from llm_engine.training.cli import handle
        else:
            from llm_engine.bench.cli import handle
        return handle(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"llm-engine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
