"""DeepSpeed (ZeRO-2 and ZeRO-3, `configs/accelerate/deepspeed_zero{2,3}.yaml`), run through accelerate.

On GPUs and on CPU: accelerate enables it only `if ... and not cpu` (with `cpu=True` it silently
runs plain DDP), so on CPU `pipeline.devices.make_accelerator` builds the Accelerator without
`cpu=True` and with the gloo backend, and DeepSpeed picks its CPU accelerator. DeepSpeed casts
the model itself to bf16/fp16 under mixed precision and keeps fp32 master weights in its
(partitioned) optimizer: `distributed.weights` reads and writes those through
`deepspeed_parameters` / `load_deepspeed_parameters` (`deepspeed.utils.safe_get/set_full_fp32_param`),
and resumable checkpoints hold DeepSpeed's own checkpoint of its partitioned state
(`save_deepspeed_state`). `deepspeed` itself is imported only inside these functions, when a run uses it.
"""

from __future__ import annotations

import torch
from torch import nn

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


def zero_stage_3(accelerator) -> bool:
    """Whether `accelerator` runs DeepSpeed ZeRO-3 (parameters partitioned across processes)."""
    return deepspeed_requested(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


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


def deepspeed_parameters(module: nn.Module, accelerator, trainable_only: bool, keep: bool) -> dict[str, torch.Tensor | None]:
    """Full CPU copies of `module`'s parameters under DeepSpeed (a collective: both reads below are).

    Trained parameters come from the optimizer's fp32 master weights: under bf16/fp16 DeepSpeed casts
    the module itself to 16 bits, so its own copies are rounded. Frozen ones (not in the optimizer)
    are the module's copies, as fp32 (16-bit-rounded under bf16/fp16)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    zero3 = zero_stage_3(accelerator)
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
def load_deepspeed_parameters(module: nn.Module, state: dict[str, torch.Tensor], accelerator) -> None:
    """Put full tensors into the trained parameters under DeepSpeed: the module's weights (which the
    forward uses; 16-bit under bf16/fp16) and the optimizer's fp32 master weights (which the next
    step updates and `deepspeed_parameters` reads). Every process passes the same `state`."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    zero3 = zero_stage_3(accelerator)
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
