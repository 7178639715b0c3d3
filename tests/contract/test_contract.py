"""The task contract, for every registered family (ids: family names): a family that registers
`Family.examples` gets these tests without writing them again (CONTRIBUTING.md, "Adding a task family")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from typer.testing import CliRunner

import tunesmith
from tunesmith.config import METHOD_CONFIGS
from tunesmith.errors import ConfigError
from tunesmith.loop.interrupt import TrainingInterrupted

from conftest import contract_examples, family_names

FAMILIES = pytest.mark.parametrize("family", family_names())
# A tiny config for each method: adapters a little wider than their defaults are not needed; last_n one layer.
METHOD_OPTIONS = {"last_n": {"last_n_layers": 1}}


def run_config(examples, model: Path, folder: Path, data: dict | None = None, **train) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "model": {"name_or_path": str(model)},
        "data": data if data is not None else examples.write_data(folder),
        "task": examples.task,
        "method": {"name": "full"},
        "train": {"learning_rate": 5e-3, "num_train_epochs": 10, "per_device_train_batch_size": 4, "seed": 0,
                  "precision": "fp32", "logging_steps": 1, **examples.train, **train},
        "output": {"dir": str(folder / "run")},
    }


def train_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["type"] == "train"]


def assert_close(a, b, path: str = "") -> None:
    """The same structure, labels and spans; floats equal to float precision (predictions, metrics)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), path
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _setup(family, checkpoints):
    examples = contract_examples(family)
    return examples, checkpoints(family, examples)


@FAMILIES
def test_overfits_saves_and_reloads_with_plain_transformers(family, checkpoints, tmp_path):
    examples, model = _setup(family, checkpoints)
    run = tunesmith.train(run_config(examples, model, tmp_path), show_progress=False)
    losses = train_losses(run.run_dir)
    assert losses[-1] < 0.5 * losses[0], losses

    loaded = tunesmith.load(run.run_dir)
    first = loaded.predict(examples.predict_inputs)
    assert loaded.predict(examples.predict_inputs) == first
    # tunesmith.predict may take a shortcut (the first-token pass of sequence heads): equal to float precision.
    assert_close(tunesmith.predict(run.run_dir, examples.predict_inputs), first)
    assert len(first) == len(examples.predict_inputs)

    # The saved folder is a plain transformers checkpoint: the family's Auto class loads it and predicts the same.
    plain = getattr(transformers, loaded.task.auto_model_class).from_pretrained(run.run_dir / "model").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run.run_dir / "model")
    again = loaded.task.predict(plain, tokenizer, list(examples.predict_inputs), loaded.state,
                                max_length=loaded.config.task.max_length)
    assert_close(again, first)

    # Registering gives the family its server endpoint: POST /v1/predict with the family's body answers as predict.
    assert_close(served_predictions(loaded, examples.predict_inputs), first)
    if loaded.task.onnx_layout is not None:
        check_onnx_export(loaded, run.run_dir, examples.predict_inputs, first, tmp_path / "onnx")


def check_onnx_export(loaded, run_dir: Path, inputs: list, first: list, folder: Path) -> None:
    """An exportable family's ONNX export matches (the export checks itself) and serves the same predictions."""
    from tunesmith.export.onnx import export_onnx, load_export

    result = export_onnx(run_dir, folder)
    assert result.agreement == 1.0 and result.samples > 0
    exported = load_export(folder)
    decide = loaded.task.prediction_decision
    assert [decide(p) for p in exported.predict(inputs)] == [decide(p) for p in first]
    assert [decide(p) for p in served_predictions(exported, inputs)] == [decide(p) for p in first]


def served_predictions(loaded, inputs: list) -> list:
    from fastapi.testclient import TestClient

    from tunesmith.serving import ServeSettings, create_app
    from tunesmith.serving.served import ServedRun

    with TestClient(create_app([ServedRun("m", loaded, ServeSettings())])) as client:
        answer = client.post("/v1/predict", json=loaded.task.request_model.body_for(list(inputs)))
    assert answer.status_code == 200, answer.text
    return answer.json()["predictions"]


@FAMILIES
@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_every_method_trains_and_predicts(family, method, checkpoints, tmp_path):
    examples, model = _setup(family, checkpoints)
    cfg = run_config(examples, model, tmp_path, max_steps=2)
    cfg["method"] = {"name": method, **METHOD_OPTIONS.get(method, {})}
    if method in examples.refused_methods:
        with pytest.raises(ConfigError, match=f"method {method}"):
            tunesmith.train(cfg, show_progress=False)
        return
    run = tunesmith.train(cfg, show_progress=False)
    assert run.metrics["train"]["global_step"] == 2
    assert len(tunesmith.predict(run.run_dir, examples.predict_inputs)) == len(examples.predict_inputs)


def _weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model" / "model.safetensors"))


# Interrupted one step into the second epoch, and after an epoch's last step (CONTRIBUTING: exact resume).
# The second once replayed the first epoch's order (the sampler's state was not kept between epochs).
WHERE = pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])


@FAMILIES
@WHERE
def test_resume_is_exact(family, where, checkpoints, tmp_path, monkeypatch):
    import signal

    examples, model = _setup(family, checkpoints)
    options = {"num_train_epochs": 2, "save_steps": 2}
    reference = tunesmith.train(run_config(examples, model, tmp_path / "ref", **options), show_progress=False)
    steps_per_epoch = reference.metrics["train"]["global_step"] // 2
    assert steps_per_epoch >= 2, "the contract data needs two optimizer steps per epoch at least"
    stop = steps_per_epoch + 1 if where == "mid-epoch" else steps_per_epoch

    original, calls = torch.optim.AdamW.step, {"n": 0}

    def step_then_interrupt(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == stop:
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_interrupt)
    with pytest.raises(TrainingInterrupted, match=rf"stopped after step {stop}"):
        tunesmith.train(run_config(examples, model, tmp_path / "cut", **options), show_progress=False)
    monkeypatch.undo()
    resumed = tunesmith.train(resume=tmp_path / "cut" / "run", show_progress=False)
    assert train_losses(reference.run_dir) == train_losses(resumed.run_dir)
    wa, wb = _weights(reference.run_dir), _weights(resumed.run_dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@FAMILIES
def test_streamed_metrics_equal_metrics_over_all_outputs(family, checkpoints, tmp_path):
    examples, model = _setup(family, checkpoints)
    cfg = run_config(examples, model, tmp_path, num_train_epochs=3)
    run = tunesmith.train(cfg, show_progress=False)
    validation = cfg["data"]["validation_file"]
    one_at_a_time = tunesmith.evaluate(run.run_dir, validation, batch_size=1)
    all_at_once = tunesmith.evaluate(run.run_dir, validation, batch_size=1024)
    assert_close(one_at_a_time, all_at_once)


@FAMILIES
def test_a_preflight_error_exits_2_without_a_traceback(family, checkpoints, tmp_path):
    import yaml

    from tunesmith.cli import app

    examples, model = _setup(family, checkpoints)
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(run_config(examples, model, tmp_path, data=examples.write_bad_data(tmp_path))))
    result = CliRunner().invoke(app, ["train", str(config), "-q"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.output.strip()
