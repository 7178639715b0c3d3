"""The `tunesmith` command end to end with a tiny model.

Training runs in a real subprocess (`tunesmith train cfg.yaml dotted.overrides...`); the commands that
follow run in-process through typer's CliRunner, which exercises the same code without paying the
seconds of torch/transformers imports per call.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import tunesmith
from tiny import sentiment_rows, tiny_config, write_csv
from tunesmith.cli import app
from tunesmith.config import config_reference, load_config


def run_cli(*args: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    exe = shutil.which("tunesmith", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "tunesmith.cli"]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300", "TOKENIZERS_PARALLELISM": "false", **env}
    return subprocess.run([*command, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=300)


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input)


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_train_eval_predict(tmp_path, tiny_bert):
    """One training, then every way of using its run directory (one test: the run is trained once)."""
    train_csv = write_csv(tmp_path / "train.csv", sentiment_rows(48, seed=2))
    valid_rows = sentiment_rows(16, seed=3)
    valid_csv = write_csv(tmp_path / "valid.csv", valid_rows)
    cfg = tiny_config(tiny_bert, train_csv, tmp_path / "unused", data={"validation_file": str(valid_csv)})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    run_dir = tmp_path / "run"

    # ---- train, with dotted overrides on the command line
    proc = run_cli(
        "train",
        "cfg.yaml",
        "train.num_train_epochs=2",
        "train.learning_rate=5e-3",
        "task.max_length=24",
        "train.group_by_length=false",
        f"output.dir={run_dir}",
        "--quiet",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"run directory: {run_dir}" in proc.stdout
    assert "accuracy" in proc.stdout  # the validation metrics table
    saved = load_config(run_dir / "config.yaml")
    assert saved.train.num_train_epochs == 2.0
    assert saved.train.learning_rate == 5e-3
    assert saved.task.max_length == 24
    assert saved.train.group_by_length is False
    assert saved.output.dir == str(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["epochs"] == 2
    assert metrics["validation"]["samples"] == 16
    assert (run_dir / "model" / "config.json").exists() and (run_dir / "log.jsonl").exists()
    assert not (tmp_path / "unused").exists()

    # ---- eval
    result = invoke("eval", str(run_dir), str(valid_csv), "-o", str(tmp_path / "m.json"))
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "m.json").read_text())
    assert evaluated["samples"] == 16
    assert 0.0 <= evaluated["accuracy"] <= 1.0
    # Same model, same data: the numbers the training run reported.
    assert evaluated["accuracy"] == pytest.approx(metrics["validation"]["accuracy"])
    assert evaluated["loss"] == pytest.approx(metrics["validation"]["loss"], rel=1e-4)
    assert "accuracy" in result.stdout

    # ---- predict --text (repeatable)
    expected = tunesmith.predict(run_dir, ["a wonderful superb film", "dull and awful"])
    result = invoke("predict", str(run_dir), "--text", "a wonderful superb film", "--text", "dull and awful")
    assert result.exit_code == 0, result.output
    lines = _jsonl(result.stdout)
    assert [line["text"] for line in lines] == ["a wonderful superb film", "dull and awful"]
    assert [line["label"] for line in lines] == [p["label"] for p in expected]
    for line, want in zip(lines, expected):
        assert set(line["scores"]) == {"neg", "pos"}
        assert sum(line["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        assert line["score"] == pytest.approx(want["score"], abs=1e-5)

    # ---- predict --input file.csv -o out.jsonl: one line per row, in file order
    out = tmp_path / "out.jsonl"
    result = invoke("predict", str(run_dir), "--input", str(valid_csv), "-o", str(out))
    assert result.exit_code == 0, result.output
    written = _jsonl(out.read_text(encoding="utf-8"))
    assert [w["text"] for w in written] == [r["text"] for r in valid_rows]
    by_api = tunesmith.predict(run_dir, [r["text"] for r in valid_rows])
    assert [w["label"] for w in written] == [p["label"] for p in by_api]
    assert f"wrote 16 predictions to {out}" in result.output

    # ---- predict from stdin lines (blank lines skipped), and a .txt file
    result = invoke("predict", str(run_dir), input="a wonderful superb film\n\n  \ndull and awful\n")
    assert result.exit_code == 0, result.output
    assert [(x["text"], x["label"]) for x in _jsonl(result.stdout)] == [(x["text"], x["label"]) for x in lines]
    (tmp_path / "texts.txt").write_text("dull and awful\n", encoding="utf-8")
    result = invoke("predict", str(run_dir), "--input", str(tmp_path / "texts.txt"))
    assert result.exit_code == 0, result.output
    assert _jsonl(result.stdout)[0]["label"] == lines[1]["label"]

    # ---- user errors exit 2 with one line, no traceback
    bad = write_csv(tmp_path / "bad.csv", [{"text": "fine film", "label": "pos"}, {"text": "meh", "label": "neutral"}])
    result = invoke("eval", str(run_dir), str(bad))
    assert result.exit_code == 2
    assert f"error: {bad} line 3: column 'label' has label 'neutral', which does not occur in train" in result.output
    result = invoke("predict", str(run_dir), "--input", str(tmp_path / "nope.csv"))
    assert result.exit_code == 2 and "--input: file" in result.output and "not found" in result.output
    write_csv(tmp_path / "no_text.csv", [{"review": "x"}])
    result = invoke("predict", str(run_dir), "--input", str(tmp_path / "no_text.csv"))
    assert result.exit_code == 2 and "missing column 'text'" in result.output and "columns found: review;" in result.output
    assert "rename the text column to 'text'" in result.output
    result = invoke("predict", str(tmp_path), "--text", "x")
    assert result.exit_code == 2 and "is not a tunesmith run directory (no config.yaml)" in result.output
    result = invoke("predict", str(run_dir), input="\n\n")
    assert result.exit_code == 2 and "no input texts" in result.output
    (tmp_path / "latin.txt").write_bytes("un film très bon\n".encode("latin-1"))
    result = invoke("predict", str(run_dir), "--input", str(tmp_path / "latin.txt"))
    assert result.exit_code == 2
    assert f"error: {tmp_path / 'latin.txt'}: line 1: expected utf-8 text, found byte 0xe8" in result.output
    assert type(result.exception) is SystemExit  # a clean exit, not an escaped exception


# --------------------------------------------------------------------------- config commands


def test_config_init_validate_show(tmp_path):
    path = tmp_path / "run.yaml"
    result = invoke("config", "init", str(path))
    assert result.exit_code == 0, result.output
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# tunesmith run config")
    written = yaml.safe_load(text)
    assert set(written) == {"model", "data", "task", "method", "train", "generation", "output"}
    assert written["data"]["train_file"] == "train.csv"

    result = invoke("config", "init", str(path))
    assert result.exit_code == 2 and "exists; pass --force" in result.output
    assert invoke("config", "init", str(path), "--force").exit_code == 0

    # The starter names train.csv, which is not there yet: validate says so instead of "ok" (then train failing).
    result = invoke("config", "validate", str(path))
    assert result.exit_code == 2 and "data.train_file: file 'train.csv' not found" in result.output
    write_csv(tmp_path / "train.csv", sentiment_rows(4))
    result = invoke("config", "validate", str(path))
    assert result.exit_code == 0 and "is valid" in result.output

    result = invoke("config", "show", str(path), "train.learning_rate=1e-4", "method=lora", "method.lora_r=4")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["learning_rate"] == 1e-4
    assert shown["method"]["name"] == "lora" and shown["method"]["lora_r"] == 4
    assert shown["train"]["per_device_train_batch_size"] == 32  # defaults filled in
    assert shown["model"]["name_or_path"] == "bundled:all-MiniLM-L6-v2"

    result = invoke("config", "show")  # no file: the defaults
    assert result.exit_code == 0 and yaml.safe_load(result.stdout)["method"]["name"] == "full"


def test_config_validate_reports_typos_and_bad_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rat: 1e-4\ndata:\n  validation_split: 1.5\n", encoding="utf-8")
    result = invoke("config", "validate", str(path))
    assert result.exit_code == 2
    errors = sorted(line for line in result.output.splitlines() if line.startswith("error:"))
    assert errors == [
        f"error: {path}: data.validation_split: Input should be less than 1 (found 1.5)",
        f"error: {path}: unknown key 'train.learning_rat'; did you mean 'train.learning_rate'?",
    ]
    assert type(result.exception) is SystemExit

    result = invoke("config", "validate", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 2 and "not found; create one with `tunesmith config init" in result.output
    result = invoke("config", "validate", str(tmp_path / "bad.yaml"), "nokey")
    assert result.exit_code == 2 and "expected dotted.key=value" in result.output
    (tmp_path / "list.yaml").write_text("- a\n- b\n", encoding="utf-8")
    result = invoke("config", "validate", str(tmp_path / "list.yaml"))
    assert result.exit_code == 2 and "expected a mapping of sections" in result.output and "found list" in result.output


def test_config_reference(tmp_path):
    result = invoke("config", "reference")
    assert result.exit_code == 0
    assert result.stdout == config_reference() + "\n"
    result = invoke("config", "reference", "-o", str(tmp_path / "ref.md"))
    assert (tmp_path / "ref.md").read_text(encoding="utf-8") == config_reference() + "\n"


def test_train_with_a_broken_config_exits_2(tmp_path):
    (tmp_path / "cfg.yaml").write_text("method: lorra\n", encoding="utf-8")
    result = invoke("train", str(tmp_path / "cfg.yaml"))
    assert result.exit_code == 2
    assert ("method.name: expected 'full', 'last_n', 'frozen', 'lora', 'dora', 'ia3', found 'lorra'; did you mean 'lora'?"
            in result.output)


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "eval", "predict", "doctor", "demo", "config"):
        assert command in result.output


# --------------------------------------------------------------------------- doctor


def test_doctor(tmp_path):
    import torch

    from tunesmith.assets import installed_assets

    proc = run_cli("doctor", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr
    assert torch.__version__ in out
    assert tunesmith.__version__ in out
    assert re.search(r"torch threads \(intra/inter\)\s*│\s*\d+/\d+", out), out
    assert "native bf16 flags" in out
    assert "precision: auto" in out
    assert "HF_HUB_OFFLINE" in out
    for name in installed_assets():
        assert name in out  # bundled:all-MiniLM-L6-v2, bundled:rotten_tomatoes, ...
    assert "bundled:all-MiniLM-L6-v2" in out
