"""FSDP2 (`train.fsdp: true`): parameter-sharded training on 2 gloo CPU processes.

Each 2-process run shards the tiny BERT with torch's `fully_shard` (every layer, then the root)
and goes through the whole loop: training against a one-process run with the same global batch,
evaluation over the whole validation set, the best checkpoint, the final save as a plain
transformers model (merged for LoRA), and SIGTERM + resume. No GPU here: NCCL is not run.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import tunesmith
from test_distributed import _no_dropout_bert, launch_env
from test_resume import SRC, _assert_same_run, _cfg, _write_cfg, two_process_trainer
from tiny import sentiment_rows, write_csv
from tunesmith.loop.checkpoint import latest_checkpoint
from tunesmith.errors import ConfigError

SHARDED = "FSDP2 over 2 processes"


def _config(model_dir: Path, train: Path, validation: Path, out: Path, per_device: int, fsdp: bool, **train_options) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_file": str(train), "validation_file": str(validation)},
        "task": {"name": "classification", "max_length": 32},
        "train": {"learning_rate": 3e-3, "num_train_epochs": 2, "per_device_train_batch_size": per_device,
                  "per_device_eval_batch_size": 4, "seed": 0, "precision": "fp32", "logging_steps": 1, "fsdp": fsdp,
                  **train_options},
        "output": {"dir": str(out)},
    }


def _launch(config: dict, path: Path) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(path), "--nproc", "2", "--quiet"],
                          capture_output=True, text=True, env=launch_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert SHARDED in done.stderr, done.stderr[-3000:]  # really sharded, not silently DDP
    return done


def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["type"] == kind]


@pytest.fixture
def data(tmp_path):
    # 15 validation rows: not a multiple of the global eval batch (2 x 4), so the last batch is padded across processes.
    return (_no_dropout_bert(tmp_path / "bert"), write_csv(tmp_path / "train.csv", sentiment_rows(48)),
            write_csv(tmp_path / "validation.csv", sentiment_rows(15, seed=3)))


def test_fsdp_two_processes_match_one_and_save_a_plain_model(data, tmp_path):
    model_dir, train, validation = data
    single = tunesmith.train(_config(model_dir, train, validation, tmp_path / "single", 8, fsdp=False), show_progress=False)
    _launch(_config(model_dir, train, validation, tmp_path / "fsdp", 4, fsdp=True), tmp_path / "fsdp.yaml")
    run_dir = tmp_path / "fsdp"

    # Same loss curve and final weights as one process with the same global batch.
    a = AutoModelForSequenceClassification.from_pretrained(single.run_dir / "model").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").state_dict()
    assert a.keys() == b.keys()
    # Attention key biases get a zero gradient in exact arithmetic: AdamW turns float noise there into steps.
    mismatched = [k for k in a if not k.endswith("attention.self.key.bias") and not torch.allclose(a[k], b[k], atol=1e-4)]
    assert not mismatched, mismatched
    losses = lambda d: torch.tensor([r["loss"] for r in _records(d, "train")])
    assert torch.allclose(losses(single.run_dir), losses(run_dir), atol=1e-4)
    assert [r["step"] for r in _records(run_dir, "train")] == list(range(1, 13))

    # Metrics over the whole validation set, each example once.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["validation"]["samples"] == single.metrics["validation"]["samples"] == 15
    assert abs(metrics["validation"]["loss"] - single.metrics["validation"]["loss"]) < 1e-4
    assert json.loads((run_dir / "provenance.json").read_text())["speed"]["fsdp"]["processes"] == 2

    # The saved model is plain transformers and predicts what the sharded model did: `evaluate` loads
    # model/ with from_pretrained and reproduces the loss the sharded model computed at the end of training.
    assert tunesmith.evaluate(run_dir, validation)["loss"] == pytest.approx(metrics["validation"]["loss"], abs=1e-5)
    plain = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    texts = ["a wonderful film", "a dull mess"]
    with torch.no_grad():
        probs = plain(**tokenizer(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
    predicted = tunesmith.predict(run_dir, texts)
    assert [p["score"] for p in predicted] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)


def test_fsdp_lora_restores_best_checkpoint_and_saves_merged_model(data, tmp_path):
    """LoRA under FSDP2 with gradient accumulation, and the best evaluation an early one: the final
    model is the restored best."""
    model_dir, train, validation = data
    # greater_is_better on the loss: the best evaluation is the worst one, the first, not the last.
    options = {"num_train_epochs": 3, "metric_for_best_model": "loss", "greater_is_better": True,
               "gradient_accumulation_steps": 2}
    config = lambda out, per_device, fsdp: {**_config(model_dir, train, validation, out, per_device, fsdp, **options),
                                            "method": {"name": "lora", "lora_dropout": 0.0}}
    single = tunesmith.train(config(tmp_path / "single", 4, False), show_progress=False)
    _launch(config(tmp_path / "fsdp", 2, True), tmp_path / "fsdp.yaml")
    run_dir = tmp_path / "fsdp"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    evals = _records(run_dir, "eval")
    best = max(evals, key=lambda r: r["loss"])
    assert metrics["train"]["best_step"] == best["step"] == single.best_step < metrics["train"]["global_step"] == 18
    assert abs(evals[-1]["loss"] - best["loss"]) > 1e-3  # restoring the best really changes the weights
    assert metrics["validation"]["loss"] == pytest.approx(best["loss"], abs=1e-5)  # every shard got the best weights
    assert metrics["validation"]["loss"] == pytest.approx(single.metrics["validation"]["loss"], abs=1e-4)

    # adapter/ holds the adapter, model/ a merged plain model; both reproduce the best model's loss.
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert tunesmith.evaluate(run_dir, validation)["loss"] == pytest.approx(best["loss"], abs=1e-5)
    a = AutoModelForSequenceClassification.from_pretrained(single.run_dir / "model").state_dict()
    b = merged.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a if not k.endswith("attention.self.key.bias"))


@pytest.mark.slow
def test_fsdp_sigterm_and_resume_matches_uninterrupted(tiny_bert, sentiment_csv, tmp_path):
    run = two_process_trainer(tmp_path)
    # Dropout on: the resumed processes must replay their own dropout masks too.
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path / "ref", num_train_epochs=2, per_device_train_batch_size=4, fsdp=True)
    reference = run([str(_write_cfg(tmp_path, "ref", cfg))])
    assert reference.returncode == 0 and SHARDED in reference.stderr, reference.stderr[-3000:]

    cfg["output"]["dir"] = str(tmp_path / "run")
    stopped = run([str(_write_cfg(tmp_path, "run", cfg))], signal_at=8)
    assert stopped.returncode != 0 and "SIGTERM received: stopped after step 8" in stopped.stderr, stopped.stderr[-3000:]
    step = tmp_path / "run" / "checkpoints" / "step-000008"
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").step == 8
    # Full weights in one file, the optimizer's shards one file per process.
    assert {p.name for p in step.glob("*.pt")} == {"rng-rank0.pt", "rng-rank1.pt", "optimizer-rank0.pt", "optimizer-rank1.pt",
                                                  "scheduler.pt"}
    shards = [torch.load(step / f"optimizer-rank{k}.pt", weights_only=True)["state"] for k in (0, 1)]
    full = AutoModelForSequenceClassification.from_pretrained(tiny_bert).num_parameters()
    assert sum(v["exp_avg"].numel() for s in shards for v in s.values()) == full  # each moment stored once, split in two

    # One process cannot continue a sharded checkpoint (its optimizer state is per process): refused, nothing lost.
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    alone = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "--resume", str(tmp_path / "run"), "-q"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode != 0 and "written by a sharded (FSDP2) run" in alone.stderr, alone.stderr[-3000:]

    resumed = run(["--resume", str(tmp_path / "run")])
    assert resumed.returncode == 0 and SHARDED in resumed.stderr, resumed.stderr[-3000:]
    _assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_fsdp_with_one_process_has_no_effect(tiny_bert, sentiment_csv, tmp_path, caplog):
    from tiny import tiny_config

    cfg = tiny_config(tiny_bert, sentiment_csv, tmp_path / "run", train={"num_train_epochs": 1, "fsdp": True})
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        result = tunesmith.train(cfg, show_progress=False)
    assert "train.fsdp: no effect with one process" in caplog.text
    assert (result.run_dir / "model" / "model.safetensors").is_file()


def test_fsdp_with_torch_compile_is_refused(tiny_bert, sentiment_csv, tmp_path):
    from tiny import tiny_config

    with pytest.raises(ConfigError, match="train.fsdp and train.torch_compile"):
        tunesmith.train(tiny_config(tiny_bert, sentiment_csv, tmp_path / "run", train={"fsdp": True, "torch_compile": True}))


@pytest.mark.parametrize("gpu", [False, True])
def test_fsdp1_is_refused(monkeypatch, gpu):
    from tunesmith.api import make_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match=r"FSDP version 1; tunesmith supports FSDP version 2.*fsdp_version: 2"):
        make_accelerator("no")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("launcher", ["nproc", "accelerate"])
def test_fsdp_on_two_gpus_matches_one(data, tmp_path, launcher):
    """The same path on NCCL (never run where tunesmith is developed: no GPU there)."""
    model_dir, train, validation = data
    single = tunesmith.train(_config(model_dir, train, validation, tmp_path / "single", 8, fsdp=False), show_progress=False)
    config = tmp_path / "fsdp.yaml"
    config.write_text(yaml.safe_dump(_config(model_dir, train, validation, tmp_path / "fsdp", 4, fsdp=launcher == "nproc")))
    root = Path(__file__).resolve().parents[1]
    command = ([sys.executable, "-m", "tunesmith.cli", "train", str(config), "--nproc", "2", "--quiet"] if launcher == "nproc" else
               [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "configs/accelerate/fsdp.yaml"),
                "--num_processes", "2", "--mixed_precision", "no", "-m", "tunesmith.cli", "train", str(config), "--quiet"])
    done = subprocess.run(command, capture_output=True, text=True, env=launch_env(), timeout=600, cwd=tmp_path)
    assert done.returncode == 0 and "FSDP2 over 2 processes (cuda)" in done.stderr, done.stderr[-3000:]
    a = AutoModelForSequenceClassification.from_pretrained(single.run_dir / "model").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "fsdp" / "model").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-3) for k in a if not k.endswith("attention.self.key.bias"))
    metrics = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert metrics["validation"]["samples"] == 15
    assert tunesmith.evaluate(tmp_path / "fsdp", validation)["loss"] == pytest.approx(metrics["validation"]["loss"], abs=1e-4)
