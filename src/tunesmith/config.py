"""The typed run config: pydantic v2 models with `extra="forbid"`, YAML files and dotted overrides.

One schema for every run. Sections: `model`, `data`, `task`, `method`, `train`, `output`.
`task` is a union keyed by the task's name (each task family adds its own typed sub-section);
`method` is keyed by the method's name. Both accept the bare name as a shorthand
(`method: frozen`). A typo is an error naming the dotted path and the closest valid key.
"""

from __future__ import annotations

import difflib
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import ConfigError

# Bump when a key is renamed or removed; recorded in every run directory.
SCHEMA_VERSION = 1

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
        False, description="Move each `answer_start` that does not point at its answer text to the nearest occurrence of that text."
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
    fast_dropout: bool = Field(
        True, description="CPU training: `nn.Dropout` and the attention-probability dropout of models using transformers' "
        "SDPA attention draw their masks from 16-bit uniforms (4 per 64-bit random word of numpy's SFC64, seeded from "
        "torch's generator) instead of one Bernoulli per element: ~5x cheaper masks; keep probability within 8e-6 of "
        "1 - p, kept values scaled by its inverse (rounded to the tensor's dtype, as torch's dropout rounds its scaled mask). "
        "GPUs and evaluation unaffected."
    )
    cpu_attention_upcast: bool = Field(
        False, description="CPU training with attention dropout (`fast_dropout`): compute the attention matmuls in fp32, "
        "as SDPA's math kernel does. Default: they run in the autocast dtype (bf16), as in transformers' eager "
        "attention under autocast, with the softmax and its backward in fp32; 2x faster attention (MiniLM, 35 tokens), "
        "scores rounded to bf16 before the softmax. No effect in fp32 training."
    )
    first_token_only: bool = Field(
        True, description="Sequence classification with a head that reads only the first token (BERT, RoBERTa, XLM-R, "
        "CamemBERT, ELECTRA): the last layer computes its query, attention row, attention output and feed-forward block "
        "for that token only. Same outputs and gradients; 14% fewer matmuls in a 6-layer model. Other models and tasks "
        "are unaffected."
    )
    cpu_math_attention_max_length: int = Field(
        128, ge=0, description="CPU training: batches with sequences up to this many tokens run SDPA's math kernel, "
        "faster than its CPU flash kernel in training on short sequences (0.67-0.87x the time at 32-128 tokens, "
        "1.15x at 256); matters for models without attention dropout. 0: torch's choice always. Evaluation keeps "
        "torch's choice."
    )
    skip_unseen_embedding_rows: bool = Field(
        True, description="CPU training: the input-embedding rows of tokens that never occur in the training data get "
        "no gradient, so AdamW only decays them; they are kept out of the gradient, clipping and optimizer, and decayed "
        "by the same fp32 multiply AdamW makes: a bit-identical model, 4% faster MiniLM steps on Rotten Tomatoes "
        "(12,026 of 30,522 rows trained). Only a trained, untied `nn.Embedding`; not under FSDP2/DeepSpeed."
    )
    reuse_freed_memory: bool = Field(
        True, description="glibc only: serve large blocks from the heap and never trim it (mallopt), so each step "
        "reuses memory instead of page-faulting fresh zeroed pages (MiniLM steps 1.3x faster at 32 tokens, 1.6-1.9x "
        "at 256-512; see README). Costs heap fragmentation at long sequences (up to ~50% more peak RSS, counted by "
        "the memory check). Process-wide; freed memory returns to the system when the process exits."
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
        10, ge=0, description="Skip up to N updates with a NaN/inf loss or gradient, then stop with an explanation."
    )
    fsdp: bool = Field(
        False, description="Shard weights, gradients and optimizer state across processes (torch FSDP2 `fully_shard` on "
        "each transformer block, then the whole model) instead of replicating them (DDP): each process holds 1/N of "
        "them. Works on CPU (gloo, `tunesmith train --nproc N train.fsdp=true`) and GPUs (NCCL); no effect with one "
        "process. `accelerate launch` with configs/accelerate/fsdp.yaml turns it on too."
    )

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


# --------------------------------------------------------------------------- loading


def _known_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """Valid keys at a dotted path, for 'did you mean' suggestions."""
    current: Any = model
    for part in path:
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        annotation = fields[part].annotation
        current = _section_type(annotation)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _section_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _section_members(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _section_members(arg)]


def _clean_location(loc: tuple) -> tuple[list[str], str]:
    """Field names of an error location without pydantic's union-branch tags (`classification`,
    `literal['none','balanced']`, `list[float]`), list positions as `[i]`. Returns (keys, dotted path)."""
    keys: list[str] = []
    dotted = ""
    members: list[type[BaseModel]] = [RunConfig]  # sections the next location part may be a key of
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
        members = _section_members(field.annotation) if field is not None else []
    return keys, dotted or "(root)"


def _format_validation_error(err: ValidationError, source: str) -> list[str]:
    problems: list[str] = []
    merged: dict[str, int] = {}  # dotted path -> index in problems, to join the branches of a union
    for e in err.errors():
        keys, dotted = _clean_location(e["loc"])
        if e["type"] == "extra_forbidden":
            parent, key = keys[:-1], keys[-1]
            candidates = _known_keys(RunConfig, parent)
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
            hint = f"did you mean '{'.'.join(parent + [close[0]])}'?" if close else f"valid keys: {', '.join(candidates)}"
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


def parse_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def _parse_value(text: str) -> Any:
    # YAML scalars: `1e-4` -> float, `true` -> bool, `[a, b]` -> list, `null` -> None.
    value = yaml.safe_load(text) if text != "" else ""
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
            node[parts[-1]] = _parse_value(text)
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file '{path}' not found; create one with `tunesmith config init {path}`")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, task, ...), found {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or none: defaults), apply dotted overrides, validate."""
    raw = read_yaml(path) if path else {}
    if path:
        _resolve_relative_paths(raw, Path(path).parent)
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path) if path else "config")


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


def coerce_config(config: "RunConfig | dict | str | Path", overrides: list[str] | None = None) -> RunConfig:
    if isinstance(config, RunConfig):
        if overrides:
            return parse_config(apply_overrides(config.model_dump(mode="json"), overrides))
        return config
    if isinstance(config, dict):
        return parse_config(apply_overrides(config, overrides or []))
    return load_config(config, overrides)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- reference docs


def config_reference() -> str:
    """Markdown reference of every key, generated from the schema (docs/config.md)."""
    lines = [
        "# Config reference",
        "",
        f"Generated from `tunesmith.config` (schema version {SCHEMA_VERSION}) by `tunesmith config reference`.",
        "Do not edit by hand. Unknown keys are errors that name the closest valid key.",
        "",
    ]
    sections: list[tuple[str, type[BaseModel]]] = [
        ("model", ModelConfig),
        ("data", DataConfig),
        *((f"task (name: {m.model_fields['name'].default})", m) for m in get_args(get_args(TaskConfig)[0])),
        ("method", MethodConfig),
        ("train", TrainConfig),
        ("output", OutputConfig),
    ]
    for title, model in sections:
        lines += [f"## `{title}`", "", (model.__doc__ or "").strip(), "", "| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            kind = _type_name(field.annotation) + _constraints(field.metadata)
            cells = [f"`{name}`", f"`{kind}`", f"`{field.default!r}`", field.description or ""]
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
