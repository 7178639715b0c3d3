"""The typed run config's sections: pydantic v2 models with `extra="forbid"`.

One schema for every run. Sections: `model`, `data`, `task`, `method`, `train`, `generation`, `output`.
`task` is a union keyed by the task's name, of the sections of the registered task families
(`tunesmith.tasks.registry`: each family's config lives in its folder); `method` is a union keyed
by the method's name, each method with only its own keys. Both accept the bare name as a
shorthand (`method: frozen`). Reading YAML, overrides and error messages: `config.loading`;
the generated reference: `config.reference`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, ValidationInfo, field_validator, model_validator

from tunesmith.config.section import Section
from tunesmith.config.task_base import TaskConfigBase

# Bump when a key is renamed or removed; recorded in every run directory.
SCHEMA_VERSION = 2

DEFAULT_MODEL = "bundled:all-MiniLM-L6-v2"


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
    attn_implementation: str | None = Field(
        None, description="Attention kernel, as transformers' `attn_implementation`: `sdpa`, `eager`, `flash_attention_2` "
        "(CUDA with flash-attn installed: packed rows run as variable-length sequences, no padding), or a hub kernel "
        "name. Unset: transformers' choice (SDPA where the model supports it)."
    )
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


# --------------------------------------------------------------------------- methods


class MethodConfig(Section):
    """The base of every method's section: shared code reads only these."""

    # Whether the method trains a peft adapter (saved as RUN_DIR/adapter, optionally merged).
    trains_adapter: ClassVar[bool] = False

    name: str


class FullMethodConfig(MethodConfig):
    """`full`: every weight trains."""

    name: Literal["full"] = "full"


class LastNMethodConfig(MethodConfig):
    """`last_n`: the last layers of the transformer stack and the head train, the rest is frozen."""

    name: Literal["last_n"] = "last_n"
    last_n_layers: int = Field(2, ge=0, description="`last_n`: transformer layers left trainable (per stack).")


class FrozenMethodConfig(MethodConfig):
    """`frozen`: only the task head trains (`train.cache_frozen_features`: the encoder runs once)."""

    name: Literal["frozen"] = "frozen"


class AdapterMethodConfig(MethodConfig):
    """The keys every peft adapter method has."""

    trains_adapter: ClassVar[bool] = True

    target_modules: list[str] | Literal["auto", "all-linear"] = Field(
        "auto", description="Modules to adapt; `auto` uses peft's per-architecture defaults, else all linear layers."
    )
    merge_on_save: bool = Field(True, description="Also save a plain merged model next to the adapter.")


class LoraMethodConfig(AdapterMethodConfig):
    """`lora` (via peft): low-rank updates of the target modules; the base model stays frozen."""

    name: Literal["lora"] = "lora"
    lora_r: int = Field(8, gt=0, description="LoRA/DoRA rank.")
    lora_alpha: int = Field(16, gt=0, description="LoRA/DoRA scaling numerator.")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA/DoRA input.")


class DoraMethodConfig(LoraMethodConfig):
    """`dora` (via peft): LoRA with weight-decomposed magnitude and direction."""

    name: Literal["dora"] = "dora"


class IA3MethodConfig(AdapterMethodConfig):
    """`ia3` (via peft): learned rescaling vectors on the target modules."""

    name: Literal["ia3"] = "ia3"


METHODS: tuple[type[MethodConfig], ...] = (
    FullMethodConfig, LastNMethodConfig, FrozenMethodConfig, LoraMethodConfig, DoraMethodConfig, IA3MethodConfig,
)
METHOD_CONFIGS: dict[str, type[MethodConfig]] = {m.model_fields["name"].default: m for m in METHODS}

AnyMethodConfig = Annotated[Union[METHODS], Field(discriminator="name")]

# Before the method union, one section held every method's keys and dumps of it (RUN_DIR/config.yaml, the
# checkpoints' config fingerprint) carry them all. A key at this old default is what the old version wrote,
# not a choice: it is dropped when it does not belong to the method (other values are errors).
LEGACY_METHOD_DEFAULTS: dict[str, Any] = {
    "last_n_layers": 2, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "auto", "merge_on_save": True,
}


def is_legacy_method_default(dotted: str, value: Any) -> bool:
    """Whether `method.<key>: value` is a key an older tunesmith wrote for every method at its default."""
    section, _, key = dotted.partition(".")
    return section == "method" and key in LEGACY_METHOD_DEFAULTS and LEGACY_METHOD_DEFAULTS[key] == value


# --------------------------------------------------------------------------- train, output


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
    gradient_accumulation_steps: int = Field(
        1, gt=0,
        description="Micro-batches per optimizer step; the loss is averaged over every example (or target token) of "
                    "the step, so 8 x 2 trains as 16 x 1 (DeepSpeed: each micro-batch's own mean).",
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    warmup_steps: int = Field(
        0, ge=0,
        description="Warm up over this many optimizer steps instead of a share of them (`warmup_ratio`); set one of the two.",
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant_with_warmup", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")
    label_smoothing_factor: float = Field(
        0.0, ge=0.0, lt=1.0, description="Label smoothing of cross-entropy losses (single-label classification, token "
        "classification, sequence-to-sequence targets); 0: none. As in `Trainer`, the losses logged during training, "
        "evaluations included, are smoothed; `tunesmith eval` reports the plain loss."
    )
    neftune_noise_alpha: float | None = Field(
        None, gt=0.0, description="NEFTune (Jain et al. 2023): while training, uniform noise of size alpha / sqrt(length x "
        "hidden) is added to the input embeddings (5 is the paper's choice for instruction tuning); never in evaluation, "
        "generation or the saved model. Unset: none."
    )
    seed: int = 42
    eval_strategy: Literal["epoch", "steps", "no"] = "epoch"
    eval_steps: int | None = Field(None, gt=0, description="With `eval_strategy: steps`.")
    eval_on_start: bool | None = Field(
        None, description="Evaluate once before the first training step (metrics.json's `validation_before_training`). "
        "Unset: the task's choice (on for language modelling: the perplexity before and after) while evaluation is on; "
        "`true` evaluates first even under `eval_strategy: no`."
    )
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


MIN_TEMPERATURE = 1e-5


class GenerationSection(Section):
    """How generating families (sequence-to-sequence, causal LMs) generate at evaluation and prediction, named like
    `transformers.GenerationConfig`; saved as the model's `generation_config.json`, so plain `generate()`
    does the same. A key left unset keeps the checkpoint's own setting (transformers' default where it has
    none). `tunesmith predict --num-beams/--max-new-tokens` override them per call."""

    max_new_tokens: int | None = Field(
        None, gt=0, description="Most tokens generated per output. Unset: the task's own (seq2seq: task.max_target_length; "
        "causal LMs: the longest trained answer, rounded up), never transformers' 20."
    )
    num_beams: int | None = Field(None, ge=1, description="Beam search width; 1: greedy (or sampling with do_sample).")
    length_penalty: float | None = Field(
        None, description="Beam search: exponent on the length dividing a beam's score (> 1 favours longer outputs)."
    )
    no_repeat_ngram_size: int | None = Field(None, ge=0, description="Never repeat an n-gram of this size; 0: off.")
    early_stopping: bool | None = Field(None, description="Beam search: stop once num_beams finished candidates exist.")
    repetition_penalty: float | None = Field(None, gt=0.0, description="Penalty on tokens already generated; 1: none.")
    do_sample: bool | None = Field(None, description="Sample instead of greedy or beam decoding.")
    # Below 1e-5, logits / temperature overflow to inf and sampling fails (schemathesis sent 5e-324).
    temperature: float | None = Field(None, ge=MIN_TEMPERATURE, description="Sampling temperature (at least 1e-5; "
                                      "for greedy decoding set do_sample: false).")
    top_k: int | None = Field(None, ge=0, description="Sampling: keep the k most likely tokens; 0: all.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Sampling: keep the smallest set of tokens with this probability mass.")
    stop_strings: list[str] | None = Field(
        None, description="Stop generating once the output ends with one of these strings (as well as at the end-of-turn "
        "and EOS tokens)."
    )

class OutputConfig(Section):
    """Where the run directory is written."""

    dir: str | None = Field(None, description="Run directory; default `runs/<task>-<timestamp>`.")
    overwrite: bool = Field(False, description="Replace an existing, non-empty run directory.")


_SHORTHAND = {"task": "name", "method": "name"}


def _default_task() -> TaskConfigBase:
    return task_configs()[0]()


class RunConfig(Section):
    """A whole run. `tunesmith config show` prints it resolved; `docs/config.md` is generated from it."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    # The registered families' sections, keyed by name: set by `set_task_configs` (the task registry).
    task: TaskConfigBase = Field(default_factory=_default_task)
    method: AnyMethodConfig = Field(default_factory=FullMethodConfig)
    train: TrainConfig = TrainConfig()
    generation: GenerationSection = GenerationSection()
    output: OutputConfig = OutputConfig()

    @field_validator("task", "method", mode="before")
    @classmethod
    def _name_shorthand(cls, value: Any, info: ValidationInfo) -> Any:
        # `method: frozen` means `method: {name: frozen}`; a section without `name` gets the default one.
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and "name" not in value:
            default = task_configs()[0] if info.field_name == "task" else FullMethodConfig
            value = {"name": default.model_fields["name"].default, **value}
        if info.field_name == "method" and isinstance(value, dict):
            value = _drop_legacy_method_keys(value)
        return value


def _drop_legacy_method_keys(value: dict[str, Any]) -> dict[str, Any]:
    member = METHOD_CONFIGS.get(value.get("name"))  # type: ignore[arg-type]
    if member is None:
        return value  # an unknown method: the union reports it
    return {key: item for key, item in value.items()
            if key in member.model_fields or not is_legacy_method_default(f"method.{key}", item)}


# --------------------------------------------------------------------------- the task union

_task_configs: list[type[TaskConfigBase]] = []


def task_configs() -> list[type[TaskConfigBase]]:
    """The registered task families' sections, in registration order (the first is the default task)."""
    if not _task_configs:
        raise RuntimeError("no task family is registered (tunesmith.tasks registers the built-in ones)")
    return list(_task_configs)


def set_task_configs(configs: list[type[TaskConfigBase]]) -> None:
    """Make RunConfig's `task` the union of these sections, keyed by `name` (called by the task registry)."""
    _task_configs[:] = configs
    field = RunConfig.model_fields["task"]
    if len(configs) == 1:  # pydantic wants two or more members for a discriminated union
        field.annotation, field.discriminator = configs[0], None
    else:
        field.annotation, field.discriminator = Union[tuple(configs)], "name"  # type: ignore[assignment]
    RunConfig.model_rebuild(force=True)


# Names that lived here before config/ was split by role, for code written against the old layout: the
# loading and reference functions. (A family's task section is imported from its own folder.)
_MOVED = {"config_reference": "tunesmith.config.reference"}
_LOADING = {"apply_overrides", "coerce_config", "dump_config", "load_config", "parse_config", "read_yaml", "MAX_CONFIG_BYTES"}


def __getattr__(name: str) -> Any:
    module = _MOVED.get(name) or ("tunesmith.config.loading" if name in _LOADING else None)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


# The built-in families register themselves (and this union) when tunesmith.tasks is imported; it imports
# only their config modules, not torch.
import tunesmith.tasks  # noqa: E402,F401
