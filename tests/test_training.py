"""Training API: data pipeline, schedule, resume, checkpoints, torchrun, SFT masks, CLI."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from testing_utils import interpreter_or_cuda, require_default_model

from llm_engine import ops
from llm_engine.config import ModelConfig
from llm_engine.model import Transformer
from llm_engine.training import checkpoint as ckpt_lib
from llm_engine.training import data as data_lib
from llm_engine.training.cli import add_train_parser, handle
from llm_engine.training.trainer import (
    TrainConfig,
    Trainer,
    WarmupCosine,
    param_groups,
)

TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "import os\nprint(os.path.join('a', 'b'))\n"
) * 3
TINY_MODEL = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  intermediate_size=64, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tokenizer():
    return data_lib.train_tokenizer([TEXT, "Hello! How are you? I am fine, thanks."], 300)


def _model(vocab: int = 320, arch: str = "llama", **shape: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(arch=arch, vocab_size=vocab, **{**TINY_MODEL, **shape}))


def _windows(n_tokens: int = 4000, vocab: int = 300, seq_len: int = 16, seed: int = 0):
    """A token stream with structure to learn: a random walk over a small vocabulary."""
    rng = np.random.default_rng(seed)
    tokens = np.cumsum(rng.integers(1, 4, size=n_tokens)) % vocab
    return data_lib.TokenWindows(tokens.astype(np.uint16), seq_len)


def _trainer(tmp_path: Path, tokenizer, steps: int = 6, **overrides) -> Trainer:
    settings = dict(batch_size=4, seq_len=16, lr=1e-2, warmup_steps=2, eval_every=0,
                    ckpt_every=0, eval_examples=8, num_samples=0, log_every=1, progress=False)
    cfg = TrainConfig(out_dir=str(tmp_path), steps=steps, **{**settings, **overrides})
    return Trainer(cfg, _model(), tokenizer, _windows(), _windows(seed=1), device="cpu")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# -- schedule, optimizer groups --------------------------------------------------------------

def test_warmup_cosine_rises_linearly_then_decays_to_min_ratio():
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_weight_decay_only_on_matrices_not_norms_biases_or_embeddings():
    model = _model(arch="gpt2")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "embed_tokens.weight" in kept and "embed_positions.weight" in kept
    assert all(model.get_parameter(n).dim() >= 2 for n in decayed)
    assert not any("embed" in n for n in decayed)
    assert any(n.endswith("bias") for n in kept) and any("norm" in n for n in kept)
    assert len(decayed) + len(kept) == len(list(model.parameters()))


# -- data --------------------------------------------------------------------------------------

def test_stdlib_corpus_is_found_and_capped():
    files = data_lib.stdlib_files(max_bytes=200_000)
    assert files and all(f.suffix == ".py" for f in files)
    assert sum(f.stat().st_size for f in files) <= 200_000
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)


def test_token_dtype_is_uint16_when_the_vocab_fits():
    assert data_lib.token_dtype(49152) == np.uint16
    assert data_lib.token_dtype(65536) == np.uint16
    assert data_lib.token_dtype(65537) == np.uint32


def test_shards_hold_every_document_and_are_reused(tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = {f"doc{i}.txt": f"# document {i}\n" + TEXT[i * 7:] for i in range(40)}
    for name, text in docs.items():
        (corpus / name).write_text(text)
    files = data_lib.text_files(corpus)
    shards = data_lib.build_shards(files, tokenizer, tmp_path / "shards", val_fraction=0.2,
                                   progress=False)
    assert shards.train.dtype == np.uint16 and len(shards.val) > 0
    eos = tokenizer.eos_token_id
    n_docs = int((shards.train == eos).sum() + (shards.val == eos).sum())
    assert n_docs == len(docs)
    decoded = tokenizer.decode(np.concatenate([shards.train, shards.val]).tolist())
    for text in docs.values():
        assert text in decoded
    mtime = (tmp_path / "shards" / "train.bin").stat().st_mtime_ns
    again = data_lib.build_shards(files, tokenizer, tmp_path / "shards", val_fraction=0.2,
                                  progress=False)
    assert (tmp_path / "shards" / "train.bin").stat().st_mtime_ns == mtime
    assert np.array_equal(again.train, shards.train)


def test_windows_are_contiguous_with_next_token_targets():
    tokens = np.arange(100, dtype=np.uint16)
    windows = data_lib.TokenWindows(tokens, seq_len=8)
    inputs, targets = windows.get(np.array([0, 50, 91]))
    assert inputs.dtype == torch.int64 and inputs.shape == (3, 8)
    assert torch.equal(inputs[1], torch.arange(50, 58))
    assert torch.equal(targets, inputs + 1)
    assert windows.num_choices == 92


def test_ranks_and_micro_steps_partition_the_global_batch():
    indices = data_lib.global_batch_indices(seed=3, step=7, global_batch=24, num_choices=10_000)
    assert np.array_equal(indices, data_lib.global_batch_indices(3, 7, 24, 10_000))
    assert not np.array_equal(indices, data_lib.global_batch_indices(3, 8, 24, 10_000))
    parts = [data_lib.micro_batch_indices(indices, m, 3, r, 2) for m in range(3) for r in range(2)]
    assert all(len(p) == 4 for p in parts)
    assert np.array_equal(np.concatenate(parts), indices)


def test_sft_loss_mask_covers_only_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "def add(a, b):"},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "I am fine"},
    ]
    ids, mask = data_lib.encode_chat(tokenizer, messages)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert ids == tokenizer.encode(text)
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m],
                               skip_special_tokens=False)
    assert trained == "def add(a, b):<|im_end|>\nI am fine<|im_end|>\n"

    examples = data_lib.build_sft_examples([messages], tokenizer, seq_len=len(ids) + 5)
    inputs, targets = examples.get(np.array([0]))
    n = len(ids) - 1
    assert torch.equal(inputs[0, :n], torch.tensor(ids[:-1]))
    kept = targets[0][targets[0] != data_lib.IGNORE_INDEX].tolist()
    assert kept == [i for i, m in zip(ids[1:], mask[1:], strict=True) if m]
    assert (targets[0, n:] == data_lib.IGNORE_INDEX).all()


def test_chat_jsonl_without_messages_is_rejected(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        data_lib.read_chat_jsonl(path)


# -- training loop, resume, checkpoints -------------------------------------------------------

def test_fused_and_plain_loss_agree_on_a_step(tmp_path, tokenizer):
    fused = _trainer(tmp_path / "a", tokenizer, fused_loss=True).train_step()
    plain = _trainer(tmp_path / "b", tokenizer, fused_loss=False).train_step()
    assert fused["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert fused["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)


def test_steps_on_the_triton_kernels_match_the_torch_ops(tmp_path, tokenizer):
    """Three optimizer steps with every op on its Triton kernel (the interpreter on CPU),
    the fused loss's row kernel included, against the same steps on the PyTorch ops."""
    device = interpreter_or_cuda()
    losses = {}
    for backend in ("torch", "triton"):
        cfg = TrainConfig(out_dir=str(tmp_path / backend), steps=3, batch_size=2, seq_len=16,
                          lr=1e-2, warmup_steps=1, num_samples=0, progress=False,
                          autocast=False, device=device)
        model = _model(vocab=256, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
        trainer = Trainer(cfg, model, tokenizer, _windows(vocab=256), _windows(vocab=256),
                          device=device)
        with ops.use(backend):
            losses[backend] = [trainer.train_step()["loss"] for _ in range(3)]
    np.testing.assert_allclose(losses["triton"], losses["torch"], rtol=1e-5)


def test_activation_checkpointing_gives_the_same_step(tmp_path, tokenizer):
    plain = _trainer(tmp_path / "a", tokenizer)
    recomputed = _trainer(tmp_path / "b", tokenizer, gradient_checkpointing=True)
    assert recomputed.model.gradient_checkpointing
    a, b = plain.train_step(), recomputed.train_step()
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for (name, p), q in zip(plain.model.named_parameters(), recomputed.model.parameters(),
                            strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_from_checkpoint_is_bitwise_identical(tmp_path, tokenizer):
    straight = _trainer(tmp_path / "straight", tokenizer, grad_accum=2)
    for _ in range(6):
        straight.train_step()

    first = _trainer(tmp_path / "split", tokenizer, grad_accum=2)
    for _ in range(3):
        first.train_step()
    first.save()
    resumed = _trainer(tmp_path / "split", tokenizer, grad_accum=2)
    resumed.model.reset_parameters()
    assert resumed.resume()
    assert resumed.step == 3
    for _ in range(3):
        resumed.train_step()
    _assert_bitwise_equal(_state(straight.model), _state(resumed.model))
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


def test_resume_takes_the_schedule_from_the_new_config(tmp_path, tokenizer):
    first = _trainer(tmp_path, tokenizer, steps=4)
    for _ in range(4):
        first.train_step()
    first.save()
    longer = _trainer(tmp_path, tokenizer, steps=20, lr=5e-3)
    assert longer.resume() and longer.step == 4
    expected = 5e-3 * WarmupCosine(2, 20, longer.cfg.min_lr_ratio)(4)
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert longer.train_step()["lr"] == pytest.approx(expected)
    assert longer.optimizer.param_groups[0]["lr"] == pytest.approx(
        5e-3 * WarmupCosine(2, 20, longer.cfg.min_lr_ratio)(5))


def test_ctrl_c_checkpoints_after_the_step_and_resume_continues(tmp_path, tokenizer):
    straight = _trainer(tmp_path / "straight", tokenizer, steps=5)
    straight.fit()

    interrupted = _trainer(tmp_path / "run", tokenizer, steps=5)
    step = interrupted.train_step

    def step_then_ctrl_c():
        metrics = step()
        if interrupted.step == 2:
            signal.raise_signal(signal.SIGINT)
        return metrics

    interrupted.train_step = step_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    assert ckpt_lib.latest_checkpoint(tmp_path / "run").name == "step_0000002"
    resumed = _trainer(tmp_path / "run", tokenizer, steps=5)
    assert resumed.resume()
    summary = resumed.fit()
    assert summary["step"] == 5
    _assert_bitwise_equal(_state(straight.model), _state(resumed.model))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    trainer = _trainer(tmp_path, tokenizer)
    trainer.train_step()
    good = trainer.save()
    saved = _state(trainer.model)
    trainer.train_step()

    real_save_file = ckpt_lib.save_file

    def crash_midway(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        if Path(path).name == "optimizer.safetensors":
            with open(path, "r+b") as f:  # a half-written file, then the process "dies"
                f.truncate(os.path.getsize(path) // 2)
            raise OSError("disk full")

    monkeypatch.setattr(ckpt_lib, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    monkeypatch.setattr(ckpt_lib, "save_file", real_save_file)

    root = tmp_path / "checkpoints"
    assert ckpt_lib.latest_checkpoint(tmp_path) == good
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [good.name]
    fresh = _trainer(tmp_path, tokenizer)
    assert fresh.resume() and fresh.step == 1
    _assert_bitwise_equal(saved, _state(fresh.model))

    trainer.save()
    assert ckpt_lib.latest_checkpoint(tmp_path).name == "step_0000002"
    assert not list(root.glob(".tmp-*"))


def test_checkpoint_is_loadable_as_a_model(tmp_path, tokenizer):
    from llm_engine.loader import load_model

    trainer = _trainer(tmp_path, tokenizer)
    trainer.train_step()
    path = trainer.save()
    model, tok = load_model(str(path), device="cpu", dtype=torch.float32)
    _assert_bitwise_equal(_state(trainer.model), _state(model))
    assert tok.encode("def add") == tokenizer.encode("def add")


def test_resume_refuses_a_different_global_batch(tmp_path, tokenizer):
    trainer = _trainer(tmp_path, tokenizer)
    trainer.train_step()
    trainer.save()
    with pytest.raises(ValueError, match="global batch"):
        _trainer(tmp_path, tokenizer, grad_accum=2).resume()


# -- end to end --------------------------------------------------------------------------------

def _train_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["train", *argv])


def test_tiny_preset_on_stdlib_lowers_validation_loss(tmp_path, capsys):
    out = tmp_path / "tiny"
    args = _train_args(
        "--preset", "tiny", "--data", "stdlib", "--out", str(out), "--steps", "50",
        "--batch-size", "8", "--seq-len", "64", "--vocab-size", "512",
        "--stdlib-max-bytes", "400000", "--eval-every", "25", "--eval-examples", "32",
        "--warmup-steps", "5", "--lr", "1e-3", "--num-samples", "2", "--no-progress",
        "--model-config", json.dumps(dict(TINY_MODEL, hidden_size=64, intermediate_size=128)))
    assert handle(args) == 0
    evals = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in evals if "val_loss" in r]
    assert val[0] > math.log(512) - 0.5  # starts near uniform over the vocabulary
    assert val[0] > val[1] > val[2] and val[2] < val[0] - 0.4, val
    samples = [r["samples"] for r in evals if "val_loss" in r]
    assert all(len(s) == 2 and s[0].startswith("def") and s[1].startswith("import")
               for s in samples)
    assert samples[-1][0] != "def"  # the continuation is there
    assert "val loss" in capsys.readouterr().out
    assert ckpt_lib.latest_checkpoint(out).name == "step_0000050"


def test_sft_preset_rejects_plain_text_data(tmp_path, capsys):
    args = _train_args("--preset", "smollm2-sft", "--data", "stdlib", "--out", str(tmp_path))
    assert handle(args) == 2
    assert "jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_match_one_with_the_same_global_batch(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 20)
    common = ["--preset", "tiny", "--data", str(corpus), "--steps", "4", "--seq-len", "16",
              "--vocab-size", "300", "--eval-every", "2", "--eval-examples", "8",
              "--warmup-steps", "1", "--lr", "1e-2", "--num-samples", "0", "--no-progress",
              "--log-every", "1", "--device", "cpu", "--model-config", json.dumps(TINY_MODEL)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    def launch(*argv: str) -> None:
        done = subprocess.run([sys.executable, *argv], env=env, timeout=180,
                              capture_output=True, text=True)
        assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stderr[-3000:]}"

    one = tmp_path / "one"
    launch("-m", "llm_engine.training", *common, "--out", str(one), "--batch-size", "4")
    runs = [one]
    for name, per_rank in (("two", ["--batch-size", "2"]),
                           ("two-accum", ["--batch-size", "1", "--grad-accum", "2"])):
        runs.append(tmp_path / name)
        launch("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "llm_engine.training", *common, "--out", str(runs[-1]), *per_rank,
               "--tokenizer", str(one / "tokenizer"))
    logs = [[json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
            for d in runs]
    train = [[r["loss"] for r in log if "loss" in r] for log in logs]
    val = [[r["val_loss"] for r in log if "val_loss" in r] for log in logs]
    assert all(len(losses) == 4 for losses in train)
    for other in (1, 2):
        np.testing.assert_allclose(train[other], train[0], rtol=1e-4)
        np.testing.assert_allclose(val[other], val[0], rtol=1e-4)
    assert val[0][-1] < val[0][0]


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You answer with one word."},
     {"role": "user", "content": "What colour is the sky?"},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Say hello to Ada."},
     {"role": "assistant", "content": "Hello, Ada! Nice to meet you."},
     {"role": "user", "content": "And goodbye."},
     {"role": "assistant", "content": "Goodbye, Ada."}],
    [{"role": "user", "content": "2 + 2 = ?"},
     {"role": "assistant", "content": "2 + 2 = 4."}],
]


@pytest.mark.slow
def test_sft_on_smollm2_lowers_the_loss_of_its_chat_examples(tmp_path):
    from llm_engine.loader import load_model

    require_default_model()
    model, tokenizer = load_model("smollm2", device="cpu", dtype=torch.float32, quantization="none")
    examples = data_lib.build_sft_examples(CHATS, tokenizer, seq_len=64)
    assert (examples.targets != data_lib.IGNORE_INDEX).sum() < (examples.inputs != 0).sum() / 2
    cfg = TrainConfig.from_preset("smollm2-sft", out_dir=str(tmp_path), steps=2, batch_size=4,
                                  seq_len=64, lr=2e-4, warmup_steps=1, eval_examples=4,
                                  progress=False)
    trainer = Trainer(cfg, model, tokenizer, examples, examples, device="cpu")
    before = trainer.evaluate()["val_loss"]
    for _ in range(cfg.steps):
        trainer.train_step()
    after = trainer.evaluate()["val_loss"]
    assert after < before - 0.2, (before, after)


@pytest.mark.gpu
def test_cuda_bf16_steps_with_the_fused_kernel_match_the_plain_loss_and_learn(tmp_path, tokenizer):
    def cuda_trainer(out: str, fused: bool) -> Trainer:
        cfg = TrainConfig(out_dir=str(tmp_path / out), steps=30, batch_size=8, seq_len=16,
                          lr=1e-2, warmup_steps=2, eval_every=0, ckpt_every=0, eval_examples=16,
                          num_samples=0, progress=False, fused_loss=fused, device="cuda")
        model = _model(hidden_size=128, num_heads=2, num_kv_heads=1)  # kernel-sized heads
        return Trainer(cfg, model, tokenizer, _windows(), _windows(seed=1), device="cuda")

    fused, plain = cuda_trainer("fused", True), cuda_trainer("plain", False)
    assert fused.train_step()["loss"] == pytest.approx(plain.train_step()["loss"], rel=1e-2)
    before = fused.evaluate()["val_loss"]
    for _ in range(29):
        fused.train_step()
    assert fused.evaluate()["val_loss"] < before - 0.5
