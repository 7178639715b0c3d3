"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo), launched with the repo's own
configs/accelerate/deepspeed_zero{2,3}.yaml as a user would (`--num_processes 2`).

accelerate enables DeepSpeed only off CPU (`cpu=True` turns it into plain DDP); tunesmith builds its
Accelerator on CPU with the gloo backend instead, and DeepSpeed picks its CPU accelerator itself.
The runs are checked like DDP's (tests/test_distributed.py): the same weights, losses and metrics as
one process with the global batch, one writer; plus what only DeepSpeed does: its fp32 master
weights are what is saved under bf16, and its own checkpoint (partitioned optimizer state) resumes
a run exactly.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tunesmith
from test_distributed import assert_matches_single_run, launch_env, run_config, single_and_ddp_config
from test_resume import _assert_same_run, _cfg, _write_cfg, two_process_trainer
from tiny import sentiment_rows, write_csv
from tunesmith.loop.checkpoint import latest_checkpoint

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make test installs it)")

ACCELERATE = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
SRC = Path(__file__).resolve().parents[1] / "src"
STAGES = [2, 3]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where 2 GPUs are, the same runs take NCCL


def _launch(stage: int, config_file: Path, cwd: Path, mixed_precision: str = "no", **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch` with the repo's ZeRO config on 2 processes; `env`: extra environment variables.

    No C++ compiler: DeepSpeed's CPU backend would JIT-compile its shared-memory all-reduce (used only
    by DeepSpeed inference), which tunesmith skips (`distributed.skip_deepspeed_shm_op`)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / f"deepspeed_zero{stage}.yaml"),
               "--num_processes", "2", "--mixed_precision", mixed_precision, "-m", "tunesmith.cli", "train", str(config_file),
               "--quiet"]
    no_compiler = {"CXX": str(cwd / "no-such-compiler"), "TORCH_EXTENSIONS_DIR": str(cwd / "torch_extensions")}
    return subprocess.run(command, capture_output=True, text=True, env={**launch_env(), **no_compiler, **env}, timeout=300, cwd=cwd)


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_on_cpu_matches_one_process(tmp_path, stage):
    # The best checkpoint is the first evaluation's (the larger loss "wins"), so the saved model is the one
    # restored from it at the end (one tensor at a time under DeepSpeed), not the last step's weights.
    single, config_file = single_and_ddp_config(tmp_path, train_options={"metric_for_best_model": "loss", "greater_is_better": True})
    assert single.metrics["train"]["best_step"] == 6 < single.metrics["train"]["global_step"]
    done = _launch(stage, config_file, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"ZeRO stage {stage} over 2 processes ({DEVICE})" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "torch_extensions").exists()  # nothing was compiled (and no compiler was needed)
    assert_matches_single_run(single, tmp_path / "ddp")
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["train"]["best_step"] == 6
    # Saved under the names a one-process run uses (transformers' ZeRO-3 loader would have them
    # renamed to legacy LayerNorm.gamma/beta), and loadable as a plain model.
    saved = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    assert saved.keys() == load_file(str(single.run_dir / "model" / "model.safetensors")).keys()
    provenance = json.loads((tmp_path / "ddp" / "provenance.json").read_text())
    assert provenance["speed"]["deepspeed"] == {"processes": 2, "zero_stage": stage, "device": DEVICE}


def test_deepspeed_zero3_lora_matches_one_process(tmp_path):
    """LoRA under ZeRO-3 (the large-model case): the frozen base weights are partitioned too; the
    adapter and the merged model equal one process's (LoRA dropout off: each process draws its own masks)."""
    single, config_file = single_and_ddp_config(tmp_path, {"name": "lora", "lora_r": 4, "lora_dropout": 0.0})
    done = _launch(3, config_file, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_matches_single_run(single, tmp_path / "ddp")  # the merged model/
    a = load_file(str(single.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_bf16_saves_its_fp32_master_weights(tiny_bert, tmp_path, stage):
    """Under bf16 DeepSpeed casts the model itself to bf16 and keeps fp32 master weights in its
    optimizer: the saved model must be those (a plain bf16-autocast run saves fp32 weights too), and
    reload to the validation metrics the run reported."""
    rows = sentiment_rows(64)
    train, validation = write_csv(tmp_path / "train.csv", rows[:48]), write_csv(tmp_path / "validation.csv", rows[48:])
    cfg = run_config(tiny_bert, train, tmp_path / "run", 4)
    cfg["data"] = {"train_file": str(train), "validation_file": str(validation)}
    cfg["train"]["precision"] = "bf16"
    done = _launch(stage, _write_cfg(tmp_path, "run", cfg), tmp_path, mixed_precision="bf16")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    # bf16-rounded copies would all be exactly representable in bf16; fp32 master weights are not.
    rounded = [name for name, v in saved.items() if v.numel() > 8 and torch.equal(v.bfloat16().float(), v)]
    assert not rounded, f"bf16 weights saved: {rounded}"
    reported = json.loads((tmp_path / "run" / "metrics.json").read_text())["validation"]
    # The run evaluated its bf16 weights; the reload evaluates the fp32 ones in fp32.
    reloaded = tunesmith.evaluate(tmp_path / "run", validation)
    assert reloaded["samples"] == reported["samples"] == 16
    assert abs(reloaded["loss"] - reported["loss"]) < 0.02, (reloaded["loss"], reported["loss"])


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_sigterm_and_resume_matches_uninterrupted(tiny_bert, sentiment_csv, tmp_path, stage):
    run = two_process_trainer(tmp_path, ACCELERATE / f"deepspeed_zero{stage}.yaml")
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path / "ref", num_train_epochs=2, per_device_train_batch_size=4)
    reference = run([str(_write_cfg(tmp_path, "ref", cfg))])
    assert reference.returncode == 0, reference.stderr[-3000:]

    cfg["output"]["dir"] = str(tmp_path / "run")
    # DeepSpeed calls AdamW.step itself when it sets up its optimizer state, so the step the signal
    # lands in is read from the message.
    stopped = run([str(_write_cfg(tmp_path, "run", cfg))], signal_at=6)
    found = re.search(r"SIGTERM received: stopped after step (\d+)", stopped.stderr)
    assert stopped.returncode != 0 and found, stopped.stderr[-3000:]
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint.step == int(found.group(1)) and 2 <= checkpoint.step < 12
    # DeepSpeed's own checkpoint: one optimizer partition per process.
    partitions = sorted(p.name for p in (checkpoint.path / "deepspeed").glob("*optim_states.pt"))
    assert len(partitions) == 2, partitions

    resumed = run(["--resume", str(tmp_path / "run")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_a_deepspeed_checkpoint_resumed_without_deepspeed_or_damaged_is_refused(tiny_bert, sentiment_csv, tmp_path):
    run = two_process_trainer(tmp_path, ACCELERATE / "deepspeed_zero2.yaml")
    cfg = _cfg(tiny_bert, sentiment_csv, tmp_path / "run", num_train_epochs=2, per_device_train_batch_size=4)
    stopped = run([str(_write_cfg(tmp_path, "run", cfg))], signal_at=4)
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert stopped.returncode != 0 and checkpoint is not None, stopped.stderr[-3000:]
    plain = two_process_trainer(tmp_path)(["--resume", str(tmp_path / "run")])
    assert plain.returncode != 0
    assert "was written by a DeepSpeed run and this run does not use DeepSpeed" in plain.stderr.replace("\n", " "), \
        plain.stderr[-3000:]
    partitions = list((checkpoint.path / "deepspeed").glob("*optim_states.pt"))
    assert len(partitions) == 2
    for partition in partitions:
        partition.unlink()
    damaged = run(["--resume", str(tmp_path / "run")])
    assert damaged.returncode != 0
    assert "DeepSpeed could not load its state" in damaged.stderr.replace("\n", " "), damaged.stderr[-3000:]
    # Exit code 2 in both processes: the CLI's handled error, not a crash (the launcher's own traceback follows it).
    assert damaged.stderr.count("exitcode  : 2") == 2 or "exitcode: 2" in damaged.stderr, damaged.stderr[-3000:]
    assert "[rank0]: Traceback" not in damaged.stderr and "[rank1]: Traceback" not in damaged.stderr


POISON = textwrap.dedent(
    """
    # Loaded by every process of the run: the training loss is NaN in the 3rd and 4th training batches.
    import os
    if os.environ.get("POISON_LOSS"):
        from tunesmith.tasks.classification.task import ClassificationTask
        _loss_fn = ClassificationTask.loss_fn
        def poisoned(self, cfg, state, train):
            inner, calls = _loss_fn(self, cfg, state, train), [0]
            def loss(logits, labels):
                if train is not None and logits.requires_grad:
                    calls[0] += 1
                    if calls[0] in (3, 4):
                        return inner(logits, labels)._replace(sums=inner(logits, labels).sums * float("nan"))
                return inner(logits, labels)
            return loss
        ClassificationTask.loss_fn = poisoned
        # A NaN loss reaching DeepSpeed's backward (where its engine steps) is recorded in a file.
        from deepspeed.runtime.engine import DeepSpeedEngine
        _backward = DeepSpeedEngine.backward
        def backward(self, loss, *args, **kwargs):
            if not bool(loss.isfinite()):
                open(os.environ["POISON_LOSS"], "a").write("nan loss in backward; ")
            return _backward(self, loss, *args, **kwargs)
        DeepSpeedEngine.backward = backward
    """
)


def test_deepspeed_skips_a_nonfinite_loss_before_it_updates_the_weights(tmp_path):
    """DeepSpeed's engine steps inside accelerate's backward: a NaN loss must be caught before it
    (DeepSpeed 0.19 also skips steps whose gradient norm is not finite, depending on its settings:
    the check here is that the NaN loss never reaches its backward)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(POISON)
    _, config_file = single_and_ddp_config(tmp_path)
    config_file.write_text(config_file.read_text().replace("precision: fp32", "precision: bf16"))
    reached = tmp_path / "nan-backward.txt"
    done = _launch(2, config_file, tmp_path, "bf16", POISON_LOSS=str(reached), PYTHONPATH=os.pathsep.join([str(hooks), str(SRC)]))
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "skipped"] == [3, 4]
    assert not reached.exists(), reached.read_text()
    weights = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
