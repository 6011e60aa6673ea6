"""The CLI's shared engine options and its summary line."""

import torch

from llm_engine.cli import _speed_line, build_parser, main
from llm_engine.engine.config import EngineConfig, engine_config_from_args
from llm_engine.engine.sequence import CompletionOutput, RequestMetrics, RequestOutput


def test_generate_and_chat_build_the_same_engine_config():
    flags = ["--dtype", "fp32", "--max-model-len", "512", "--kv-cache-memory", "4096",
             "--no-prefix-caching", "--enforce-eager"]
    gen = engine_config_from_args(build_parser().parse_args(["generate", "hi", *flags]))
    chat = engine_config_from_args(build_parser().parse_args(["chat", *flags]))
    assert gen == chat == EngineConfig(dtype=torch.float32, max_num_seqs=1, max_model_len=512,
                                       kv_cache_memory=4096, enable_prefix_caching=False,
                                       enforce_eager=True)


def test_a_bad_engine_option_is_an_error_naming_it(capsys):
    assert main(["generate", "hi", "--max-num-seqs", "0"]) == 2
    assert "max_num_seqs must be a positive int" in capsys.readouterr().err


def test_speed_line_gives_load_first_token_and_decode_apart():
    metrics = RequestMetrics(arrival_time=10.0, first_token_time=10.5, finished_time=12.5,
                             num_prompt_tokens=42, num_output_tokens=9)
    out = RequestOutput("0", "hi", [1] * 42, 0, [CompletionOutput(0, "x", [5] * 9, "length")],
                        True, metrics)
    assert _speed_line(out, 3.25) == ("9 tokens; load 3.25 s, first token 0.50 s "
                                      "(42-token prompt), decode 4.0 tokens/s")
