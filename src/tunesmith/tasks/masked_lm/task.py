"""Masked language modelling: continue an encoder's pretraining on the user's text (domain adaptation).

The saved model is a plain `*ForMaskedLM` checkpoint; its encoder is what other families start from
(`model.name_or_path: RUN/model`). Masks are drawn by the collator (masking.py), per example and epoch."""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import torch
from torch import nn

from tunesmith.data.inputs import InputColumns
from tunesmith.errors import ConfigError, DataError, summarise
from tunesmith.tasks.base import CardSection, Losses, Task, TaskState
from tunesmith.tasks.masked_lm.request import FillMaskRequest
from tunesmith.tasks.masked_lm import data
from tunesmith.tasks.masked_lm.masking import MaskingCollator, MaskingRule
from tunesmith.tasks.masked_lm.metrics import MaskedLMAccumulator, masked_correct, token_log_likelihoods

log = logging.getLogger("tunesmith")


@dataclasses.dataclass(frozen=True)
class MaskedLMState(TaskState):
    mlm_probability: float = 0.15
    whole_word_masking: bool = False
    pseudo_perplexity_samples: int = 64
    top_k: int = 5


class MaskedLMTask(Task):
    request_model = FillMaskRequest
    name = "masked_lm"
    auto_model_class = "AutoModelForMaskedLM"
    peft_task_type = None  # peft has no masked-LM TaskType: a plain PeftModel wraps the model
    pipeline_tag = "fill-mask"
    state_type = MaskedLMState
    # Masked positions change every epoch: the frozen body's outputs cannot be cached once.
    frozen_feature_cache: ClassVar[bool] = False
    # The collator puts random vocabulary tokens into training inputs (the 10% random replacement), so the CPU
    # trick of training only the embedding rows seen in the data (speed/embedding_rows.py) does not hold. Drawing
    # the replacements from the seen rows only would keep it, but changes the objective (the noise would no longer
    # be uniform over the vocabulary, as in BERT and run_mlm.py); and with the usual tied decoder every row gets a
    # gradient anyway, where the trick never applies. So it is skipped: exact, and costs only untied models.
    inserts_any_token: ClassVar[bool] = True
    example_outputs_name: ClassVar[str] = "predictions"

    # ------------------------------------------------------------------ data

    def reader(self, cfg):
        return lambda path, encoding="utf-8", field="data.train_file": data.read_text_or_table(
            path, encoding, field, cfg.text_column)

    def stratify_key(self, cfg):
        return lambda frame: None

    def preflight(self, cfg, tables):
        problems = [p for table in tables.values() for p in data.text_problems(table, cfg.text_column)]
        if problems:
            raise DataError(summarise(problems))
        return MaskedLMState(cfg.mlm_probability, cfg.whole_word_masking, cfg.pseudo_perplexity_samples, cfg.top_k), []

    def preflight_eval(self, cfg, state, table) -> None:
        problems = data.text_problems(table, cfg.text_column)
        if problems:
            raise DataError(summarise(problems))

    def tokenizer_warnings(self, cfg, tables, tokenizer) -> list[str]:
        if tokenizer.mask_token_id is None:
            raise ConfigError("the tokenizer has no mask token (expected one for masked language modelling, e.g. "
                              "[MASK] or <mask>); choose a masked-LM checkpoint's tokenizer")
        return []

    def encode(self, cfg, table, tokenizer, state):
        return data.encode_table(cfg, table, tokenizer)

    def collator(self, tokenizer, model=None):
        config = getattr(model, "config", None)
        rule = MaskingRule(float(getattr(config, "mlm_probability", 0.15)), tokenizer.mask_token_id,
                           len(tokenizer), bool(getattr(config, "whole_word_masking", False)))
        return MaskingCollator(tokenizer, rule)

    def split_batch(self, batch: dict):
        extras = {k: batch[k] for k in ("original_ids", "example_index") if k in batch}
        inputs = {k: v for k, v in batch.items() if k not in extras and k != "labels"}
        return inputs, batch["labels"], extras

    # ------------------------------------------------------------------ model

    def model_kwargs(self, state) -> dict:
        return {}

    def load_pretrained(self, cfg, source: str, **kwargs):
        import transformers

        model, info = transformers.AutoModelForMaskedLM.from_pretrained(source, output_loading_info=True, **kwargs)
        new = sorted(k for k in info.get("missing_keys", ()) if "embeddings" not in k)
        if new:
            log.warning("masked LM head: '%s' has no masked-LM head weights (%s); the head is new (random, its decoder "
                        "tied to the input embeddings) and trains from scratch", source, ", ".join(new[:4]))
        return model

    def configure_model(self, model, tokenizer, cfg, state) -> None:
        model.config.pad_token_id = tokenizer.pad_token_id
        # Read by the collator (which is handed the model); kept in config.json as a record of the training.
        model.config.mlm_probability = cfg.task.mlm_probability
        model.config.whole_word_masking = cfg.task.whole_word_masking
        if cfg.method.name == "frozen" and not self.head_modules(model):
            raise ConfigError(f"method frozen: the masked-LM head of {type(model).__name__} is only its output layer, "
                              "which is tied to the input embeddings, so frozen would train nothing (or, untied from "
                              "them, the whole vocabulary); use method last_n, lora or full")

    def head_modules(self, model) -> list[str]:
        """The MLM head's own layers (BERT's transform), not its decoder: that is tied to the input embedding, so
        training it would train the whole vocabulary. A head that is only the tied decoder: `frozen` is an error."""
        shared = {id(p) for p in model.get_input_embeddings().parameters()}
        base = getattr(model, "base_model_prefix", "")
        found: list[str] = []

        def walk(name: str, module: nn.Module) -> None:
            params = list(module.parameters())
            if not params:
                return
            if not any(id(p) in shared for p in params):
                found.append(name)
                return
            for child_name, child in module.named_children():
                walk(f"{name}.{child_name}", child)

        for name, child in model.named_children():
            if name != base:
                walk(name, child)
        return found

    def adapter_saved_modules(self, model) -> list[str]:
        return []  # the adapters train the encoder; the tied head stays as the checkpoint has it

    # ------------------------------------------------------------------ loss and metrics

    def loss_fn(self, cfg, state, train, label_smoothing: float = 0.0):
        return lambda logits, labels: Losses.per_token(logits, labels, label_smoothing)

    def supports_label_smoothing(self, state) -> bool:
        return True

    def scores(self, logits, state):
        return logits.argmax(-1)

    @torch.no_grad()
    def evaluation_batch(self, model, inputs, labels, extras, loss_fn, state, *, tokenizer=None):
        logits = self.logits(model(**inputs))
        losses = loss_fn(logits, labels)
        reduced = {"loss_sums": losses.sums, "loss_units": losses.units, "correct": masked_correct(logits, labels)}
        reduced["pll_sums"], reduced["pll_units"] = self._pseudo_log_likelihood(model, inputs, extras, state, tokenizer)
        return reduced

    def _pseudo_log_likelihood(self, model, inputs, extras, state, tokenizer):
        original = extras["original_ids"].to(inputs["input_ids"].device)
        size = original.shape[0]
        samples = state.pseudo_perplexity_samples if isinstance(state, MaskedLMState) else 0
        picked = (extras["example_index"] < samples).to(original.device)
        if tokenizer is None or not bool(picked.any()):
            zeros = torch.zeros(size, dtype=torch.float64, device=original.device)
            return zeros, zeros.clone()
        special = torch.tensor(sorted(set(tokenizer.all_special_ids)), device=original.device)
        maskable = inputs["attention_mask"].bool() & ~torch.isin(original, special) & picked[:, None]
        sums = token_log_likelihoods(model, original, inputs["attention_mask"], maskable, tokenizer.mask_token_id)
        return sums.to(original.device), maskable.sum(-1).double()

    def update(self, accumulator, reduced, state) -> None:
        accumulator.update(reduced)

    def new_accumulator(self, state, references=None):
        return MaskedLMAccumulator()

    def compute_metrics(self, accumulator, state) -> dict:
        return accumulator.metrics()

    def default_metric(self, state):
        return "loss", False

    def summary_metrics(self, state):
        return ("accuracy", "perplexity")

    # ------------------------------------------------------------------ use

    def input_columns(self, cfg) -> InputColumns:
        return InputColumns(cfg.text_column)

    def card(self, state) -> CardSection:
        return CardSection("fill-mask", kind="masked language modelling", usage=[
            "from transformers import pipeline",
            'fill = pipeline("fill-mask", model="PATH/TO/RUN/model")',
            'fill("Paris is the [MASK] of France.")',
        ], cli_example="--text 'Paris is the [MASK] of France.'")

    @torch.inference_mode()
    def predict(self, model, tokenizer, inputs: list, state, batch_size: int = 64, max_length: int = 512,
                top_k: int | None = None) -> list[dict]:
        """Per input: for each mask token, the `top_k` fill-ins (`token`, `token_id`, `score`, `sequence`), as
        transformers' fill-mask pipeline gives them."""
        mask = tokenizer.mask_token
        missing = [i for i, text in enumerate(inputs) if mask not in str(text)]
        if missing:
            raise DataError(f"input {missing[0] + 1}: no {mask} token in {str(inputs[missing[0]])[:80]!r}; expected "
                            f"text with {mask} where a word should be filled in")
        top_k = min(top_k or getattr(state, "top_k", 5), len(tokenizer))
        model.eval()
        device = next(model.parameters()).device
        results = []
        for start in range(0, len(inputs), batch_size):
            texts = [str(t) for t in inputs[start:start + batch_size]]
            batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
            probs = model(**batch).logits.float().softmax(-1)
            for row in range(len(texts)):
                results.append({"masks": self._fills(tokenizer, batch["input_ids"][row], probs[row], top_k)})
        return results

    @staticmethod
    def _fills(tokenizer, ids: torch.Tensor, probs: torch.Tensor, top_k: int) -> list[list[dict]]:
        fills = []
        for position in (ids == tokenizer.mask_token_id).nonzero().flatten().tolist():
            values, tokens = probs[position].topk(top_k)
            options = []
            for score, token in zip(values.tolist(), tokens.tolist()):
                filled = ids.clone()
                filled[position] = token
                options.append({"token": tokenizer.decode([token]).strip(), "token_id": int(token), "score": float(score),
                                "sequence": tokenizer.decode(filled, skip_special_tokens=True)})
            fills.append(options)
        return fills
