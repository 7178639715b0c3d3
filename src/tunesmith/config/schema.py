"""The typed run config: pydantic v2 models with `extra="forbid"`, YAML files and dotted overrides.

One schema for every run. Sections: `model`, `data`, `task`, `method`, `train`, `output`.
`task` is a union keyed by the task's name (each task family adds its own typed sub-section);
`method` is keyed by the method's name. Both accept the bare name as a shorthand
(`method: frozen`). A typo is an error naming the dotted path and the closest valid key.
"""

from __future__ import annotations

import difflib
import logging
import types
import unicodedata
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tunesmith.errors import ConfigError, shown

log = logging.getLogger(__name__)

# Bump when a key is renamed or removed; recorded in every run directory.
SCHEMA_VERSION = 2

DEFAULT_MODEL = "bundled:all-MiniLM-L6-v2"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """Which pretrained model to start from."""

    name_or_path: str = Field(
        DEFAULT_MODEL,
        description="Hub name (`bert-base-uncased`), local folder, or `bundled:all-MiniLM-L6-v2`.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer_name_or_path: str | None = Field(None, description="Tokenizer, if not the model's own.")
    trust_remote_code: bool = Field(False, description="Run custom model code from the hub. Off unless set.")
    gguf_file: str | None = Field(None, description="GGUF file inside `name_or_path` to load (dequantized).")
    allow_pickle: bool = Field(
        False, description="Also load pickled `.bin` weights (they can run code when loaded); safetensors only by default."
    )


class DataConfig(Section):
    """Where the data comes from and how splits are made."""

    train_file: str | None = Field(None, description="CSV, TSV, JSON, JSONL, Parquet file or a `save_to_disk` folder.")
    validation_file: str | None = Field(None, description="Validation data; carved out of train when absent.")
    test_file: str | None = Field(None, description="Held-out test data, evaluated once with the best model.")
    dataset_name: str | None = Field(None, description="Hub dataset name (online), or `bundled:rotten_tomatoes`.")
    dataset_config_name: str | None = Field(None, description="Hub dataset configuration.")
    validation_split: float = Field(
        0.1, gt=0.0, lt=1.0, description="Share of train carved out (stratified, seeded) when no validation set."
    )
    test_split: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of train carved out as a test set when no test set is given."
    )
    max_train_samples: int | None = Field(None, gt=0, description="Truncate train (after shuffling) for quick runs.")
    max_eval_samples: int | None = Field(None, gt=0, description="Truncate validation and test sets.")
    encoding: str = Field("utf-8", description="Text encoding of CSV/TSV/JSON files.")



class ClassificationTaskConfig(Section):
    """Sequence classification: single-label, multi-label, regression, sentence pairs."""

    pipeline_tag: ClassVar[str] = "text-classification"  # the transformers pipeline's name, accepted as `task:`
    name: Literal["classification"] = "classification"
    text_column: str = Field("text", description="Column with the input text.")
    text_pair_column: str | None = Field(None, description="Second text column for sentence-pair tasks (NLI, MRPC).")
    label_column: str = Field("label", description="Column with the label (string, int, float, or list for multi-label).")
    label_columns: list[str] | None = Field(
        None, description="Multi-label as several 0/1 columns, one per label (overrides `label_column`)."
    )
    problem_type: Literal["auto", "single_label", "multi_label", "regression"] = Field(
        "auto", description="`auto` infers it from the labels: lists -> multi_label, non-integer floats -> regression."
    )
    label_separator: str = Field("|", description="Separator of labels in one string cell for multi-label (`a|b`).")
    max_length: int = Field(128, gt=1, description="Longest tokenized input; longer texts are truncated (warned).")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Multi-label decision threshold on sigmoid scores.")
    tune_threshold: bool = Field(True, description="Multi-label: pick the threshold maximising micro-F1 on validation.")
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none", description="Loss weights for imbalance: `balanced` (n / (k * count)) or one weight per label."
    )


class TokenClassificationTaskConfig(Section):
    """Token classification: named entities, part-of-speech tags, chunks."""

    pipeline_tag: ClassVar[str] = "token-classification"
    name: Literal["token_classification"] = "token_classification"
    format: Literal["auto", "conll", "tokens", "spans"] = Field(
        "auto",
        description="`conll`: one token per line, tag in a column, blank line between sentences; `tokens`: records with "
        "token and tag lists; `spans`: records with text and character-offset entities. `auto`: .conll/.iob/.bio/.txt/.tsv "
        "files are CoNLL, other files by their columns.",
    )
    tokens_column: str = Field("tokens", description="`tokens` format: column with the list of tokens.")
    tags_column: str = Field("tags", description="`tokens` format: column with the list of tags, one per token.")
    text_column: str = Field("text", description="`spans` format: column with the raw text.")
    entities_column: str = Field(
        "entities", description="`spans` format: column with entities `{start, end, label}` (character offsets, end exclusive)."
    )
    conll_token_column: int = Field(0, ge=0, description="CoNLL: column of the token (0-based).")
    conll_tag_column: int = Field(-1, description="CoNLL: column of the tag (0-based; -1 is the last column).")
    scheme: Literal["auto", "BIO", "BIOES", "IO", "none"] = Field(
        "auto",
        description="Tag scheme of the data. `auto`: E-/S- tags -> BIOES, B- tags -> BIO, only I- -> IO, "
        "tags without prefixes -> none (POS tags: no entities, token accuracy).",
    )
    convert_scheme: Literal["keep", "BIO", "BIOES", "IO"] = Field(
        "keep", description="Convert every split's tags to this scheme before training (`keep`: leave them)."
    )
    repair: bool = Field(False, description="Turn an I-X that follows no X into B-X instead of reporting it as an error.")
    label_all_subtokens: bool = Field(
        False, description="Train on every sub-token of a word (default: the first one only, the rest ignored)."
    )
    max_length: int = Field(
        128, gt=4, description="Longest tokenized window; longer sentences are split into windows at word boundaries."
    )
    strict: bool = Field(False, description="seqeval strict mode (IOB2/IOBES); default: conlleval-compatible matching.")
    aggregation: Literal["first", "average", "max"] = Field(
        "first", description="How sub-token scores make a word's tag at prediction (as the transformers pipeline)."
    )


class QuestionAnsweringTaskConfig(Section):
    """Extractive question answering: SQuAD v1.1/v2.0 JSON or flat rows; the answer is a span of the context."""

    pipeline_tag: ClassVar[str] = "question-answering"
    name: Literal["question_answering"] = "question_answering"
    question_column: str = Field("question", description="Flat JSONL/CSV: column with the question (SQuAD JSON is read as is).")
    context_column: str = Field("context", description="Flat JSONL/CSV: column with the context the answer is a span of.")
    answers_column: str = Field(
        "answers",
        description="Flat JSONL/CSV: column with `{text: [...], answer_start: [...]}` (character offsets; a JSON string in CSV); "
        "empty lists: no answer.",
    )
    id_column: str = Field("id", description="Flat JSONL/CSV: optional column with a record id, named in errors and predictions.")
    max_length: int = Field(
        384, gt=16, description="Tokens per window (question + context + special tokens); longer contexts become overlapping windows."
    )
    doc_stride: int = Field(128, ge=0, description="Context tokens that consecutive windows share (overlap).")
    max_answer_length: int = Field(30, gt=0, description="Longest answer, in tokens, considered at prediction.")
    n_best_size: int = Field(20, gt=0, description="Best start and end positions per window combined into candidate spans.")
    version_2_with_negative: Literal["auto"] | bool = Field(
        "auto",
        description="SQuAD v2: questions may have no answer and the model may answer nothing. `auto`: on when any train or "
        "validation question has no answer.",
    )
    null_score_threshold: float = Field(
        0.0, description="v2: answer nothing when the no-answer score beats the best span's score by more than this (logits)."
    )
    tune_null_threshold: bool = Field(True, description="v2: after training, set the threshold that maximises F1 on validation.")
    repair: bool = Field(
        False,
        description="Training data: move each `answer_start` that does not point at its answer text to the nearest occurrence "
        "of that text. Offsets off only by surrounding whitespace are repaired anyway; evaluation data needs only answer texts.",
    )

    @model_validator(mode="after")
    def _stride_fits(self) -> "QuestionAnsweringTaskConfig":
        if self.doc_stride >= self.max_length:
            raise ValueError(
                f"doc_stride ({self.doc_stride}) must be less than max_length ({self.max_length}): windows overlap by doc_stride "
                "tokens and must still advance; lower task.doc_stride (128 for max_length 384 is usual)"
            )
        return self


TaskConfig = Annotated[
    Union[ClassificationTaskConfig, TokenClassificationTaskConfig, QuestionAnsweringTaskConfig], Field(discriminator="name")
]


class MethodConfig(Section):
    """Fine-tuning strategy. `full`, `last_n`, `frozen` (head only), `lora`, `dora`, `ia3` (via peft)."""

    name: Literal["full", "last_n", "frozen", "lora", "dora", "ia3"] = "full"
    last_n_layers: int = Field(2, ge=0, description="`last_n`: transformer layers left trainable (per stack).")
    lora_r: int = Field(8, gt=0, description="LoRA/DoRA rank.")
    lora_alpha: int = Field(16, gt=0, description="LoRA/DoRA scaling numerator.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        "auto", description="Modules to adapt; `auto` uses peft's per-architecture defaults, else all linear layers."
    )
    merge_on_save: bool = Field(True, description="Also save a plain merged model next to the adapter.")


class CpuConfig(Section):
    """CPU speed tricks of training (`tunesmith.speed.cpu`, docs/speed.md); `speedups: false` turns all of them off."""

    speedups: bool = Field(
        True, description="The switch for every key below: false runs plain PyTorch (torch's dropout, transformers' SDPA "
        "attention and torch's kernel choice, every token and embedding row computed, glibc's allocator settings), "
        "whatever the other keys say."
    )
    fast_dropout: bool = Field(
        True, description="CPU training: `nn.Dropout` and the attention-probability dropout of models using transformers' "
        "SDPA attention draw their masks from 16-bit uniforms (4 per 64-bit random word of numpy's SFC64, seeded from "
        "torch's generator) instead of one Bernoulli per element. Keep probability within 8e-6 of 1 - p, kept values "
        "scaled by its inverse; a different random stream from torch's, as reproducible. GPUs, evaluation and "
        "`train.torch_compile` runs keep torch's dropout."
    )
    attention_upcast: bool = Field(
        False, description="CPU training with attention dropout (`fast_dropout`): compute the attention matmuls in fp32, "
        "as SDPA's math kernel does. Default: they run in the autocast dtype (bf16), as in transformers' eager "
        "attention under autocast, with the softmax and its backward in fp32 (scores rounded to bf16 before the "
        "softmax). No effect in fp32 training."
    )
    first_token_only: bool = Field(
        True, description="Sequence classification with a head that reads only the first token (BERT, RoBERTa, XLM-R, "
        "CamemBERT, ELECTRA), on any device: the last layer computes its query, attention row, attention output and "
        "feed-forward block for that token only. Same outputs and gradients. Other models and tasks are unaffected."
    )
    math_attention_max_length: int = Field(
        128, ge=0, description="CPU training: batches with sequences up to this many tokens run SDPA's math kernel "
        "instead of torch's choice (its flash kernel, slower in training on short sequences); matters for models "
        "without attention dropout. 0: torch's choice always. Evaluation and `train.torch_compile` runs keep torch's choice."
    )
    skip_unseen_embedding_rows: bool = Field(
        True, description="CPU training: the input-embedding rows of tokens that never occur in the training data get "
        "no gradient, so AdamW only decays them; they are kept out of the gradient, clipping and optimizer, and decayed "
        "by the same fp32 multiply AdamW makes (a bit-identical model). Only a trained, untied `nn.Embedding`; not "
        "under FSDP2/DeepSpeed."
    )
    reuse_freed_memory: bool = Field(
        True, description="glibc only: for the run, serve large blocks from the heap and never trim it (mallopt), so "
        "each step reuses memory instead of page-faulting fresh zeroed pages. Costs heap fragmentation at long "
        "sequences (counted by the memory check). Process-wide; glibc's defaults are set back when the run ends."
    )

    def effective(self, key: str) -> Any:
        """The value `key` has in effect: its own, or off (false, 0) when `speedups` is false."""
        value = getattr(self, key)
        return value if self.speedups else type(value)()


class TrainConfig(Section):
    """Training hyper-parameters, named like `transformers.TrainingArguments`."""

    learning_rate: float = Field(5e-5, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay; never applied to biases and norms.")
    num_train_epochs: float = Field(3.0, gt=0.0)
    max_steps: int = Field(-1, description="If > 0, total optimizer steps; overrides `num_train_epochs`.")
    per_device_train_batch_size: int = Field(32, gt=0)
    per_device_eval_batch_size: int = Field(64, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    warmup_steps: int = Field(
        0, ge=0,
        description="Warm up over this many optimizer steps instead of a share of them (`warmup_ratio`); set one of the two.",
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant_with_warmup", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")
    seed: int = 42
    eval_strategy: Literal["epoch", "steps", "no"] = "epoch"
    eval_steps: int | None = Field(None, gt=0, description="With `eval_strategy: steps`.")
    logging_steps: int = Field(10, gt=0)
    early_stopping_patience: int | None = Field(None, gt=0, description="Stop after this many evaluations without improvement.")
    metric_for_best_model: str | None = Field(None, description="Defaults per task (accuracy, micro-F1, MSE).")
    greater_is_better: bool | None = Field(None, description="Inferred from the metric name when unset.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="`auto`: bf16 autocast only where the CPU has native bf16 and a quick check shows it faster."
    )
    group_by_length: bool = Field(True, description="Length-grouped batches to minimise padding.")
    torch_compile: bool = Field(
        False, description="`torch.compile` the model in place (inductor, dynamic shapes: one compile despite varying "
        "batch lengths); the first steps pay the compile time. Needs a C++ compiler on CPU, triton on CUDA."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (non-reentrant): less memory, about a third more compute."
    )
    num_threads: int | Literal["auto"] = Field(
        "auto", description="Torch intra-op threads per process. `auto`: `OMP_NUM_THREADS` if set, else physical cores / "
        "processes on this machine; never more than the process already uses."
    )
    cache_frozen_features: bool = Field(
        True, description="`method: frozen`: run the encoder once, cache its outputs, train only the head on them."
    )
    dataloader_num_workers: int = Field(0, ge=0)
    memory_check: bool = Field(
        True, description="Before the run starts, estimate peak training memory and stop (with what would fit) if it exceeds "
        "the RAM or GPU memory available; warn above 80%."
    )
    save_steps: int = Field(
        500, ge=0, description="Write a resumable checkpoint every N optimizer steps (also after each evaluation and epoch); 0: only then."
    )
    save_total_limit: int | None = Field(
        2, ge=1, description="Keep the newest N resumable checkpoints plus the best one; None keeps all."
    )
    max_nonfinite_steps: int = Field(
        10, ge=0, description="Skip up to N consecutive updates with a NaN/inf loss or gradient, then stop with an explanation "
        "(fp16 loss-scaler overflows, which the scaler handles, are logged but not counted)."
    )
    cpu: CpuConfig = Field(CpuConfig(), description="CPU speed tricks, one switch for all of them: the `train.cpu` section.")
    fsdp: bool = Field(
        False, description="Shard weights, gradients and optimizer state across processes (torch FSDP2 `fully_shard` on "
        "each transformer block, then the whole model) instead of replicating them (DDP): each process holds 1/N of "
        "them. Works on CPU (gloo, `tunesmith train --nproc N train.fsdp=true`) and GPUs (NCCL); no effect with one "
        "process. `accelerate launch` with configs/accelerate/fsdp.yaml turns it on too."
    )

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu_is_a_section(cls, value: Any) -> Any:
        if isinstance(value, bool):
            word = "true" if value else "false"
            raise ValueError(f"expected a section of CPU settings (speedups, fast_dropout, ...), not {word}; to turn every "
                             f"CPU speed trick {'on' if value else 'off'}, set train.cpu.speedups={word}")
        return value

    @field_validator("num_threads", mode="before")
    @classmethod
    def _positive_threads(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, int) and value < 1):
            raise ValueError("expected 'auto' or a thread count of at least 1; set train.num_threads=auto or e.g. 4")
        return value

    @model_validator(mode="after")
    def _steps_need_eval_steps(self) -> "TrainConfig":
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("eval_strategy is 'steps' but eval_steps is not set; set train.eval_steps=N")
        if self.fsdp and self.torch_compile:
            raise ValueError("train.fsdp and train.torch_compile together are not supported (never tested); "
                             "set one of them to false")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) and train.warmup_ratio ({self.warmup_ratio}) are "
                             "both set; expected one of them; set the other to 0")
        return self


class OutputConfig(Section):
    """Where the run directory is written."""

    dir: str | None = Field(None, description="Run directory; default `runs/<task>-<timestamp>`.")
    overwrite: bool = Field(False, description="Replace an existing, non-empty run directory.")


_SHORTHAND = {"task": "name", "method": "name"}
_DEFAULT_NAMES = {"task": "classification", "method": "full"}


class RunConfig(Section):
    """A whole run. `tunesmith config show` prints it resolved; `docs/config.md` is generated from it."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    task: TaskConfig = ClassificationTaskConfig()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("task", "method", mode="before")
    @classmethod
    def _name_shorthand(cls, value: Any, info: ValidationInfo) -> Any:
        # `method: frozen` means `method: {name: frozen}`; a section without `name` gets the default one.
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and "name" not in value:
            return {"name": _DEFAULT_NAMES[info.field_name], **value}
        return value


# --------------------------------------------------------------------------- Hugging Face names

# People arrive with TrainingArguments, pipeline and run_glue.py names. The few with an exact equivalent are
# read as ours before validation (`_apply_aliases`: each with a note); the rest stay unknown keys, and their
# message names the one equivalent (`_FOREIGN_KEYS`). Pipeline task names live on the task classes (`pipeline_tag`).

# Path as written -> our path; the value carries over unchanged.
_RENAMES: dict[str, str] = {
    "output_dir": "output.dir",
    "train.output_dir": "output.dir",
    "output.output_dir": "output.dir",
}

# tunesmith's own keys as they were named before a rename -> (the key now, the schema version that renamed it).
# Read like the Hugging Face names above, with a note: old configs, and the config.yaml of old run directories
# (which `--resume` reads), keep working.
_OLD_NAMES: dict[str, tuple[str, int]] = {
    "train.fast_dropout": ("train.cpu.fast_dropout", 2),
    "train.cpu_attention_upcast": ("train.cpu.attention_upcast", 2),
    "train.first_token_only": ("train.cpu.first_token_only", 2),
    "train.cpu_math_attention_max_length": ("train.cpu.math_attention_max_length", 2),
    "train.skip_unseen_embedding_rows": ("train.cpu.skip_unseen_embedding_rows", 2),
    "train.reuse_freed_memory": ("train.cpu.reuse_freed_memory", 2),
}


def renamed_key(dotted: str) -> str:
    """The key a dotted key written under an earlier schema version is now (itself when it was never renamed)."""
    return _OLD_NAMES[dotted][0] if dotted in _OLD_NAMES else dotted

_ALWAYS_EVALUATES = (
    "`tunesmith train` always trains, evaluates on the validation set, and evaluates the best model on the test set "
    "when there is one (data.test_file or data.test_split); remove it"
)

# An unknown key, in whichever section it is written -> our key (no spaces), or what to do instead.
_FOREIGN_KEYS: dict[str, str] = {
    # TrainingArguments
    "batch_size": "train.per_device_train_batch_size",
    "train_batch_size": "train.per_device_train_batch_size",
    "per_gpu_train_batch_size": "train.per_device_train_batch_size",
    "eval_batch_size": "train.per_device_eval_batch_size",
    "per_gpu_eval_batch_size": "train.per_device_eval_batch_size",
    "lr": "train.learning_rate",
    "epochs": "train.num_train_epochs",
    "num_epochs": "train.num_train_epochs",
    "gradient_accumulation": "train.gradient_accumulation_steps",
    "evaluation_strategy": "train.eval_strategy",
    "overwrite_output_dir": "output.overwrite",
    "save_strategy": "checkpoints are written every train.save_steps optimizer steps and after each evaluation and epoch "
    "(train.save_steps=0: only then); remove it",
    "report_to": "metrics are logged to RUN_DIR/log.jsonl (no integrations such as wandb or tensorboard yet); remove it",
    "logging_dir": "logs (log.jsonl) are written into the run directory, output.dir; remove it or set output.dir",
    "logging_strategy": "logs are written every train.logging_steps optimizer steps; remove it (set train.logging_steps)",
    "optim": "the optimizer is always AdamW (no weight decay on biases and norms); remove it",
    "do_train": _ALWAYS_EVALUATES,
    "do_eval": _ALWAYS_EVALUATES,
    "do_predict": _ALWAYS_EVALUATES,
    # run_glue.py / run_ner.py / run_qa.py arguments
    "model_name_or_path": "model.name_or_path",
    "tokenizer_name": "model.tokenizer_name_or_path",
    "max_seq_length": "task.max_length",
    "max_predict_samples": "data.max_eval_samples",
    "pad_to_max_length": "each batch is padded to its longest sequence, never to task.max_length; remove it",
    "cache_dir": "models and datasets are cached where Hugging Face caches them (the HF_HOME environment variable); remove it",
}


def _pipeline_names() -> dict[str, str]:
    """`text-classification` -> `classification`, from each task config's `pipeline_tag`."""
    return {m.pipeline_tag: m.model_fields["name"].default for m in _section_members(TaskConfig)}


def _apply_aliases(raw: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """Hugging Face names with an exact equivalent, and our own keys' earlier names, read as ours. Returns (the
    rewritten config, notes, problems); the caller's dict and its sections are left as they were."""
    raw = dict(raw)
    notes: list[str] = []
    problems: list[str] = []
    copied: set[tuple[str, ...]] = set()

    def section(*names: str, create: bool = False) -> dict[str, Any] | None:
        # Our own copy of a (nested) section, to edit; None when it is not a mapping (validation reports that).
        holder = raw
        for depth, name in enumerate(names):
            value = holder.get(name)
            if value is None and create:
                value = {}
            if not isinstance(value, dict):
                return None
            if names[: depth + 1] not in copied:
                value = holder[name] = dict(value)
                copied.add(names[: depth + 1])
            holder = value
        return holder

    renames = [(written, ours, "the TrainingArguments name", "the TrainingArguments name for")
               for written, ours in _RENAMES.items()]
    renames += [(written, ours, f"its name before schema version {version}", f"the name before schema version {version} of")
                for written, (ours, version) in _OLD_NAMES.items()]
    for written, ours, why, conflict in renames:
        *parent, key = written.split(".")
        holder = section(*parent)
        if holder is None or key not in holder:
            continue
        *target_names, target_key = ours.split(".")
        target = section(*target_names, create=True)
        if target is None:
            continue
        value = holder.pop(key)
        if target.get(target_key) not in (None, value):
            problems.append(f"{source}: '{written}' ({value!r}) and '{ours}' ({target[target_key]!r}) are both set; "
                            f"'{written}' is {conflict} '{ours}'; keep one")
            continue
        target[target_key] = value
        notes.append(f"{source}: read '{written}' as '{ours}' ({why})")

    train = section("train")
    if train is not None:
        flags = {flag: train.pop(flag) for flag in ("bf16", "fp16") if flag in train}
        on = [flag for flag, value in flags.items() if value is True]
        for flag, value in flags.items():
            if not isinstance(value, bool):
                problems.append(f"{source}: train.{flag}: expected true or false, found {value!r}; "
                                f"better: train.precision: {flag}")
        if len(on) == 2:
            problems.append(f"{source}: train.bf16 and train.fp16 are both true; expected one precision; set train.precision "
                            "to bf16 or fp16 and remove both")
        elif on and train.get("precision", on[0]) != on[0]:
            problems.append(f"{source}: 'train.{on[0]}: true' and 'train.precision: {train['precision']}' disagree; keep one "
                            f"(train.{on[0]}: true is train.precision: {on[0]})")
        elif on:
            train["precision"] = on[0]
            notes.append(f"{source}: read 'train.{on[0]}: true' as 'train.precision: {on[0]}' (the TrainingArguments name)")
        for flag in (flag for flag, value in flags.items() if value is False):
            # TrainingArguments' fp32 default is not ours: `auto` may pick bf16, so say how to get fp32.
            decides = (f"train.precision is '{train['precision']}'" if "precision" in train
                       else "train.precision decides (default 'auto'); set train.precision=fp32 to train in fp32")
            notes.append(f"{source}: ignored 'train.{flag}: false': {decides}")
        if "load_best_model_at_end" in train:
            value = train.pop("load_best_model_at_end")
            if value is True:
                notes.append(f"{source}: ignored 'train.load_best_model_at_end: true': tunesmith always loads the best "
                             "checkpoint at the end")
            else:
                problems.append(
                    f"{source}: train.load_best_model_at_end: {'false' if value is False else repr(value)} is not supported: "
                    "tunesmith always loads the best checkpoint at the end of training; remove the key "
                    "(train.eval_strategy=no trains without evaluation and keeps the final weights)"
                )

    names = _pipeline_names()
    task = raw.get("task")
    if isinstance(task, str) and task in names:
        raw["task"] = names[task]
        notes.append(f"{source}: read 'task: {task}' as 'task: {names[task]}' (the pipeline task name)")
    elif isinstance(task, dict) and isinstance(task.get("name"), str) and task["name"] in names:
        task = section("task")
        notes.append(f"{source}: read 'task.name: {task['name']}' as 'task.name: {names[task['name']]}' (the pipeline task name)")
        task["name"] = names[task["name"]]
    return raw, notes, problems


def _section_keys() -> dict[str, list[str]]:
    """Each section's keys (the task's: those of every task), for suggestions across sections."""
    return {
        name: list(dict.fromkeys(key for member in _section_members(field.annotation) for key in member.model_fields))
        for name, field in RunConfig.model_fields.items()
    }


def _unknown_key_hint(parent: list[str], key: str, members: list[type[BaseModel]]) -> str:
    """What to write instead of an unknown key: the Hugging Face name's equivalent, the same key in another
    section, a near-miss; else the valid keys, never a long list of them."""
    foreign = _FOREIGN_KEYS.get(key)
    if foreign:
        return foreign if " " in foreign else f"tunesmith calls it '{foreign}'"
    elsewhere = {name: f"{name}.{key}" for name, keys in _section_keys().items() if key in keys and [name] != parent}
    if elsewhere and len(parent) <= 1:
        plural = "s" if len(elsewhere) > 1 else ""
        return (f"it is a key of the {' and '.join(elsewhere)} section{plural}: did you mean "
                f"{' or '.join(repr(dotted) for dotted in elsewhere.values())}?")
    candidates = list(dict.fromkeys(k for member in members for k in member.model_fields))
    # 0.6, not difflib's usual 0.5 or less: below it the "closest" key is a different setting (fp16 -> fsdp).
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{'.'.join(parent + [close[0]])}'?"
    if len(candidates) <= 8:
        return f"valid keys: {', '.join(candidates)}"
    return f"see `tunesmith config reference` (docs/config.md) for the {len(candidates)} keys of {'.'.join(parent)}"


# --------------------------------------------------------------------------- loading


def _section_members(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _section_members(arg)]


def _clean_location(loc: tuple) -> tuple[list[str], str, list[type[BaseModel]]]:
    """Field names of an error location without pydantic's union-branch tags (`classification`,
    `literal['none','balanced']`, `list[float]`), list positions as `[i]`. Returns (keys, dotted path, the
    sections the last key was looked up in: the task's own branch for a task key)."""
    keys: list[str] = []
    dotted = ""
    members: list[type[BaseModel]] = [RunConfig]  # sections the next location part may be a key of
    parent_members = members
    for part in loc:
        if isinstance(part, int):
            dotted += f"[{part}]"
            continue
        if not members:
            continue  # below a plain field: the parts name union branches, not keys
        by_tag = [m for m in members if "name" in m.model_fields and m.model_fields["name"].default == part]
        if by_tag and not any(part in m.model_fields for m in members):
            members = by_tag  # the discriminator tag of a task/method union
            continue
        field = next((m.model_fields[part] for m in members if part in m.model_fields), None)
        keys.append(part)
        dotted += ("." if dotted else "") + part
        parent_members = members
        members = _section_members(field.annotation) if field is not None else []
    return keys, dotted or "(root)", parent_members


def _format_validation_error(err: ValidationError, source: str) -> list[str]:
    problems: list[str] = []
    merged: dict[str, int] = {}  # dotted path -> index in problems, to join the branches of a union
    for e in err.errors():
        keys, dotted, parent_members = _clean_location(e["loc"])
        if e["type"] == "extra_forbidden":
            hint = _unknown_key_hint(keys[:-1], keys[-1], parent_members)
            problems.append(f"{source}: unknown key '{dotted}'; {hint}")
            continue
        if e["type"] == "union_tag_invalid":
            ctx = e.get("ctx", {})
            problems.append(
                f"{source}: {dotted}.{ctx.get('discriminator', 'name').strip(chr(39))}: expected {ctx.get('expected_tags')}, "
                f"found '{ctx.get('tag')}'"
            )
            continue
        message = e["msg"].removeprefix("Value error, ")
        found = e.get("input")
        found_text = "" if isinstance(found, (dict, list)) else f" (found {found!r})"
        if dotted in merged:
            # Another branch of a union type: "should be 'none' or 'balanced'" + "should be a valid list".
            i = merged[dotted]
            head, _, tail = problems[i].rpartition(found_text) if found_text else (problems[i], "", "")
            problems[i] = f"{head} or {message.removeprefix('Input should be ')}{found_text}{tail}"
            continue
        merged[dotted] = len(problems)
        problems.append(f"{source}: {dotted}: {message}{found_text}")
    return problems


def parse_config(raw: dict[str, Any], source: str = "config", notes: list[str] | None = None) -> RunConfig:
    """Validate a raw config. Hugging Face names with an exact equivalent (`output_dir`, `train.bf16`,
    `task: text-classification`) are read as ours: one note each, logged and appended to `notes` if given."""
    found: list[str] = []
    problems: list[str] = []
    if isinstance(raw, dict):
        raw, found, problems = _apply_aliases(raw, source)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(problems + _format_validation_error(err, source)) from None
    if problems:
        raise ConfigError(problems)
    for note in found:
        log.info(note)
    if notes is not None:
        notes.extend(found)
    return cfg


def _parse_value(text: str, item: str) -> Any:
    # YAML scalars: `1e-4` -> float, `true` -> bool, `[a, b]` -> list, `null` -> None.
    try:
        value = _load_yaml(text, f"override '{item}'") if text != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({' '.join(str(err).split())}); expected a "
                          "YAML value such as 4, 1e-4, true or [a, b]") from None
    if isinstance(value, str) and _looks_like_float(value):
        return float(value)
    return value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _is_text_field(parts: list[str]) -> bool:
    """Whether the key at this dotted path holds a string (`str` or `str | None`)."""
    members: list[type[BaseModel]] = [RunConfig]
    annotation: Any = None
    for part in parts:
        field = next((m.model_fields[part] for m in members if part in m.model_fields), None)
        if field is None:
            return False
        annotation = field.annotation
        members = _section_members(annotation)
    return annotation is str or (
        get_origin(annotation) in (Union, types.UnionType) and set(get_args(annotation)) == {str, type(None)}
    )


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `train.learning_rate=1e-4` style overrides to a raw config dict.

    Values are YAML scalars, except for string keys, which take the text as written: `model.revision=0123`
    is the revision "0123", not the octal number 83."""
    raw = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected dotted.key=value, e.g. train.learning_rate=1e-4")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part in _SHORTHAND:
                child = {_SHORTHAND[part]: child}
            if not isinstance(child, dict):
                child = {} if child is None else child
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node[part] = child
            node = child
        if _is_text_field(parts) and text not in {"null", "~"}:
            node[parts[-1]] = text
        else:
            node[parts[-1]] = _parse_value(text, item)
    return raw


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that also records each key written twice in one mapping (SafeLoader keeps the
    last one without a word), with its dotted path and lines; `_load_yaml` reports them."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, list[int]]] = []  # (dotted key, the lines it is written on)
        self._paths: dict[int, str] = {}  # id(node) -> its dotted path
        self._checked: set[int] = set()

    def construct_document(self, node: yaml.Node) -> Any:
        # The constructor sees one mapping at a time; where each one sits comes from a walk of the whole tree.
        self._paths = _node_paths(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        self._check_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def flatten_mapping(self, node: yaml.Node) -> None:
        # A merge (`<<: *base`) copies base's pairs into this mapping's node, and flattens base (its own merges)
        # first: check each mapping as written, before that, so a key that overrides a merged one is no duplicate.
        self._check_duplicates(node)
        super().flatten_mapping(node)

    def _check_duplicates(self, node: yaml.Node) -> None:
        if not isinstance(node, yaml.MappingNode) or id(node) in self._checked:
            return
        self._checked.add(id(node))
        lines: dict[Any, list[int]] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                lines.setdefault(self.construct_object(key_node), []).append(key_node.start_mark.line + 1)
        path = self._paths.get(id(node), "")
        for key, where in lines.items():
            if len(where) > 1:
                self.duplicates.append((f"{path}.{key}" if path else str(key), where))


def _node_paths(root: yaml.Node) -> dict[int, str]:
    """The dotted path of every node, in document order (an alias keeps its anchor's path)."""
    paths: dict[int, str] = {}
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in paths:
            continue
        paths[id(node)] = path
        children: list[tuple[yaml.Node, str]] = []
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:  # merged mappings' keys join this mapping
                    merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                    children += [(m, path) for m in merged]
                elif isinstance(key_node, yaml.ScalarNode):
                    children.append((value_node, f"{path}.{key_node.value}" if path else key_node.value))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        stack.extend(reversed(children))
    return paths


def _load_yaml(text: str, source: str) -> Any:
    """YAML text as Python data; a key written twice is a ConfigError (YAML errors are left to the caller)."""
    loader = _ConfigLoader(text)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    problems = []
    for dotted, lines in sorted(loader.duplicates, key=lambda item: item[1]):
        if len(set(lines)) == 1:
            where = f"{'twice' if len(lines) == 2 else f'{len(lines)} times'} on line {lines[0]}"
        else:
            where = f"on lines {', '.join(map(str, lines[:-1]))} and {lines[-1]}"
        problems.append(f"{source}: duplicate key '{shown(dotted)}' {where}; the last one would silently win; keep one of them")
    if problems:
        raise ConfigError(problems)
    return data


def _line_at(content: str | bytes, offset: int) -> int:
    return content.count(b"\n" if isinstance(content, bytes) else "\n", 0, offset) + 1


# A config is a few KB: a file this big is another one (a dataset, a model), not worth reading whole.
MAX_CONFIG_BYTES = 10 * 1024 * 1024


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping of sections. A file that is missing, unreadable, binary, not UTF-8, not YAML,
    empty, not a mapping or has a key twice is a ConfigError naming the file, one line per problem."""
    path = Path(path)
    if path.is_dir():
        inside = path / "config.yaml"
        fix = (f"pass the config file inside it: {inside}" if inside.is_file()
               else "pass the path of a .yaml file (create one with `tunesmith config init FILE`)")
        raise ConfigError(f"{path}: is a directory; expected a YAML config file; {fix}")
    if not path.exists():
        raise ConfigError(f"config file '{path}' not found; create one with `tunesmith config init {path}`")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        fix = f"check its permissions (chmod u+r {path})" if isinstance(err, PermissionError) else "check the file and its disk"
        raise ConfigError(f"{path}: cannot read the file ({err.strerror or err}); expected a readable YAML file; {fix}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: more than {MAX_CONFIG_BYTES:,} bytes; expected a YAML config file (a few KB); "
                          "is it the right file?")
    # NUL bytes never occur in UTF-8 text: binary data or UTF-16. Checked before decoding, so that a binary
    # file is not reported as text in the wrong encoding.
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ConfigError(
            f"{path}: line {_line_at(data, nul)}, byte offset {nul}: found a NUL byte: binary data, not YAML "
            "text; expected a YAML config file in UTF-8; pass the config file (UTF-16 text: re-save it as UTF-8)"
        )
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a BOM, as some Windows editors write, is no text
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: line {_line_at(data, err.start)}, byte offset {err.start}: found byte "
            f"0x{data[err.start]:02x}, which is not UTF-8; expected UTF-8 text; re-save it as UTF-8"
        ) from None
    try:
        raw = _load_yaml(text, str(path))
    except yaml.reader.ReaderError as err:  # a character YAML does not allow (PyYAML says "position N")
        char = err.character if isinstance(err.character, str) else chr(err.character)
        kind = "control character" if unicodedata.category(char) == "Cc" else "character"
        raise ConfigError(f"{path}: line {_line_at(text, err.position)}: found the {kind} U+{ord(char):04X}, "
                          "which YAML does not allow; expected YAML text; remove it") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    if raw is None:  # nothing but comments and blank lines: the wrong file, or one emptied by accident
        raise ConfigError(f"{path}: is empty; expected sections {', '.join(RunConfig.model_fields)}; create a starter "
                          f"with `tunesmith config init --force {path}`")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, task, ...), found {type(raw).__name__}")
    return raw


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, notes: list[str] | None = None
) -> RunConfig:
    """Read a YAML config (or none: defaults), apply dotted overrides, validate. `notes`: see `parse_config`."""
    raw = read_yaml(path) if path else {}
    if path:
        _resolve_relative_paths(raw, Path(path).parent)
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path) if path else "config", notes=notes)


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    # Data paths in a config file are relative to the file, like in every other tool that reads configs;
    # fall back to the working directory so `tunesmith train configs/x.yaml` from the repo root works too.
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("train_file", "validation_file", "test_file"):
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            candidate = base / value
            if candidate.exists() and not Path(value).exists():
                data[key] = str(candidate)


def coerce_config(
    config: "RunConfig | dict | str | Path", overrides: list[str] | None = None, notes: list[str] | None = None
) -> RunConfig:
    if isinstance(config, RunConfig):
        if overrides:
            return parse_config(apply_overrides(config.model_dump(mode="json"), overrides), notes=notes)
        return config
    if isinstance(config, dict):
        return parse_config(apply_overrides(config, overrides or []), notes=notes)
    return load_config(config, overrides, notes=notes)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- reference docs


def config_reference() -> str:
    """Markdown reference of every key, generated from the schema (docs/config.md)."""
    lines = [
        "# Config reference",
        "",
        f"Generated from `tunesmith.config.schema` (schema version {SCHEMA_VERSION}) by `tunesmith config reference`.",
        "Do not edit by hand. Unknown keys are errors that name the closest valid key (or, for a Hugging Face",
        "name, its equivalent). Names with an exact equivalent are read as these keys, with a note: `output_dir`,",
        "`train.bf16`/`train.fp16`, `train.load_best_model_at_end: true`, and the pipeline task names "
        f"({', '.join(f'`{tag}`' for tag in _pipeline_names())}); so are the earlier names of renamed keys "
        f"({', '.join(f'`{old}` (now `{new}`)' for old, (new, _) in _OLD_NAMES.items())}).",
        "",
    ]
    sections: list[tuple[str, type[BaseModel]]] = [
        ("model", ModelConfig),
        ("data", DataConfig),
        *((f"task (name: {m.model_fields['name'].default})", m) for m in get_args(get_args(TaskConfig)[0])),
        ("method", MethodConfig),
        ("train", TrainConfig),
        ("train.cpu", CpuConfig),
        ("output", OutputConfig),
    ]
    for title, model in sections:
        lines += [f"## `{title}`", "", (model.__doc__ or "").strip(), "", "| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            kind = _type_name(field.annotation) + _constraints(field.metadata)
            nested = isinstance(field.default, Section)  # a sub-section: its keys have their own table
            cells = [f"`{name}`", "section" if nested else f"`{kind}`", "see below" if nested else f"`{field.default!r}`",
                     field.description or ""]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    """`str | None`, `'auto' | 'fp32'`, `list[float]` rather than `<class 'str'>`, `typing.Union[...]`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(metadata: list) -> str:
    bounds = []
    for item in metadata:
        for attribute, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(item, attribute, None)
            if value is not None:
                bounds.append(f"{symbol} {value}")
    return f" ({', '.join(bounds)})" if bounds else ""
