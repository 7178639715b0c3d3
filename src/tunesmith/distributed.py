"""Which distributed strategy a launcher asked for, and whether tunesmith can run it here.

`accelerate launch --config_file configs/accelerate/<x>.yaml` passes the strategy to each process
in environment variables (`ACCELERATE_USE_FSDP`, `ACCELERATE_USE_DEEPSPEED`, `FSDP_VERSION`,
`ACCELERATE_DEEPSPEED_ZERO_STAGE`); `Accelerator()` reads them. `check_launch_strategy` runs before
the Accelerator is built and turns the cases that would otherwise fail late, hang or silently do
something else into one-line errors:

- FSDP or DeepSpeed without a CUDA device. accelerate 1.15 enables FSDP only for GPU-like
  distributed types (`AcceleratorState.__init__`: `DistributedType.FSDP` is set only inside the
  `MULTI_GPU/MULTI_XPU/...` branch); on CPU it builds `MULTI_CPU` and wraps the model in plain DDP,
  silently. DeepSpeed likewise is enabled only `if ... and not cpu`. (torch's own FSDP2
  `fully_shard` does run on CPU with gloo; it is accelerate that will not select it.)
- FSDP version 1: `train` evaluates and saves through the model object it prepared, which FSDP1
  replaces with a wrapper (FSDP2 shards in place).
- Parameter sharding (FSDP2, DeepSpeed ZeRO-3): every process then holds a slice of each weight,
  and the best-checkpoint and save paths must gather the slices on all processes together
  (`gather_state` / `load_trainable_state` below), which the training loop does not call yet.
  ZeRO-2 (optimizer and gradient sharding, full weights on every process) is allowed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping

import torch
from torch import nn

from .errors import ConfigError

CPU_FIX = "on CPU use configs/accelerate/ddp_cpu.yaml or `tunesmith train --nproc N` (DDP over gloo)"


def requested_strategy(env: Mapping[str, str] = os.environ) -> str:
    """`fsdp`, `deepspeed` or `ddp` (which covers one process) as the launcher's environment asks."""
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return "ddp"


def check_launch_strategy(cuda_available: bool, env: Mapping[str, str] = os.environ) -> None:
    strategy = requested_strategy(env)
    if strategy == "ddp":
        return
    name = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}[strategy]
    if not cuda_available:
        raise ConfigError(
            f"accelerate launch asked for {name}, which needs CUDA GPUs; found no CUDA device (accelerate runs {name} "
            f"on GPUs only and on CPU would silently fall back to plain DDP); {CPU_FIX}"
        )
    if strategy == "fsdp" and env.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(
            f"accelerate launch asked for FSDP version {env.get('FSDP_VERSION', '1')}; tunesmith supports FSDP version 2 "
            "(in-place sharding); set `fsdp_version: 2` in fsdp_config (see configs/accelerate/fsdp.yaml)"
        )
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"accelerate launch asked for DeepSpeed, which is not installed; pip install deepspeed, or use "
                          "configs/accelerate/ddp_multi_gpu.yaml")
    sharded = strategy == "fsdp" or env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    if sharded:
        raise ConfigError(
            f"accelerate launch asked for {'FSDP' if strategy == 'fsdp' else 'DeepSpeed ZeRO-3'}, which shards the weights "
            "across processes; tunesmith's best-checkpoint and save steps do not gather sharded weights yet; use "
            "configs/accelerate/ddp_multi_gpu.yaml or deepspeed_zero2.yaml (or method=lora to fit a large model)"
        )


# --------------------------------------------------------------------------- sharded weights


def sharding(model: nn.Module, accelerator=None) -> str | None:
    """`fsdp2` when `model` was sharded in place by FSDP2, `zero3` under DeepSpeed ZeRO-3, else None."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return "fsdp2"
    if accelerator is not None and str(accelerator.distributed_type).endswith("DEEPSPEED"):
        if accelerator.state.deepspeed_plugin.zero_stage == 3:
            return "zero3"
    return None


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    # `full_tensor` is a collective (all-gather): every process reaches it for the same tensors in the same order.
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


def gather_state(model: nn.Module, accelerator=None, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the model's trainable parameters, or of its whole state dict.

    A collective under sharding: every process must call it, at the same point. Without sharding it
    is a plain copy (and needs no other process). Keys are the model's own parameter names."""
    kind = sharding(model, accelerator)
    if kind == "zero3":
        import deepspeed

        module = accelerator.unwrap_model(model)
        params = [p for p in module.parameters() if p.requires_grad or not trainable_only]
        with deepspeed.zero.GatheredParameters(params):
            if trainable_only:
                return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if accelerator is not None and kind is None:
        model = accelerator.unwrap_model(model)
    if trainable_only:
        return {n: _full(p) for n, p in model.named_parameters() if p.requires_grad}
    return {k: _full(v) for k, v in model.state_dict().items()}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor] | None, accelerator=None) -> None:
    """Copy full tensors into the (possibly sharded) trainable parameters.

    Under sharding only the main process needs `state` (others pass None): its values are scattered
    to every process. A collective under sharding, like `gather_state`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    kind = sharding(model, accelerator)
    if kind == "zero3":
        import deepspeed

        module = accelerator.unwrap_model(model)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
            if state is not None and accelerator.is_main_process:
                for name, param in named:
                    param.copy_(state[name])
        return
    if accelerator is not None and kind is None:
        model = accelerator.unwrap_model(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if isinstance(param, DTensor):
            source = state[name] if state is not None else torch.empty(param.shape, dtype=param.dtype)
            # distribute_tensor scatters process 0's values; the other processes' `source` only gives the shape.
            param.copy_(distribute_tensor(source.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements))
        else:
            param.copy_(state[name])
