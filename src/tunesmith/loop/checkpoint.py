"""Crash-safe training checkpoints: everything needed to continue a run exactly.

A checkpoint is a folder `checkpoints/step-000120/` holding

    trainable.safetensors   the parameters training changes (all of them for full fine-tuning),
                            full (unsharded) also under FSDP2
    optimizer.pt            AdamW moments and step counts
    optimizer-rank{K}.pt    instead of optimizer.pt under FSDP2: process K's shards of the moments
    scheduler.pt            learning-rate schedule position
    scaler.pt               fp16 loss scaler (CUDA fp16 only)
    rng-rank{K}.pt          python, numpy, torch (and CUDA) RNG states of process K
    state.json              loop position (epoch, batches consumed, sampler RNG at epoch start),
                            best metric so far, counters, log.jsonl's size (a resume cuts it back
                            to that), config and data hashes

It is written into `step-000120.tmp-<pid>/`, every file fsynced, then renamed: a crash leaves the
old checkpoint or the new one, never half of one. The `.pt` files hold only tensors, numbers and
strings and are read with `torch.load(weights_only=True)`, which executes no code.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tunesmith import distributed
from tunesmith.errors import TunesmithError
from tunesmith.methods.apply import parameter_shape

log = logging.getLogger("tunesmith")

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


class CheckpointError(TunesmithError):
    """A checkpoint could not be written or read; the previous checkpoint is intact."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict

    @classmethod
    def read(cls, path: Path) -> "Checkpoint":
        try:
            state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint '{path}': unreadable {STATE_FILE} ({err}); resume from an older one or start over") from None
        return cls(path, int(state["global_step"]), state)


def step_dirs(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (only renamed folders count), oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for child in checkpoints_dir.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).exists():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(checkpoints_dir: Path) -> Checkpoint | None:
    found = step_dirs(checkpoints_dir)
    return Checkpoint.read(found[-1][1]) if found else None


def remove_partial(checkpoints_dir: Path) -> None:
    """Folders a crash left half-written (never renamed): safe to delete."""
    if checkpoints_dir.is_dir():
        for child in checkpoints_dir.iterdir():
            if ".tmp" in child.name:
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


# --------------------------------------------------------------------------- write


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    checkpoints_dir: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    scaler,
    loop_state: dict,
    accelerator,
    save_total_limit: int | None,
    keep_step: int | None,
) -> Path:
    """Write a checkpoint atomically (all processes call this); returns its folder.

    Any failure (disk full, out of memory, permissions) removes the partial folder and raises
    `CheckpointError`; earlier checkpoints are untouched."""
    final = checkpoints_dir / f"step-{step:06d}"
    tmp = checkpoints_dir / f"{final.name}.tmp-{os.getpid() if accelerator.is_main_process else 'x'}"
    main = accelerator.is_main_process
    # The main process names the folder; other processes learn it after the barrier.
    tmp_name = [tmp.name]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(tmp_name)
    tmp = checkpoints_dir / tmp_name[0]
    sharded = distributed.sharding(model, accelerator) is not None
    engine = distributed.deepspeed_engine(accelerator)
    collective = distributed.collective_weights(model, accelerator)
    failure = None
    try:
        if main:
            checkpoints_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        accelerator.wait_for_everyone()
        _torch_save(rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
        # Under sharding or DeepSpeed every process takes part in gathering the weights and writes its optimizer shard.
        weights = distributed.gather_state(model, accelerator, keep=main) if collective or main else None
        if engine is not None:
            distributed.save_deepspeed_state(engine, tmp)
        elif sharded:
            _torch_save(distributed.local_optimizer_state(optimizer), tmp / f"optimizer-rank{accelerator.process_index}.pt")
        if main:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
            fsync_file(tmp / "trainable.safetensors")
            if not sharded and engine is None:
                _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
            _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
            if scaler is not None:
                _torch_save(scaler.state_dict(), tmp / "scaler.pt")
            payload = json.dumps(loop_state, indent=1, ensure_ascii=False).encode("utf-8")
            with open(tmp / STATE_FILE, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
    except (OSError, MemoryError, RuntimeError) as err:
        failure = err
    # Every process reports whether its part succeeded, so all stop together on failure.
    failed = any_process(accelerator, failure is not None)
    if failed:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_save_failure_message(checkpoints_dir, step, failure))
    accelerator.wait_for_everyone()
    if main:
        _fsync_dir(tmp)
        if final.exists():  # a resumed run re-saving the step it resumed from
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(checkpoints_dir)
        prune(checkpoints_dir, save_total_limit, keep_step)
    accelerator.wait_for_everyone()
    return final


def any_process(accelerator, flag: bool) -> bool:
    """True on every process if `flag` is true on any (a collective under DDP: all processes call it)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def _save_failure_message(checkpoints_dir: Path, step: int, err: BaseException | None) -> str:
    previous = step_dirs(checkpoints_dir)
    kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "no earlier checkpoint exists"
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        free = shutil.disk_usage(checkpoints_dir).free / 2**20 if checkpoints_dir.exists() else 0.0
        cause = f"the disk is full ({free:.0f} MiB free)"
        fix = "free disk space or lower train.save_total_limit, then resume with `tunesmith train --resume RUN_DIR`"
    elif isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and "memory" in str(err).lower()):
        cause = "out of memory while copying the state"
        fix = "lower the batch size or use method: lora, then resume with `tunesmith train --resume RUN_DIR`"
    else:
        cause = f"{type(err).__name__ if err else 'another process failed'}: {err or ''}".rstrip(": ")
        fix = "check the output folder is writable, then resume with `tunesmith train --resume RUN_DIR`"
    return f"could not write the checkpoint for step {step} in '{checkpoints_dir}': {cause}; {kept}; {fix}"


def prune(checkpoints_dir: Path, save_total_limit: int | None, keep_step: int | None) -> None:
    """Keep the newest `save_total_limit` checkpoints plus the one at `keep_step` (the best)."""
    if save_total_limit is None:
        return
    found = step_dirs(checkpoints_dir)
    newest = {step for step, _ in found[-save_total_limit:]} if save_total_limit > 0 else set()
    for step, path in found:
        if step not in newest and step != keep_step:
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- read


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one user-facing error
        raise CheckpointError(f"checkpoint file '{path}' is unreadable ({type(err).__name__}: {str(err)[:200]}); "
                              "resume from an older checkpoint (delete this folder) or start over with --overwrite") from None


def restore_checkpoint(checkpoint: Checkpoint, *, model: torch.nn.Module, optimizer, scheduler, scaler, accelerator) -> None:
    """Load weights, optimizer, scheduler and scaler (RNG states: `restore_rng`, when the first new batch is due)."""
    path = checkpoint.path
    sharded = distributed.sharding(model, accelerator) is not None
    engine = distributed.deepspeed_engine(accelerator)
    if (path / distributed.DEEPSPEED_TAG).is_dir() != (engine is not None):
        raise CheckpointError(
            f"checkpoint '{path}' was written by a {'DeepSpeed' if engine is None else 'non-DeepSpeed'} run and this run "
            f"{'does not use' if engine is None else 'uses'} DeepSpeed; resume with the accelerate config the run was started with")
    per_rank = (path / "optimizer-rank0.pt").exists()
    if engine is None and per_rank != sharded:
        raise CheckpointError(
            f"checkpoint '{path}' was written by a {'sharded (FSDP2)' if per_rank else 'non-sharded'} run and this run is "
            f"{'sharded' if sharded else 'not sharded'}; resume with the number of processes and the train.fsdp "
            "the run was started with")
    if not (path / f"rng-rank{accelerator.process_index}.pt").exists():
        raise CheckpointError(f"checkpoint '{path}' has no RNG state for process {accelerator.process_index}; "
                              "resume with the same number of processes the run was started with")
    # Under sharding or DeepSpeed the main process reads the weights (and under FSDP2 scatters them):
    # a collective, so every process learns whether reading failed before any of them enters it.
    collective = distributed.collective_weights(model, accelerator)
    state, problem = None, None
    if accelerator.is_main_process or not collective:
        try:
            # The file's header is enough to check it; the tensors are read only where they are loaded from it
            # (under DeepSpeed its own checkpoint restores the weights: a ZeRO-3 model is not read whole here).
            with safe_open(str(path / "trainable.safetensors"), framework="pt") as saved:
                shapes = {name: tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}
            expected = {n: parameter_shape(p) for n, p in distributed.trainable_tensors(model)}
            if set(shapes) != set(expected) or any(shapes[n] != tuple(expected[n]) for n in expected):
                missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
                problem = f"missing {missing[:3]}, unexpected {extra[:3]}" if missing or extra else "parameter shapes differ"
            elif engine is None:
                state = load_file(str(path / "trainable.safetensors"))
        except (OSError, RuntimeError) as err:
            problem = str(err)
    if any_process(accelerator, problem is not None) if collective else problem is not None:
        raise _weights_mismatch(path, problem or "see the main process")
    if engine is not None:  # DeepSpeed's own checkpoint: the weights, its fp32 master weights and optimizer partitions
        try:
            distributed.load_deepspeed_state(engine, path)
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            raise CheckpointError(f"checkpoint '{path}': DeepSpeed could not load its state from "
                                  f"'{path / distributed.DEEPSPEED_TAG}' ({type(err).__name__}: {str(err)[:200]}); resume "
                                  "with the accelerate config and number of processes the run was started with, or from an "
                                  "older checkpoint (delete this one)") from None
        scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
        return
    try:
        distributed.load_trainable_state(model, state, accelerator)
    except (KeyError, RuntimeError) as err:
        raise _weights_mismatch(path, str(err)) from None
    if sharded:
        distributed.load_local_optimizer_state(optimizer, _torch_load(path / f"optimizer-rank{accelerator.process_index}.pt"))
    else:
        optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
    scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(_torch_load(path / "scaler.pt"))


def _weights_mismatch(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"checkpoint '{path}': weights do not match this model ({detail[:200]}); "
                           "was the config changed? Resume with the run's own config or start over with --overwrite")


def restore_rng(checkpoint: Checkpoint, process_index: int) -> None:
    """Set this process's RNG states as they were when the checkpoint was written."""
    set_rng_state(_torch_load(checkpoint.path / f"rng-rank{process_index}.pt"))
