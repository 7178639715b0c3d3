"""What a task family provides to the shared loop, CLI and API.

A task module turns tables into tokenized datasets, knows its model class, its loss, its
metrics and how to turn model outputs into predictions. Everything else (config, data loading,
methods, the training loop, run directories) is shared.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import datasets
import torch

from transformers import DataCollatorWithPadding

from tunesmith.data.inputs import InputColumns, read_text_inputs
from tunesmith.data.loaders import Table, read_file
from tunesmith.export.layouts import OnnxLayout
from tunesmith.methods.apply import head_module_names
from tunesmith.serving.requests import PredictRequest, TextsRequest


@dataclasses.dataclass(frozen=True)
class TaskState:
    """What a trained run's task knows beyond its config (labels, tag scheme, tuned thresholds): found by
    `preflight`, tuned by `after_training`, saved as `task.json` and read back by `load`. Each family
    subclasses it with typed fields; it is immutable (`dataclasses.replace` makes a tuned copy)."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict, source: str = "task.json"):
        from tunesmith.errors import ConfigError

        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"'{source}': missing {', '.join(missing)} (expected the task state `train` wrote); "
                              "restore the file from a copy, or train the run again")
        return cls(**{k: v for k, v in data.items() if k in names})  # keys of other versions are left out


@dataclasses.dataclass(frozen=True)
class CardSection:
    """The task's part of a run's model card (README.md)."""

    pipeline_tag: str  # the hub's task tag; the transformers pipeline where one exists
    kind: str = ""  # e.g. the problem type or the tag scheme
    labels: list[str] | None = None  # None: the task has no label set to list
    usage: list[str] = dataclasses.field(default_factory=list)  # Python lines using the saved model with plain transformers
    cli_example: str = "--text 'an example sentence'"  # what follows `tunesmith predict RUN_DIR`


class Losses(NamedTuple):
    """A batch's loss, per example (dim 0): each example's loss summed over its units, and how many units
    it has (1 for a sequence-level loss; its target tokens for a token-level one). The loop divides the
    sum over an optimizer step's micro-batches and processes by the units over all of them, so every unit
    weighs the same however the batch is split (transformers PR 34191); evaluation reports sum / units."""

    sums: torch.Tensor
    units: torch.Tensor

    @classmethod
    def per_example(cls, losses: torch.Tensor) -> "Losses":
        """Sequence-level losses, one unit each."""
        return cls(losses, torch.ones_like(losses))

    @classmethod
    def per_token(cls, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                  ignore_index: int = -100) -> "Losses":
        """Token-level cross-entropy (logits [batch, length, classes], labels [batch, length]): each example's
        sum over its labelled tokens (labels other than `ignore_index`), and how many there are."""
        tokens = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=ignore_index,
                                                   reduction="none", label_smoothing=label_smoothing)
        return cls(tokens.sum(-1), (labels != ignore_index).sum(-1).to(tokens.dtype))


class LossTotal:
    """An evaluation pass's loss, folded batch by batch: the sum over every unit divided by the units."""

    def __init__(self) -> None:
        self.sum = 0.0
        self.units = 0.0

    def add(self, sums: torch.Tensor | None, units: torch.Tensor | None) -> None:
        if sums is not None:
            self.sum += float(sums.detach().double().sum())
            self.units += float(units.detach().double().sum())

    @property
    def mean(self) -> float:
        return self.sum / self.units if self.units else 0.0


class Task(ABC):
    name: str
    auto_model_class: str  # name of the transformers Auto class, e.g. AutoModelForSequenceClassification
    peft_task_type: str  # peft TaskType, e.g. SEQ_CLS
    state_type: ClassVar[type[TaskState]] = TaskState
    pipeline_tag: ClassVar[str]  # the hub's / transformers pipeline's name of the task, e.g. text-classification
    # The loss reads only the model's sequence-level head (one output per sequence), never per-token outputs.
    sequence_head: bool = False
    # `frozen` may run the frozen body once and cache its outputs (`train.cache_frozen_features`): the head reads
    # only the base model's outputs. False where the trained part reads the frozen one step by step (a decoder).
    frozen_feature_cache: ClassVar[bool] = True
    # `train.eval_on_start` unset: whether to evaluate before training (language modelling: perplexity before/after).
    evaluate_before_training: ClassVar[bool] = False
    # The collator puts token ids into training inputs that the data does not have (masked LM's random
    # replacement): the CPU trick that trains only the data's embedding rows (speed/embedding_rows.py) is skipped.
    inserts_any_token: ClassVar[bool] = False

    def reader(self, cfg) -> Callable[[Any, str, str], Table]:
        """Reads one data file (path, encoding, config field) into a Table; task families with their own
        file formats (CoNLL) override it."""
        return read_file

    def tokenizer_kwargs(self, cfg) -> dict:
        """Extra tokenizer loading options (e.g. `add_prefix_space` for word-level input to BPE tokenizers)."""
        return {}

    def collator(self, tokenizer, model=None):
        """Pads a list of encoded examples into a batch. `model` is the model being trained (seq2seq
        collators build decoder inputs with it); None where only inference runs."""
        return DataCollatorWithPadding(tokenizer)

    def head_modules(self, model) -> list[str]:
        """The model's top-level modules this task trains as its head (what `frozen` trains, what LoRA saves
        whole). Default: the children next to the base model, leaving out an output layer tied to the input
        embedding (a language model's vocabulary projection is not a head)."""
        return head_module_names(model)

    def adapter_saved_modules(self, model) -> list[str]:
        """Modules a LoRA/DoRA/IA3 run trains and saves whole, beside the adapter (peft's `modules_to_save`):
        what the pretrained checkpoint did not have. Default: the head modules."""
        return self.head_modules(model)

    def load_pretrained(self, cfg, source: str, **kwargs):
        """The pretrained model from `source` (a folder or hub name) with `kwargs` for `from_pretrained`; `cfg`
        is the task section. Default: the family's Auto class."""
        import transformers

        return getattr(transformers, self.auto_model_class).from_pretrained(source, **kwargs)

    def configure_model(self, model, tokenizer, cfg, state: TaskState) -> None:
        """Set what the model must know of the tokenizer and the run config (`cfg`: the whole RunConfig) before
        training and prediction: special token ids, the generation settings. Default: the pad token."""
        model.config.pad_token_id = tokenizer.pad_token_id

    def split_batch(self, batch: dict) -> tuple[dict, torch.Tensor, dict]:
        """(model inputs, labels, extras): extras are per-example fields the metrics need that the model
        must not see (e.g. which example a window came from)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"], {}

    def logits(self, outputs) -> torch.Tensor:
        """The one tensor the loss and metrics read from the model's outputs."""
        return outputs.logits

    def training_losses(self, model, inputs: dict, labels, loss_fn) -> Losses:
        """One training micro-batch's forward pass and loss."""
        return loss_fn(self.logits(model(**inputs)), labels)

    def evaluation_batch(self, model, inputs: dict, labels, extras: dict, loss_fn, state: dict, *,
                         tokenizer=None) -> dict[str, torch.Tensor | list]:
        """One evaluation batch reduced, on this process, to what the metrics keep: tensors whose first
        dimension is the batch's examples, or lists with one item per example (a task that generates calls
        `model.generate` here and decodes with `tokenizer`). Only these are gathered across processes (2-D
        and larger tensors padded along dimension 1 with -100 first; lists as objects), never per-token
        logits. Always includes the per-example `loss_sums` and `loss_units`."""
        logits = self.logits(model(**inputs))
        losses = loss_fn(logits, labels)
        return {"scores": self.scores(logits, state), "labels": labels, "loss_sums": losses.sums, "loss_units": losses.units}

    def update(self, accumulator, reduced: dict[str, torch.Tensor], state: dict) -> None:
        """Fold one gathered `evaluation_batch` into the streaming accumulator."""
        accumulator.update(reduced["scores"], reduced["labels"], reduced["loss_sums"], reduced["loss_units"])

    def references(self, cfg, table: Table, state: dict) -> Any:
        """What the metrics of an evaluated table need besides the model's outputs (QA: contexts and gold
        answers; generation: the untruncated target texts); handed to `new_accumulator`."""
        return None

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

    def with_tokenizer(self, cfg, tables: dict[str, Table], tokenizer, state: TaskState) -> tuple[TaskState, list[str]]:
        """Preflight's second half, once the tokenizer is loaded and before any model is: adapt the tokenizer
        (a chat template, a pad token distinct from EOS; it is saved with the model) and complete the state
        with what needs it (end-of-turn ids). Returns (state, notes); raises DataError for data that cannot be
        tokenized as the task needs. Default: both unchanged."""
        return state, []

    def default_method(self, run_cfg) -> str | None:
        """The method a run uses when its config names none (causal LMs: `lora` above 100M parameters), decided
        before any model loads; None: `full`."""
        return None

    def arrange(self, cfg, dataset: datasets.Dataset, training: bool) -> datasets.Dataset:
        """An encoded split as the loop reads it: `training` for the train split (causal LMs pack short examples
        there and leave out the ones with nothing to learn). Default: as encoded."""
        return dataset

    @abstractmethod
    def encode(self, cfg, table: Table, tokenizer, state: dict) -> datasets.Dataset:
        """Tokenize a table (batched `datasets.map`); columns: model inputs, `labels`, `length`."""

    @abstractmethod
    def model_kwargs(self, state: dict) -> dict:
        """Extra `from_pretrained` kwargs (num_labels, id2label, ...)."""

    @abstractmethod
    def loss_fn(self, cfg, state: dict, train: datasets.Dataset | None,
                label_smoothing: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], Losses]:
        """The per-example losses of a batch from logits and labels (`train` None: evaluation only, the plain loss);
        `label_smoothing` (`train.label_smoothing_factor`) only where `supports_label_smoothing`."""

    def supports_label_smoothing(self, state) -> bool:
        """Whether `loss_fn` honours `label_smoothing` (a cross-entropy over classes or tokens); checked before
        training starts, so a setting the loss would ignore is an error, not a silent no-op."""
        return False

    @abstractmethod
    def new_accumulator(self, state: dict, references: Any = None):
        """A streaming metrics accumulator for one evaluation pass over a table (`references`: see `references`)."""

    @abstractmethod
    def scores(self, logits: torch.Tensor, state: dict) -> torch.Tensor:
        """Per-example scores kept by the accumulator (probabilities, regression values)."""

    @abstractmethod
    def compute_metrics(self, accumulator, state: dict) -> dict:
        """Metrics of one evaluation pass; includes `loss`."""

    @abstractmethod
    def default_metric(self, state: dict) -> tuple[str, bool]:
        """(metric name, greater is better) for best-model selection when the config names none."""

    def summary_metrics(self, state) -> tuple[str, ...]:
        """The metrics the loop's one-line evaluation summary shows after the best-model metric and the loss."""
        return (self.default_metric(state)[0],)

    example_outputs_name: ClassVar[str] = "predictions"  # the file stem of `example_outputs`: <split>_<name>.jsonl

    def example_outputs(self, accumulator, state) -> list[dict] | None:
        """Per-example records of an evaluated split written into the run directory as
        `<split>_<example_outputs_name>.jsonl` (generation: source, reference, prediction); None: none."""
        return None

    def logits_elements(self, model, cfg, batch_size: int, length: int) -> int:
        """How many logits the training loss holds at once for a batch (the memory preflight counts 12 bytes each:
        value, softmax, gradient). Default: a vocabulary-sized output layer (a language-model head) at every
        position, else 0 (a classification or tagging head is small beside the activations)."""
        inner = getattr(model, "module", model)
        output = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        vocabulary = getattr(output, "out_features", None) or getattr(getattr(output, "weight", None), "shape", [0])[0]
        return batch_size * length * int(vocabulary or 0)

    def evaluation_log_fields(self, accumulator, state) -> dict:
        """Small non-numeric fields written with each evaluation's line in log.jsonl (a language model's sample
        generations, so their progress over training can be read back); {}: none."""
        return {}

    def after_training(self, cfg, state: dict, accumulator) -> dict:
        """Calibrate on validation outputs of the best model (e.g. tune a threshold); returns updated state."""
        return state

    def input_columns(self, cfg) -> InputColumns:
        """Where `predict`'s inputs are in a table given to it (its text column, a pair's, pre-split tokens)."""
        return InputColumns()

    def predict_inputs(self, cfg, encoding: str, input_file: Path | None, texts: list[str] | None,
                       options: dict) -> tuple[list, list[dict]]:
        """(inputs for `predict`, the records echoed with each prediction) from the command line: --text values,
        an --input file or stdin; `options`: the family's own input options given (`Family.predict_options`)."""
        if options:
            from tunesmith.errors import DataError

            given = "/".join(f"--{name}" for name in options)
            raise DataError(f"{given}: not an option of {self.name} runs (this run); pass its inputs with --text or --input")
        return read_text_inputs(self.reader(cfg), encoding, input_file, texts, self.input_columns(cfg))

    # The task's `predict` returns {"generated_text"} (`tunesmith generate`, `tunesmith.generate`).
    generates: ClassVar[bool] = False
    # The body of the server's `POST /v1/predict` for this family: its `items()` are `predict`'s inputs, its
    # `options()` the family's prediction options. Registering a family gives it the endpoint.
    request_model: ClassVar[type[PredictRequest]] = TextsRequest
    # The family answers OpenAI-style `/v1/chat/completions` and `/v1/completions` (through `complete`).
    completes: ClassVar[bool] = False
    # How the family's model becomes ONNX (`tunesmith export`; tunesmith.export.layouts): one forward pass and the
    # outputs `predict` reads, or an encoder-decoder's graphs. None: not exportable.
    onnx_layout: ClassVar[OnnxLayout | None] = None

    def reply(self, model, tokenizer, state: TaskState, messages: list[dict], streamer=None, **settings) -> str:
        """The assistant's next turn after `messages` (`tunesmith chat`); only chat-capable families implement it."""
        from tunesmith.errors import ConfigError

        raise ConfigError(f"a {self.name} run does not chat; chat needs a causal-LM run with a chat template "
                          "(task.name: causal_lm)")

    def prediction_decision(self, prediction):
        """What must stay the same for two predictions to count as the same (an int8 export's check): the
        prediction without its `score` / `scores` confidences."""
        if isinstance(prediction, dict):
            return {k: self.prediction_decision(v) for k, v in prediction.items() if k not in ("score", "scores")}
        if isinstance(prediction, (list, tuple)):
            return [self.prediction_decision(v) for v in prediction]
        return prediction

    def complete(self, model, tokenizer, state: TaskState, prompt, streamer=None, max_length: int | None = None,
                 seed: int | str | None = None, **settings):
        """One generation after a conversation (a list of turns) or a raw text, with its token counts and finish
        reason (`Completion`); only families with `completes` implement it."""
        from tunesmith.errors import ConfigError

        raise ConfigError(f"a {self.name} run does not complete prompts; chat and text completions need a causal-LM run "
                          "(task.name: causal_lm)")

    def before_save(self, model, state: TaskState) -> None:
        """Write what plain transformers should know of the state into the model's config before it is saved
        (e.g. a tuned decision threshold)."""

    def card(self, state: TaskState) -> CardSection:
        """The task's part of the model card: by default, use through the transformers pipeline of its tag."""
        return CardSection(self.pipeline_tag, usage=[
            "from transformers import pipeline",
            f'model = pipeline("{self.pipeline_tag}", model="PATH/TO/RUN/model")',
            'model("an example sentence")',
        ])

    @abstractmethod
    def predict(self, model, tokenizer, inputs: list, state: dict, batch_size: int = 64) -> list[dict]:
        """Predictions for raw inputs."""
