"""What a task family provides to the shared loop, CLI and API.

A task module turns tables into tokenized datasets, knows its model class, its loss, its
metrics and how to turn model outputs into predictions. Everything else (config, data loading,
methods, the training loop, run directories) is shared.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import datasets
import torch

from transformers import DataCollatorWithPadding

from tunesmith.data.loaders import Table, read_file


class Task(ABC):
    name: str
    auto_model_class: str  # name of the transformers Auto class, e.g. AutoModelForSequenceClassification
    peft_task_type: str  # peft TaskType, e.g. SEQ_CLS
    # The loss reads only the model's sequence-level head (one output per sequence), never per-token outputs.
    sequence_head: bool = False

    def reader(self, cfg) -> Callable[[Any, str, str], Table]:
        """Reads one data file (path, encoding, config field) into a Table; task families with their own
        file formats (CoNLL) override it."""
        return read_file

    def tokenizer_kwargs(self, cfg) -> dict:
        """Extra tokenizer loading options (e.g. `add_prefix_space` for word-level input to BPE tokenizers)."""
        return {}

    def collator(self, tokenizer):
        """Pads a list of encoded examples into a batch."""
        return DataCollatorWithPadding(tokenizer)

    def split_batch(self, batch: dict) -> tuple[dict, torch.Tensor, dict]:
        """(model inputs, labels, extras): extras are per-example fields the metrics need that the model
        must not see (e.g. which example a window came from)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"], {}

    def logits(self, outputs) -> torch.Tensor:
        """The one tensor the loss and metrics read from the model's outputs."""
        return outputs.logits

    def update(self, accumulator, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, extras: dict, state: dict) -> None:
        """Feed one evaluation batch to the streaming accumulator."""
        accumulator.update(self.scores(logits, state), labels, loss)

    @abstractmethod
    def stratify_key(self, cfg) -> Callable[[Any], Any]:
        """A function of a train frame giving labels to stratify carved splits by (or None)."""

    @abstractmethod
    def preflight(self, cfg, tables: dict[str, Table]) -> tuple[dict, list[str]]:
        """Validate tables before any model is loaded. Returns (task state, warnings); raises DataError."""

    @abstractmethod
    def preflight_eval(self, cfg, state: dict, table: Table) -> None:
        """Validate a labelled evaluation table against a trained run's task state; raises DataError."""

    @abstractmethod
    def tokenizer_warnings(self, cfg, tables: dict[str, Table], tokenizer) -> list[str]:
        """Warnings that need the tokenizer (truncation share, unknown-token share)."""

    @abstractmethod
    def encode(self, cfg, table: Table, tokenizer, state: dict) -> datasets.Dataset:
        """Tokenize a table (batched `datasets.map`); columns: model inputs, `labels`, `length`."""

    @abstractmethod
    def model_kwargs(self, state: dict) -> dict:
        """Extra `from_pretrained` kwargs (num_labels, id2label, ...)."""

    @abstractmethod
    def loss_fn(self, cfg, state: dict, train: datasets.Dataset) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Loss of a batch from logits and labels."""

    @abstractmethod
    def new_accumulator(self, state: dict):
        """A streaming metrics accumulator for one evaluation pass."""

    @abstractmethod
    def scores(self, logits: torch.Tensor, state: dict) -> torch.Tensor:
        """Per-example scores kept by the accumulator (probabilities, regression values)."""

    @abstractmethod
    def compute_metrics(self, accumulator, state: dict) -> dict:
        """Metrics of one evaluation pass; includes `loss`."""

    @abstractmethod
    def default_metric(self, state: dict) -> tuple[str, bool]:
        """(metric name, greater is better) for best-model selection when the config names none."""

    def after_training(self, cfg, state: dict, accumulator) -> dict:
        """Calibrate on validation outputs of the best model (e.g. tune a threshold); returns updated state."""
        return state

    @abstractmethod
    def predict(self, model, tokenizer, inputs: list, state: dict, batch_size: int = 64) -> list[dict]:
        """Predictions for raw inputs."""
