"""FSDP2: sharded training, run by tunesmith itself.

FSDP2 (`train.fsdp: true`, or `accelerate launch` with configs/accelerate/fsdp.yaml) is run by
tunesmith itself, with torch's `fully_shard`, on CPU (gloo) and GPU (NCCL) alike:
`shard_model` shards every transformer block (the layer stacks `methods.layer_stacks` finds) and
then the root. accelerate is kept out of it: it never sees the model (`accelerator.prepare` would
wrap it in DDP on top), and when `accelerate launch` asked for FSDP its variables are removed
before the Accelerator is built (`take_over_launcher_fsdp`) — accelerate 1.15 would only select
FSDP on GPUs (on CPU it silently builds DDP), and transformers would load the weights on the meta
device on every process but the first (`FSDP_CPU_RAM_EFFICIENT_LOADING`). So the launcher's FSDP
run takes the same code path as `tunesmith train --nproc N train.fsdp=true`, which is tested on CPU.

Under FSDP2 every process holds a slice (a `DTensor` shard) of each parameter; the optimizer state
is saved per process (`local_optimizer_state` / `load_local_optimizer_state`). Reading and writing
the weights: `distributed.weights`.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, MutableMapping

import torch
from torch import nn

from tunesmith.distributed.deepspeed import zero_stage_3
from tunesmith.distributed.launch import requested_strategy
from tunesmith.methods.apply import parameter_shape

log = logging.getLogger("tunesmith")

LAUNCHER_FSDP_PREFIXES = ("FSDP_",)


def launcher_reshard_after_forward(env: Mapping[str, str] = os.environ) -> bool:
    """fsdp.yaml's `fsdp_reshard_after_forward` as `accelerate launch` passes it (true when unset)."""
    return env.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0")


def take_over_launcher_fsdp(env: MutableMapping[str, str] = os.environ) -> dict | None:
    """When `accelerate launch` asked for FSDP2: remove its variables (so neither accelerate nor
    transformers acts on them) and return the options tunesmith honours; else None.

    Honoured: `fsdp_reshard_after_forward`. Ignored (logged): parameter offload, accelerate's
    activation checkpointing (use train.gradient_checkpointing), its wrap policy (tunesmith wraps
    every transformer block, as TRANSFORMER_BASED_WRAP does), and rank-0-only loading (every
    process reads the pretrained weights, then shards them)."""
    if requested_strategy(env) != "fsdp":
        return None
    options = {"reshard_after_forward": launcher_reshard_after_forward(env)}
    ignored = [k for k in ("FSDP_OFFLOAD_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING") if env.get(k, "false").lower() == "true"]
    if ignored:
        log.warning("accelerate launch FSDP options not applied by tunesmith: %s", ", ".join(ignored))
    for key in [k for k in env if k.startswith(LAUNCHER_FSDP_PREFIXES) or k == "ACCELERATE_USE_FSDP"]:
        del env[key]
    return options


# --------------------------------------------------------------------------- sharding the model


def shard_model(model: nn.Module, accelerator, reshard_after_forward: bool = True) -> int:
    """Shard `model` in place with FSDP2 over all processes: each transformer block, then the root
    (embeddings, final norms, head). Returns the number of blocks sharded. A collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tunesmith.methods.apply import layer_stacks

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    blocks = [block for stack in layer_stacks(model) for block in stack]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return len(blocks)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory), buffers kept: the
    skeleton `plain_model` fills with the gathered weights. Take it before sharding. Tied
    parameters stay tied."""
    # (`parameter_shape`: ZeRO-3's partitioned parameters are empty placeholders of another shape)
    memo = {id(p): nn.Parameter(torch.empty(parameter_shape(p), dtype=p.dtype, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def sharding(model: nn.Module, accelerator=None) -> str | None:
    """`fsdp2` when `model` was sharded in place by FSDP2, `zero3` under DeepSpeed ZeRO-3, else None."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return "fsdp2"
    return "zero3" if zero_stage_3(accelerator) else None


def local_optimizer_state(optimizer) -> dict:
    """This process's optimizer state with DTensor moments as their local shards (plain tensors,
    loadable with `torch.load(weights_only=True)`). Saved once per process under FSDP2."""
    from torch.distributed.tensor import DTensor

    state = optimizer.state_dict()
    local = {key: {name: value.to_local() if isinstance(value, DTensor) else value for name, value in entry.items()}
             for key, entry in state["state"].items()}
    return {"state": local, "param_groups": state["param_groups"]}


def load_local_optimizer_state(optimizer, state: dict) -> None:
    """Inverse of `local_optimizer_state`: local shards become DTensors laid out like their parameters."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict keys are these positions
    restored = {}
    for key, entry in state["state"].items():
        param = params[int(key)]
        restored[key] = {
            name: DTensor.from_local(value.to(param.device), param.device_mesh, param.placements, shape=param.shape,
                                     stride=param.stride(), run_check=False)
            if isinstance(param, DTensor) and torch.is_tensor(value) and value.dim() == param.dim() and value.dim() > 0
            else value
            for name, value in entry.items()
        }
    optimizer.load_state_dict({"state": restored, "param_groups": state["param_groups"]})


def full_value(tensor):
    """A plain tensor for a (possibly DTensor) scalar such as the gradient norm under FSDP2."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
