"""Which distributed strategy a launcher asked for, and the checks on the launch itself.

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
The process group: started under its own store prefix on a torchrun restart
(`init_restarted_process_group`), torn down cleanly at the end (`end_process_group`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from pathlib import Path

from tunesmith.errors import ConfigError

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
