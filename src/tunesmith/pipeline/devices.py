"""Threads, precision and the Accelerator a run trains with."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith import distributed
from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError
from tunesmith.speed.performance import ThreadChoice, configure_threads
from tunesmith.speed.precision import PrecisionChoice, choose_precision

log = logging.getLogger("tunesmith")


@dataclass
class Devices:
    device: torch.device
    threads: ThreadChoice
    precision: PrecisionChoice
    reshard: bool  # FSDP2's reshard_after_forward, as the launcher asked (true when unset)
    accelerator: Any


def choose_devices(cfg: RunConfig) -> Devices:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = configure_threads(cfg.train.num_threads)  # before the precision check times matmuls
    precision = choose_precision(cfg.train.precision, device)
    log.info("precision: %s (%s)", precision.precision, precision.reason)
    # fsdp.yaml's fsdp_reshard_after_forward, read before make_accelerator removes the launcher's FSDP variables
    reshard = distributed.launcher_reshard_after_forward()
    accelerator = make_accelerator(precision.accelerate_mixed_precision, cfg.train.gradient_accumulation_steps)
    if cfg.train.fsdp and accelerator.num_processes > 1 and precision.precision == "fp16":
        # fp16's loss scaler must agree across shards on skipped steps (FSDP's sharded scaler); never run here.
        raise ConfigError("train.fsdp with fp16 is not supported (its loss scaler is not sharding-aware here); "
                          "set train.precision=bf16 (Ampere or newer GPUs) or fp32")
    return Devices(device, threads, precision, reshard, accelerator)


def make_accelerator(precision: str, gradient_accumulation_steps: int = 1):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps one global state per process and refuses a second Accelerator with another
    # precision: a bf16 `train` followed by an fp32 `evaluate` in one notebook would fail. Each call
    # here starts a new run, so the run-level state is reset (the process group, if any, is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()

    from accelerate.utils import DataLoaderConfiguration

    distributed.check_launch_strategy()  # FSDP/DeepSpeed from `accelerate launch`: fail early, clearly
    # FSDP2 from `accelerate launch`: tunesmith shards the model itself (see `distributed`); accelerate
    # must not see the request (it would select FSDP on GPUs only, and on CPU silently build DDP).
    distributed.take_over_launcher_fsdp()
    cpu = not torch.cuda.is_available()
    distributed.init_restarted_process_group("gloo" if cpu else "nccl")  # torchrun --max-restarts: no stale store keys
    handlers = []
    if cpu and distributed.requested_strategy() == "deepspeed":
        # accelerate turns DeepSpeed off under cpu=True (it would run plain DDP, silently); without it
        # and with gloo, accelerate starts DeepSpeed's process group and DeepSpeed its CPU accelerator.
        from accelerate.utils import InitProcessGroupKwargs

        distributed.skip_deepspeed_shm_op()
        cpu, handlers = False, [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=cpu,
        kwargs_handlers=handlers,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
