"""After the loop: the final evaluation, the plain trained model, the saved model and run files."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import RunConfig
from tunesmith.data.splits import data_file_paths
from tunesmith import distributed
from tunesmith.loop.interrupt import StopSignals
from tunesmith.loop.evaluation import run_evaluation
from tunesmith.methods.apply import is_peft
from tunesmith.pipeline.devices import Devices
from tunesmith.pipeline.fit import Fitted
from tunesmith.pipeline.prepare import Prepared
from tunesmith.runs.rundir import model_card, provenance, write_json, write_jsonl
from tunesmith.speed.performance import restore_speed_options
from tunesmith.tasks.base import Task, TaskState


def keep_saving_on_ctrl_c(cleanup: contextlib.ExitStack, accelerator) -> None:
    """From here a Ctrl-C is acknowledged and the run goes on saving; a second one abandons it (during the
    loop, the loop's own handler stops at the next step with a checkpoint)."""
    cleanup.enter_context(StopSignals(notice=_saving_notice if accelerator.is_main_process else None))


def _saving_notice(signum: int) -> str:
    return ("stopping: training has finished and the run is being evaluated and saved; it ends by itself in a moment. "
            "Press Ctrl-C again to abandon the save (the last checkpoint stays resumable)")


def final_metrics(cfg: RunConfig, data: Prepared, devices: Devices, model,
                  fitted: Fitted) -> tuple[TaskState, dict, dict[str, list[dict]]]:
    """The task state after the task's `after_training` (e.g. a tuned threshold), the run's metrics (validation
    and test from the best checkpoint, restored by the loop, and the loop's summary) and the task's
    per-example outputs of each split (`Task.example_outputs`: generated text), written beside them."""
    task, accelerator, loaders, references = data.task, devices.accelerator, fitted.loaders, fitted.references
    state = data.state
    val_metrics, val_acc = run_evaluation(model, accelerator.prepare(loaders["validation"]), task, state, fitted.loss_fn,
                                          accelerator, references.get("validation"), data.tokenizer)
    tuned = task.after_training(cfg.task, state, val_acc)
    if tuned != state:
        state = tuned
        val_metrics = task.compute_metrics(val_acc, state)
    metrics: dict[str, Any] = {"validation": val_metrics}
    if fitted.loop.start_metrics:
        metrics["validation_before_training"] = fitted.loop.start_metrics
    outputs = {"validation": task.example_outputs(val_acc, state)}
    if "test" in loaders:
        metrics["test"], test_acc = run_evaluation(model, accelerator.prepare(loaders["test"]), task, state, fitted.loss_fn,
                                                   accelerator, references["test"], data.tokenizer)
        outputs["test"] = task.example_outputs(test_acc, state)
    metrics["train"] = _train_summary(fitted, devices.precision.precision)
    return state, metrics, {split: rows for split, rows in outputs.items() if rows is not None}


def _train_summary(fitted: Fitted, precision: str) -> dict:
    loop = fitted.loop
    return {
        "global_step": loop.global_step,
        "epochs": loop.epochs_completed,
        "samples_per_second": loop.samples_per_second,
        "tokens_per_second": loop.tokens_per_second,
        "train_seconds": loop.train_seconds,
        "eval_seconds": loop.eval_seconds,
        **({"feature_cache_seconds": fitted.feature_cache_seconds} if fitted.feature_cache_seconds is not None else {}),
        "padding_share": loop.padding_share,
        "stopped_early": loop.stopped_early,
        "best_step": loop.best_step,
        "metric_for_best_model": fitted.metric,
        "best_metric": loop.best_metric,
        "precision": precision,
    }


def plain_trained_model(model, skeleton: torch.nn.Module | None, accelerator) -> torch.nn.Module | None:
    """The trained model as a plain module (no feature cache, no speed options): under FSDP2/DeepSpeed
    every process gathers the full weights together and the main process gets it (None on the others)."""
    from tunesmith.methods.feature_cache import uncache_body

    uncache_body(accelerator.unwrap_model(model))
    plain = distributed.plain_model(model, skeleton, accelerator.is_main_process, accelerator) if skeleton is not None else (
        accelerator.unwrap_model(model))
    if distributed.deepspeed_engine(accelerator) is not None:
        accelerator.free_memory()  # kept by the loop for the fp32 master weights plain_model just read
    for trained in (accelerator.unwrap_model(model), plain):
        if trained is not None:
            restore_speed_options(trained)  # the returned/saved model is plain again; glibc's allocator defaults back
    return plain


def write_run(run_dir: Path, model, tokenizer, cfg: RunConfig, task: Task, state: TaskState, metrics: dict,
              precision: dict, warnings: list[str], notes: list[str], params: str, speed: dict | None = None,
              outputs: dict[str, list[dict]] | None = None) -> None:
    """The finished run: model (or adapter), task state, metrics, per-example outputs
    (`<split>_generated_predictions.jsonl`), provenance, model card; checkpoints removed."""
    save_model(model, tokenizer, run_dir, cfg, state, task)
    write_json(run_dir / "task.json", {"task": task.name, **state.to_json()})
    write_json(run_dir / "metrics.json", metrics)
    for split, rows in (outputs or {}).items():
        write_jsonl(run_dir / f"{split}_{task.example_outputs_name}.jsonl", rows)
    write_json(
        run_dir / "provenance.json",
        provenance(cfg, data_file_paths(cfg.data), precision,
                   {"warnings": warnings, "notes": notes, "parameters": params, "speed": speed}),
    )
    card = model_card(cfg, task.card(state), metrics, cfg.model.name_or_path, params)
    (run_dir / "README.md").write_text(card, encoding="utf-8")
    (run_dir / "model" / "README.md").write_text(card, encoding="utf-8")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def save_model(model, tokenizer, run_dir: Path, cfg: RunConfig, state: TaskState, task: Task) -> None:
    model_dir = run_dir / "model"
    if is_peft(model):
        model.save_pretrained(run_dir / "adapter")
        tokenizer.save_pretrained(run_dir / "adapter")
        if not cfg.method.merge_on_save:
            tokenizer.save_pretrained(model_dir)  # `load` reads the tokenizer from model/ in every run
            if getattr(model, "generation_config", None) is not None:  # and the generation settings
                model.generation_config.save_pretrained(model_dir)
            return
        model = model.merge_and_unload()
    task.before_save(model, state)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
