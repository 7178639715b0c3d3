"""A newcomer's first hour: finished work is never lost, mistakes get one-line errors (exit 2), stops
are acknowledged and say the one command that works next.

One tiny run is trained per module (`finished`) and copied for each test that damages it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import tunesmith
from tiny import sentiment_rows, tiny_config, write_csv
from tunesmith import pipeline
from tunesmith.cli import app
from tunesmith.loop.interrupt import TrainingInterrupted
from tunesmith.runs.rundir import REPLACED, RUN_MARKER


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input)


def _config(tiny_bert, work: Path, out: Path, **sections) -> dict:
    train = work / "train.csv"
    if not train.exists():
        write_csv(train, sentiment_rows(48, seed=2))
    return tiny_config(tiny_bert, train, out, train={"num_train_epochs": 2, **sections.pop("train", {})}, **sections)


@pytest.fixture(scope="module")
def finished(tiny_bert, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("finished")
    result = tunesmith.train(_config(tiny_bert, work, work / "run"), show_progress=False)
    return result.run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- finished work is never lost


def test_overwrite_keeps_the_previous_run_until_the_new_one_has_saved(finished, tiny_bert, tmp_path, monkeypatch):
    """A run stopped during its final evaluation (a double Ctrl-C) puts the previous run back, the user's
    own files untouched; a run that finishes replaces only what tunesmith wrote."""
    run_dir = _copy(finished, tmp_path)
    (run_dir / "notes.txt").write_text("my notes")
    (run_dir / "analysis").mkdir()
    (run_dir / "analysis" / "plot.txt").write_text("a plot")
    before = _snapshot(run_dir)
    cfg = _config(tiny_bert, tmp_path, run_dir, train={"learning_rate": 1e-3})

    def stop_at_once(*args, **kwargs):
        raise KeyboardInterrupt  # what a second Ctrl-C raises

    monkeypatch.setattr(pipeline.finish, "run_evaluation", stop_at_once)
    with pytest.raises(TrainingInterrupted) as caught:
        tunesmith.train(cfg, show_progress=False, overwrite=True)
    (message,) = caught.value.problems
    assert message.startswith("stopped at once (Ctrl-C) before the new run had saved;")
    assert f"the previous run in '{run_dir}' is back as it was" in message
    assert _snapshot(run_dir) == before  # model, metrics, card, and the user's files, byte for byte
    assert not (run_dir / REPLACED).exists()

    monkeypatch.undo()
    tunesmith.train(cfg, show_progress=False, overwrite=True)
    after = _snapshot(run_dir)
    assert after["notes.txt"] == b"my notes" and after["analysis/plot.txt"] == b"a plot"
    assert after["metrics.json"] != before["metrics.json"] and not (run_dir / REPLACED).exists()
    assert yaml.safe_load(after["config.yaml"])["train"]["learning_rate"] == 1e-3


def test_a_failed_overwrite_puts_the_previous_run_back_and_says_so(finished, tiny_bert, tmp_path, monkeypatch):
    from tunesmith.errors import ResourceError

    run_dir = _copy(finished, tmp_path)
    before = _snapshot(run_dir)

    def full_disk(*args, **kwargs):
        raise ResourceError("disk full (simulated)")

    monkeypatch.setattr(pipeline.finish, "write_run", full_disk)
    with pytest.raises(ResourceError) as caught:
        tunesmith.train(_config(tiny_bert, tmp_path, run_dir), show_progress=False, overwrite=True)
    assert caught.value.problems[-1].startswith(f"--overwrite: the previous run in '{run_dir}' is back as it was")
    assert _snapshot(run_dir) == before


def test_an_overwrite_whose_process_died_is_put_back_by_the_next_command(finished, tmp_path):
    """SIGKILL during an --overwrite leaves the previous run set aside; `predict` (and `train`) put it back."""
    from tunesmith.runs.rundir import set_aside_previous_run

    run_dir = _copy(finished, tmp_path)
    before = _snapshot(run_dir)
    set_aside_previous_run(run_dir)
    (run_dir / RUN_MARKER).write_text("the dead replacement's marker")
    (run_dir / "log.jsonl").write_text('{"type": "train"}\n')
    result = invoke("predict", str(run_dir), "--text", "a wonderful film")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["label"] in {"pos", "neg"}
    assert _snapshot(run_dir) == before


def test_demo_never_replaces_an_earlier_demo_without_overwrite(finished, tmp_path, monkeypatch):
    from tunesmith.cli.demo import demo_run_dir

    monkeypatch.chdir(tmp_path)
    assert demo_run_dir(None) == Path("runs/demo")
    shutil.copytree(finished, tmp_path / "runs" / "demo")
    assert demo_run_dir(None) == Path("runs/demo-2")  # the default moves on
    (tmp_path / "runs" / "demo-2").mkdir()
    (tmp_path / "runs" / "demo-2" / "x.txt").write_text("not a run, not empty")
    assert demo_run_dir(None) == Path("runs/demo-3")
    assert demo_run_dir(None, overwrite=True) == Path("runs/demo")
    # An explicit folder follows train's rules: refused without --overwrite, before anything loads.
    result = invoke("demo", "--output-dir", "runs/demo")
    assert result.exit_code == 2
    assert "output.dir: 'runs/demo' already holds a run; replace it with --overwrite" in result.output


# --------------------------------------------------------------------------- stops


def test_ctrl_c_while_saving_is_acknowledged_and_the_run_still_saves(tiny_bert, tmp_path, monkeypatch, capfd):
    real = pipeline.finish.run_evaluation
    sent = []

    def evaluation_with_ctrl_c(*args, **kwargs):
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)  # handled at once, by the handler of the saving phase
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.finish, "run_evaluation", evaluation_with_ctrl_c)
    result = tunesmith.train(_config(tiny_bert, tmp_path, tmp_path / "run"), show_progress=False)
    assert sent and (result.run_dir / "metrics.json").exists()
    assert "stopping: training has finished and the run is being evaluated and saved" in capfd.readouterr().err


def test_a_double_ctrl_c_while_saving_leaves_a_resumable_run(tiny_bert, tmp_path, monkeypatch):
    def stop_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.finish, "run_evaluation", stop_at_once)
    cfg = _config(tiny_bert, tmp_path, tmp_path / "run")
    with pytest.raises(TrainingInterrupted) as caught:
        tunesmith.train(cfg, show_progress=False)
    run_dir = tmp_path / "run"
    assert caught.value.problems == [
        f"stopped at once (Ctrl-C); the last checkpoint is kept: continue with `tunesmith train --resume {run_dir}`"]
    assert caught.value.exit_code == 130
    result = invoke("predict", str(run_dir), "--text", "x")  # not finished: says how to finish it
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: '{run_dir}' did not finish training, so it has no saved model yet; continue it "
                                     f"with `tunesmith train --resume {run_dir}`")
    monkeypatch.undo()
    assert tunesmith.train(resume=run_dir, show_progress=False).metrics["validation"]["samples"] == 12


def test_ctrl_c_before_training_leaves_nothing_behind(tiny_bert, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.fit, "train_loop", interrupted)  # after the run directory was made
    with pytest.raises(TrainingInterrupted) as caught:
        tunesmith.train(_config(tiny_bert, tmp_path, tmp_path / "run"), show_progress=False)
    assert caught.value.problems[0].startswith("stopped (Ctrl-C) before the run's first checkpoint, so nothing was kept")
    assert not (tmp_path / "run").exists()  # so the same command simply runs again
    monkeypatch.setattr(pipeline.model, "load_model", interrupted)  # before it was made
    with pytest.raises(TrainingInterrupted, match="before training started; nothing was written"):
        tunesmith.train(_config(tiny_bert, tmp_path, tmp_path / "run"), show_progress=False)
    assert not (tmp_path / "run").exists()


def test_sigint_during_an_overwrite_in_a_real_process(finished, tiny_bert, tmp_path):
    """The issue's reproduction: `tunesmith train c.yaml output.dir=runs/keep --overwrite`, Ctrl-C after a
    few steps. The stop is acknowledged, printed as a stop (not an error), exit 130, and the old run is
    intact. The plain run does not import DeepSpeed (no "Setting accelerator to CPU")."""
    run_dir = _copy(finished, tmp_path)
    (run_dir / "notes.txt").write_text("mine")
    before = _snapshot(run_dir)
    cfg = _config(tiny_bert, tmp_path, run_dir, train={"num_train_epochs": 500, "logging_steps": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    exe = shutil.which("tunesmith", path=str(Path(sys.executable).parent))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    proc = subprocess.Popen([exe, "train", "c.yaml", "--overwrite"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = run_dir / "log.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and '"type": "train"' in log.read_text() and (run_dir / REPLACED).exists():
            break  # the replacement is training
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, out + err
    assert "SIGINT received: stopping after this step" in err
    assert "stopped: SIGINT received: stopped after step" in err and "before the new run had saved" in err
    assert "error:" not in err and "Traceback" not in err
    assert "Setting accelerator to CPU" not in out + err
    assert _snapshot(run_dir) == before


# --------------------------------------------------------------------------- one-line errors


def test_predict_and_eval_errors_before_any_work(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    for args in (["predict", str(run_dir), "--text", "hi", "-o", "/nonexistent/x.jsonl"],
                 ["eval", str(run_dir), str(tmp_path / "x.csv"), "-o", "/nonexistent/x.json"]):
        result = invoke(*args)
        assert result.exit_code == 2
        assert result.output.strip() == ("error: --output: the folder '/nonexistent' of '/nonexistent/x.json"
                                         + ("l" if args[0] == "predict" else "") + "' does not exist; create it first "
                                         "(mkdir -p /nonexistent) or choose another path")
    result = invoke("predict", str(run_dir), "--text", "hi", "-o", str(tmp_path))
    assert result.exit_code == 2 and "is a folder; expected a file name" in result.output
    result = invoke("predict", str(run_dir), "--text", "hi", "--batch-size", "0")
    assert result.exit_code == 2 and "Invalid value for '--batch-size'" in result.output
    shutil.rmtree(run_dir / "model")
    result = invoke("predict", str(run_dir), "--text", "hi")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == (f"error: '{run_dir / 'model'}' is missing: expected the saved model there (or an "
                                     "adapter/ folder); restore it from a copy, or train the run again")
    result = invoke("predict", str(tmp_path / "nope"), "--text", "hi")
    assert result.exit_code == 2 and "run directory" in result.output and "not found" in result.output


def test_an_unstarted_run_says_how_to_start_it_again(finished, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(finished / "config.yaml", run_dir / "config.yaml")
    (run_dir / RUN_MARKER).write_text("")
    result = invoke("predict", str(run_dir), "--text", "x")
    assert result.exit_code == 2
    assert (f"did not finish training, so it has no saved model yet; it stopped before its first checkpoint; start it "
            f"again with `tunesmith train {run_dir / 'config.yaml'} --overwrite`") in result.output
    result = invoke("train", "--resume", str(run_dir))
    assert result.exit_code == 2 and f"tunesmith train {run_dir / 'config.yaml'} --overwrite" in result.output


def test_json_output_and_stdout_dash(finished):
    result = invoke("predict", str(finished), "--text", "a", "--text", "b", "--json")
    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)
    assert [p["text"] for p in predictions] == ["a", "b"] and all("label" in p for p in predictions)
    result = invoke("predict", str(finished), "--text", "a", "-o", "-")
    assert result.exit_code == 0 and json.loads(result.stdout)["text"] == "a"
    assert not Path("-").exists()
    result = invoke("eval", str(finished), str(Path(yaml.safe_load((finished / "config.yaml").read_text())["data"]["train_file"])),
                    "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == 48
    result = invoke("doctor", "--json")
    assert result.exit_code == 0 and "precision: auto" in json.loads(result.stdout)


def test_version_and_dashed_overrides():
    from tunesmith import __version__

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"tunesmith {__version__}"
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "c.yaml", "--train.learning_rate=1e-4"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    assert proc.returncode == 2
    assert ("error: unknown option '--train.learning_rate=1e-4': config overrides are written without dashes, e.g. "
            "`tunesmith train CONFIG train.learning_rate=1e-4`; drop the leading '--'") in proc.stderr


def test_resume_takes_overrides_without_a_config(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    result = invoke("train", "--resume", str(run_dir), "train.save_steps=50")
    assert result.exit_code == 2
    assert f"--resume: '{run_dir}' holds a finished run; nothing to resume" in result.output  # not "config file not found"


def test_unwritable_output_dir_is_refused_before_anything_loads(tmp_path):
    """Checked before torch is even imported: a fresh interpreter reports it without importing torch."""
    write_csv(tmp_path / "train.csv", sentiment_rows(8))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": {"train_file": "train.csv"}, "output": {"dir": "/proc/x"}}))
    code = ("import sys; from tunesmith.cli import main\n"
            "sys.argv = ['tunesmith', 'train', 'c.yaml']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "300"})
    assert proc.stdout.strip() == "exit 2 False", proc.stdout + proc.stderr
    assert "error: output.dir: cannot write to '/proc'" in proc.stderr
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data": {"train_file": "nope.csv"}}))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "300"})
    assert proc.stdout.strip() == "exit 2 False" and "data.train_file: file 'nope.csv' not found" in proc.stderr


def test_config_init_with_the_users_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "reviews.csv", [{"review": "fine", "sentiment": "pos"}, {"review": "bad", "sentiment": "neg"}])
    (tmp_path / "cfg").mkdir()
    result = invoke("config", "init", "cfg/my.yaml", "--train-file", "reviews.csv")
    assert result.exit_code == 2
    assert ("error: --train-file: 'reviews.csv' has no column 'text', 'label'; columns found: review, sentiment; name the "
            "right ones with --text-column NAME --label-column NAME") in result.output
    result = invoke("config", "init", "cfg/my.yaml", "--train-file", "reviews.csv", "--text-column", "review",
                    "--label-column", "sentiment")
    assert result.exit_code == 0, result.output
    written = yaml.safe_load((tmp_path / "cfg" / "my.yaml").read_text())
    assert written["data"]["train_file"] == "../reviews.csv"  # relative to the config, as configs are read
    assert written["task"]["text_column"] == "review" and written["task"]["label_column"] == "sentiment"
    assert invoke("config", "validate", "cfg/my.yaml").exit_code == 0
    result = invoke("config", "init", "/nonexistent/dir/x.yaml")
    assert result.exit_code == 2 and "the folder '/nonexistent/dir' does not exist" in result.output


def test_model_card_counts_every_parameter(finished):
    """The embedding-rows speed option hides rows from `parameters()`: the count comes from before it."""
    from transformers import AutoModelForSequenceClassification

    total = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(finished / "model").parameters())
    params = json.loads((finished / "provenance.json").read_text())["parameters"]
    assert params == f"trainable parameters: {total:,} of {total:,} (100.00%)"  # method full: all of them
    assert json.loads((finished / "provenance.json").read_text())["speed"]["skip_unseen_embedding_rows"]
    assert f"{total:,}" in (finished / "README.md").read_text()
