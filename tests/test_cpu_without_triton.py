"""CPU inference and training never import Triton.

No Triton kernel runs on CPU (the ops registry picks the C++, oneDNN and PyTorch
implementations there), and importing Triton costs a CPU process start-up time and
memory (its shared library alone is tens of MB of resident memory). The steps run in a
fresh interpreter without ``TRITON_INTERPRET`` (which the test session sets, and under
which the kernels package does import Triton), checking ``sys.modules`` after each.

Training stops at the loss's backward: torch's own optimizers import ``torch._dynamo``
(``Optimizer.add_param_group`` is wrapped by ``torch._disable_dynamo``), which imports
Triton whenever it is installed, whatever this package does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import contextlib
    import importlib.util
    import io
    import json
    import sys
    import tempfile

    imported = {}

    def check(step):
        imported[step] = sorted(m for m in ("triton", "torch._dynamo") if m in sys.modules)

    import llm_engine
    check("import llm_engine")
    from llm_engine import LLM, SamplingParams
    check("from llm_engine import LLM")

    import torch

    from llm_engine.config import ModelConfig
    from llm_engine.loader import save_pretrained
    from llm_engine.model import Transformer
    from llm_engine.training import data as data_lib
    from llm_engine.training.trainer import LossModule

    torch.manual_seed(0)
    tokenizer = data_lib.train_tokenizer(["hello world, hello there; the cat sat"], 300)
    shape = dict(arch="llama", vocab_size=320, hidden_size=32, num_layers=2, num_heads=4,
                 num_kv_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = Transformer(ModelConfig(**shape)).eval()
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=4, seed=1,
                             ignore_eos=True)
    llm = LLM.from_modules(model, tokenizer, kv_cache_memory=1 << 20)
    llm.generate(["hello world", "the cat"], [greedy, sampled], use_tqdm=False)
    check("generate (LLM.from_modules)")

    with tempfile.TemporaryDirectory() as out:
        save_pretrained(model, tokenizer, out)
        for quantization in ("none", "q8_0"):
            loaded = LLM(out, device="cpu", quantization=quantization, kv_cache_memory=1 << 20)
            loaded.generate(["hello world"], greedy, use_tqdm=False)
            check(f"load and generate (quantization={quantization})")

        if importlib.util.find_spec("fastapi") is not None:
            from llm_engine.server.app import build_app

            build_app(llm.engine)
            check("server app")

    windows = torch.randint(0, 300, (2, 17))
    loss = LossModule(Transformer(ModelConfig(**shape)))(windows[:, :-1], windows[:, 1:])
    loss.backward()
    check("training forward and backward")

    from llm_engine import cli

    with contextlib.redirect_stdout(io.StringIO()):
        cli.main(["backends"])
    check("llm-engine backends")
    print(json.dumps(imported))
""")


def test_cpu_inference_and_training_never_import_triton():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported, "the script checked nothing"
    loaded = {step: modules for step, modules in imported.items() if modules}
    assert not loaded, f"steps after which these modules were imported: {loaded}"
