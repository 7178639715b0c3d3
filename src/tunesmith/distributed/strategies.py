"""Which distributed strategy a launcher asked for, sharded (FSDP2) training, and sharding-aware
reads and writes of the weights.

`accelerate launch --config_file configs/accelerate/<x>.yaml` passes the strategy to each process
in environment variables (`ACCELERATE_USE_FSDP`, `ACCELERATE_USE_DEEPSPEED`, `FSDP_VERSION`,
`ACCELERATE_DEEPSPEED_ZERO_STAGE`); `Accelerator()` reads them. `check_launch_strategy` runs before
the Accelerator is built and turns the cases that would otherwise fail late, hang or silently do
something else into one-line errors:

- DeepSpeed without `deepspeed` installed.
- `accelerate launch --cpu` asked for several processes or machines: its `--cpu` launcher starts
  one process per machine and leaves the rest to `mpirun` (`--mpirun_hostfile`); without it the
  process is alone and would silently train with 1/N of the global batch (`lone_cpu_launch`).
- FSDP version 1: `train` evaluates and saves through the model object it prepared, which FSDP1
  replaces with a wrapper (FSDP2 shards in place).

Once the run directory exists, `check_shared_run_dir` refuses a run whose processes do not all see
it (machines without a shared `output.dir`), before training rather than at the first checkpoint.

DeepSpeed (ZeRO-2 and ZeRO-3, `configs/accelerate/deepspeed_zero{2,3}.yaml`) runs through
accelerate, on GPUs and on CPU: accelerate enables it only `if ... and not cpu` (with `cpu=True`
it silently runs plain DDP), so on CPU `api.make_accelerator` builds the Accelerator without
`cpu=True` and with the gloo backend, and DeepSpeed picks its CPU accelerator. DeepSpeed casts
the model itself to bf16/fp16 under mixed precision and keeps fp32 master weights in its
(partitioned) optimizer: `gather_state`, `load_trainable_state` and `plain_model` read and write
those (`deepspeed.utils.safe_get/set_full_fp32_param`), and resumable checkpoints hold DeepSpeed's
own checkpoint of its partitioned state (`save_deepspeed_state`).

FSDP2 (`train.fsdp: true`, or `accelerate launch` with configs/accelerate/fsdp.yaml) is run by
tunesmith itself, with torch's `fully_shard`, on CPU (gloo) and GPU (NCCL) alike:
`shard_model` shards every transformer block (the layer stacks `methods.layer_stacks` finds) and
then the root. accelerate is kept out of it: it never sees the model (`accelerator.prepare` would
wrap it in DDP on top), and when `accelerate launch` asked for FSDP its variables are removed
before the Accelerator is built (`take_over_launcher_fsdp`) — accelerate 1.15 would only select
FSDP on GPUs (on CPU it silently builds DDP), and transformers would load the weights on the meta
device on every process but the first (`FSDP_CPU_RAM_EFFICIENT_LOADING`). So the launcher's FSDP
run takes the same code path as `tunesmith train --nproc N train.fsdp=true`, which is tested on CPU.

Under FSDP2 every process holds a slice (a `DTensor` shard) of each parameter, so every read or
write of the weights is a collective that all processes reach at the same point: `gather_state`
(full copies), `load_trainable_state` (scatter from the main process), `plain_model` (the full,
unsharded model for saving), and the optimizer state, saved per process
(`local_optimizer_state` / `load_local_optimizer_state`).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import torch
from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.methods.apply import parameter_shape

log = logging.getLogger("tunesmith")

CPU_FIX = "on CPU use configs/accelerate/ddp_cpu.yaml or `tunesmith train --nproc N` (DDP over gloo)"


def requested_strategy(env: Mapping[str, str] = os.environ) -> str:
    """`fsdp`, `deepspeed` or `ddp` (which covers one process) as the launcher's environment asks."""
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return "ddp"


# Where a launcher says which process this is: torchrun/accelerate (RANK) and the MPI launchers accelerate reads.
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def lone_cpu_launch(env: Mapping[str, str] = os.environ) -> bool:
    """True in a process that `accelerate launch --cpu` started for a multi-process run, alone.

    accelerate's `--cpu` launcher (its "simple" launcher) starts one process per machine, sets
    `MASTER_ADDR`/`MASTER_PORT` only when more than one process or machine was asked for, and
    expects `mpirun` (`--mpirun_hostfile`) to start and number the others. Without it no rank
    variable is set, and `Accelerator()` quietly builds a one-process run."""
    return (env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env
            and not any(name in env for name in RANK_VARIABLES))


def check_launch_strategy(env: Mapping[str, str] = os.environ) -> None:
    if lone_cpu_launch(env):
        raise ConfigError(
            "accelerate launch --cpu asked for several processes or machines (it set MASTER_ADDR), but started this "
            "process alone: with --cpu, accelerate starts one process per machine and leaves the others to mpirun "
            f"(--mpirun_hostfile), and none of {', '.join(RANK_VARIABLES)} is set. Training now would run one "
            "process with a fraction of the global batch asked for. For N CPU processes use `tunesmith train --nproc N` "
            "or `accelerate launch --config_file configs/accelerate/ddp_cpu.yaml --num_processes N` (use_cpu: true in "
            "the file, no --cpu flag; add --num_machines/--machine_rank for several machines); for one process, "
            "drop --num_processes/--num_machines (or unset MASTER_ADDR)"
        )
    strategy = requested_strategy(env)
    if strategy == "ddp":
        return
    if strategy == "fsdp":
        if env.get("FSDP_VERSION", "1") != "2":
            raise ConfigError(
                f"accelerate launch asked for FSDP version {env.get('FSDP_VERSION', '1')}; tunesmith supports FSDP version 2 "
                "(in-place sharding); set `fsdp_version: 2` in fsdp_config (see configs/accelerate/fsdp.yaml)"
            )
        return  # FSDP2: tunesmith shards the model itself (take_over_launcher_fsdp), on CPU and GPU
    # DeepSpeed, on GPUs (NCCL) and on CPU (gloo, see `api.make_accelerator`); ZeRO-2 and ZeRO-3 are tested on CPU.
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("accelerate launch asked for DeepSpeed, which is not installed; pip install deepspeed, or use "
                          "configs/accelerate/ddp_multi_gpu.yaml (" + CPU_FIX + ")")


def import_deepspeed_only_when_used() -> None:
    """accelerate's `extract_model_from_parallel` (every `unwrap_model`, every transformers `save_pretrained`)
    imports DeepSpeed whenever it is installed, just to test `isinstance(model, DeepSpeedEngine)`: a second
    of imports and DeepSpeed's "Setting accelerator to CPU" warning in every plain run. A model can only be
    a DeepSpeedEngine once DeepSpeed was imported, so the test is asked only then (same answer)."""
    import sys

    import accelerate.utils.other as other

    if getattr(other.is_deepspeed_available, "__name__", "") != "_deepspeed_imported":
        def _deepspeed_imported() -> bool:
            return "deepspeed" in sys.modules

        other.is_deepspeed_available = _deepspeed_imported


def init_restarted_process_group(backend: str, env: Mapping[str, str] = os.environ) -> bool:
    """Under `torchrun --max-restarts`, start a restarted attempt's process group in a store
    namespace of its own; True if it did (accelerate then uses that group).

    torchrun's workers share its agent's TCPStore (`TORCHELASTIC_USE_AGENT_STORE`), and torch 2.13
    keeps that store across restarts (its `_create_c10d_store` says a new one is made for every retry),
    so the keys a process group registers its processes' addresses under (`default_pg/0//cpu//0/<rank>`
    for gloo) still hold the dead attempt's values when the next attempt starts. A process that reads
    its peer's old address before the peer has written the new one connects to a dead port: the
    restart hung in gloo's `connectFullMesh` or failed after its timeout (2 of 3 restarts of a
    2-process run here; a plain torch script reproduces it). Keys under a per-attempt prefix are
    never stale. The first attempt keeps accelerate's own initialisation."""
    import torch.distributed as dist

    restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restart in ("", "0") or not dist.is_available() or dist.is_initialized():
        return False
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False)
    dist.init_process_group(backend, store=dist.PrefixStore(f"tunesmith/restart-{restart}", store),
                            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]))
    log.info("torchrun restart %s: process group started under its own store prefix", restart)
    return True


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


def plain_model(model: nn.Module, skeleton: nn.Module, main: bool, accelerator=None) -> nn.Module | None:
    """The full, unsharded model (CPU) on the main process, None on the others. A collective.

    `skeleton` is `meta_copy(model)` from before sharding (or before DeepSpeed's `prepare`): its
    parameters are replaced with the gathered ones (names are the same: FSDP2 keeps them), its buffers
    with the model's. Under DeepSpeed the trained parameters are its fp32 master weights (`gather_state`)."""
    if deepspeed_engine(accelerator) is not None:
        full = _deepspeed_parameters(model, accelerator, trainable_only=False, keep=main)
    else:  # all-gather, same order everywhere
        full = {name: _full(param, keep=main) for name, param in model.named_parameters()}
    if not main:
        return None
    old = dict(skeleton.named_parameters())
    new = {id(old[name]): nn.Parameter(value, requires_grad=old[name].requires_grad) for name, value in full.items()}
    buffers = {name: b.detach().cpu().clone() for name, b in model.named_buffers()}
    for module_name, module in skeleton.named_modules():
        for key, param in list(module._parameters.items()):
            if param is not None and id(param) in new:
                module._parameters[key] = new[id(param)]
        for key, buffer in list(module._buffers.items()):
            name = f"{module_name}.{key}" if module_name else key
            if buffer is not None and name in buffers:
                module._buffers[key] = buffers[name]
    if sharding(model, accelerator) == "zero3":
        # transformers' ZeRO-3 loader records every weight renaming it knows for the model, applied or
        # not, and save_pretrained reverts them: LayerNorm.weight would be saved as the legacy
        # LayerNorm.gamma. Without any, the model is saved under the names it has (as outside ZeRO-3).
        for module in skeleton.modules():
            if getattr(module, "_weight_conversions", None):
                module._weight_conversions = []
    return skeleton


# --------------------------------------------------------------------------- sharded weights


def sharding(model: nn.Module, accelerator=None) -> str | None:
    """`fsdp2` when `model` was sharded in place by FSDP2, `zero3` under DeepSpeed ZeRO-3, else None."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return "fsdp2"
    if deepspeed_requested(accelerator):
        if accelerator.state.deepspeed_plugin.zero_stage == 3:
            return "zero3"
    return None


def _full(tensor: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    from torch.distributed.tensor import DTensor

    # `full_tensor` is a collective (all-gather): every process reaches it for the same tensors in the same order.
    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return full.detach().cpu().clone() if keep else None


def trainable_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of what training changes: the trainable parameters, plus the tensors modules list
    in `extra_training_state()` (the embedding rows that only decay, `embedding_rows`), named under the module."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for prefix, module in model.named_modules():
        extra = getattr(module, "extra_training_state", None)
        if callable(extra):
            named += [(f"{prefix}.{key}" if prefix else key, tensor) for key, tensor in extra().items()]
    return named


def gather_state(model: nn.Module, accelerator=None, trainable_only: bool = True, keep: bool = True) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the model's `trainable_tensors`, or of its whole state dict.

    A collective under sharding: every process must call it, at the same point. Without sharding it
    is a plain copy (and needs no other process). Keys are the model's own parameter names.
    `keep=False`: take part in the gathering but keep nothing (processes that do not write; FSDP2
    only — each full tensor is dropped as soon as it is gathered)."""
    kind = sharding(model, accelerator)
    if deepspeed_engine(accelerator) is not None:
        module = accelerator.unwrap_model(model)
        full = _deepspeed_parameters(module, accelerator, trainable_only, keep)
        if not trainable_only:
            full.update({k: v.detach().cpu().clone() for k, v in module.named_buffers()})
        return full if keep else {}
    if accelerator is not None and kind is None:
        model = accelerator.unwrap_model(model)
    items = trainable_tensors(model) if trainable_only else model.state_dict().items()
    if not keep and kind == "fsdp2":
        for _, value in items:
            _full(value, keep=False)
        return {}
    return {k: _full(v) for k, v in items}


def _deepspeed_parameters(module: nn.Module, accelerator, trainable_only: bool, keep: bool) -> dict[str, torch.Tensor | None]:
    """Full CPU copies of `module`'s parameters under DeepSpeed (a collective: both reads below are).

    Trained parameters come from the optimizer's fp32 master weights: under bf16/fp16 DeepSpeed casts
    the module itself to 16 bits, so its own copies are rounded. Frozen ones (not in the optimizer)
    are the module's copies, as fp32 (16-bit-rounded under bf16/fp16)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    zero3 = sharding(module, accelerator) == "zero3"
    full = {}
    for name, param in module.named_parameters():  # the same order on every process
        if not param.requires_grad and trainable_only:
            continue
        # Both are new tensors (DeepSpeed assembles the fp32 value in a fresh buffer; the frozen one is
        # copied before the gathered data is released), so no further copy: the whole model is held once.
        value = safe_get_full_fp32_param(param) if param.requires_grad else None
        if value is None:
            with deepspeed.zero.GatheredParameters([param], enabled=zero3):
                value = param.detach().to(torch.float32, copy=True)
        full[name] = value.detach().cpu() if keep else None
    return full


@torch.no_grad()
def _load_deepspeed_parameters(module: nn.Module, state: dict[str, torch.Tensor], accelerator) -> None:
    """Put full tensors into the trained parameters under DeepSpeed: the module's weights (which the
    forward uses; 16-bit under bf16/fp16) and the optimizer's fp32 master weights (which the next
    step updates and `_deepspeed_parameters` reads). Every process passes the same `state`."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    zero3 = sharding(module, accelerator) == "zero3"
    # One parameter at a time, each read from `state` once: with a lazy `state` (`TensorFile`) and
    # ZeRO-3 a process holds one full tensor at a time, not the whole model.
    for name, param in module.named_parameters():  # the same order on every process
        if not param.requires_grad:
            continue
        value = state[name]
        # Under ZeRO-3 the gathered weight is partitioned again on leaving, from the main process's value.
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=zero3):
            param.copy_(value)
        safe_set_full_fp32_param(param, value.to(device=param.device, dtype=torch.float32))


class TensorFile:
    """A safetensors file read one tensor at a time (`file[name]`), for loads that need the values in
    turn (DeepSpeed): memory-mapped, so processes on one machine share the pages. A context manager."""

    def __init__(self, path):
        from safetensors import safe_open

        self._handle = safe_open(str(path), framework="pt")
        self._file = self._handle.__enter__()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file.get_tensor(name)

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self._handle.__exit__(*exc)


def collective_weights(model: nn.Module, accelerator=None) -> bool:
    """Whether reading or writing the weights is a collective every process must join (FSDP2, DeepSpeed)."""
    return sharding(model, accelerator) is not None or deepspeed_engine(accelerator) is not None


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor] | None, accelerator=None) -> None:
    """Copy full tensors into the (possibly sharded) `trainable_tensors`.

    Under FSDP2 only the main process needs `state` (others pass None): its values are scattered
    to every process. Under DeepSpeed every process passes it (any mapping: `TensorFile` reads it
    one tensor at a time). A collective under sharding or DeepSpeed, like `gather_state`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    kind = sharding(model, accelerator)
    if deepspeed_engine(accelerator) is not None:
        _load_deepspeed_parameters(accelerator.unwrap_model(model), state, accelerator)
        return
    if accelerator is not None and kind is None:
        model = accelerator.unwrap_model(model)
    for name, param in trainable_tensors(model):
        if isinstance(param, DTensor):
            source = state[name] if state is not None else torch.empty(param.shape, dtype=param.dtype)
            # distribute_tensor scatters process 0's values; the other processes' `source` only gives the shape.
            param.copy_(distribute_tensor(source.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements))
        else:
            param.copy_(state[name])


# --------------------------------------------------------------------------- sharded optimizer state


DEEPSPEED_TAG = "deepspeed"  # the folder of DeepSpeed's own checkpoint inside a tunesmith checkpoint
DEEPSPEED_SHM_OP = "deepspeed_shm_comm"


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed on CPU from JIT-compiling its shared-memory all-reduce.

    DeepSpeed's CPU communication backend builds that C++ op when its process group starts (a C++
    compiler and ~25 s on first use; without a compiler the run dies with a compiler traceback),
    but only `inference_all_reduce` (DeepSpeed inference) calls it: ZeRO training reduces and
    gathers through torch.distributed (gloo) either way. DeepSpeed skips ops marked incompatible in
    `deepspeed.ops.__compatible_ops__`, a dict it caches in the module for such edits."""
    try:
        import deepspeed.ops

        compatible = deepspeed.ops.__compatible_ops__
    except Exception:  # another DeepSpeed layout: leave it its default
        return
    if isinstance(compatible, dict):
        compatible[DEEPSPEED_SHM_OP] = False


def deepspeed_requested(accelerator) -> bool:
    """Whether `accelerator` runs DeepSpeed (`accelerate launch` with a DeepSpeed config)."""
    return accelerator is not None and str(accelerator.distributed_type).endswith("DEEPSPEED")


def deepspeed_engine(accelerator):
    """The DeepSpeed engine accelerate built in `prepare` (None without DeepSpeed, or before `prepare`)."""
    if not deepspeed_requested(accelerator):
        return None
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return wrapped.engine if wrapped is not None else None


def save_deepspeed_state(engine, folder) -> None:
    """DeepSpeed's own checkpoint of its ZeRO state under `folder/deepspeed`: every process's partition
    of the optimizer state and fp32 master weights (and DeepSpeed's copy of the module). A collective.

    Its own format, because DeepSpeed's optimizer state is partitioned its own way (flat fp32 groups,
    loss scaler), and DeepSpeed's `zero_to_fp32.py` (copied into the folder) reads it."""
    engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG)


def load_deepspeed_state(engine, folder) -> None:
    """Inverse of `save_deepspeed_state` (the learning-rate schedule is tunesmith's `scheduler.pt`). A collective."""
    path, _ = engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in '{folder}/{DEEPSPEED_TAG}'")


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


# How long a process waits for the main process's marker to appear in the run directory: a shared
# file system (NFS) may cache "no such file" for a while (attribute caching, up to ~60 s by default).
SHARED_DIR_WAIT_VARIABLE = "TUNESMITH_SHARED_DIR_WAIT"
SHARED_DIR_WAIT_S = 60.0


def check_shared_run_dir(run_dir: Path, accelerator) -> None:
    """Refuse, on every process, a run directory that some process cannot see.

    Every process writes its part of each checkpoint (RNG state, optimizer shards) into the run
    directory and reads the best checkpoint back at the end, so a run over several machines needs
    `output.dir` on a file system they all mount at the same path. Without this check a run on
    machine-local disks (or with a relative `output.dir` started from different folders) trains
    until its first checkpoint and fails there. The main process writes a marker with a random
    name into the run directory it just created; every other process waits for it to appear."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast_object_list, gather_object

    main = accelerator.is_main_process
    name = [secrets.token_hex(8) if main else None]
    broadcast_object_list(name)
    marker = Path(run_dir) / f".shared-check-{name[0]}"
    if main:
        marker.write_text("written by the main process to check that every process sees this folder\n", encoding="utf-8")
    accelerator.wait_for_everyone()
    try:
        wait = float(os.environ.get(SHARED_DIR_WAIT_VARIABLE, SHARED_DIR_WAIT_S))
    except ValueError:
        wait = SHARED_DIR_WAIT_S
    deadline = time.monotonic() + wait
    while not (seen := marker.is_file()) and time.monotonic() < deadline:
        time.sleep(0.25)
    views = gather_object([(accelerator.process_index, socket.gethostname(), str(Path(run_dir).resolve()), seen)])
    if main:
        marker.unlink(missing_ok=True)
    blind = [view for view in views if not view[3]]
    if not blind:
        return
    _, main_host, main_path, _ = next(view for view in views if view[0] == 0)
    shown = "; ".join(f"process {rank} on host '{host}' (looked in '{path}')" for rank, host, path, _ in blind[:4])
    shown += f"; and {len(blind) - 4} more" if len(blind) > 4 else ""
    raise ConfigError(
        f"output.dir: '{main_path}' is not shared by every process of this run: the main process (host '{main_host}') "
        f"created it, but {shown} cannot see it. Every process writes its part of each checkpoint there and reads "
        "the best one back at the end: put output.dir on a file system every machine mounts at the same path (NFS, "
        "Lustre, a cloud file share; an absolute path), or train on one machine"
    )


def full_value(tensor):
    """A plain tensor for a (possibly DTensor) scalar such as the gradient norm under FSDP2."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def end_process_group(finished: bool = True) -> None:
    """Tear down the default process group, if any, while the interpreter is still whole.

    FSDP2's sharded modules, DTensors and optimizer state hold the device mesh, and through it the
    gloo process group, inside reference cycles; left to interpreter exit they are freed during
    finalization, where a process sometimes aborts ("terminate called without an active exception",
    SIGABRT, exit code -6; the gloo-at-exit problem of pytorch/pytorch PR 179291). Seen here in 3 of
    28 runs of the FSDP test files under `pytest -n 2` with a barrier and destroy alone, and in 0 of 14
    with this collection added (a mitigation, not a proof: the abort is rare and load-dependent).
    So: collect what is already garbage (call this once the model is out of scope), then, if
    `finished` (every process got here the same way), a barrier lets in-flight collectives complete
    (after a failure the others may never arrive), then destroy the group."""
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    if finished:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()
