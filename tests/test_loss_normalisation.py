"""The training loss is normalised over every unit of an optimizer step (transformers PR 34191): for a
token-level loss, every target token weighs the same however the global batch is split into
accumulation steps or processes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from transformers import BertConfig

import tunesmith
from test_distributed import launch_env
from tiny import build_tiny_bert, tiny_config, write_jsonl

WORDS = ["Anna", "lives", "in", "Oslo", "and", "Paris", "works", "for", "Acme", "today", "with", "Bob"]
TAGS = {"Anna": "B-PER", "Bob": "B-PER", "Oslo": "B-LOC", "Paris": "B-LOC", "Acme": "B-ORG"}


def uneven_sentences(n: int = 32, seed: int = 0) -> list[dict]:
    """Sentences of 1 to 14 words: micro-batches of one global batch hold very different token counts."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        tokens = [rng.choice(WORDS) for _ in range(1 + (i * 7) % 14)]
        rows.append({"tokens": tokens, "tags": [TAGS.get(t, "O") for t in tokens]})
    return rows


def _no_dropout_bert(folder: Path) -> Path:
    build_tiny_bert(folder)
    config = BertConfig.from_pretrained(folder)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.classifier_dropout = 0.0
    config.save_pretrained(folder)
    return folder


def _config(model: Path, train: Path, out: Path, batch: int, accumulation: int = 1, steps: int = 1) -> dict:
    # No clipping, no warmup, a plain random order: the same examples make each global batch in every run.
    return tiny_config(model, train, out, task={"name": "token_classification", "max_length": 32},
                       data={"validation_file": str(train)}, train={
        "max_steps": steps, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
        "max_grad_norm": 0.0, "warmup_ratio": 0.0, "group_by_length": False, "eval_strategy": "no",
        "logging_steps": 1, "learning_rate": 1e-3})


def _first_gradients(cfg: dict, monkeypatch) -> tuple[list[torch.Tensor], float]:
    """The gradients reaching the first optimizer step, and the logged loss of that step."""
    seen = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([p.grad.clone() for group in self.param_groups for p in group["params"] if p.grad is not None])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    result = tunesmith.train(cfg, show_progress=False)
    monkeypatch.undo()
    logged = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    return seen[0], next(r["loss"] for r in logged if r["type"] == "train")


def test_accumulated_token_loss_equals_one_large_batch(tmp_path, monkeypatch):
    """Batch 8 x accumulation 2 is batch 16 x 1 for a token-level loss, although the two micro-batches hold
    different numbers of tokens (averaging each micro-batch's mean, as before, weighs their tokens unequally)."""
    model = _no_dropout_bert(tmp_path / "bert")
    train = write_jsonl(tmp_path / "train.jsonl", uneven_sentences())
    grads_acc, loss_acc = _first_gradients(_config(model, train, tmp_path / "acc", 8, 2), monkeypatch)
    grads_big, loss_big = _first_gradients(_config(model, train, tmp_path / "big", 16, 1), monkeypatch)
    assert len(grads_acc) == len(grads_big) > 0
    for accumulated, whole in zip(grads_acc, grads_big):
        torch.testing.assert_close(accumulated, whole, rtol=1e-5, atol=1e-7)
    assert abs(loss_acc - loss_big) < 1e-6  # the logged loss is per token too


def test_two_processes_with_different_token_counts_match_one(tmp_path):
    """2 processes x batch 4 equal 1 process x batch 8: each process's share of the global batch holds a
    different number of tokens; its gradients are normalised by the tokens of both."""
    model = _no_dropout_bert(tmp_path / "bert")
    train = write_jsonl(tmp_path / "train.jsonl", uneven_sentences())
    single = tunesmith.train(_config(model, train, tmp_path / "single", 8, steps=3), show_progress=False)
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(_config(model, train, tmp_path / "ddp", 4, steps=3)))
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(config_file), "--nproc", "2", "--quiet"],
                          capture_output=True, text=True, env=launch_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(str(single.run_dir / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    # Attention key biases get a zero gradient in exact arithmetic: AdamW turns float noise there into steps.
    mismatched = [k for k in a if not k.endswith("attention.self.key.bias") and not torch.allclose(a[k], b[k], atol=1e-5)]
    assert not mismatched, mismatched
    losses = lambda run: [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert torch.allclose(torch.tensor(losses(single.run_dir)), torch.tensor(losses(tmp_path / "ddp")), atol=1e-5)
