"""Training and decoding on CUDA: mixed precision with and without loss scaling, a resume across
devices and precisions, and NCCL across two GPUs. Skipped where there is no GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from translate import runtime
from translate.build import build_trainer, train
from translate.checkpoint import load_checkpoint, save_checkpoint
from translate.data import collate
from translate.translator import DecodeOptions, Translator

from .conftest import env_with_repo
from .test_distributed import EXACT, _free_port

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def native_bf16() -> bool:
    return torch.cuda.is_available() and runtime.cuda_has_bf16(torch.device("cuda"))


def test_cuda_training_step_and_decoding(tiny_config, tmp_path):
    config = tiny_config.override({"train.device": "cuda", "train.max_steps": 3})
    result = train(config, tmp_path / "cuda", progress_bar=False)
    assert result.progress.step == 3
    translator = Translator.load(tmp_path / "cuda", DecodeOptions(beam=3), device=torch.device("cuda"))
    out = translator.translate(["El gato come pan."])
    assert isinstance(out[0][0].text, str)


@pytest.mark.parametrize("amp", ["fp16", pytest.param("bf16", marks=pytest.mark.skipif(
    not native_bf16(), reason="needs a GPU with native bf16"))])
def test_mixed_precision_steps_train(tiny_config, tmp_path, amp):
    config = tiny_config.override({"train.device": "cuda", "train.amp": amp})
    trainer = build_trainer(config, tmp_path / amp, progress_bar=False)
    assert trainer.amp_dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batches = trainer.data.epoch_batches(0)
    trained = 0
    for i in range(12):  # fp16 starts at a loss scale of 2^16, which may overflow a few steps first
        _, tokens = trainer.train_step(collate(trainer.data.src, trainer.data.tgt, batches[i % len(batches)]))
        trained += tokens > 0
    assert trained >= 6 and trainer.progress.nonfinite_steps == 0
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    trainer.metrics.close()


def test_a_cpu_run_resumes_on_the_gpu_in_fp16(tiny_config, tmp_path, monkeypatch):
    """A run begun on the CPU (bf16 or full precision: no loss scale saved) goes on under fp16 with
    a fresh loss scaler on a GPU without native bf16 (forced here, so that any GPU tests it)."""
    run_dir = tmp_path / "run"
    config = tiny_config.override({"train.max_steps": 3, "train.eval_every": 3, "train.device": "cpu"})
    train(config, run_dir, progress_bar=False)
    monkeypatch.setattr(runtime, "cuda_has_bf16", lambda device: False)
    longer = config.override({"train.max_steps": 8, "train.device": "cuda"})
    result = train(longer, run_dir, resume=True, progress_bar=False)
    assert result.progress.step == 8
    saved = load_checkpoint(run_dir / "last.pt")
    assert saved["scaler"] and saved["scaler"]["scale"] > 0  # fp16 now has a loss scale to save


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_nccl_processes_equal_one_process_with_the_same_batches(tiny_config, tmp_path):
    config = tiny_config.override({**EXACT, "train.device": "cuda"})
    single = train(config.override({"train.accumulate": 2}), tmp_path / "single",
                   progress_bar=False)
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()), encoding="utf-8")
    env = env_with_repo()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "translate", "train",
           "--run-dir", str(tmp_path / "ddp"), "--config", str(config_file)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_checkpoint(tmp_path / "single" / "last.pt")
    b = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == single.progress.step
    for name, value in a["model"].items():
        torch.testing.assert_close(value, b["model"][name], rtol=1e-3, atol=1e-4, msg=name)


def test_fp32_decodes_without_autocast_and_a_bf16_model_decodes_without_native_bf16(tiny_config, tmp_path,
                                                                                   monkeypatch):
    from click.testing import CliRunner

    from translate.cli import main
    from translate.model import Seq2Seq

    run_dir = tmp_path / "run"
    train(tiny_config.override({"train.device": "cuda", "train.max_steps": 3, "train.amp": "fp16"}), run_dir,
          progress_bar=False)
    seen = []
    real = Seq2Seq.decode_step

    def recording(self, prev, memory, state, vocab=None):
        logits, state, weights = real(self, prev, memory, state, vocab)
        seen.append(logits.dtype)
        return logits, state, weights

    monkeypatch.setattr(Seq2Seq, "decode_step", recording)
    for precision, dtype in (("fp32", torch.float32), ("auto", torch.float16)):
        translator = Translator.load(run_dir, DecodeOptions(beam=2), precision=precision, device="cuda")
        assert translator.precision == {"fp32": "fp32", "auto": "fp16"}[precision]
        seen.clear()
        translator.translate(["El gato come pan.", "Perro."])
        assert seen and set(seen) == {dtype}
    result = CliRunner().invoke(main, ["decode", str(run_dir), "--device", "cuda", "--fp32"], input="Gato.\n")
    assert result.exit_code == 0, result.output
    # a checkpoint trained in bf16, on a GPU taken for one without native bf16: fp32, with a note
    payload = load_checkpoint(run_dir / "last.pt")
    payload["config"]["train"]["amp"] = "bf16"
    save_checkpoint(tmp_path / "bf16.pt", payload)
    monkeypatch.setattr(runtime, "cuda_has_bf16", lambda device: False)
    translator = Translator.load(tmp_path / "bf16.pt", device="cuda")
    assert translator.precision == "fp32" and translator.dtype is None and "no native bf16" in translator.note
    assert translator.translate(["El gato come pan."])[0][0].text is not None


@pytest.mark.parametrize("beam", [1, 8])
def test_attention_memory_on_the_gpu_follows_the_outputs_not_their_limit(tiny_config, beam):
    from translate.encoded import Encoded
    from translate.model import build_model
    from translate.search import beam_search, greedy
    from translate.tokenizer import EOS, Tokenizer

    from .conftest import SENTENCES, make_pairs

    pairs = make_pairs(200, seed=1)
    tokenizer = Tokenizer.train([s for s, _ in pairs], [t for _, t in pairs], vocab_size=80)
    torch.manual_seed(0)
    model = build_model(tiny_config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).cuda().eval()
    sentences = SENTENCES * 13  # 65
    batch = collate(Encoded(tokenizer.encode_src(sentences)), None, list(range(len(sentences))))
    batch = batch.to(torch.device("cuda"))
    with torch.no_grad():
        model.decoder.output.bias[EOS] = 8.0  # every hypothesis ends within a few steps
        memory, state = model.encode(batch.src, batch.src_lengths, batch.src_mask)
    limits = torch.full((len(sentences),), 1000)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    hyps = (greedy(model, memory, state, limits, return_attention=True) if beam == 1
            else beam_search(model, memory, state, beam, limits, return_attention=True))
    peak = torch.cuda.max_memory_allocated() - before
    batch, src_len = memory.mask.shape
    assert max(len(h[0].tokens) for h in hyps) < 10
    assert peak < batch * beam * 1000 * src_len * 4 / 2  # half the attention buffer allocated up front before


def test_fp16_gradients_that_stay_nan_stop_the_run_on_cuda(tiny_config, tmp_path):
    """fp16's loss scaler calibrates while its scale is above 1; NaN gradients below it count as
    non-finite steps, so the run stops instead of skipping steps until its limit. The checkpoint
    says the precision the run trained in."""
    from translate import training
    from translate.errors import TrainingError

    config = tiny_config.override({"train.device": "cuda", "train.amp": "fp16", "train.max_steps": 60,
                                   "train.eval_every": 1000})
    trainer = build_trainer(config, tmp_path / "nan", progress_bar=False)
    trainer.scaler = torch.amp.GradScaler("cuda", init_scale=8.0)
    trainer.model.decoder.output.bias.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    with pytest.raises(TrainingError, match="non-finite steps in a row"):
        trainer.run()
    assert trainer.progress.step == 3 + training.MAX_NONFINITE - 1
    assert trainer.payload()["precision"] == {"device": "cuda", "amp": "fp16"}
