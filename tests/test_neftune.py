"""train.neftune_noise_alpha: noise on the input embeddings while training only, of NEFTune's size, under LoRA too,
never in evaluation or the saved model, and a resumed run draws the same noise."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
import transformers

import tunesmith
from tunesmith.config.schema import METHOD_CONFIGS
from tunesmith.errors import ConfigError
from tunesmith.loop.interrupt import TrainingInterrupted
from tunesmith.methods.apply import apply_method
from tunesmith.methods.neftune import add_neftune
from tunesmith.tasks.causal_lm.examples import contract_examples

ALPHA = 5.0


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return contract_examples()["llama3-sft"].build_model(tmp_path_factory.mktemp("llama"))


def _embedded(model, ids):
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    model(ids)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_noise_while_training_only_and_of_neftune_size(llama, method):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama)
    if method == "lora":
        model = apply_method(model, METHOD_CONFIGS["lora"](), "CAUSAL_LM", [])
    ids = torch.randint(0, 100, (2, 12))
    model.eval()
    clean = _embedded(model, ids)
    handle = add_neftune(model, ALPHA)
    model.train()
    noisy = _embedded(model, ids)
    bound = ALPHA / math.sqrt(12 * clean.size(-1))
    difference = (noisy - clean).abs()
    assert difference.max() <= bound * (1 + 1e-5) and difference.max() > 0.9 * bound  # uniform in [-bound, bound]
    model.eval()
    assert torch.equal(_embedded(model, ids), clean)  # evaluation and generation: no noise
    handle.remove()
    model.train()
    assert torch.equal(_embedded(model, ids), clean)  # the hook is gone


def _config(model: Path, folder: Path, **train) -> dict:
    ex = contract_examples()["llama3-sft"]
    folder.mkdir(parents=True, exist_ok=True)
    return {"model": {"name_or_path": str(model)}, "data": ex.write_data(folder), "task": ex.task,
            "method": {"name": "full"}, "output": {"dir": str(folder / "run")},
            "train": {"learning_rate": 3e-3, "num_train_epochs": 2, "per_device_train_batch_size": 4, "seed": 0,
                      "precision": "fp32", "logging_steps": 1, "save_steps": 2, **train}}


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]


def test_training_sees_the_noise_and_evaluation_does_not(llama, tmp_path):
    plain = tunesmith.train(_config(llama, tmp_path / "plain"), show_progress=False)
    noisy = tunesmith.train(_config(llama, tmp_path / "noisy", neftune_noise_alpha=ALPHA), show_progress=False)
    assert _losses(plain.run_dir)[0] != _losses(noisy.run_dir)[0]
    # the final evaluation (in the run) and a later one on the saved model agree: no noise at evaluation or in the model
    again = tunesmith.evaluate(noisy.run_dir, tmp_path / "noisy" / "validation.jsonl")
    assert again["loss"] == pytest.approx(noisy.metrics["validation"]["loss"], rel=1e-5)
    assert json.loads(json.dumps(noisy.metrics["validation_before_training"])) == plain.metrics["validation_before_training"]


def test_a_resumed_run_draws_the_same_noise(llama, tmp_path, monkeypatch):
    reference = tunesmith.train(_config(llama, tmp_path / "ref", neftune_noise_alpha=ALPHA), show_progress=False)
    original, calls = torch.optim.AdamW.step, {"n": 0}

    def step_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    with pytest.raises(TrainingInterrupted):
        tunesmith.train(_config(llama, tmp_path / "cut", neftune_noise_alpha=ALPHA), show_progress=False)
    monkeypatch.undo()
    resumed = tunesmith.train(resume=tmp_path / "cut" / "run", show_progress=False)
    assert _losses(reference.run_dir) == _losses(resumed.run_dir)


def test_nothing_to_add_noise_to_is_a_config_error(tmp_path):
    from tiny import build_tiny_bert, tiny_config, write_jsonl

    model = build_tiny_bert(tmp_path / "bert")
    rows = [{"text": f"good {i}", "label": "pos"} for i in range(8)] + [{"text": f"bad {i}", "label": "neg"} for i in range(8)]
    cfg = tiny_config(model, write_jsonl(tmp_path / "train.jsonl", rows), tmp_path / "run",
                      method={"name": "frozen"}, train={"neftune_noise_alpha": ALPHA, "max_steps": 1})
    with pytest.raises(ConfigError, match="neftune_noise_alpha.*cache_frozen_features"):
        tunesmith.train(cfg, show_progress=False)
