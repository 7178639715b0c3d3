"""Speed options: CPU threads, the CPU speed tricks, activation (gradient) checkpointing and `torch.compile`.

`train` calls `configure_threads` before anything measures speed (the precision check times
matmuls), and `apply_speed_options` once the method is applied, before the loop: the CPU speed tricks
(`speed.cpu.apply`, `train.cpu`), then checkpointing and compiling. Both return what they did; `train`
records it in `provenance.json` under `speed`. `restore_speed_options` undoes it (`speed.cpu.restore`).

Threads (`train.num_threads`):
  - an int: exactly that many intra-op threads;
  - `auto`: `OMP_NUM_THREADS` when it is set (by you, or by a launcher: torchrun sets 1 when it
    starts several processes and the variable is unset, `accelerate launch` on CPU sets physical
    cores / processes), else physical cores / processes on this machine. `auto` never *raises* the
    count torch already has: torch starts with the physical cores (or `OMP_NUM_THREADS`), and a
    lower count was set on purpose by whoever set it (a notebook, a test runner with one worker
    per core); raising it would oversubscribe the cores. Inter-op threads follow the intra-op
    count; torch allows setting them once per process, before any inter-op work, so a second run
    in one process keeps the first value.

`torch_compile` compiles the model *in place* (`nn.Module.compile`): the model keeps its class and
its state-dict keys (no `_orig_mod.` prefix, no wrapper for `unwrap_model` or peft to see through),
so saving, the best checkpoint and DDP wrapping work unchanged. Shapes are compiled as dynamic
(`dynamic=True`): batches are padded per batch to their longest text and length-grouped, so
sequence lengths change every step; static shapes would recompile for each new length (up to
`max_length` graphs, each costing the first compile again) or need padding to a multiple of 8/16,
which is extra padding and still many graphs. With dynamic shapes the training forward and
backward compile once, evaluation (no grad) once more.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tunesmith.distributed import requested_strategy
from tunesmith.errors import ConfigError
from tunesmith.methods.apply import transformers_model
from tunesmith.speed import cpu

log = logging.getLogger("tunesmith")

# `torch.compile` backend; tests swap in "eager" (graph capture without code generation) to stay fast.
COMPILE_BACKEND = "inductor"


# --------------------------------------------------------------------------- threads


@dataclass(frozen=True)
class ThreadChoice:
    intra_op: int
    inter_op: int
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this run on this machine (torchrun, accelerate and MPI launchers set it)."""
    from accelerate.utils import get_cpu_distributed_information

    return max(1, get_cpu_distributed_information().local_world_size)


def choose_threads(
    requested: int | str, *, cores: int, processes: int, omp_num_threads: str | None, current: int
) -> tuple[int, str]:
    """Intra-op threads for one process, and why. Pure: reads no global state, changes none."""
    if requested != "auto":
        return int(requested), f"train.num_threads={requested} (config)"
    try:
        from_env = int(omp_num_threads or 0)
    except ValueError:
        from_env = 0
    if from_env > 0:
        target, reason = from_env, f"OMP_NUM_THREADS={from_env} in the environment (yours or the launcher's)"
    else:
        target = max(1, cores // processes)
        reason = f"{cores} physical cores / {processes} process{'es' if processes > 1 else ''} on this machine"
    if current < target:
        return current, (f"{reason} would give {target}, but this process already runs torch with {current}: "
                         "kept (auto never raises it)")
    return target, f"{reason}: {target}"


def configure_threads(requested: int | str) -> ThreadChoice:
    """Set torch's intra- and inter-op threads for this process; logs and returns the choice."""
    cores = physical_cores()
    intra, reason = choose_threads(requested, cores=cores, processes=local_processes(),
                                   omp_num_threads=os.environ.get("OMP_NUM_THREADS"), current=torch.get_num_threads())
    if requested != "auto" and intra > cores:
        log.warning("train.num_threads=%d is more than the %d physical cores: threads will compete for cores", intra, cores)
    if intra != torch.get_num_threads():
        torch.set_num_threads(intra)
    if torch.get_num_interop_threads() != intra:
        try:
            torch.set_num_interop_threads(intra)
        except RuntimeError:  # torch allows it once per process, before any inter-op work: keep its pool
            pass
    choice = ThreadChoice(torch.get_num_threads(), torch.get_num_interop_threads(), reason)
    log.info("threads: %d intra-op, %d inter-op (%s)", choice.intra_op, choice.inter_op, reason)
    return choice


# --------------------------------------------------------------------------- model options


def enable_gradient_checkpointing(model: nn.Module) -> bool:
    """Non-reentrant activation checkpointing on every layer; False (with a warning) where unsupported.

    Non-reentrant checkpointing computes parameter gradients inside a checkpointed layer even when
    the layer's input does not require grad, so the embedding-output hook transformers adds for
    reentrant checkpointing with frozen embeddings (peft, `last_n`) is removed: it would only make
    backward run through frozen layers for nothing.
    """
    inner = transformers_model(model)
    if not getattr(inner, "supports_gradient_checkpointing", False):
        log.warning("train.gradient_checkpointing: %s does not support activation checkpointing; training without it",
                    type(inner).__name__)
        return False
    enable = getattr(inner, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(inner, "disable_input_require_grads"):
        inner.disable_input_require_grads()
    return True


def check_compile_available(device_type: str) -> None:
    """Raise a ConfigError (not a traceback mid-training) when `torch.compile` cannot work here."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        import sys

        raise ConfigError(
            f"train.torch_compile: torch {torch.__version__} cannot compile on Python {sys.version.split()[0]}; "
            "expected a Python version torch.compile supports; set train.torch_compile=false or change Python"
        )
    if COMPILE_BACKEND != "inductor":
        return
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("train.torch_compile: compiling for CUDA needs triton, which is not installed; "
                              "pip install triton (the version your torch names), or set train.torch_compile=false")
        return
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as err:  # torch raises InvalidCxxCompiler (a RuntimeError); keep any failure a user error
        raise ConfigError(
            f"train.torch_compile: compiling on CPU needs a C++ compiler; found none of {inductor_config.cpp.cxx} "
            f"({str(err).splitlines()[0][:120]}). Install one (apt-get install g++), point CXX at one, "
            "or set train.torch_compile=false"
        ) from None


def apply_speed_options(
    model: nn.Module, train_cfg, method: str, threads: ThreadChoice | None = None, sequence_head: bool = False, *,
    device_type: str = "cpu", train_data=None, pad_token_id: int | None = None, cleanup: contextlib.ExitStack | None = None,
) -> tuple[nn.Module, dict]:
    """The CPU speed tricks (`speed.cpu.apply`), gradient checkpointing, then `torch.compile`, as configured.
    Returns the model and a record for provenance.

    `sequence_head`: the task's loss reads only the model's sequence-level head (classification), so
    the last layer may compute only the token that head reads (`first_token`). `device_type`, `train_data`,
    `pad_token_id`: where training runs and on which tokens (the embedding rows that train). `cleanup`: the
    run's exit stack, on which the process-wide allocator setting is undone however the run ends."""
    record: dict = {"threads": threads.as_dict() if threads else None, "gradient_checkpointing": False, "torch_compile": False}
    sharded = bool(train_cfg.fsdp) or requested_strategy() == "deepspeed"
    # Swapped for the run; `api` undoes them when training ends (`restore_speed_options`).
    applied = cpu.apply(model, train_cfg, method=method, sequence_head=sequence_head, device_type=device_type,
                        train_data=train_data, pad_token_id=pad_token_id, sharded=sharded)
    if cleanup is not None:
        cleanup.callback(cpu.restore)  # the allocator's defaults back even when the run fails
    record.update(applied.record)
    # `frozen` keeps the encoder in eval mode without gradients: no activations are kept for backward,
    # and with the feature cache the encoder does not even run during training.
    if train_cfg.gradient_checkpointing:
        if method == "frozen":
            log.info("train.gradient_checkpointing: skipped for method frozen (its encoder keeps no activations for backward)")
        else:
            record["gradient_checkpointing"] = enable_gradient_checkpointing(model)
    if train_cfg.torch_compile:
        if method == "frozen" and train_cfg.cache_frozen_features:
            log.info("train.torch_compile: skipped for method frozen with cached features (only the small head runs per step)")
        else:
            check_compile_available("cuda" if torch.cuda.is_available() else "cpu")
            model.compile(backend=COMPILE_BACKEND, dynamic=True)
            record["torch_compile"] = {"backend": COMPILE_BACKEND, "dynamic": True}
            log.info("torch.compile (%s, dynamic shapes): the first training and evaluation steps include compile time",
                     COMPILE_BACKEND)
    return model, record


def restore_speed_options(model: nn.Module) -> None:
    """Undo the CPU speed tricks of `apply_speed_options` on `model` (the saved and returned model is plain)
    and the process-wide allocator setting (`speed.cpu.restore`)."""
    cpu.restore(model)
