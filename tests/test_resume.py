"""Checkpoints and exact resume: signals, SIGKILL, lock file, config/data checks, pruning."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tunesmith
from tunesmith.loop.checkpoint import latest_checkpoint, remove_partial, step_dirs
from tunesmith.errors import ConfigError, DataError
from tunesmith.loop.interrupt import TrainingInterrupted
from tunesmith.runs.lock import RunLock
from tiny import sentiment_rows, tiny_config, write_csv

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent


def _cfg(tiny_bert, train_csv, out, **train):
    # Dropout stays on: the resumed run must replay the same dropout masks, not just the same data.
    return tiny_config(tiny_bert, train_csv, out, train={
        "num_train_epochs": 3, "save_steps": 2, "logging_steps": 1, "save_total_limit": 2, **train})


def _weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _train_losses(run_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["type"] == "train"]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs after resume"
    assert _train_losses(a) == _train_losses(b)
    assert _log_without_timings(a) == _log_without_timings(b)
    ma, mb = (json.loads((d / "metrics.json").read_text())["validation"] for d in (a, b))
    assert ma == mb


def _log_without_timings(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(("seconds", "per_second"))} for r in records]


def _interrupt_at_step(monkeypatch, step: int, signum=signal.SIGINT):
    """Deliver a signal to this process during the given optimizer step (as Ctrl-C would)."""
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step_then_signal(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            signal.raise_signal(signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)


@pytest.mark.parametrize(
    "options, stop_at, batches_in_epoch",
    [
        ({}, 7, 1),  # 6 steps per epoch: one batch into the second epoch
        ({"gradient_accumulation_steps": 2, "eval_strategy": "steps", "eval_steps": 2}, 4, 2),
        ({"precision": "bf16"}, 5, 5),
    ],
    ids=["plain", "accumulation+step-eval", "bf16"],
)
def test_sigint_checkpoints_and_resume_is_bitwise_exact(tiny_bert, sentiment_csv, tmp_path, monkeypatch, options, stop_at, batches_in_epoch):
    reference = tunesmith.train(_cfg(tiny_bert, sentiment_csv, tmp_path / "ref", **options), show_progress=False)
    assert not (reference.run_dir / "checkpoints").exists()  # a finished run keeps only its model

    _interrupt_at_step(monkeypatch, stop_at)
    with pytest.raises(TrainingInterrupted, match=rf"SIGINT received: stopped after step {stop_at}.*--resume") as caught:
        tunesmith.train(_cfg(tiny_bert, sentiment_csv, tmp_path / "run", **options), show_progress=False)
    assert caught.value.exit_code == 130
    monkeypatch.undo()
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint.step == stop_at and checkpoint.state["loop"]["batches_in_epoch"] == batches_in_epoch
    assert not (tmp_path / "run" / ".lock").exists()  # released on the way out

    resumed = tunesmith.train(resume=tmp_path / "run", show_progress=False)
    _assert_same_run(reference.run_dir, resumed.run_dir)
    provenance = json.loads((resumed.run_dir / "provenance.json").read_text())
    assert any("resumed from" in note for note in provenance["notes"])


@pytest.mark.parametrize("damage", ["missing", "shape"])
def test_resume_refuses_weights_that_do_not_fit_the_model(tiny_bert, sentiment_csv, tmp_path, monkeypatch, damage):
    from safetensors.torch import save_file

    from tunesmith.loop.checkpoint import CheckpointError

    _interrupt_at_step(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted):
        tunesmith.train(_cfg(tiny_bert, sentiment_csv, tmp_path / "run"), show_progress=False)
    monkeypatch.undo()
    weights_file = latest_checkpoint(tmp_path / "run" / "checkpoints").path / "trainable.safetensors"
    weights = load_file(str(weights_file))
    name = "classifier.weight"
    if damage == "missing":
        del weights[name]
    else:
        weights[name] = weights[name][:, :-1].contiguous()
    save_file(weights, str(weights_file))
    detail = r"missing \['classifier.weight'\]" if damage == "missing" else "parameter shapes differ"
    with pytest.raises(CheckpointError, match=rf"weights do not match this model \({detail}"):
        tunesmith.train(resume=tmp_path / "run", show_progress=False)


def test_resume_auto_starts_fresh_then_refuses_finished(tiny_bert, sentiment_csv, tmp_path):
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path / "run", num_train_epochs=1)
    first = tunesmith.train(cfg, resume="auto", show_progress=False)  # nothing to resume: a new run
    assert (first.run_dir / "model").is_dir()
    with pytest.raises(ConfigError, match="finished run"):
        tunesmith.train(cfg, resume="auto", show_progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        tunesmith.train(cfg, show_progress=False)
    again = tunesmith.train(cfg, overwrite=True, show_progress=False)
    assert again.metrics["train"]["global_step"] == first.metrics["train"]["global_step"]


def test_resume_refuses_changed_config_and_data(tiny_bert, tmp_path, monkeypatch):
    train_csv = write_csv(tmp_path / "train.csv", sentiment_rows(64))
    _interrupt_at_step(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted):
        tunesmith.train(_cfg(tiny_bert, train_csv, tmp_path / "run"), show_progress=False)
    monkeypatch.undo()
    changed = _cfg(tiny_bert, train_csv, tmp_path / "run", learning_rate=1e-3)
    with pytest.raises(ConfigError, match=r"train.learning_rate: 0.003 -> 0.001"):
        tunesmith.train(changed, resume=tmp_path / "run", show_progress=False)
    # Checkpoint cadence may change: it does not change the result.
    write_csv(train_csv, sentiment_rows(64, seed=5))
    with pytest.raises(DataError, match="train.*data changed"):
        tunesmith.train(_cfg(tiny_bert, train_csv, tmp_path / "run", save_steps=5), resume=tmp_path / "run", show_progress=False)


def test_lock_stops_a_second_writer(tiny_bert, sentiment_csv, tmp_path):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        with pytest.raises(ConfigError, match=r"being written by another tunesmith run \(pid \d+"):
            tunesmith.train(_cfg(tiny_bert, sentiment_csv, run_dir), show_progress=False)
    assert not (run_dir / "config.yaml").exists()


def test_save_total_limit_keeps_newest_and_best(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    _interrupt_at_step(monkeypatch, 17)
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path / "run", save_steps=1, save_total_limit=2,
               metric_for_best_model="loss")
    with pytest.raises(TrainingInterrupted):
        tunesmith.train(cfg, show_progress=False)
    state = latest_checkpoint(tmp_path / "run" / "checkpoints").state["loop"]
    kept = [step for step, _ in step_dirs(tmp_path / "run" / "checkpoints")]
    assert kept[-2:] == [16, 17]
    assert set(kept) == {16, 17, state["best_step"]}


def test_partial_checkpoint_is_ignored_and_cleaned(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step-000004").mkdir(parents=True)
    (checkpoints / "step-000004" / "state.json").write_text(json.dumps({"global_step": 4, "loop": {}}))
    (checkpoints / "step-000006.tmp-123").mkdir()
    (checkpoints / "step-000006.tmp-123" / "state.json").write_text("{half")
    assert latest_checkpoint(checkpoints).step == 4
    remove_partial(checkpoints)
    assert [p.name for p in checkpoints.iterdir()] == ["step-000004"]


@pytest.mark.parametrize(
    "fault, message",
    [(OSError(28, "No space left on device"), "disk is full"), (MemoryError(), "out of memory")],
    ids=["disk-full", "out-of-memory"],
)
def test_failed_save_keeps_previous_checkpoint(tiny_bert, sentiment_csv, tmp_path, monkeypatch, fault, message):
    from tunesmith.loop import checkpoint as checkpoint_module
    from tunesmith.loop.checkpoint import CheckpointError

    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def save_then_fail(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(tensors, path, *args, **kwargs)  # a half-written folder, then the fault
            raise fault
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", save_then_fail)
    with pytest.raises(CheckpointError, match=rf"step 4 .*{message}.*step-000002 is intact.*--resume"):
        tunesmith.train(_cfg(tiny_bert, sentiment_csv, tmp_path / "run"), show_progress=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith("step-")] == ["step-000002"]
    assert load_file(str(checkpoints / "step-000002" / "trainable.safetensors"))
    monkeypatch.undo()
    resumed = tunesmith.train(resume=tmp_path / "run", show_progress=False)
    assert resumed.metrics["train"]["global_step"] == 18


def _poison_losses(monkeypatch, poisoned_calls: set[int]) -> None:
    """The training loss of the given training batches (counted from 1) is multiplied by NaN."""
    from tunesmith.tasks.classification.task import ClassificationTask

    real_loss_fn = ClassificationTask.loss_fn

    def poisoned(self, cfg, state, train):
        inner = real_loss_fn(self, cfg, state, train)
        calls = {"n": 0}

        def loss(logits, labels):
            if train is not None and logits.requires_grad:
                calls["n"] += 1
                if calls["n"] in poisoned_calls:
                    return inner(logits, labels)._replace(sums=inner(logits, labels).sums * float("nan"))
            return inner(logits, labels)

        return loss

    monkeypatch.setattr(ClassificationTask, "loss_fn", poisoned)


def test_nonfinite_loss_skipped_then_stops(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    from tunesmith.loop.step import TrainingDiverged

    _poison_losses(monkeypatch, {3, 4})
    result = tunesmith.train(_cfg(tiny_bert, sentiment_csv, tmp_path / "skip", num_train_epochs=1), show_progress=False)
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "skipped"] == [3, 4]
    assert all(torch.isfinite(w).all() for w in _weights(result.run_dir).values())

    with pytest.raises(TrainingDiverged, match=r"stopped at step 4: 2 consecutive steps .*learning rate at the time .*last good checkpoint"):
        tunesmith.train(_cfg(tiny_bert, sentiment_csv, tmp_path / "stop", max_nonfinite_steps=1), show_progress=False)
    assert [s for s, _ in step_dirs(tmp_path / "stop" / "checkpoints")] == [2]


def test_separated_nonfinite_steps_do_not_stop_the_run(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    """max_nonfinite_steps counts bad steps in a row: four isolated NaN batches with a limit of 1 are four
    skipped updates and a finished run (not `TrainingDiverged` at the second, as a running total would do)."""
    _poison_losses(monkeypatch, {2, 5, 8, 11})
    result = tunesmith.train(_cfg(tiny_bert, sentiment_csv, tmp_path / "run", num_train_epochs=2, max_nonfinite_steps=1),
                             show_progress=False)
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "skipped"] == [2, 5, 8, 11]
    assert result.metrics["train"]["global_step"] == 12
    assert all(torch.isfinite(w).all() for w in _weights(result.run_dir).values())


def test_nan_loss_inside_an_accumulation_window_skips_its_update(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    """Without DeepSpeed the losses are read once per optimizer step: a NaN in the window's first
    micro-batch (batch 3 of accumulation 2: step 2) still skips that update and stays out of the logged loss."""
    _poison_losses(monkeypatch, {3})
    result = tunesmith.train(_cfg(tiny_bert, sentiment_csv, tmp_path / "run", num_train_epochs=1,
                                  gradient_accumulation_steps=2), show_progress=False)
    log = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in log if r["type"] == "skipped"] == [(2, "nan")]
    assert all(math.isfinite(r["loss"]) for r in log if r["type"] == "train")
    assert all(torch.isfinite(w).all() for w in _weights(result.run_dir).values())


class _CountingAccelerator:
    """Two processes as far as `LossWindow` asks: counts the all-reduces (each returns its input)."""

    num_processes = 2

    def __init__(self):
        self.reduces = 0

    def reduce(self, tensor, reduction):
        self.reduces += 1
        return tensor


def test_loss_window_reads_the_losses_once_per_optimizer_step():
    from tunesmith.loop.state import LoopResult
    from tunesmith.loop.step import LossWindow, add_to_running_loss, gradient_scale, window_loss

    accelerator = _CountingAccelerator()
    losses = LossWindow(accelerator)
    for total, units in ((4.0, 8), (float("nan"), 8), (1.0, 4)):  # loss sums and their units
        losses.add(torch.tensor(total), torch.tensor(float(units)))
    assert accelerator.reduces == 0  # nothing read per micro-batch
    window = losses.close()
    assert accelerator.reduces == 1 and [units for _, units in window] == [8, 8, 4]
    assert math.isnan(window_loss(window)) and window_loss(window[:1] + window[2:]) == 5.0 / 12
    result = LoopResult()
    add_to_running_loss(result, window)
    assert (result.running_loss, result.running_count) == (5.0, 12)  # the NaN micro-batch left out
    # Two micro-batches of nominal 8 on 2 processes: the gradients are rescaled from sum / (8 * 2 * 2) to sum / 20.
    assert gradient_scale(window[:1] + window[2:], 8.0, 2, 2) == 32 / 12
    assert gradient_scale([(4.0, 8), (4.0, 8)], 8.0, 2, 1) == 1.0  # full unweighted batches: no multiply
    assert losses.close() == []  # the next window starts empty


def test_resume_cuts_the_log_back_to_the_checkpoint(tiny_bert, sentiment_csv, tmp_path, monkeypatch):
    """The checkpoint keeps log.jsonl's size, not its records: a resume cuts the lines written after the
    checkpoint and keeps every line before it, a skipped step's too (once lost: the records the checkpoint
    carried were the train and eval ones only)."""
    options = {"num_train_epochs": 1, "eval_strategy": "steps", "eval_steps": 2}
    _poison_losses(monkeypatch, {3})
    reference = tunesmith.train(_cfg(tiny_bert, sentiment_csv, tmp_path / "ref", **options), show_progress=False)
    _interrupt_at_step(monkeypatch, 4)  # the 4th update is step 5: step 3's was skipped
    with pytest.raises(TrainingInterrupted):
        tunesmith.train(_cfg(tiny_bert, sentiment_csv, tmp_path / "run", **options), show_progress=False)
    monkeypatch.undo()  # batch 3 is before the checkpoint: the resumed run does not see it again
    state = latest_checkpoint(tmp_path / "run" / "checkpoints").state["loop"]
    with open(tmp_path / "run" / "log.jsonl", "a") as log:  # as a step after the checkpoint would have written
        log.write('{"type": "train", "step": 99}\n')
    resumed = tunesmith.train(resume=tmp_path / "run", show_progress=False)
    assert [r["step"] for r in _log_without_timings(resumed.run_dir) if r["type"] == "skipped"] == [3]
    assert _log_without_timings(resumed.run_dir) == _log_without_timings(reference.run_dir)
    assert "history" not in state and state["log_bytes"] > 0


class _FakeScaler:
    """An fp16 GradScaler as far as the loop asks it (enabled, its scale)."""

    def is_enabled(self) -> bool:
        return True

    def get_scale(self) -> float:
        return 1024.0


class _FakeScheduler:
    def get_last_lr(self) -> list[float]:
        return [1e-4]


def _note_updates(tmp_path, outcomes: str, scaler=None, limit: int = 2):
    """Feed `_note_update` one step per character (g: good, o: finite loss with inf gradients, n: NaN loss);
    returns the loop's counters and the log's record types."""
    from tunesmith.config import TrainConfig
    from tunesmith.runs.rundir import JsonlLog
    from tunesmith.loop.state import LoopResult
    from tunesmith.loop.step import note_update as _note_update

    result, logbook = LoopResult(), JsonlLog(tmp_path / "log.jsonl")
    losses = {"g": 0.5, "o": 0.5, "n": float("nan")}
    try:
        for outcome in outcomes:
            _note_update(result, TrainConfig(max_nonfinite_steps=limit), outcome == "g", losses[outcome], scaler,
                         _FakeScheduler(), logbook, tmp_path)
            result.global_step += 1
    finally:
        logbook.close()
    return result, [json.loads(line)["type"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]


def test_fp16_overflow_skips_are_logged_not_counted(tmp_path):
    result, types = _note_updates(tmp_path, "o" * 20, scaler=_FakeScaler())
    assert types == ["overflow"] * 20 and result.nonfinite_steps == 0


def test_gradient_overflow_without_a_scaler_counts(tmp_path):
    from tunesmith.loop.step import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="stopped at step 3: 3 consecutive steps"):
        _note_updates(tmp_path, "ooo")


def test_nonfinite_count_resets_on_a_good_update(tmp_path):
    from tunesmith.loop.step import TrainingDiverged

    result, types = _note_updates(tmp_path, "nngnngnng", scaler=_FakeScaler())
    assert types == ["skipped"] * 6 and result.nonfinite_steps == 0
    # A NaN loss is divergence with a scaler too; overflows in between neither count nor reset.
    (tmp_path / "mixed").mkdir()
    with pytest.raises(TrainingDiverged, match="stopped at step 8: 3 consecutive steps"):
        _note_updates(tmp_path / "mixed", "nnog" "nnon", scaler=_FakeScaler())


# --------------------------------------------------------------------------- real processes

# A `tunesmith` CLI process whose optimizer steps are slowed down (STEP_DELAY seconds), so the test
# can kill it mid-run; one thread, like the in-process reference, so results are bitwise comparable.
CHILD = textwrap.dedent(
    """
    import os, sys, time, torch
    torch.set_num_threads(1)
    DELAY = float(os.environ.get("STEP_DELAY", "0"))
    _step = torch.optim.AdamW.step
    def slow_step(self, *args, **kwargs):
        time.sleep(DELAY)
        return _step(self, *args, **kwargs)
    torch.optim.AdamW.step = slow_step
    from tunesmith.cli import main
    sys.argv[0] = "tunesmith"
    main()
    """
)


def _child(args: list[str], tmp_path: Path, delay: float = 0.0, **kwargs) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}", "STEP_DELAY": str(delay), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _write_cfg(tmp_path: Path, name: str, cfg: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _wait_for_step(run_dir: Path, process: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = step_dirs(run_dir / "checkpoints")
        if found and found[-1][0] >= step:
            return
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared in time")


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tiny_bert, sentiment_csv, tmp_path):
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path / "ref", save_steps=3)
    reference = _child(["train", str(_write_cfg(tmp_path, "ref", cfg)), "-q"], tmp_path)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    cfg["output"]["dir"] = str(tmp_path / "run")
    victim = _child(["train", str(_write_cfg(tmp_path, "run", cfg)), "-q"], tmp_path, delay=0.15)
    _wait_for_step(tmp_path / "run", victim, 9)
    time.sleep(0.4)  # somewhere inside a later step, maybe inside a checkpoint write
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert not (tmp_path / "run" / "metrics.json").exists()

    resumed = _child(["train", "--resume", str(tmp_path / "run"), "-q"], tmp_path)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    _assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_sigterm_writes_checkpoint_and_exits_with_resume_hint(tiny_bert, sentiment_csv, tmp_path):
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path / "run", save_steps=0)
    victim = _child(["train", str(_write_cfg(tmp_path, "run", cfg)), "-q"], tmp_path, delay=0.15)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "log.jsonl").exists() or "train" not in (tmp_path / "run" / "log.jsonl").read_text():
        assert time.time() < deadline and victim.poll() is None
        time.sleep(0.05)
    victim.send_signal(signal.SIGTERM)
    output = victim.communicate(timeout=60)[0]
    assert victim.returncode == 143, output
    assert "SIGTERM received" in output and f"tunesmith train --resume {tmp_path / 'run'}" in output.replace("\n", "")
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint is not None and checkpoint.step >= 1


SITECUSTOMIZE = textwrap.dedent(
    """
    # Loaded by every process of the run (torchrun workers too): a signal to itself at a given step
    # (SIGNAL_AT_STEP; SIGNAL, default SIGTERM), in every process or only in process KILL_RANK of
    # torchrun's first attempt (KILL_RANK set: a worker dying, which torchrun --max-restarts restarts).
    import os, signal
    STEP = int(os.environ.get("SIGNAL_AT_STEP", "0"))
    RANK = os.environ.get("KILL_RANK")
    if RANK is not None and (os.environ.get("RANK") != RANK or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"):
        STEP = 0
    if STEP:
        import torch
        SIGNAL = getattr(signal, os.environ.get("SIGNAL", "SIGTERM"))
        _step, _calls = torch.optim.AdamW.step, [0]
        def step_then_signal(self, *args, **kwargs):
            _calls[0] += 1
            if _calls[0] == STEP:
                signal.raise_signal(SIGNAL)
            return _step(self, *args, **kwargs)
        torch.optim.AdamW.step = step_then_signal
    """
)


def two_process_trainer(tmp_path: Path, accelerate_config: Path | None = None) -> Callable[..., subprocess.CompletedProcess]:
    """`run(args, signal_at=0)`: `tunesmith train ARGS --nproc 2` (or, with `accelerate_config`,
    `accelerate launch --config_file CONFIG --num_processes 2 --mixed_precision no -m tunesmith.cli train ARGS`),
    each process sending itself SIGTERM in its `signal_at`-th optimizer step (0: never), via a sitecustomize hook
    (`hook`: its other settings, SIGNAL and KILL_RANK)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    if accelerate_config is None:
        launch, processes = [sys.executable, "-m", "tunesmith.cli", "train"], ["--nproc", "2"]
    else:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                  "--num_processes", "2", "--mixed_precision", "no", "-m", "tunesmith.cli", "train"]
        processes = []

    def run(args: list[str], signal_at: int = 0, **hook: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(SRC)]), "OMP_NUM_THREADS": "1",
               "SIGNAL_AT_STEP": str(signal_at), **hook}
        return subprocess.run([*launch, *args, *processes, "-q"], env=env, capture_output=True, text=True, timeout=600,
                              cwd=tmp_path)

    return run


def test_a_killed_worker_is_restarted_and_the_run_continues_exactly(tiny_bert, sentiment_csv, tmp_path):
    """Fault tolerance: `tunesmith train CONFIG --nproc 2 --max-restarts 1` (torchrun --max-restarts 1,
    each attempt `--resume auto`). Process 1 is SIGKILLed in step 9 of the first attempt (checkpoints
    every 2 steps); torchrun stops process 0 and starts both again, and the second attempt continues
    from the latest checkpoint: the run ends bitwise equal to an uninterrupted one. Fails without
    `distributed.init_restarted_process_group` (the restart hangs or fails in gloo's connectFullMesh)."""
    run = two_process_trainer(tmp_path)
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path / "ref", num_train_epochs=2, per_device_train_batch_size=4)
    reference = run([str(_write_cfg(tmp_path, "ref", cfg))])
    assert reference.returncode == 0, reference.stderr[-3000:]

    cfg["output"]["dir"] = str(tmp_path / "run")
    done = run([str(_write_cfg(tmp_path, "run", cfg)), "--max-restarts", "1"], signal_at=9, SIGNAL="SIGKILL", KILL_RANK="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exitcode: -9" in done.stderr  # the first attempt's process 1, as torchrun reports it
    assert "torchrun restart 1: process group started under its own store prefix" in done.stderr
    # Continued, not started over (which would end equal too): from the last checkpoint before step 9.
    unwrapped = "".join(line.strip() for line in done.stderr.splitlines())  # rich wraps long paths anywhere
    assert re.search(r"resuming from\S*step-000008 \(step 8,", unwrapped), done.stderr[-3000:]
    _assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_max_restarts_refuses_overwrite(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(tmp_path / "any.yaml"), "--nproc", "2",
                           "--max-restarts", "1", "--overwrite"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--overwrite with --max-restarts would replace the run" in done.stdout + done.stderr


def test_ddp_sigterm_and_resume_matches_uninterrupted(tiny_bert, sentiment_csv, tmp_path):
    run = two_process_trainer(tmp_path)
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path / "ref", num_train_epochs=2, per_device_train_batch_size=4)
    reference = run([str(_write_cfg(tmp_path, "ref", cfg))])
    assert reference.returncode == 0, reference.stderr[-3000:]

    cfg["output"]["dir"] = str(tmp_path / "run")
    stopped = run([str(_write_cfg(tmp_path, "run", cfg))], signal_at=8)
    assert stopped.returncode != 0 and "SIGTERM received: stopped after step 8" in stopped.stderr, stopped.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").step == 8
    assert {p.name for p in (tmp_path / "run" / "checkpoints" / "step-000008").glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}

    resumed = run(["--resume", str(tmp_path / "run")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(tmp_path / "ref", tmp_path / "run")
