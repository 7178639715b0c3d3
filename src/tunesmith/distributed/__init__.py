"""Distributed training: launch checks, FSDP2, DeepSpeed, and sharding-aware weight reads and writes.

- `launch`: which strategy the launcher asked for, the checks that turn a bad launch into one-line
  errors, the shared-run-directory check, the process group's start on a restart and its teardown.
- `fsdp`: FSDP2 sharding (`train.fsdp`, or `accelerate launch` with fsdp.yaml), run by tunesmith itself;
  the per-process optimizer state.
- `deepspeed`: DeepSpeed through accelerate (ZeRO-2/3), its fp32 master weights and checkpoints;
  `deepspeed` itself is imported only when a run uses it.
- `weights`: reading and writing the weights, sharded or not (`gather_state`, `load_trainable_state`,
  `plain_model`), collectives every process joins under FSDP2 or DeepSpeed.

Call sites write `from tunesmith import distributed` and `distributed.sharding(...)`.
"""

from tunesmith.distributed.launch import (
    CPU_FIX, RANK_VARIABLES, SHARED_DIR_WAIT_S, SHARED_DIR_WAIT_VARIABLE, check_launch_strategy, check_shared_run_dir,
    end_process_group, import_deepspeed_only_when_used, init_restarted_process_group, lone_cpu_launch, requested_strategy,
)
from tunesmith.distributed.deepspeed import (
    DEEPSPEED_SHM_OP, DEEPSPEED_TAG, deepspeed_engine, deepspeed_parameters, deepspeed_requested, load_deepspeed_parameters,
    load_deepspeed_state, save_deepspeed_state, skip_deepspeed_shm_op, zero_stage_3,
)
from tunesmith.distributed.fsdp import (
    LAUNCHER_FSDP_PREFIXES, full_value, launcher_reshard_after_forward, load_local_optimizer_state, local_optimizer_state,
    meta_copy, shard_model, sharding, take_over_launcher_fsdp,
)
from tunesmith.distributed.weights import (
    TensorFile, collective_weights, gather_state, load_trainable_state, plain_model, trainable_tensors,
)

__all__ = [
    "CPU_FIX", "DEEPSPEED_SHM_OP", "DEEPSPEED_TAG", "LAUNCHER_FSDP_PREFIXES", "RANK_VARIABLES", "SHARED_DIR_WAIT_S",
    "SHARED_DIR_WAIT_VARIABLE", "TensorFile", "check_launch_strategy", "check_shared_run_dir", "collective_weights",
    "deepspeed_engine", "deepspeed_parameters", "deepspeed_requested", "end_process_group", "full_value", "gather_state",
    "import_deepspeed_only_when_used", "init_restarted_process_group", "launcher_reshard_after_forward",
    "load_deepspeed_parameters", "load_deepspeed_state", "load_local_optimizer_state", "load_trainable_state",
    "local_optimizer_state", "lone_cpu_launch", "meta_copy", "plain_model", "requested_strategy", "save_deepspeed_state",
    "shard_model", "sharding", "skip_deepspeed_shm_op", "take_over_launcher_fsdp", "trainable_tensors", "zero_stage_3",
]
