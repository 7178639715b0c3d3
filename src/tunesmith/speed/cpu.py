"""The CPU speed tricks of a training run, applied in one place and undone in one (`train.cpu`).

| trick | key (`train.cpu.`) | module |
|---|---|---|
| glibc keeps freed memory (mallopt), process-wide, for the run | `reuse_freed_memory` | `cpu_fastpath` |
| dropout masks from 16-bit uniforms (`nn.Dropout`) | `fast_dropout` | `cpu_fastpath` |
| a registered attention function for attention dropout | `fast_dropout`, `attention_upcast` | `cpu_fastpath` |
| the last layer computes the first token only | `first_token_only` | `first_token` |
| only the data's input-embedding rows train | `skip_unseen_embedding_rows` | `embedding_rows` |
| SDPA's math kernel for short training batches | `math_attention_max_length` | `cpu_fastpath` |

`apply` turns them on as configured and returns an `Applied`: the record `provenance.json` keeps under
`speed`, and `restore`, which undoes all of them. Every trick but the allocator setting changes the model
(module classes, its attention implementation, its input embedding); `restore(model)` finds them on the
model and puts plain modules back, so it works on any model they were applied to (the unwrapped one, a
gathered FSDP copy) and twice in a row. The allocator setting is the process's: `restore` sets glibc's
defaults back. The math-kernel choice is made per training forward by the loop (`attention_kernel`, with
`math_attention_max_length(train_cfg)`).

`train.cpu.speedups: false` turns every one of them off, whatever the other keys say: the run is plain
PyTorch, the baseline the benchmarks compare with (`CpuConfig.effective`). Measurements: docs/speed.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tunesmith.speed.cpu_fastpath import (
    attention_kernel,
    keep_freed_memory,
    restore_allocator,
    restore_attention,
    restore_dropout,
    use_fast_attention,
    use_fast_dropout,
)
from tunesmith.speed.embedding_rows import dataset_token_ids, restore_embedding, train_seen_rows_only
from tunesmith.speed.first_token import keep_first_token_only, restore_all_tokens

__all__ = ["Applied", "apply", "attention_kernel", "math_attention_max_length", "restore"]


@dataclass
class Applied:
    """What `apply` did: `record` (for provenance) and `restore` to undo it."""

    record: dict = field(default_factory=dict)

    def restore(self, model: nn.Module | None = None) -> None:
        restore(model)


def apply(model: nn.Module, train_cfg, *, method: str, sequence_head: bool = False, device_type: str = "cpu",
          train_data=None, pad_token_id: int | None = None, sharded: bool = False) -> Applied:
    """Turn on the CPU speed tricks `train_cfg.cpu` asks for (all off with `speedups: false`); returns the record.

    `sequence_head`: the task's loss reads only the model's sequence-level head (the first-token shortcut
    may apply). `train_data`, `pad_token_id`: the tokenized training set and the padding id, whose tokens'
    embedding rows train (without `train_data` every row trains). `device_type`: where training runs;
    `sharded`: FSDP2 or DeepSpeed will shard the model (every row trains then)."""
    cpu = train_cfg.cpu
    record: dict = {"cpu_speedups": cpu.speedups}
    record["reuse_freed_memory"] = keep_freed_memory() if cpu.effective("reuse_freed_memory") else False
    # Not under torch.compile: inductor generates its own fused dropout (and would trace ours op by op).
    fast = cpu.effective("fast_dropout") and not train_cfg.torch_compile
    record["fast_dropout"] = use_fast_dropout(model) if fast else 0
    record["fast_attention_dropout"] = use_fast_attention(model, upcast=cpu.attention_upcast) if fast else False
    # With the frozen feature cache the encoder runs once, storing every position's output.
    cached = method == "frozen" and train_cfg.cache_frozen_features
    record["first_token_only"] = (keep_first_token_only(model) if cpu.effective("first_token_only") and sequence_head
                                  and not cached else False)
    rows = cpu.effective("skip_unseen_embedding_rows") and device_type == "cpu" and not sharded and train_data is not None
    record["skip_unseen_embedding_rows"] = (train_seen_rows_only(model, dataset_token_ids(train_data), [pad_token_id])
                                            or False) if rows else False
    record["math_attention_max_length"] = math_attention_max_length(train_cfg)
    return Applied(record)


def math_attention_max_length(train_cfg) -> int:
    """The longest training sequence that runs SDPA's math kernel on CPU (0: torch's choice always)."""
    return 0 if train_cfg.torch_compile else int(train_cfg.cpu.effective("math_attention_max_length"))


def restore(model: nn.Module | None = None) -> None:
    """Undo every trick `apply` may have made: on `model` (the saved and returned model is plain
    transformers again: nn.Dropout, sdpa, every token, a plain embedding) and glibc's allocator settings."""
    if model is not None:
        restore_embedding(model)
        restore_dropout(model)
        restore_attention(model)
        restore_all_tokens(model)
    restore_allocator()
