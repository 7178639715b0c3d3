"""DDP on CPU (gloo): `tunesmith train --nproc 2` matches a one-process run with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForSequenceClassification, BertConfig

import tunesmith
from tiny import build_tiny_bert, sentiment_rows, write_csv


def _no_dropout_bert(folder: Path) -> Path:
    # Dropout draws different random masks in each process; without it the two runs must agree.
    build_tiny_bert(folder)
    config = BertConfig.from_pretrained(folder)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(folder)
    return folder


def run_config(model_dir: Path, train: Path, out: Path, per_device: int) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"train_file": str(train), "validation_split": 0.25},
        "task": {"name": "classification", "max_length": 32},
        "train": {"learning_rate": 3e-3, "num_train_epochs": 2, "per_device_train_batch_size": per_device,
                  "per_device_eval_batch_size": 5, "seed": 0, "precision": "fp32", "logging_steps": 1},
        "output": {"dir": str(out)},
    }


def launch_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def assert_matches_single_run(single, ddp_dir: Path) -> None:
    """A 2-process run (batch 4 each) against `single` (one process, batch 8): weights, loss curve, metrics, one writer."""
    a = AutoModelForSequenceClassification.from_pretrained(single.run_dir / "model").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(ddp_dir / "model").state_dict()
    # Attention key biases get a zero gradient in exact arithmetic (softmax ignores a per-query
    # constant), so AdamW scales float noise into full steps there: they are noise in any two runs.
    compared = [k for k in a if not k.endswith("attention.self.key.bias")]
    mismatched = [k for k in compared if not torch.allclose(a[k], b[k], atol=1e-4)]
    assert not mismatched, mismatched
    losses = lambda run_dir: [json.loads(line).get("loss") for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert torch.allclose(torch.tensor(losses(single.run_dir)), torch.tensor(losses(ddp_dir)), atol=1e-4)

    # Metrics over the whole validation set: 16 rows, none dropped or duplicated (16 is not a multiple of 2 x 5).
    ddp_metrics = json.loads((ddp_dir / "metrics.json").read_text())
    assert ddp_metrics["validation"]["samples"] == single.metrics["validation"]["samples"] == 16
    assert abs(ddp_metrics["validation"]["loss"] - single.metrics["validation"]["loss"]) < 1e-4
    # Written once: one log with one line per step, same steps as the single run.
    steps = lambda run_dir: [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps(ddp_dir) == steps(single.run_dir)
    assert ddp_metrics["train"]["global_step"] == single.metrics["train"]["global_step"] == 12


def _configs(tmp_path: Path, method: dict | None, train_options: dict | None = None):
    model_dir = _no_dropout_bert(tmp_path / "bert")
    train = write_csv(tmp_path / "train.csv", sentiment_rows(64))

    def config(out: Path, per_device: int) -> dict:
        found = {**run_config(model_dir, train, out, per_device), **({"method": method} if method else {})}
        found["train"].update(train_options or {})
        return found

    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config(tmp_path / "ddp", 4)))
    return config, config_file


def ddp_config(tmp_path: Path) -> Path:
    """The config file of a 2-process run (batch 4 each, into tmp_path/ddp), without the reference run."""
    return _configs(tmp_path, None)[1]


def single_and_ddp_config(tmp_path: Path, method: dict | None = None, train_options: dict | None = None):
    """The one-process reference run, and the config file for the same run on 2 processes
    (`method`: the config's method section, full fine-tuning when None; `train_options`: added to
    both runs' train section)."""
    config, config_file = _configs(tmp_path, method, train_options)
    single = tunesmith.train(config(tmp_path / "single", 8), show_progress=False)
    return single, config_file


def test_two_processes_match_one(tmp_path):
    single, config_file = single_and_ddp_config(tmp_path)
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(config_file), "--nproc", "2", "--quiet"],
                          capture_output=True, text=True, env=launch_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_matches_single_run(single, tmp_path / "ddp")
    # The main process logs the run; the other only warnings (Trainer's log_level_replica="warning").
    assert done.stderr.count("method full: trainable parameters") == 1, done.stderr[-3000:]


_GROUP = """
import os, torch.distributed as dist
from tunesmith.distributed import end_process_group
end_process_group()  # no group: nothing to do
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["PORT"], rank=0, world_size=1)
work = dist.all_reduce(__import__("torch").ones(4), async_op=True)
work.wait()
end_process_group()
print(dist.is_initialized())
end_process_group(finished=False)  # again: nothing left to close
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_end_process_group_closes_the_group_before_exit():
    # Left to interpreter exit, gloo's threads could abort the process (SIGABRT, exit -6) after a finished run.
    done = subprocess.run([sys.executable, "-c", _GROUP], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PORT": str(free_port())})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "False"
