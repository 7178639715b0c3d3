"""The run to start: its config and checkpoint, the data checked before a model loads, the tokenizer."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers

from tunesmith import distributed
from tunesmith.assets import resolve_model_path
from tunesmith.config import ModelConfig, RunConfig, coerce_config
from tunesmith.data.splits import make_splits
from tunesmith.errors import ConfigError
from tunesmith.loop.checkpoint import Checkpoint
from tunesmith.loop.resume import check_fingerprint, fingerprint, plan_resume
from tunesmith.runs.lock import check_unlocked
from tunesmith.runs.rundir import check_run_dir
from tunesmith.tasks import get_task
from tunesmith.tasks.base import Task, TaskState

log = logging.getLogger("tunesmith")


def resolve_run(config: RunConfig | dict | str | os.PathLike | None, overrides: list[str] | None,
                resume: str | os.PathLike | None, overwrite: bool) -> tuple[RunConfig, Checkpoint | None, Path]:
    """The config to run, the checkpoint to continue (None: a fresh run) and the run directory, each
    refused early (no data, a live run there, an existing run without `overwrite`) before any data loads."""
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
    return cfg, checkpoint, run_dir


@dataclass
class Prepared:
    """The checked data and what the later phases read from it."""

    task: Task
    tables: dict  # split name -> table
    state: TaskState
    tokenizer: Any
    warnings: list[str]
    notes: list[str]
    fingerprint: dict
    launcher_fsdp: bool  # `accelerate launch` asked for FSDP (now recorded as train.fsdp=true)


def check_data(cfg: RunConfig, checkpoint: Checkpoint | None) -> Prepared:
    """Preflight: everything that can be wrong with the data is found before a model loads."""
    task = get_task(cfg.task.name)
    transformers.set_seed(cfg.train.seed)
    tables, notes = make_splits(cfg.data, cfg.train.seed, task.stratify_key(cfg.task), task.reader(cfg.task))
    state, warnings = task.preflight(cfg.task, tables)
    if cfg.train.label_smoothing_factor and not task.supports_label_smoothing(state):
        raise ConfigError(f"train.label_smoothing_factor={cfg.train.label_smoothing_factor}: the loss of this {cfg.task.name} "
                          "task is not a cross-entropy over classes or tokens, so smoothing would be ignored; remove it "
                          "(set train.label_smoothing_factor=0)")
    tokenizer = load_tokenizer(cfg.model, **task.tokenizer_kwargs(cfg.task))
    state, tokenizer_notes = task.with_tokenizer(cfg.task, tables, tokenizer, state)
    notes += tokenizer_notes
    warnings += task.tokenizer_warnings(cfg.task, tables, tokenizer)
    choose_default_method(cfg, task, notes)
    for line in notes:
        log.info(line)
    for line in warnings:
        log.warning(line)
    if cfg.method.name == "frozen" and cfg.train.cache_frozen_features and not task.frozen_feature_cache:
        cfg.train.cache_frozen_features = False  # recorded so in config.yaml: a resume runs the same way
        notes.append(f"train.cache_frozen_features: off for {cfg.task.name} (its trained part reads the frozen one at "
                     "every step; nothing to cache once)")
    if task.inserts_any_token and cfg.train.cpu.effective("skip_unseen_embedding_rows"):
        notes.append(f"train.cpu.skip_unseen_embedding_rows: not applied for {cfg.task.name} (its training inputs "
                     "carry tokens the data does not have, so every embedding row trains)")
    launcher_fsdp = launcher_asked_for_fsdp(cfg)  # before the fingerprint: it becomes train.fsdp=true
    run_fingerprint = fingerprint(cfg, tables)
    if checkpoint is not None:  # the same config and data, checked before any model loads
        check_fingerprint(checkpoint, run_fingerprint)
        notes.append(f"resumed from {checkpoint.path}")
    return Prepared(task, tables, state, tokenizer, warnings, notes, run_fingerprint, launcher_fsdp)


def choose_default_method(cfg: RunConfig, task: Task, notes: list[str]) -> None:
    """A config that names no method gets the task's default for its model (recorded in config.yaml, so a resume
    trains the same way)."""
    if "method" in cfg.model_fields_set:
        return
    chosen = task.default_method(cfg)
    if chosen and chosen != cfg.method.name:
        from tunesmith.config.schema import METHOD_CONFIGS

        cfg.method = METHOD_CONFIGS[chosen]()
        notes.append(f"method: {chosen} (no method set; {chosen} is this task's default for a model of this size: set "
                     "method: full to train every weight)")


def encode_splits(cfg: RunConfig, data: Prepared, accelerator) -> dict:
    """Every split tokenized. Under DDP the first process of each machine tokenizes first and fills the
    cache; the machine's others then read it (as Trainer's main_process_first(local=True)): one
    tokenization per machine whether or not the machines share the cache folder."""
    with accelerator.local_main_process_first():
        return {split: data.task.arrange(cfg.task, data.task.encode(cfg.task, table, data.tokenizer, data.state), split == "train")
                for split, table in data.tables.items()}


def launcher_asked_for_fsdp(cfg: RunConfig) -> bool:
    """`accelerate launch` with an FSDP config means `train.fsdp: true` (recorded so in config.yaml,
    so a resume shards again whatever launches it)."""
    if distributed.requested_strategy() != "fsdp":
        return False
    if cfg.train.torch_compile:
        raise ConfigError("accelerate launch asked for FSDP, and train.fsdp with train.torch_compile is not supported "
                          "(never tested); set train.torch_compile=false")
    cfg.train.fsdp = True
    return True


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
