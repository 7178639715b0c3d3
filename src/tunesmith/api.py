"""The Python API: `train`, `evaluate`, `predict`, `load`. The CLI is a thin layer over these; a
training run's phases are in `tunesmith.pipeline`, and `_train` below calls them in order."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml

from tunesmith.config import RunConfig, parse_config
from tunesmith.data.batching import eval_loader
from tunesmith import distributed
from tunesmith.errors import ConfigError
from tunesmith.loop.checkpoint import Checkpoint
from tunesmith.loop.interrupt import TrainingInterrupted
from tunesmith.loop.evaluation import run_evaluation
from tunesmith import pipeline
from tunesmith.pipeline.devices import make_accelerator
from tunesmith.pipeline.model import load_model
from tunesmith.pipeline.prepare import load_tokenizer
from tunesmith.runs.rundir import drop_previous_run, finished_run_dir
from tunesmith.speed.first_token import first_token_only
from tunesmith.tasks import get_task
from tunesmith.tasks.base import Task, TaskState

__all__ = ["LoadedRun", "RunResult", "chat", "evaluate", "generate", "load", "load_model", "load_tokenizer", "make_accelerator",
           "predict", "train"]

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
    cfg, checkpoint, run_dir = pipeline.prepare.resolve_run(config, overrides, resume, overwrite)
    new_run = pipeline.run_dir.NewRun(run_dir)
    try:
        with contextlib.ExitStack() as cleanup:  # releases the run-directory lock however the run ends
            return _train(cfg, run_dir, checkpoint, cleanup, show_progress, new_run)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started: stopped at once
        import signal

        raise TrainingInterrupted(new_run.stopped_at_once(resuming=checkpoint is not None), signal.SIGINT) from None


def _train(cfg: RunConfig, run_dir: Path, checkpoint: Checkpoint | None, cleanup: contextlib.ExitStack,
           show_progress: bool, new_run: pipeline.run_dir.NewRun) -> RunResult:
    data = pipeline.prepare.check_data(cfg, checkpoint)  # everything wrong with the data, before a model loads
    hardware = pipeline.devices.choose_devices(cfg)
    accelerator = hardware.accelerator
    encoded = pipeline.prepare.encode_splits(cfg, data, accelerator)
    built = pipeline.model.build_model(cfg, data, hardware, encoded["train"], cleanup)  # too big: fails before the run dir
    warnings = data.warnings + built.warnings
    pipeline.run_dir.open_run_dir(cfg, run_dir, checkpoint, accelerator, cleanup, new_run)  # only now does it appear
    fitted = pipeline.fit.fit(cfg, data, hardware, built, encoded, run_dir, checkpoint, show_progress)
    pipeline.finish.keep_saving_on_ctrl_c(cleanup, accelerator)
    state, metrics, outputs = pipeline.finish.final_metrics(cfg, data, hardware, built.model, fitted)
    plain = pipeline.finish.plain_trained_model(built.model, fitted.skeleton, accelerator)
    if accelerator.is_main_process:  # one writer: under DDP the model and files are written once
        precision = {"choice": hardware.precision.precision, "reason": hardware.precision.reason}
        pipeline.finish.write_run(run_dir, plain, data.tokenizer, cfg, data.task, state, metrics, precision, warnings,
                                  data.notes, built.parameters, built.speed, outputs)
        new_run.saved = True
        drop_previous_run(run_dir)  # an --overwrite's previous run goes only now that the new one has saved
    accelerator.wait_for_everyone()
    return RunResult(run_dir, metrics, fitted.loop.best_metric, fitted.loop.best_step, warnings)


# --------------------------------------------------------------------------- load / predict / evaluate


@dataclass
class LoadedRun:
    """A trained run ready for inference: model, tokenizer, task and its state."""

    run_dir: Path
    config: RunConfig
    task: Task
    state: TaskState
    model: torch.nn.Module
    tokenizer: Any

    def predict(self, inputs: list, batch_size: int = 64, **options) -> list[dict]:
        """`options` are the task's prediction options (token classification: `aggregation`)."""
        return self.task.predict(self.model, self.tokenizer, list(inputs), self.state, batch_size=batch_size,
                                 max_length=self.config.task.max_length, **options)


    def generate(self, prompts: list[str], batch_size: int = 16, **settings) -> list[str]:
        """The generated text for each prompt (a generating family's run: causal LM, seq2seq)."""
        if not self.task.generates:
            raise ConfigError(f"'{self.run_dir}' is a {self.task.name} run, which does not generate text; use "
                              "tunesmith.predict (tunesmith predict RUN_DIR)")
        return [p["generated_text"] for p in self.predict(list(prompts), batch_size=batch_size, **settings)]

    def chat(self, messages: list[dict], streamer=None, **settings) -> str:
        """The assistant's reply to a conversation (a list of `{"role", "content"}` turns), rendered with the run's
        chat template; `streamer` (a transformers streamer) receives the tokens as they are generated."""
        return self.task.reply(self.model, self.tokenizer, self.state, messages, streamer=streamer,
                               max_length=self.config.task.max_length, **settings)

    def complete(self, prompt: str | list[dict], streamer=None, **settings):
        """One generation after a conversation (a list of turns) or a raw text, with its token counts and finish
        reason (a causal-LM run; what the server's OpenAI-compatible endpoints answer with)."""
        return self.task.complete(self.model, self.tokenizer, self.state, prompt, streamer=streamer,
                                  max_length=self.config.task.max_length, **settings)


def read_run_files(folder: Path) -> tuple[RunConfig, Task, TaskState]:
    """A run's resolved config (config.yaml), its task and the task's state (task.json): what any copy of a run
    (its directory, an ONNX export) needs to predict as the run does."""
    cfg = parse_config(yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")), str(folder / "config.yaml"))
    saved = json.loads((folder / "task.json").read_text(encoding="utf-8"))
    task = get_task(saved.pop("task"))
    return cfg, task, task.state_type.from_json(saved, str(folder / "task.json"))


def load(run_dir: str | os.PathLike) -> LoadedRun:
    """Load a run directory written by `train` (merged model, or base model + adapter)."""
    run_dir = finished_run_dir(Path(run_dir))
    cfg, task, state = read_run_files(run_dir)
    auto_class = getattr(transformers, task.auto_model_class)
    model_dir = run_dir / "model"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        if (model_dir / "config.json").exists():
            model = auto_class.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
        else:
            import peft

            base = load_model(cfg, task, state, tokenizer)
            model = peft.PeftModel.from_pretrained(base, run_dir / "adapter")
        if (model_dir / "generation_config.json").exists():  # the run's generation settings, adapter runs included
            model.generation_config = transformers.GenerationConfig.from_pretrained(model_dir)
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


def generate(run_dir: str | os.PathLike | LoadedRun, prompts: str | list[str], batch_size: int = 16, **settings) -> list[str]:
    """Generated text for each prompt of a causal-LM or seq2seq run; `settings`: `generation` settings for this call
    (`max_new_tokens=64, do_sample=True, temperature=0.7, top_p=0.9, stop_strings=["\\n\\n"], seed=0`)."""
    loaded = run_dir if isinstance(run_dir, LoadedRun) else load(run_dir)
    return loaded.generate([prompts] if isinstance(prompts, str) else list(prompts), batch_size=batch_size, **settings)


def chat(run_dir: str | os.PathLike | LoadedRun, messages: list[dict], streamer=None, **settings) -> str:
    """The assistant's next reply to `messages` with a chat run's template and generation settings."""
    loaded = run_dir if isinstance(run_dir, LoadedRun) else load(run_dir)
    return loaded.chat(messages, streamer=streamer, **settings)


def evaluate(run_dir: str | os.PathLike | LoadedRun, data: str | os.PathLike, batch_size: int = 64) -> dict:
    """Metrics of a trained run on a labelled data file (same columns as training)."""
    loaded = run_dir if isinstance(run_dir, LoadedRun) else load(run_dir)
    table = loaded.task.reader(loaded.config.task)(data, loaded.config.data.encoding, "DATA")
    for line in table.notes:
        log.info(line)
    loaded.task.preflight_eval(loaded.config.task, loaded.state, table)
    dataset = loaded.task.arrange(loaded.config.task, loaded.task.encode(loaded.config.task, table, loaded.tokenizer, loaded.state),
                                  False)
    # Class weights shape the training loss only; evaluation reports the plain loss.
    loss_fn = loaded.task.loss_fn(loaded.config.task, loaded.state, None)
    loader = eval_loader(dataset, loaded.tokenizer, batch_size, loaded.task.collator(loaded.tokenizer, loaded.model))
    references = loaded.task.references(loaded.config.task, table, loaded.state)
    with first_token_only(loaded.model, loaded.task.sequence_head):
        metrics, _ = run_evaluation(loaded.model, loader, loaded.task, loaded.state, loss_fn, make_accelerator("no"), references,
                                    loaded.tokenizer)
    return metrics
