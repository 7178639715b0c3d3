"""`tunesmith export --format onnx`: int8 quantization checked by agreement, a failing check writes nothing, families
that are not one forward pass are refused, the CLI, and the export served with `--backend onnx`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tunesmith
import tunesmith.export.onnx as onnx_export
from tunesmith.cli import app
from tunesmith.errors import ConfigError
from tunesmith.serving import ServeSettings, create_app, load_runs
from tunesmith.tasks.causal_lm.examples import contract_examples as causal_examples
from tunesmith.tasks.token_classification.examples import contract_examples as ner_examples

from tiny import train_contract_example

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory) -> Path:
    return train_contract_example(ner_examples(), tmp_path_factory.mktemp("ner"), 5)


def test_int8_export_is_checked_by_agreement_and_says_what_it_measured(ner_run, tmp_path):
    result = onnx_export.export_onnx(ner_run, tmp_path / "int8", quantize="int8")
    record = json.loads((tmp_path / "int8" / "export.json").read_text())
    assert record["quantize"] == "int8" and record["agreement"] == result.agreement >= 0.99
    assert 0 < result.max_abs_diff  # int8 weights: the outputs moved, the predictions did not
    fp32 = onnx_export.export_onnx(ner_run, tmp_path / "fp32")
    assert (tmp_path / "int8" / "model.onnx").stat().st_size < 0.9 * (tmp_path / "fp32" / "model.onnx").stat().st_size
    assert fp32.max_abs_diff <= onnx_export.ATOL
    for name in ("config.json", "tokenizer.json", "task.json", "config.yaml"):
        assert (tmp_path / "fp32" / name).exists(), name


def test_a_failing_check_names_the_largest_difference_and_writes_nothing(ner_run, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "ATOL", 0.0)
    monkeypatch.setattr(onnx_export, "RTOL", 0.0)
    with pytest.raises(ConfigError, match="largest difference is .* nothing was written"):
        onnx_export.export_onnx(ner_run, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_generating_family_is_refused_with_what_to_do(tmp_path):
    chat = train_contract_example(causal_examples()["smollm-chat"], tmp_path / "chat", epochs=1)
    result = CliRunner().invoke(app, ["export", str(chat), str(tmp_path / "onnx")])
    assert result.exit_code == 2 and "tunesmith serve" in result.output and not (tmp_path / "onnx").exists()


def test_the_cli_exports_and_refuses_a_full_folder(ner_run, tmp_path):
    out = tmp_path / "onnx"
    done = CliRunner().invoke(app, ["export", str(ner_run), str(out), "--format", "onnx"])
    assert done.exit_code == 0, done.output
    assert "same predictions 100.0%" in done.output
    again = CliRunner().invoke(app, ["export", str(ner_run), str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = CliRunner().invoke(app, ["export", str(ner_run), str(tmp_path / "x"), "--quantize", "int4"])
    assert bad.exit_code == 2 and "int8" in bad.output


def test_the_export_serves_the_same_predictions(ner_run, tmp_path):
    from fastapi.testclient import TestClient

    onnx_export.export_onnx(ner_run, tmp_path / "onnx")
    inputs = ner_examples().predict_inputs
    settings = ServeSettings()
    with TestClient(create_app(load_runs([tmp_path / "onnx"], settings, backend="onnx"), settings)) as client:
        body = {"texts": inputs} if all(isinstance(x, str) for x in inputs) else {"tokens": inputs}
        served = client.post("/v1/predict", json=body)
        models = client.get("/v1/models").json()["data"]
        unknown = client.post("/v1/predict", json={**body, "aggregation": "mean"})  # the family's own check refuses it
    assert unknown.status_code == 422 and "aggregation: expected one of first, average, max" in unknown.text
    assert served.status_code == 200, served.text
    task = tunesmith.load(ner_run).task
    want = tunesmith.predict(ner_run, inputs)
    assert [task.prediction_decision(p) for p in served.json()["predictions"]] == [task.prediction_decision(p) for p in want]
    assert models[0]["task"] == "token_classification"
    with pytest.raises(ConfigError, match="not an ONNX export"):
        load_runs([ner_run], settings, backend="onnx")


def test_a_lora_run_exports_with_its_adapter_merged(tmp_path):
    # (a run saves its model merged; an adapter-only run folder is merged by the export itself)
    from tunesmith.tasks.classification.examples import contract_examples as classification_examples

    run_dir = train_contract_example(classification_examples(), tmp_path, 3, method={"name": "lora", "lora_r": 4})
    result = onnx_export.export_onnx(run_dir, tmp_path / "onnx")
    assert result.agreement == 1.0 and result.max_abs_diff <= onnx_export.ATOL
    graph = __import__("onnx").load(str(tmp_path / "onnx" / "model.onnx"))
    assert not any("lora" in init.name.lower() for init in graph.graph.initializer)  # merged, not carried along
