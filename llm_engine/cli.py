"""The ``llm-engine`` command: generate, chat, train, bench, profile-kernel, backends."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from llm_engine.backends import add_backend_arg, apply_backend_args

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="model name, .gguf file or checkpoint dir")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--quantization", default="auto",
                   choices=["auto", "none", "q8_0", "q4_0", "q4_1"],
                   help="auto: a GGUF file's weights stay in their quantized types on the CPU; "
                        "none: full precision; q8_0/q4_0/q4_1: quantize at load")
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
    from llm_engine.training.cli import add_train_parser

    add_train_parser(sub)
    add_bench_parsers(sub)
    return parser


def _load(args: argparse.Namespace):
    from llm_engine import LLM

    dtype = DTYPES[args.dtype] if args.dtype else None
    apply_backend_args(args.backend)
    return LLM(model=args.model, device=args.device, dtype=dtype,
               quantization=args.quantization)


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


def cmd_generate(args: argparse.Namespace) -> int:
    llm = _load(args)
    params = _params(args)
    start = time.perf_counter()
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate([args.prompt], params, use_tqdm=False)[0]
    elapsed = time.perf_counter() - start
    completion = out.outputs[0]
    print(completion.text)
    n = len(completion.token_ids)
    print(f"\n[{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tokens/s; "
          f"finish: {completion.finish_reason}; {_backend_line(llm)}]", file=sys.stderr)
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
        if args.command == "train":
            from llm_engine.training.cli import handle
        else:
            from llm_engine.bench.cli import handle
        return handle(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"llm-engine: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
