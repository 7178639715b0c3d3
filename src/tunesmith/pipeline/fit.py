"""Training proper: the loaders, the `frozen` feature cache, the best-model metric, the loop."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import RunConfig
from tunesmith.data.batching import eval_loader, train_loader
from tunesmith.loop.checkpoint import Checkpoint
from tunesmith.loop.evaluation import greater_is_better
from tunesmith.loop.loop import train_loop
from tunesmith.pipeline.devices import Devices
from tunesmith.pipeline.model import Built, maybe_shard
from tunesmith.pipeline.prepare import Prepared
from tunesmith.tasks.base import Task, TaskState


@dataclass
class Fitted:
    """What the final evaluation and the save need from training."""

    loop: Any  # the loop's result: steps, epochs, timings, best step and metric
    loaders: dict  # "train", and "validation"/"test" where the data has them
    references: dict  # the evaluation splits' references (question answering)
    loss_fn: Any
    metric: str  # metric_for_best_model
    skeleton: torch.nn.Module | None  # `maybe_shard`'s parameter-less copy (FSDP2, DeepSpeed), else None
    feature_cache_seconds: float | None


def fit(cfg: RunConfig, data: Prepared, devices: Devices, built: Built, encoded: dict, run_dir: Path,
        checkpoint: Checkpoint | None, show_progress: bool) -> Fitted:
    task, state, accelerator, model = data.task, data.state, devices.accelerator, built.model
    metric, bigger = best_metric(cfg, task, state)
    # Passed only when set (checked against `supports_label_smoothing` in preflight): a family's loss_fn without
    # the keyword keeps working.
    smoothing = {"label_smoothing": cfg.train.label_smoothing_factor} if cfg.train.label_smoothing_factor else {}
    loss_fn = task.loss_fn(cfg.task, state, encoded["train"], **smoothing)
    collator = task.collator(data.tokenizer, model)
    references = {s: task.references(cfg.task, data.tables[s], state) for s in ("validation", "test") if s in data.tables}
    loaders = build_loaders(cfg, encoded, data.tokenizer, collator, accelerator.num_processes)
    cache_seconds = cache_frozen_features(cfg, model, encoded, loaders, data.tokenizer, collator, accelerator)
    skeleton = maybe_shard(model, cfg, accelerator, data.launcher_fsdp, devices.reshard, built.speed)
    loop = train_loop(
        model=model,
        task=task,
        state=state,
        train_cfg=cfg.train,
        train_loader=loaders["train"],
        # eval_on_start asked for explicitly evaluates even when periodic evaluation is off
        eval_loader=loaders.get("validation") if cfg.train.eval_strategy != "no" or cfg.train.eval_on_start else None,
        loss_fn=loss_fn,
        accelerator=accelerator,
        run_dir=run_dir,
        metric=metric,
        bigger_better=bigger,
        show_progress=show_progress,
        resume=checkpoint,
        fingerprint=data.fingerprint,
        eval_references=references.get("validation"),
        tokenizer=data.tokenizer,
    )
    return Fitted(loop, loaders, references, loss_fn, metric, skeleton, cache_seconds)


def best_metric(cfg: RunConfig, task: Task, state: TaskState) -> tuple[str, bool]:
    """metric_for_best_model (the task's default unless set) and whether bigger is better."""
    default, default_bigger = task.default_metric(state)
    metric = (cfg.train.metric_for_best_model or default).removeprefix("eval_")
    bigger = cfg.train.greater_is_better if cfg.train.greater_is_better is not None else (
        default_bigger if metric == default else greater_is_better(metric, None)
    )
    return metric, bigger


def build_loaders(cfg: RunConfig, encoded: dict, tokenizer, collator, processes: int) -> dict:
    """Loaders yield global batches that accelerate splits across processes (`split_batches`), so a run
    on N processes sees exactly the batches of a one-process run with N times the batch size."""
    return {
        "train": train_loader(
            encoded["train"], tokenizer, cfg.train.per_device_train_batch_size * processes, cfg.train.group_by_length,
            cfg.train.seed, cfg.train.dataloader_num_workers, collator,
        ),
        **{
            s: eval_loader(encoded[s], tokenizer, cfg.train.per_device_eval_batch_size * processes, collator)
            for s in ("validation", "test")
            if s in encoded
        },
    }


def cache_frozen_features(cfg: RunConfig, model, encoded: dict, loaders: dict, tokenizer, collator,
                          accelerator) -> float | None:
    """Method `frozen` with `train.cache_frozen_features`: the encoder's one pass over every split, before
    the loop (not part of train_seconds; its seconds are returned, reported next to it). Else None."""
    if cfg.method.name != "frozen" or not cfg.train.cache_frozen_features:
        return None
    from tunesmith.methods.feature_cache import cache_body

    cache_start = time.perf_counter()
    everything = [eval_loader(encoded["train"], tokenizer, cfg.train.per_device_eval_batch_size, collator)]
    cache_body(model, everything + [loaders[s] for s in ("validation", "test") if s in loaders], accelerator.autocast)
    return round(time.perf_counter() - cache_start, 3)
