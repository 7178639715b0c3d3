"""Causal language modelling: continued pretraining on raw text, instruction tuning (SFT) and chat.

Any `AutoModelForCausalLM` (GPT-2, Llama, Qwen, SmolLM, Mistral, Phi, ...). Raw text is joined with EOS and
packed into `task.block_size` blocks; conversations are rendered with the chat template and labelled per turn
at tokenization time (`chat.py`), optionally packed (`packing.py`). The loss projects hidden states to the
vocabulary in chunks (`speed/lm_loss.py`). Evaluation reports loss, perplexity and token accuracy and generates
a few validation prompts; prediction generates (`generation` section, saved as generation_config.json).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable

import datasets
import torch

from tunesmith import generation
from tunesmith.data.inputs import InputColumns
from tunesmith.data.loaders import Table
from tunesmith.data.tokenize import cached_map
from tunesmith.errors import ConfigError, DataError, summarise
from tunesmith.tasks.base import CardSection, LossTotal, Losses, Task, TaskState
from tunesmith.serving.requests import SamplingRequest
from tunesmith.tasks.causal_lm import chat, formats
from tunesmith.tasks.causal_lm.config import CausalLMTaskConfig
from tunesmith.tasks.causal_lm.generating import (Completion, fitting_prompt, generate_completions, generate_texts, last_tokens,
                                                  prompt_token_ids, seed_sampling)
from tunesmith.tasks.causal_lm.packing import IGNORE, CausalLMCollator, block_rows, pack_examples, packed_row

log = logging.getLogger("tunesmith")

LORA_ABOVE = 100_000_000  # parameters: above this, a run that names no method adapts the model with LoRA
SAMPLE_PROMPT_TOKENS = 32  # raw text: a validation block's first tokens are the prompt of its sample generation
REFERENCE_TOKENS = 256  # of a sample's reference continuation, kept in the samples file


@dataclasses.dataclass(frozen=True)
class CausalLMState(TaskState):
    format: str = "text"  # the rows' format, resolved from `task.format` in preflight
    template: str | None = None  # the chat template used: tokenizer, chatml, plain, custom (None: raw text)
    system_prompt: str | None = None
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)  # eos and the template's end-of-turn token
    max_new_tokens: int = 128  # generation's default length: the longest trained answer, rounded up

    @property
    def chat(self) -> bool:
        return self.format != "text"


class EvalTotals:
    """One evaluation pass: the loss, correct next-token guesses, and the sample generations by example."""

    def __init__(self) -> None:
        self.loss = LossTotal()
        self.correct = 0.0
        self.examples = 0
        self.samples: dict[int, dict] = {}

    def add(self, reduced: dict) -> None:
        self.loss.add(reduced["loss_sums"], reduced["loss_units"])
        self.correct += float(reduced["correct"].double().sum())
        self.examples += len(reduced["loss_sums"])
        for index, sample in zip(reduced["example_index"].tolist(), reduced["samples"]):
            if sample is not None:
                self.samples[index] = sample


class ChunkedLoss:
    """The loss function the loop hands back to the task: its settings, and the plain loss over given logits
    (shifted: position t predicts label t + 1)."""

    def __init__(self, chunk_tokens: int, label_smoothing: float = 0.0):
        self.chunk_tokens, self.label_smoothing = chunk_tokens, label_smoothing

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> Losses:
        return Losses.per_token(logits[:, :-1], labels[:, 1:], self.label_smoothing, IGNORE)


class CausalLMTask(Task):
    request_model = SamplingRequest
    completes = True
    name = "causal_lm"
    auto_model_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    state_type = CausalLMState
    pipeline_tag = "text-generation"
    frozen_feature_cache = False  # the output layer reads every block's output at every position
    example_outputs_name = "generated_samples"
    generates = True
    evaluate_before_training = True

    # ------------------------------------------------------------------ data

    def reader(self, cfg: CausalLMTaskConfig):
        return functools.partial(formats.read_text_file, column=cfg.text_column)

    def stratify_key(self, cfg: CausalLMTaskConfig):
        return lambda frame: None

    def preflight(self, cfg: CausalLMTaskConfig, tables: dict[str, Table]) -> tuple[CausalLMState, list[str]]:
        train = tables["train"]
        fmt = formats.detect_format(cfg, list(train.frame.columns), train.source)
        errors = [p for table in tables.values() for p in _problems(cfg, table, fmt)]
        if errors:
            raise DataError(summarise(errors))
        return CausalLMState(format=fmt, system_prompt=cfg.system_prompt), []

    def preflight_eval(self, cfg: CausalLMTaskConfig, state: CausalLMState, table: Table) -> None:
        errors = _problems(cfg, table, formats.detect_format(cfg, list(table.frame.columns), table.source))
        if errors:
            raise DataError(summarise(errors))

    def with_tokenizer(self, cfg: CausalLMTaskConfig, tables: dict[str, Table], tokenizer,
                       state: CausalLMState) -> tuple[CausalLMState, list[str]]:
        notes = []
        template = None
        if state.chat:
            choice = chat.resolve_template(tokenizer, cfg.chat_template)
            template = choice.name
            notes.append(f"chat template: {template}" + (" (the tokenizer has none; set task.chat_template to choose)"
                                                         if template == "chatml" and cfg.chat_template == "auto" else ""))
            if choice.added_tokens:
                notes.append(f"tokenizer: added {', '.join(choice.added_tokens)} for the {template} template (new "
                             "embedding rows, initialised at the mean of the others)")
        pad_note = chat.choose_pad_token(tokenizer)
        if pad_note:
            notes.append(pad_note)
        stops = chat.end_of_turn_ids(tokenizer) if state.chat else [tokenizer.eos_token_id]
        longest = _longest_answer(cfg, tables["train"], tokenizer, state) if state.chat else 128
        return dataclasses.replace(state, template=template, stop_token_ids=[i for i in stops if i is not None],
                                   max_new_tokens=longest), notes

    def tokenizer_warnings(self, cfg: CausalLMTaskConfig, tables: dict[str, Table], tokenizer) -> list[str]:
        if not _is_chat(cfg, tables["train"]):
            return []
        train = tables["train"]
        fmt = formats.detect_format(cfg, list(train.frame.columns), train.source)
        unlearnable = []
        for i, conversation in enumerate(formats.read_conversations(cfg, train, fmt)):
            rendered = chat.render(conversation, tokenizer, cfg.train_on, cfg.max_length, where=train.where(i))
            if rendered.truncated or not any(label != IGNORE for label in rendered.labels):
                unlearnable.append(i)
        if not unlearnable:
            return []
        rows = ", ".join(train.where(i) for i in unlearnable[:3])
        message = (f"{len(unlearnable)} of {len(train.frame)} train conversations have no trainable token or their "
                   f"last trained turn is cut off by task.max_length={cfg.max_length} (e.g. {rows})")
        if cfg.unlearnable == "error":
            raise DataError(f"{message}; raise task.max_length, shorten or remove them, or set task.unlearnable=warn to "
                            "train without them")
        return [f"{message}: they are left out of training (task.unlearnable=warn)"]

    def encode(self, cfg: CausalLMTaskConfig, table: Table, tokenizer, state: CausalLMState) -> datasets.Dataset:
        if not state.chat:
            return _encode_text(cfg, table, tokenizer)
        conversations = formats.read_conversations(cfg, table, state.format)
        columns = {"conversation": conversations, "example_index": list(range(len(conversations)))}
        samples = cfg.sample_prompts

        def tokenize(batch):
            out = {"input_ids": [], "labels": [], "length": [], "learnable": [], "prompt_length": []}
            for conversation, index in zip(batch["conversation"], batch["example_index"]):
                rendered = chat.render(conversation, tokenizer, cfg.train_on, cfg.max_length)
                out["input_ids"].append(rendered.input_ids)
                out["labels"].append(rendered.labels)
                out["length"].append(len(rendered.input_ids))
                out["learnable"].append(not rendered.truncated and any(x != IGNORE for x in rendered.labels))
                out["prompt_length"].append(_prompt_length(conversation, tokenizer) if index < samples else 0)
            return out

        key = f"clm-{state.format}-{state.template}-{cfg.train_on}-{cfg.max_length}-{cfg.system_prompt}-{samples}"
        return cached_map(datasets.Dataset.from_dict(columns), tokenize, tokenizer, key_extra=key,
                          remove_columns=["conversation"])

    def arrange(self, cfg: CausalLMTaskConfig, dataset: datasets.Dataset, training: bool) -> datasets.Dataset:
        if "learnable" not in dataset.column_names:  # raw text: already packed blocks
            return dataset
        if training:
            dataset = dataset.filter(lambda row: row["learnable"])
        if cfg.packing if training else cfg.eval_packing:
            return _packed(dataset, cfg.max_length)
        return dataset

    def collator(self, tokenizer, model=None):
        return CausalLMCollator(tokenizer.pad_token_id)

    def split_batch(self, batch: dict) -> tuple[dict, torch.Tensor, dict]:
        extras = {k: batch[k] for k in ("example_index", "prompt_length") if k in batch}
        inputs = {k: v for k, v in batch.items() if k not in ("labels", *extras)}
        return inputs, batch["labels"], extras

    # ------------------------------------------------------------------ model

    def model_kwargs(self, state: CausalLMState) -> dict:
        return {}

    def adapter_saved_modules(self, model) -> list[str]:
        # The output layer is pretrained, not new: an adapter run leaves it frozen (as peft and TRL do), instead of
        # training and saving a vocabulary-sized matrix whole beside a few MB of adapter.
        return []

    def default_method(self, run_cfg) -> str | None:
        return "lora" if _parameter_count(run_cfg.model) > LORA_ABOVE else None

    def configure_model(self, model, tokenizer, cfg, state: CausalLMState) -> None:
        model.config.pad_token_id = tokenizer.pad_token_id
        stops = state.stop_token_ids or [tokenizer.eos_token_id]
        generation.apply_settings(model, cfg.generation.model_dump(), state.max_new_tokens,
                                  eos_token_id=stops if len(stops) > 1 else stops[0], pad_token_id=tokenizer.pad_token_id)

    # ------------------------------------------------------------------ loss, evaluation, metrics

    def logits_elements(self, model, cfg: CausalLMTaskConfig, batch_size: int, length: int) -> int:
        # The chunked loss (speed/lm_loss.py) holds one chunk of labelled tokens' logits at a time.
        return min(batch_size * length, cfg.loss_chunk_tokens) * (super().logits_elements(model, cfg, 1, 1) or 0)

    def supports_label_smoothing(self, state) -> bool:
        return True

    def loss_fn(self, cfg: CausalLMTaskConfig, state, train, label_smoothing: float = 0.0) -> Callable:
        return ChunkedLoss(cfg.loss_chunk_tokens, label_smoothing)

    def training_losses(self, model, inputs: dict, labels, loss_fn: ChunkedLoss) -> Losses:
        from tunesmith.speed.lm_loss import causal_lm_losses

        losses, _ = causal_lm_losses(model, {**inputs, "use_cache": False}, labels, chunk_tokens=loss_fn.chunk_tokens,
                                     label_smoothing=loss_fn.label_smoothing)
        return losses

    def evaluation_batch(self, model, inputs: dict, labels, extras: dict, loss_fn: ChunkedLoss, state: CausalLMState, *,
                         tokenizer=None) -> dict:
        from tunesmith.speed.lm_loss import causal_lm_losses

        losses, correct = causal_lm_losses(model, {**inputs, "use_cache": False}, labels, chunk_tokens=loss_fn.chunk_tokens,
                                           with_accuracy=True)
        index = extras.get("example_index", torch.full((len(labels),), -1))
        return {"loss_sums": losses.sums, "loss_units": losses.units, "correct": correct, "example_index": index,
                "samples": _samples(model, tokenizer, inputs["input_ids"], labels, extras.get("prompt_length"))}

    def update(self, accumulator: EvalTotals, reduced: dict, state) -> None:
        accumulator.add(reduced)

    def new_accumulator(self, state, references=None) -> EvalTotals:
        return EvalTotals()

    def scores(self, logits: torch.Tensor, state) -> torch.Tensor:
        return logits.argmax(-1)

    def compute_metrics(self, accumulator: EvalTotals, state: CausalLMState) -> dict:
        loss = accumulator.loss.mean
        for index in sorted(accumulator.samples):
            sample = accumulator.samples[index]
            log.info("sample %d: %r -> %r", index, sample["prompt"][-200:], sample["generated"][:200])
        units = accumulator.loss.units
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": accumulator.correct / units if units else 0.0,
                "tokens": int(units), "samples": accumulator.examples}

    def default_metric(self, state) -> tuple[str, bool]:
        return ("loss", False)

    def summary_metrics(self, state) -> tuple[str, ...]:
        return ("perplexity", "token_accuracy")

    def evaluation_log_fields(self, accumulator: EvalTotals, state) -> dict:
        return {"generated_samples": self.example_outputs(accumulator, state)} if accumulator.samples else {}

    def example_outputs(self, accumulator: EvalTotals, state) -> list[dict] | None:
        return [accumulator.samples[i] for i in sorted(accumulator.samples)] or None

    # ------------------------------------------------------------------ use

    def input_columns(self, cfg: CausalLMTaskConfig) -> InputColumns:
        return InputColumns(cfg.text_column if cfg.format == "text" else cfg.prompt_column)

    def card(self, state: CausalLMState) -> CardSection:
        prompt = ('messages = [{"role": "user", "content": "Hello!"}]',
                  "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', "
                  "return_dict=True)") if state.chat else ('inputs = tokenizer(["Once upon a time"], return_tensors="pt")',)
        return CardSection(self.pipeline_tag, kind=f"{state.format} ({state.template or 'no'} chat template)",
                           cli_example="--text 'Hello!'", usage=[
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/RUN/model")',
            'model = AutoModelForCausalLM.from_pretrained("PATH/TO/RUN/model")',
            *prompt,
            "# generation_config.json holds the run's settings: stop ids, max_new_tokens",
            "output = model.generate(**inputs)",
            "print(tokenizer.decode(output[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        ])

    @torch.inference_mode()
    def predict(self, model, tokenizer, inputs: list, state: CausalLMState, batch_size: int = 16, max_length: int | None = None,
                seed: int | str | None = None, **settings) -> list[dict]:
        """Generated text for each input, in order: a user message (chat runs: rendered with the chat template and
        the run's system prompt) or a text to continue. `settings`: `generation` settings for this call; `seed`
        makes sampling reproducible."""
        overrides = generation.overrides(settings)
        model.eval()
        prompts = [last_tokens(prompt_token_ids(tokenizer, state, text), max_length) for text in inputs]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[dict | None] = [None] * len(prompts)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seed_sampling(seed)
            for i, text in zip(idx, generate_texts(model, tokenizer, [prompts[i] for i in idx], **overrides)):
                results[i] = {"generated_text": text}
        return results  # type: ignore[return-value]

    def reply(self, model, tokenizer, state: CausalLMState, messages: list[dict], streamer=None, max_length: int | None = None,
              seed: int | str | None = None, **settings) -> str:
        return self.complete(model, tokenizer, state, list(messages), streamer=streamer, max_length=max_length, seed=seed,
                             **settings).text

    @torch.inference_mode()
    def complete(self, model, tokenizer, state: CausalLMState, prompt: str | list[dict], streamer=None,
                 max_length: int | None = None, seed: int | str | None = None, **settings) -> Completion:
        """One generation with its token counts and finish reason: after a conversation (a list of turns, rendered
        with the chat template; the oldest turns dropped to fit `max_length`) or after a raw text, continued as
        given (OpenAI's `/v1/completions`)."""
        conversation = isinstance(prompt, list)
        if conversation and not tokenizer.chat_template:
            raise ConfigError("this run's tokenizer has no chat template (it was trained on raw text from a base model); "
                              "use tunesmith generate RUN_DIR --prompt TEXT, or train with a chat format")
        overrides = generation.overrides(settings)
        model.eval()
        seed_sampling(seed)
        if conversation:
            chat_state = state if state.chat else dataclasses.replace(state, format="messages")
            ids = fitting_prompt(tokenizer, chat_state, prompt, max_length)
        else:
            ids = tokenizer(str(prompt))["input_ids"]
        return generate_completions(model, tokenizer, [last_tokens(ids, max_length)], streamer=streamer, **overrides)[0]


# --------------------------------------------------------------------------- helpers


def _is_chat(cfg: CausalLMTaskConfig, table: Table) -> bool:
    return formats.detect_format(cfg, list(table.frame.columns), table.source) != "text"


def _problems(cfg: CausalLMTaskConfig, table: Table, fmt: str) -> list[str]:
    if fmt == "text":
        return [] if formats.read_texts(cfg, table) else [
            f"{table.source}: no text in column '{cfg.text_column}' (every row is empty); expected documents to train on"]
    return formats.check_conversations(cfg, table, fmt)


def _encode_text(cfg: CausalLMTaskConfig, table: Table, tokenizer) -> datasets.Dataset:
    """Documents joined with EOS and packed into blocks (each document keeps its own positions and attention)."""
    texts = formats.read_texts(cfg, table)
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        # A tokenizer that already ends each text with EOS (Llama 2's add_eos_token) gets no second one.
        docs = [ids if ids[-1:] == [eos] else ids + [eos] for ids in tokenizer(batch["text"])["input_ids"]]
        if cfg.packing is False:
            rows = [row for doc in docs for row in block_rows([doc], cfg.block_size)]
        else:
            rows = list(block_rows(docs, cfg.block_size))
        return {key: [row[key] for row in rows] for key in ("input_ids", "labels", "position_ids", "length")}

    blocks = cached_map(datasets.Dataset.from_dict({"text": texts}), tokenize, tokenizer,
                        key_extra=f"clm-text-{cfg.block_size}-{cfg.packing}", remove_columns=["text"])
    prompt = [min(SAMPLE_PROMPT_TOKENS, n // 2) if i < cfg.sample_prompts else 0 for i, n in enumerate(blocks["length"])]
    return blocks.add_column("example_index", list(range(len(blocks)))).add_column("prompt_length", prompt)


def _packed(dataset: datasets.Dataset, max_length: int) -> datasets.Dataset:
    examples = list(zip(dataset["input_ids"], dataset["labels"]))
    rows = [packed_row([examples[i] for i in members]) for members in pack_examples(examples, max_length)]
    columns = {key: [row[key] for row in rows] for key in ("input_ids", "labels", "position_ids", "length")}
    columns["example_index"] = list(range(len(rows)))
    columns["prompt_length"] = [0] * len(rows)  # a packed row has no one prompt to sample from
    return datasets.Dataset.from_dict(columns)


def _prompt_length(conversation: list[dict], tokenizer) -> int:
    """Tokens before the last assistant turn, generation prompt included: what a sample generation starts from."""
    last = max((i for i, turn in enumerate(conversation) if turn["role"] == "assistant"), default=None)
    return len(chat.prompt_ids(conversation[:last], tokenizer)) if last else 0


def _longest_answer(cfg: CausalLMTaskConfig, table: Table, tokenizer, state: CausalLMState) -> int:
    """generation's default max_new_tokens: the longest assistant turn in the train data (its tokens plus the
    end-of-turn token), rounded up to a multiple of 16 and at least 16, so generation can say all it learned."""
    answers = [turn["content"] for conversation in formats.read_conversations(cfg, table, state.format)
               for turn in conversation if turn["role"] == "assistant"]
    lengths = [len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]] if answers else [0]
    return max(16, int(math.ceil((max(lengths) + 1) / 16) * 16))


def _parameter_count(model_cfg) -> int:
    """The checkpoint's parameter count from its config alone (an empty model on the meta device: no weights read)."""
    import transformers

    from tunesmith.assets import resolve_model_path

    try:
        config = transformers.AutoConfig.from_pretrained(resolve_model_path(model_cfg.name_or_path), revision=model_cfg.revision,
                                                         trust_remote_code=model_cfg.trust_remote_code,
                                                         gguf_file=model_cfg.gguf_file)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError):  # reported with its fix when the model loads
        return 0
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _samples(model, tokenizer, input_ids: torch.Tensor, labels: torch.Tensor, prompt_length: torch.Tensor | None) -> list:
    """Sample generations for the batch's rows that have a prompt (the first `task.sample_prompts` validation
    examples): prompt, reference continuation and generated text; None for the other rows."""
    found: list[dict | None] = [None] * len(input_ids)
    if prompt_length is None or tokenizer is None or not bool((prompt_length > 0).any()):
        return found
    rows = [i for i in range(len(input_ids)) if int(prompt_length[i]) > 0]
    prompts = [input_ids[i, :int(prompt_length[i])].tolist() for i in rows]
    generated = generate_texts(model, tokenizer, prompts)
    for i, prompt, text in zip(rows, prompts, generated):
        reference = [t for t in labels[i, int(prompt_length[i]):].tolist() if t != IGNORE][:REFERENCE_TOKENS]
        found[i] = {"prompt": tokenizer.decode(prompt, skip_special_tokens=False),
                    "reference": tokenizer.decode(reference, skip_special_tokens=True).strip(), "generated": text}
    return found
