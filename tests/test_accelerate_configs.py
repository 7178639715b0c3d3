"""configs/accelerate/*.yaml: accelerate reads each into the intended set-up; the CPU DDP one trains.

What runs here (CPU, no GPU): `accelerate launch` with ddp_cpu.yaml and with fsdp.yaml on 2 gloo
processes, each checked against a one-process run like tests/test_distributed.py (under fsdp.yaml
tunesmith shards the model itself with torch's FSDP2, see `tunesmith.distributed`); FSDP2's
in-place sharding of a tiny BERT on 2 gloo processes (torch alone) to check the gather/scatter of
sharded weights. The GPU configs are checked as far as accelerate's own launch code takes them
(arguments, environment, plugins) and tunesmith's refusal of what it cannot run.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

from test_distributed import assert_matches_single_run, ddp_config, free_port, launch_env, single_and_ddp_config
from tunesmith import distributed
from tunesmith.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "configs" / "accelerate"

# name: (distributed_type, use_cpu, machines, processes, mixed_precision)
EXPECTED = {
    "ddp_cpu": (DistributedType.MULTI_GPU, True, 1, 2, "no"),  # MULTI_GPU = accelerate's torchrun launcher; see the file
    "ddp_multi_gpu": (DistributedType.MULTI_GPU, False, 1, 8, "bf16"),
    "ddp_multi_node": (DistributedType.MULTI_GPU, False, 2, 16, "bf16"),
    "fsdp": (DistributedType.FSDP, False, 1, 8, "bf16"),
    "deepspeed_zero2": (DistributedType.DEEPSPEED, False, 1, 8, "bf16"),
    "deepspeed_zero3": (DistributedType.DEEPSPEED, False, 1, 8, "bf16"),
}


def test_every_config_is_checked():
    assert {p.stem for p in ACCELERATE.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_config_loads_with_accelerate(name):
    config = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))
    assert isinstance(config, ClusterConfig)
    kind, use_cpu, machines, processes, precision = EXPECTED[name]
    assert (config.distributed_type, config.use_cpu, config.num_machines, config.num_processes, config.mixed_precision) == (
        kind, use_cpu, machines, processes, precision)


def _launch_args(name: str):
    """`accelerate launch --config_file <name>` parsed and validated as accelerate itself does."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(ACCELERATE / f"{name}.yaml"), "-m", "tunesmith.cli", "train", "run.yaml"])
    # Keys in fsdp_config / deepspeed_config become launch arguments; accelerate ignores unknown ones silently.
    known = {action.dest for action in parser._actions}
    config = load_config_from_file(str(ACCELERATE / f"{name}.yaml"))
    nested = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in config.fsdp_config] + list(config.deepspeed_config)
    assert not [k for k in nested if k not in known], f"{name}: keys accelerate does not know"
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def _environment(name: str) -> dict:
    """The environment `accelerate launch` gives each process for this config (what `Accelerator()` reads)."""
    return _launch(name)[1]


def _launch(name: str):
    """Launch arguments (completed for torchrun) and the environment of each process."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults = _launch_args(name)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_ddp_configs_launch_torchrun_with_the_intended_processes():
    args, _ = _launch("ddp_cpu")
    assert args.multi_gpu and args.use_cpu and not args.use_fsdp
    assert args.nproc_per_node == "2"

    args, _ = _launch("ddp_multi_node")
    # 16 processes over 2 machines: 8 per machine, rendezvous at the main machine's placeholder address
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("8", "2", 0)
    assert args.rdzv_endpoint == "10.0.0.1:29500"


def test_fsdp_config_builds_the_fsdp2_full_shard_plugin(tiny_bert):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import AutoModelForSequenceClassification

    env = _environment("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # full shard
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    # Transformer-based wrapping takes the model's own block class: one FSDP unit per layer.
    plugin.set_auto_wrap_policy(AutoModelForSequenceClassification.from_pretrained(tiny_bert))
    assert plugin.auto_wrap_policy.func.__name__ == "transformer_auto_wrap_policy"
    assert "BertLayer" in {c.__name__ for c in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}


@pytest.mark.parametrize(("name", "stage"), [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_configs_build_the_zero_plugin(name, stage):
    from accelerate.utils import DeepSpeedPlugin

    env = _environment(name)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()  # builds the DeepSpeed config dict; deepspeed itself is not needed
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == stage and plugin.deepspeed_config["gradient_clipping"] == 1.0
    # Left to tunesmith's train.gradient_accumulation_steps, which fills DeepSpeed's "auto".
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


# --------------------------------------------------------------------------- what tunesmith runs and refuses


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_on_cpu_gets_gloo_not_silently_ddp(name, monkeypatch):
    # accelerate 1.15 turns DeepSpeed with cpu=True into plain DDP without a word; tunesmith builds the
    # Accelerator without cpu=True and with gloo instead (the runs: tests/test_deepspeed.py).
    from accelerate.utils import InitProcessGroupKwargs

    from tunesmith import api

    for key, value in _environment(name).items():
        if key.startswith(("ACCELERATE_USE_", "FSDP_", "ACCELERATE_DEEPSPEED_")):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # as if deepspeed were installed
    built = {}
    monkeypatch.setattr("accelerate.Accelerator", lambda **kwargs: built.update(kwargs))
    api.make_accelerator("no")
    assert built["cpu"] is False
    (handler,) = built["kwargs_handlers"]
    assert isinstance(handler, InitProcessGroupKwargs) and handler.backend == "gloo"


def test_strategies():
    env = lambda name: {k: v for k, v in _environment(name).items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    distributed.check_launch_strategy(env("ddp_multi_gpu"))  # DDP: fine
    distributed.check_launch_strategy(env("ddp_cpu"))
    distributed.check_launch_strategy(env("fsdp"))  # FSDP2: tunesmith shards the model itself, on CPU and GPU
    with pytest.raises(ConfigError, match="FSDP version 1.*fsdp_version: 2"):
        distributed.check_launch_strategy({**env("fsdp"), "FSDP_VERSION": "1"})
    for name in ("deepspeed_zero2", "deepspeed_zero3"):
        if importlib.util.find_spec("deepspeed") is not None:
            distributed.check_launch_strategy(env(name))  # on CPU (gloo) and GPUs alike
        with mock.patch.object(importlib.util, "find_spec", lambda name: None):
            with pytest.raises(ConfigError, match="DeepSpeed, which is not installed; pip install deepspeed"):
                distributed.check_launch_strategy(env(name))


# --------------------------------------------------------------------------- runs


def test_accelerate_launch_ddp_cpu_matches_one_process(tmp_path):
    single, config_file = single_and_ddp_config(tmp_path)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "ddp_cpu.yaml"),
               "-m", "tunesmith.cli", "train", str(config_file), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, env=launch_env(), timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_matches_single_run(single, tmp_path / "ddp")


def test_accelerate_launch_fsdp_on_cpu_shards_and_matches_one_process(tmp_path):
    """fsdp.yaml on 2 CPU processes: accelerate would build plain DDP here; tunesmith takes the FSDP
    request over and shards the model with FSDP2 (the same path as train.fsdp=true)."""
    single, config_file = single_and_ddp_config(tmp_path)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "fsdp.yaml"),
               "--num_processes", "2", "--mixed_precision", "no", "-m", "tunesmith.cli", "train", str(config_file), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, env=launch_env(), timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "accelerate launch (FSDP): FSDP2 over 2 processes" in done.stderr, done.stderr[-3000:]
    assert_matches_single_run(single, tmp_path / "ddp")


def _launch_two_machines(config_file: Path, folders: list[Path], extra_env: dict | None = None) -> list:
    """Two "machines" on localhost, one process each: what ddp_multi_node.yaml starts on each machine,
    with use_cpu (ddp_cpu.yaml) and the rendezvous at 127.0.0.1. Each runs in its own folder."""
    port = str(free_port())
    started = [
        subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "ddp_cpu.yaml"),
             "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
             "--main_process_port", port, "-m", "tunesmith.cli", "train", str(config_file), "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**launch_env(), **(extra_env or {})}, cwd=folder)
        for rank, folder in enumerate(folders)
    ]
    return [(process, *process.communicate(timeout=300)) for process in started]


def test_two_machines_match_one_process(tmp_path):
    """Multi-node as configs/accelerate/ddp_multi_node.yaml runs it, with two launchers on this machine:
    every process has LOCAL_RANK 0, so anything keyed on the local rank (writers, logging, threads) shows."""
    single, config_file = single_and_ddp_config(tmp_path)
    for process, _, stderr in _launch_two_machines(config_file, [tmp_path, tmp_path]):
        assert process.returncode == 0, stderr[-3000:]
        assert stderr.count("method full: trainable parameters") == 1  # each machine's first process logs
    assert_matches_single_run(single, tmp_path / "ddp")


def test_two_machines_without_a_shared_output_dir_are_refused_before_training(tmp_path):
    """A relative output.dir started from two folders is what machine-local disks look like: refused at
    the start (before, the run trained an epoch and failed at its first checkpoint with FileNotFoundError)."""
    config = yaml.safe_load(ddp_config(tmp_path).read_text())
    config["output"]["dir"] = "ddp"
    (tmp_path / "relative.yaml").write_text(yaml.safe_dump(config))
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    for folder in machines:
        folder.mkdir()
    done = _launch_two_machines(tmp_path / "relative.yaml", machines, {"TUNESMITH_SHARED_DIR_WAIT": "2"})
    for process, _, stderr in done:
        assert process.returncode != 0
        assert "failed (exitcode: 2)" in stderr, stderr[-3000:]  # tunesmith's handled error, under torchrun
        (line,) = [line for line in stderr.splitlines() if line.startswith("error: output.dir")]
        assert f"'{machines[0] / 'ddp'}' is not shared by every process" in line
        assert f"process 1 on host '{socket.gethostname()}' (looked in '{machines[1] / 'ddp'}') cannot see it" in line
        assert "eval @ step" not in stderr  # refused before training
    # Nothing trained, so nothing is left behind: the same command can run again once the path is fixed.
    assert not (machines[0] / "ddp").exists() and not (machines[1] / "ddp").exists()


def test_accelerate_cpu_flag_with_several_processes_is_refused(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (its --cpu launcher leaves the rest to
    mpirun); it used to train alone with half the global batch, exit code 0."""
    config_file = ddp_config(tmp_path)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tunesmith.cli", "train", str(config_file), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, env=launch_env(), timeout=300, cwd=tmp_path)
    assert done.returncode != 0
    assert "error: accelerate launch --cpu asked for several processes or machines" in done.stderr, done.stderr[-3000:]
    assert "tunesmith train --nproc N" in done.stderr
    assert not (tmp_path / "ddp").exists()


def test_lone_cpu_launch_is_only_the_unnumbered_process():
    lone = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert distributed.lone_cpu_launch(lone)
    with pytest.raises(ConfigError, match="started this process alone"):
        distributed.check_launch_strategy(lone)
    for numbered in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):  # torchrun, MPI launchers
        distributed.check_launch_strategy({**lone, numbered: "0"})
    distributed.check_launch_strategy({**lone, "ACCELERATE_USE_CPU": "False"})  # GPUs: accelerate's own launchers
    distributed.check_launch_strategy({k: v for k, v in lone.items() if k != "MASTER_ADDR"})  # --cpu, one process


def _fsdp2_worker(rank: int, world: int, init_file: str, model_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _fsdp2_checks(rank, model_dir)
        # The sharded model is out of scope now: collected, barrier, then teardown (see end_process_group).
        distributed.end_process_group()
    finally:
        distributed.end_process_group(finished=False)


def _fsdp2_checks(rank: int, model_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    model.bert.embeddings.requires_grad_(False)  # frozen weights stay out of the trainable state
    unsharded_keys = set(model.state_dict())
    original = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    assert distributed.sharding(model) == "fsdp2"
    assert type(model.bert.encoder.layer[0].attention.self.query.weight).__name__ == "DTensor"

    gathered = distributed.gather_state(model)
    assert gathered.keys() == original.keys()
    assert all(torch.equal(gathered[k], original[k]) for k in original)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(5, 60, (4, 9), generator=torch.Generator().manual_seed(rank))
    model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    optimizer.step()
    trained = distributed.gather_state(model)
    assert not torch.equal(trained["classifier.weight"], original["classifier.weight"])
    # Every process gathered the same full weights.
    reference = [trained] if rank == 0 else [None]
    dist.broadcast_object_list(reference, src=0)
    assert all(torch.equal(trained[k], reference[0][k]) for k in trained)

    # Restore the original weights: process 0 alone holds them, the others receive their shards.
    distributed.load_trainable_state(model, original if rank == 0 else None)
    restored = distributed.gather_state(model)
    assert all(torch.equal(restored[k], original[k]) for k in original)
    full = distributed.gather_state(model, trainable_only=False)
    assert set(full) == unsharded_keys and all(v.device.type == "cpu" for v in full.values())


def test_fsdp2_sharded_weights_gather_and_restore_on_cpu(tiny_bert, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_fsdp2_worker, args=(2, str(tmp_path / "rendezvous"), str(tiny_bert)), nprocs=2, join=True)


def test_train_fsdp_under_deepspeed_is_refused():
    from types import SimpleNamespace

    from tunesmith.pipeline.model import maybe_shard

    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    cfg = SimpleNamespace(train=SimpleNamespace(fsdp=True))
    with pytest.raises(ConfigError, match="train.fsdp=true under DeepSpeed .*both shard the model"):
        maybe_shard(torch.nn.Linear(2, 2), cfg, accelerator, False, True, {})
