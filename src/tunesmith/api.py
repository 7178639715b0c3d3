"""The Python API: `train`, `evaluate`, `predict`, `load`. The CLI is a thin layer over these."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml

from tunesmith.assets import resolve_model_path
from tunesmith.config import ModelConfig, RunConfig, coerce_config, parse_config
from tunesmith.data.batching import eval_loader, train_loader
from tunesmith.data.splits import data_file_paths, make_splits
from tunesmith.distributed import strategies as distributed
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.speed.first_token import first_token_only
from tunesmith.speed.memory import check_memory
from tunesmith.methods.apply import apply_method, count_parameters, is_peft
from tunesmith.speed.precision import choose_precision
from tunesmith.speed.performance import apply_speed_options, configure_threads, restore_speed_options
from tunesmith.runs.lock import RunLock, check_unlocked
from tunesmith.loop.resume import check_fingerprint, fingerprint, plan_resume
from tunesmith.loop.interrupt import StopSignals, TrainingInterrupted
from tunesmith.runs.rundir import (
    check_run_dir, create_run_dir, discard_new_run_dir, drop_previous_run, model_card, provenance, put_back_previous_run,
    finished_run_dir, run_state, save_config, write_json,
)
from tunesmith.tasks import Task, get_task
from tunesmith.loop.evaluation import greater_is_better, run_evaluation
from tunesmith.loop.loop import train_loop

log = logging.getLogger("tunesmith")
distributed.import_deepspeed_only_when_used()


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    best_metric: float | None
    best_step: int | None
    warnings: list[str] = field(default_factory=list)

    @property
    def model_dir(self) -> Path:
        return self.run_dir / "model"


# --------------------------------------------------------------------------- model loading


def load_tokenizer(cfg: ModelConfig, add_prefix_space: bool = False):
    """`add_prefix_space`: byte-level BPE tokenizers (RoBERTa, GPT-2) read pre-split words as if each
    followed a space, which word-level tasks need (transformers refuses split words without it)."""
    source = resolve_model_path(cfg.tokenizer_name_or_path or cfg.name_or_path)
    extra = {"add_prefix_space": True} if add_prefix_space else {}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, gguf_file=cfg.gguf_file, **extra
        )
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.name_or_path: cannot load a tokenizer from '{source}' ({str(err).splitlines()[0][:200]}); "
            "expected a hub name (online), a local model folder, or bundled:all-MiniLM-L6-v2"
        ) from None
    if tokenizer.pad_token is None:
        # Decoder-only models (GPT-2, Llama) ship without a pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.sep_token
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    if add_prefix_space:
        _byte_level_prefix_space(tokenizer)
    return tokenizer


def _byte_level_prefix_space(tokenizer) -> None:
    # A generic fast tokenizer takes the option without applying it to its backend: set it there, so it is
    # also saved with the model (tokenizer.json) and plain transformers reads words the same way.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is None:
        return
    from tokenizers import pre_tokenizers

    parts = [pre] if isinstance(pre, pre_tokenizers.ByteLevel) else []
    if isinstance(pre, pre_tokenizers.Sequence):
        parts = [p for p in pre if isinstance(p, pre_tokenizers.ByteLevel)]
    for part in parts:
        part.add_prefix_space = True
    if parts:
        backend.pre_tokenizer = pre
        tokenizer.add_prefix_space = True


def load_model(cfg: ModelConfig, task: Task, state: dict, tokenizer) -> torch.nn.Module:
    source = resolve_model_path(cfg.name_or_path)
    auto_class = getattr(transformers, task.auto_model_class)
    # Pickled weights can execute code on load: safetensors only unless the user opts in (GGUF is not pickle).
    safetensors_only = not cfg.allow_pickle and not cfg.gguf_file
    try:
        model = auto_class.from_pretrained(
            source,
            revision=cfg.revision,
            trust_remote_code=cfg.trust_remote_code,
            gguf_file=cfg.gguf_file,
            dtype=torch.float32,
            ignore_mismatched_sizes=True,
            use_safetensors=True if safetensors_only else None,
            **task.model_kwargs(state),
        )
    except (OSError, ValueError) as err:
        pickled = safetensors_only and Path(source).is_dir() and any(Path(source).glob("*.bin"))
        if pickled:
            raise ConfigError(
                f"model.name_or_path: '{source}' has only pickled .bin weights, which can run code when loaded; "
                "tunesmith loads safetensors only. Convert the weights to safetensors, or set model.allow_pickle=true "
                "(tunesmith train --allow-pickle) if you trust the files"
            ) from None
        raise ConfigError(
            f"model.name_or_path: cannot load '{source}' as {task.auto_model_class} ({str(err).splitlines()[0][:200]}); "
            "check the name or folder (it needs config.json and safetensors weights)"
        ) from None
    _drop_quantizer(model)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _drop_quantizer(model: torch.nn.Module) -> None:
    # A GGUF file loads dequantized to fp32; the leftover quantizer would block training and saving.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def make_accelerator(precision: str, gradient_accumulation_steps: int = 1):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate keeps one global state per process and refuses a second Accelerator with another
    # precision: a bf16 `train` followed by an fp32 `evaluate` in one notebook would fail. Each call
    # here starts a new run, so the run-level state is reset (the process group, if any, is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()

    from accelerate.utils import DataLoaderConfiguration

    distributed.check_launch_strategy()  # FSDP/DeepSpeed from `accelerate launch`: fail early, clearly
    # FSDP2 from `accelerate launch`: tunesmith shards the model itself (see `distributed`); accelerate
    # must not see the request (it would select FSDP on GPUs only, and on CPU silently build DDP).
    distributed.take_over_launcher_fsdp()
    cpu = not torch.cuda.is_available()
    distributed.init_restarted_process_group("gloo" if cpu else "nccl")  # torchrun --max-restarts: no stale store keys
    handlers = []
    if cpu and distributed.requested_strategy() == "deepspeed":
        # accelerate turns DeepSpeed off under cpu=True (it would run plain DDP, silently); without it
        # and with gloo, accelerate starts DeepSpeed's process group and DeepSpeed its CPU accelerator.
        from accelerate.utils import InitProcessGroupKwargs

        distributed.skip_deepspeed_shm_op()
        cpu, handlers = False, [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=cpu,
        kwargs_handlers=handlers,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


# --------------------------------------------------------------------------- train


def train(
    config: RunConfig | dict | str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    *,
    show_progress: bool = True,
    resume: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Fine-tune a model as configured; returns the run directory and its metrics.

    `resume`: a run directory to continue from its latest checkpoint, or `"auto"` (continue the
    config's `output.dir` if it has a checkpoint, else start). `overwrite`: replace an existing run."""
    if resume:
        cfg, checkpoint = plan_resume(config, overrides, resume)
    elif config is None:
        raise ConfigError("train: no config given; pass a config file, dict or RunConfig (or resume=RUN_DIR)")
    else:
        cfg, checkpoint = coerce_config(config, overrides), None
    if overwrite:
        cfg.output.overwrite = True
    if not cfg.data.train_file and not cfg.data.dataset_name:
        raise ConfigError("data: no training data; set data.train_file (CSV, TSV, JSON, JSONL, Parquet) or data.dataset_name")
    distributed.check_launch_strategy()  # the launcher's environment: refused before any data loads
    if cfg.output.dir:
        check_unlocked(Path(cfg.output.dir))  # a live run there: say so, rather than "already holds a run"
    run_dir = check_run_dir(cfg) if checkpoint is None else Path(cfg.output.dir)
    new_run = _NewRun(run_dir)
    try:
        with contextlib.ExitStack() as cleanup:  # releases the run-directory lock however the run ends
            return _train(cfg, run_dir, checkpoint, cleanup, show_progress, new_run)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: stopped at once
        import signal

        raise TrainingInterrupted(new_run.stopped_at_once(resuming=checkpoint is not None), signal.SIGINT) from None


class _NewRun:
    """What this `train` call did to output.dir (main process), so that a run that fails or is stopped
    undoes exactly that: an `--overwrite` puts the previous run back; a new run stopped before its first
    checkpoint leaves no half-made folder behind. Entered as the last cleanup, after the run lock."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.started = self.created = self.saved = False
        self.outcome: str | None = None  # "put_back" | "removed"

    def begin(self, created: bool) -> "_NewRun":
        self.started, self.created = True, created
        return self

    def __enter__(self) -> "_NewRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None or self.saved or not self.started:
            return False
        if put_back_previous_run(self.run_dir):
            self.outcome = "put_back"
            note = (f"the previous run in '{self.run_dir}' is back as it was (the unfinished replacement was removed); "
                    "run the same command again to replace it")
            if isinstance(exc, TrainingInterrupted):
                exc.problems = [exc.problems[0].split(", checkpoint written")[0] + f" before the new run had saved; {note}"]
            elif isinstance(exc, TunesmithError):
                exc.problems.append(f"--overwrite: {note}")
        elif issubclass(exc_type, (KeyboardInterrupt, TrainingInterrupted)) and run_state(self.run_dir) == "unstarted":
            discard_new_run_dir(self.run_dir, self.created)
            self.outcome = "removed"
        return False

    def stopped_at_once(self, resuming: bool) -> str:
        """The message for a run stopped by KeyboardInterrupt (after `__exit__` ran)."""
        if self.outcome == "put_back":
            return (f"stopped at once (Ctrl-C) before the new run had saved; the previous run in '{self.run_dir}' is back as "
                    "it was; run the same command again to replace it")
        if self.outcome == "removed":
            return (f"stopped (Ctrl-C) before the run's first checkpoint, so nothing was kept (the new run directory "
                    f"'{self.run_dir}' was removed); run the same command again to start over")
        if not self.started and not resuming:
            return "stopped (Ctrl-C) before training started; nothing was written; run the same command again to start"
        if run_state(self.run_dir) == "finished":
            return f"stopped (Ctrl-C) after the run had saved: '{self.run_dir}' is complete"
        return f"stopped at once (Ctrl-C); the last checkpoint is kept: continue with `tunesmith train --resume {self.run_dir}`"


def _train(cfg: RunConfig, run_dir: Path, checkpoint, cleanup: contextlib.ExitStack, show_progress: bool,
           new_run: _NewRun) -> RunResult:
    task = get_task(cfg.task.name)
    transformers.set_seed(cfg.train.seed)

    # Preflight: everything that can be wrong with the data is found before a model loads.
    tables, notes = make_splits(cfg.data, cfg.train.seed, task.stratify_key(cfg.task), task.reader(cfg.task))
    state, warnings = task.preflight(cfg.task, tables)
    tokenizer = load_tokenizer(cfg.model, **task.tokenizer_kwargs(cfg.task))
    warnings += task.tokenizer_warnings(cfg.task, tables, tokenizer)
    for line in notes:
        log.info(line)
    for line in warnings:
        log.warning(line)
    launcher_fsdp = _launcher_fsdp(cfg)  # before the fingerprint: it becomes train.fsdp=true
    run_fingerprint = fingerprint(cfg, tables)
    if checkpoint is not None:  # the same config and data, checked before any model loads
        check_fingerprint(checkpoint, run_fingerprint)
        notes.append(f"resumed from {checkpoint.path}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    threads = configure_threads(cfg.train.num_threads)  # before the precision check times matmuls
    precision = choose_precision(cfg.train.precision, device)
    log.info("precision: %s (%s)", precision.precision, precision.reason)
    # fsdp.yaml's fsdp_reshard_after_forward, read before make_accelerator removes the launcher's FSDP variables
    reshard = distributed.launcher_reshard_after_forward()
    accelerator = make_accelerator(precision.accelerate_mixed_precision, cfg.train.gradient_accumulation_steps)
    if cfg.train.fsdp and accelerator.num_processes > 1 and precision.precision == "fp16":
        # fp16's loss scaler must agree across shards on skipped steps (FSDP's sharded scaler); never run here.
        raise ConfigError("train.fsdp with fp16 is not supported (its loss scaler is not sharding-aware here); "
                          "set train.precision=bf16 (Ampere or newer GPUs) or fp32")
    # Under DDP the first process of each machine tokenizes first and fills the cache; the machine's
    # others then read it (as Trainer's main_process_first(local=True)): one tokenization per machine
    # whether or not the machines share the cache folder.
    with accelerator.local_main_process_first():
        encoded = {split: task.encode(cfg.task, table, tokenizer, state) for split, table in tables.items()}

    transformers.set_seed(cfg.train.seed)
    model = load_model(cfg.model, task, state, tokenizer)
    model = apply_method(model, cfg.method, task.peft_task_type, task.head_modules(model))
    # Counted before the speed options: skipping unseen embedding rows hides most of the embedding from
    # `parameters()`, which would report the model as half its size.
    params = str(count_parameters(model))
    model, speed = apply_speed_options(model, cfg.train, cfg.method.name, threads, sequence_head=task.sequence_head,
                                       device_type=device.type, train_data=encoded["train"],
                                       pad_token_id=tokenizer.pad_token_id, cleanup=cleanup)
    warnings += check_memory(model, cfg, precision.precision, encoded["train"])  # ResourceError before the run dir exists
    # Only now, with data checked and the model loaded, does the run directory appear (written by
    # the main process once every process has passed the check above).
    accelerator.wait_for_everyone()
    created = not run_dir.exists()  # before the lock, which makes the folder to hold its file
    if accelerator.is_main_process:
        cleanup.enter_context(RunLock(run_dir))  # first: no other run may write here from now on
        if checkpoint is None:
            check_run_dir(cfg)  # again: another run may have finished in this folder since the first check
            cleanup.enter_context(new_run.begin(created))  # from here on a failure undoes what this run wrote
            create_run_dir(run_dir, cfg.output.overwrite)
            save_config(run_dir, cfg)
    accelerator.wait_for_everyone()
    try:
        distributed.check_shared_run_dir(run_dir, accelerator)  # several machines: one run directory for all
    except ConfigError:
        if accelerator.is_main_process and checkpoint is None:
            discard_new_run_dir(run_dir, created)  # nothing ran: leave no half-made run behind
        raise

    metric, bigger = _best_metric(cfg, task, state)
    loss_fn = task.loss_fn(cfg.task, state, encoded["train"])
    collator = task.collator(tokenizer, model)
    references = {s: task.references(cfg.task, tables[s], state) for s in ("validation", "test") if s in tables}
    # Loaders yield global batches that accelerate splits across processes (`split_batches`), so a run
    # on N processes sees exactly the batches of a one-process run with N times the batch size.
    processes = accelerator.num_processes
    loaders = {
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
    feature_cache_seconds = None
    if cfg.method.name == "frozen" and cfg.train.cache_frozen_features:
        from tunesmith.methods.feature_cache import cache_body

        # The encoder's one pass, before the loop: not part of train_seconds, reported next to it.
        cache_start = time.perf_counter()
        everything = [eval_loader(encoded["train"], tokenizer, cfg.train.per_device_eval_batch_size, collator)]
        cache_body(model, everything + [loaders[s] for s in ("validation", "test") if s in loaders], accelerator.autocast)
        feature_cache_seconds = round(time.perf_counter() - cache_start, 3)
    skeleton = _maybe_shard(model, cfg, accelerator, launcher_fsdp, reshard, speed)
    loop = train_loop(
        model=model,
        task=task,
        state=state,
        train_cfg=cfg.train,
        train_loader=loaders["train"],
        eval_loader=loaders["validation"] if cfg.train.eval_strategy != "no" else None,
        loss_fn=loss_fn,
        accelerator=accelerator,
        run_dir=run_dir,
        metric=metric,
        bigger_better=bigger,
        show_progress=show_progress,
        resume=checkpoint,
        fingerprint=run_fingerprint,
        eval_references=references.get("validation"),
    )

    # From here a Ctrl-C is acknowledged and the run goes on saving; a second one abandons it (during the
    # loop, the loop's own handler stops at the next step with a checkpoint).
    cleanup.enter_context(StopSignals(notice=_saving_notice if accelerator.is_main_process else None))
    # Final numbers come from the best checkpoint (restored by the loop).
    val_metrics, val_acc = run_evaluation(model, accelerator.prepare(loaders["validation"]), task, state, loss_fn, accelerator,
                                           references.get("validation"))
    tuned = task.after_training(cfg.task, state, val_acc)
    if tuned != state:
        state = tuned
        val_metrics = task.compute_metrics(val_acc, state)
    metrics: dict[str, Any] = {"validation": val_metrics}
    if "test" in loaders:
        metrics["test"], _ = run_evaluation(model, accelerator.prepare(loaders["test"]), task, state, loss_fn, accelerator,
                                        references["test"])
    metrics["train"] = {
        "global_step": loop.global_step,
        "epochs": loop.epochs_completed,
        "samples_per_second": loop.samples_per_second,
        "train_seconds": loop.train_seconds,
        "eval_seconds": loop.eval_seconds,
        **({"feature_cache_seconds": feature_cache_seconds} if feature_cache_seconds is not None else {}),
        "padding_share": loop.padding_share,
        "stopped_early": loop.stopped_early,
        "best_step": loop.best_step,
        "metric_for_best_model": metric,
        "best_metric": loop.best_metric,
        "precision": precision.precision,
    }

    from tunesmith.methods.feature_cache import uncache_body

    uncache_body(accelerator.unwrap_model(model))
    # Under FSDP2 every process gathers the full weights together; the main process gets a plain model.
    plain = distributed.plain_model(model, skeleton, accelerator.is_main_process, accelerator) if skeleton is not None else (
        accelerator.unwrap_model(model))
    if distributed.deepspeed_engine(accelerator) is not None:
        accelerator.free_memory()  # kept by the loop for the fp32 master weights plain_model just read
    for trained in (accelerator.unwrap_model(model), plain):
        if trained is not None:
            restore_speed_options(trained)  # the returned/saved model is plain again; glibc's allocator defaults back
    if accelerator.is_main_process:  # one writer: under DDP the model and files are written once
        _write_run(run_dir, plain, tokenizer, cfg, task, state, metrics,
                   {"choice": precision.precision, "reason": precision.reason}, warnings, notes, params, speed)
        new_run.saved = True
        drop_previous_run(run_dir)  # an --overwrite's previous run goes only now that the new one has saved
    accelerator.wait_for_everyone()
    return RunResult(run_dir, metrics, loop.best_metric, loop.best_step, warnings)


def _saving_notice(signum: int) -> str:
    return ("stopping: training has finished and the run is being evaluated and saved; it ends by itself in a moment. "
            "Press Ctrl-C again to abandon the save (the last checkpoint stays resumable)")


def _launcher_fsdp(cfg: RunConfig) -> bool:
    """`accelerate launch` with an FSDP config means `train.fsdp: true` (recorded so in config.yaml,
    so a resume shards again whatever launches it)."""
    from tunesmith.distributed.strategies import requested_strategy

    if requested_strategy() != "fsdp":
        return False
    if cfg.train.torch_compile:
        raise ConfigError("accelerate launch asked for FSDP, and train.fsdp with train.torch_compile is not supported "
                          "(never tested); set train.torch_compile=false")
    cfg.train.fsdp = True
    return True


def _maybe_shard(model, cfg: RunConfig, accelerator, launcher_fsdp: bool, reshard: bool, speed: dict) -> torch.nn.Module | None:
    """FSDP2 when `train.fsdp` is set (or `accelerate launch` asked for it) and several processes run:
    shards `model` in place and returns a parameter-less copy of it for the final save; else None.
    Under DeepSpeed (which partitions the model in `prepare`) the copy is returned too."""
    speed["fsdp"] = False
    if distributed.deepspeed_requested(accelerator):
        if cfg.train.fsdp:
            raise ConfigError("train.fsdp=true under DeepSpeed (accelerate launch with a DeepSpeed config): both shard the "
                              "model; drop train.fsdp, or launch with configs/accelerate/fsdp.yaml instead")
        stage = accelerator.state.deepspeed_plugin.zero_stage
        speed["deepspeed"] = {"processes": accelerator.num_processes, "zero_stage": stage, "device": accelerator.device.type}
        log.info("accelerate launch (DeepSpeed): ZeRO stage %d over %d processes (%s)", stage, accelerator.num_processes,
                 accelerator.device.type)
        return distributed.meta_copy(model)
    if not cfg.train.fsdp:
        return None
    source = "accelerate launch (FSDP)" if launcher_fsdp else "train.fsdp"
    if accelerator.num_processes == 1:
        log.info("%s: no effect with one process (nothing to shard across)", source)
        return None
    if cfg.method.name == "frozen" and cfg.train.cache_frozen_features:
        log.info("%s: no effect for method frozen with cached features (only the small head trains)", source)
        return None
    skeleton = distributed.meta_copy(model)
    blocks = distributed.shard_model(model, accelerator, reshard_after_forward=reshard)
    speed["fsdp"] = {"processes": accelerator.num_processes, "blocks": blocks, "reshard_after_forward": reshard}
    log.info("%s: FSDP2 over %d processes (%s), %d transformer blocks sharded, then the whole model",
             source, accelerator.num_processes, accelerator.device.type, blocks)
    return skeleton


def _write_run(run_dir: Path, model, tokenizer, cfg: RunConfig, task: Task, state: dict, metrics: dict,
               precision: dict, warnings: list[str], notes: list[str], params: str, speed: dict | None = None) -> None:
    _save_model(model, tokenizer, run_dir, cfg, state, task)
    write_json(run_dir / "task.json", {"task": task.name, **state.to_json()})
    write_json(run_dir / "metrics.json", metrics)
    write_json(
        run_dir / "provenance.json",
        provenance(cfg, data_file_paths(cfg.data), precision,
                   {"warnings": warnings, "notes": notes, "parameters": params, "speed": speed}),
    )
    card = model_card(cfg, task.card(state), metrics, cfg.model.name_or_path, params)
    (run_dir / "README.md").write_text(card, encoding="utf-8")
    (run_dir / "model" / "README.md").write_text(card, encoding="utf-8")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _best_metric(cfg: RunConfig, task: Task, state: dict) -> tuple[str, bool]:
    default, default_bigger = task.default_metric(state)
    metric = (cfg.train.metric_for_best_model or default).removeprefix("eval_")
    bigger = cfg.train.greater_is_better if cfg.train.greater_is_better is not None else (
        default_bigger if metric == default else greater_is_better(metric, None)
    )
    return metric, bigger


def _save_model(model, tokenizer, run_dir: Path, cfg: RunConfig, state: dict, task: Task) -> None:
    model_dir = run_dir / "model"
    if is_peft(model):
        model.save_pretrained(run_dir / "adapter")
        tokenizer.save_pretrained(run_dir / "adapter")
        if not cfg.method.merge_on_save:
            tokenizer.save_pretrained(model_dir)  # `load` reads the tokenizer from model/ in every run
            return
        model = model.merge_and_unload()
    task.before_save(model, state)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


# --------------------------------------------------------------------------- load / predict / evaluate


@dataclass
class LoadedRun:
    """A trained run ready for inference: model, tokenizer, task and its state."""

    run_dir: Path
    config: RunConfig
    task: Task
    state: dict
    model: torch.nn.Module
    tokenizer: Any

    def predict(self, inputs: list, batch_size: int = 64, **options) -> list[dict]:
        """`options` are the task's prediction options (token classification: `aggregation`)."""
        max_length = getattr(self.config.task, "max_length", 512)
        return self.task.predict(
            self.model, self.tokenizer, list(inputs), self.state, batch_size=batch_size, max_length=max_length, **options
        )


def load(run_dir: str | os.PathLike) -> LoadedRun:
    """Load a run directory written by `train` (merged model, or base model + adapter)."""
    run_dir = finished_run_dir(Path(run_dir))
    cfg = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")), str(run_dir / "config.yaml"))
    saved = json.loads((run_dir / "task.json").read_text(encoding="utf-8"))
    task = get_task(saved.pop("task"))
    state = task.state_type.from_json(saved, str(run_dir / "task.json"))
    auto_class = getattr(transformers, task.auto_model_class)
    model_dir = run_dir / "model"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        if (model_dir / "config.json").exists():
            model = auto_class.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
        else:
            import peft

            base = load_model(cfg.model, task, state, tokenizer)
            model = peft.PeftModel.from_pretrained(base, run_dir / "adapter")
    except (OSError, ValueError) as err:  # a damaged or half-copied model folder
        raise ConfigError(
            f"'{model_dir}': cannot load the saved model ({type(err).__name__}: {str(err).splitlines()[0][:200]}); expected "
            "the model and tokenizer files `train` wrote; restore the folder from a copy, or train the run again"
        ) from None
    model.eval()
    return LoadedRun(run_dir, cfg, task, state, model, tokenizer)


def predict(run_dir: str | os.PathLike | LoadedRun, inputs: list, batch_size: int = 64, **options) -> list[dict]:
    """Predictions for raw inputs (strings, or (text, pair) tuples for sentence-pair models; token
    classification: strings give entity spans, token lists give one tag per token)."""
    loaded = run_dir if isinstance(run_dir, LoadedRun) else load(run_dir)
    with first_token_only(loaded.model, loaded.task.sequence_head):
        return loaded.predict(inputs, batch_size=batch_size, **options)


def evaluate(run_dir: str | os.PathLike | LoadedRun, data: str | os.PathLike, batch_size: int = 64) -> dict:
    """Metrics of a trained run on a labelled data file (same columns as training)."""
    loaded = run_dir if isinstance(run_dir, LoadedRun) else load(run_dir)
    table = loaded.task.reader(loaded.config.task)(data, loaded.config.data.encoding, "DATA")
    for line in table.notes:
        log.info(line)
    loaded.task.preflight_eval(loaded.config.task, loaded.state, table)
    dataset = loaded.task.encode(loaded.config.task, table, loaded.tokenizer, loaded.state)
    # Class weights shape the training loss only; evaluation reports the plain loss.
    loss_fn = loaded.task.loss_fn(loaded.config.task, loaded.state, None)
    loader = eval_loader(dataset, loaded.tokenizer, batch_size, loaded.task.collator(loaded.tokenizer, loaded.model))
    references = loaded.task.references(loaded.config.task, table, loaded.state)
    with first_token_only(loaded.model, loaded.task.sequence_head):
        metrics, _ = run_evaluation(loaded.model, loader, loaded.task, loaded.state, loss_fn, make_accelerator("no"), references)
    return metrics
