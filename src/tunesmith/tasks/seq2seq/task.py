"""Sequence to sequence: summarization, translation, simplification, any text-to-text task.

Any `AutoModelForSeq2SeqLM` (T5, BART, Pegasus, Marian, mBART/M2M/NLLB), or an encoder-decoder warm-started
from an encoder checkpoint (bert2bert, `models.py`). Training is teacher-forced cross-entropy over the target
tokens; evaluation generates (`generation` section) and scores the text (ROUGE, sacreBLEU, chrF, exact match).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import datasets
import numpy as np
import torch

from tunesmith.data.inputs import InputColumns
from tunesmith.data.loaders import Table
from tunesmith.data.tokenize import cached_map
from tunesmith import generation
from tunesmith.errors import DataError, summarise
from tunesmith.export.encoder_decoder import EncoderDecoder
from tunesmith.metrics.generation import bleu_tokenizer, generation_metrics
from tunesmith.tasks.base import CardSection, LossTotal, Losses, Task, TaskState
from tunesmith.serving.requests import GenerationRequest
from tunesmith.tasks.seq2seq import models
from tunesmith.tasks.seq2seq.config import Seq2SeqTaskConfig
from tunesmith.tasks.seq2seq.data import Pairs, check_table, read_pairs

log = logging.getLogger("tunesmith")

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Seq2SeqState(TaskState):
    source_prefix: str = ""  # put before every source, in training and prediction
    source_lang: str | None = None
    target_lang: str | None = None
    bleu_tokenizer: str = "13a"  # sacreBLEU's tokenizer for the target language (chosen in preflight)


class GeneratedText:
    """One evaluation pass: each example's generated text and length, by its index in the table, and the loss."""

    def __init__(self, references: Pairs | None):
        self.references = references
        self.predictions: dict[int, str] = {}
        self.lengths: dict[int, int] = {}
        self.loss = LossTotal()

    def add(self, reduced: dict) -> None:
        for index, text, length in zip(reduced["example_index"].tolist(), reduced["predictions"],
                                       reduced["generated_lengths"].tolist()):
            self.predictions[index], self.lengths[index] = text, length
        self.loss.add(reduced["loss_sums"], reduced["loss_units"])

    @property
    def indices(self) -> list[int]:
        return sorted(self.predictions)


class Seq2SeqTask(Task):
    request_model = GenerationRequest
    name = "seq2seq"
    auto_model_class = "AutoModelForSeq2SeqLM"
    peft_task_type = "SEQ_2_SEQ_LM"
    state_type = Seq2SeqState
    pipeline_tag = "text2text-generation"
    frozen_feature_cache = False  # the decoder reads the encoder at every step; `frozen` freezes the encoder
    example_outputs_name = "generated_predictions"
    generates = True
    onnx_layout = EncoderDecoder()

    # ------------------------------------------------------------------ data

    def stratify_key(self, cfg: Seq2SeqTaskConfig):
        return lambda frame: None

    def preflight(self, cfg: Seq2SeqTaskConfig, tables: dict[str, Table]) -> tuple[Seq2SeqState, list[str]]:
        errors = [problem for table in tables.values() for problem in check_table(cfg, table)]
        if errors:
            raise DataError(summarise(errors))
        targets = read_pairs(cfg, tables["train"]).targets
        state = Seq2SeqState(cfg.source_prefix, cfg.source_lang, cfg.target_lang, bleu_tokenizer(cfg.target_lang, targets[:1000]))
        return state, []

    def preflight_eval(self, cfg: Seq2SeqTaskConfig, state: Seq2SeqState, table: Table) -> None:
        errors = check_table(cfg, table)
        if errors:
            raise DataError(summarise(errors))

    def tokenizer_warnings(self, cfg: Seq2SeqTaskConfig, tables: dict[str, Table], tokenizer) -> list[str]:
        pairs = read_pairs(cfg, tables["train"])
        models.set_languages(tokenizer, cfg.source_lang, cfg.target_lang)
        sources = tokenizer([cfg.source_prefix + s for s in pairs.sources])["input_ids"]
        targets = tokenizer(text_target=pairs.targets)["input_ids"]
        warnings = []
        for side, ids, limit, key in (("source", sources, cfg.max_source_length, "max_source_length"),
                                      ("target", targets, cfg.max_target_length, "max_target_length")):
            lengths = np.array([len(x) for x in ids])
            p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).round().astype(int)
            over = int((lengths > limit).sum())
            log.info("train %s lengths in tokens: p50 %d, p90 %d, p99 %d, max %d; %d of %d (%.1f%%) longer than "
                     "task.%s=%d", side, p50, p90, p99, lengths.max(), over, len(lengths), 100 * over / len(lengths), key, limit)
            if over:
                warnings.append(f"{over} of {len(lengths)} train {side}s ({over / len(lengths):.1%}) are longer than "
                                f"task.{key}={limit} tokens and will be truncated (longest: {lengths.max()}, p99: {p99}); "
                                f"raise task.{key} if the end matters")
        unknown = _mostly_unknown(targets, tokenizer.unk_token_id)
        if unknown:
            warnings.append(f"{len(unknown)} train targets are mostly unknown tokens for this tokenizer (e.g. "
                            f"{tables['train'].where(unknown[0])}): the model cannot write that script; choose a model "
                            "whose tokenizer covers the target language")
        return warnings

    def encode(self, cfg: Seq2SeqTaskConfig, table: Table, tokenizer, state: Seq2SeqState) -> datasets.Dataset:
        pairs = read_pairs(cfg, table, need_targets=False)
        columns = {"source": [state.source_prefix + s for s in pairs.sources], "example_index": list(range(len(pairs.sources)))}
        if pairs.targets is not None:
            columns["target"] = pairs.targets

        def tokenize(batch):
            models.set_languages(tokenizer, state.source_lang, state.target_lang)
            encoded = tokenizer(batch["source"], truncation=True, max_length=cfg.max_source_length)
            if "target" in batch:
                encoded["labels"] = tokenizer(text_target=batch["target"], truncation=True,
                                              max_length=cfg.max_target_length)["input_ids"]
            encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
            return encoded

        key = f"s2s-{cfg.max_source_length}-{cfg.max_target_length}-{state.source_lang}-{state.target_lang}"
        return cached_map(datasets.Dataset.from_dict(columns), tokenize, tokenizer, key_extra=key,
                          remove_columns=[c for c in columns if c in ("source", "target")])

    def references(self, cfg: Seq2SeqTaskConfig, table: Table, state: Seq2SeqState) -> Pairs:
        """The untruncated targets (metrics score against what the data says, not its truncated tokens)."""
        return read_pairs(cfg, table)

    def collator(self, tokenizer, model=None):
        # Labels padded with -100; decoder inputs built from them by the model (its decoder start token).
        return models.Seq2SeqCollator(tokenizer, model=model, label_pad_token_id=IGNORE)

    def split_batch(self, batch: dict) -> tuple[dict, torch.Tensor, dict]:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_index")}
        extras = {"example_index": batch["example_index"]} if "example_index" in batch else {}
        return inputs, batch["labels"], extras

    # ------------------------------------------------------------------ model

    def model_kwargs(self, state: Seq2SeqState) -> dict:
        return {}

    def load_pretrained(self, cfg: Seq2SeqTaskConfig, source: str, **kwargs):
        return models.load_seq2seq(source, **kwargs)

    def logits_elements(self, model, cfg, batch_size: int, length: int) -> int:
        # The decoder's logits: one row per target token, not per source token.
        return super().logits_elements(model, cfg, batch_size, cfg.max_target_length)

    def configure_model(self, model, tokenizer, cfg, state: Seq2SeqState) -> None:
        models.set_special_tokens(model, tokenizer, state.target_lang)
        models.set_generation(model, tokenizer, cfg.generation.model_dump(), cfg.task.max_target_length, state.target_lang)

    def head_modules(self, model) -> list[str]:
        """`frozen` trains the decoder (a frozen encoder), never the shared vocabulary table."""
        return models.decoder_modules(model)

    def adapter_saved_modules(self, model) -> list[str]:
        return models.new_modules(model)

    # ------------------------------------------------------------------ loss, evaluation, metrics

    def supports_label_smoothing(self, state) -> bool:
        return True

    def loss_fn(self, cfg, state, train, label_smoothing: float = 0.0) -> Callable:
        return lambda logits, labels: Losses.per_token(logits, labels, label_smoothing, IGNORE)

    def evaluation_batch(self, model, inputs: dict, labels, extras: dict, loss_fn, state, *, tokenizer=None) -> dict:
        losses = loss_fn(self.logits(model(**inputs)), labels)
        generated = generation.generate(model, inputs["input_ids"], inputs.get("attention_mask"), tokenizer)
        return {"predictions": _decode(tokenizer, generated), "generated_lengths": models.generated_lengths(model, generated),
                "example_index": extras["example_index"], "loss_sums": losses.sums, "loss_units": losses.units}

    def update(self, accumulator: GeneratedText, reduced: dict, state) -> None:
        accumulator.add(reduced)

    def new_accumulator(self, state, references: Pairs | None = None) -> GeneratedText:
        return GeneratedText(references)

    def scores(self, logits: torch.Tensor, state) -> torch.Tensor:
        return logits.argmax(-1)

    def compute_metrics(self, accumulator: GeneratedText, state: Seq2SeqState) -> dict:
        indices = accumulator.indices
        predictions = [accumulator.predictions[i] for i in indices]
        references = [accumulator.references.targets[i] for i in indices] if accumulator.references else []
        # The run's BLEU tokenizer, chosen once in preflight: every evaluation (and `tunesmith eval`) scores alike.
        metrics = generation_metrics(predictions, references, tokenizer=state.bleu_tokenizer) if references else {}
        lengths = [accumulator.lengths[i] for i in indices]
        return {"loss": accumulator.loss.mean, "samples": len(indices), **metrics,
                "gen_len": float(np.mean(lengths)) if lengths else 0.0}

    def default_metric(self, state: Seq2SeqState) -> tuple[str, bool]:
        # Translation is scored by BLEU in the field; summaries and other rewrites by ROUGE-L.
        return ("bleu", True) if state.target_lang else ("rougeL", True)

    def summary_metrics(self, state: Seq2SeqState) -> tuple[str, ...]:
        return ("rouge1", "rouge2", "rougeL", "bleu", "chrf", "gen_len")

    def example_outputs(self, accumulator: GeneratedText, state) -> list[dict] | None:
        refs = accumulator.references
        if refs is None:
            return None
        return [{"source": refs.sources[i], "reference": refs.targets[i], "prediction": accumulator.predictions[i]}
                for i in accumulator.indices]

    # ------------------------------------------------------------------ use

    def input_columns(self, cfg: Seq2SeqTaskConfig) -> InputColumns:
        return InputColumns(cfg.source_column)

    def card(self, state: Seq2SeqState) -> CardSection:
        kind = f"translation {state.source_lang} -> {state.target_lang}" if state.target_lang else "text to text"
        prefix = repr(state.source_prefix) + " + " if state.source_prefix else ""
        return CardSection(self.pipeline_tag, kind=kind, cli_example="--text 'a source text'", usage=[
            "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
            'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/RUN/model")',
            'model = AutoModelForSeq2SeqLM.from_pretrained("PATH/TO/RUN/model")',
            f'inputs = tokenizer([{prefix}"a source text"], return_tensors="pt")',
            "# generation_config.json holds the run's settings (max_new_tokens, num_beams, ...)",
            "print(tokenizer.batch_decode(model.generate(**inputs), skip_special_tokens=True))",
        ])

    @torch.inference_mode()
    def predict(self, model, tokenizer, inputs: list, state: Seq2SeqState, batch_size: int = 64, max_length: int = 512,
                **settings) -> list[dict]:
        """Generated text for each source string, in order. `settings`: settings of the `generation` section
        overriding the saved ones for this call (`num_beams=4`, `max_new_tokens=64`)."""
        overrides = generation.overrides(settings)
        model.eval()
        device = next(model.parameters()).device
        sources = [state.source_prefix + str(x) for x in inputs]
        models.set_languages(tokenizer, state.source_lang, state.target_lang)
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))  # batches of similar length pad little
        results: list[dict | None] = [None] * len(sources)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([sources[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt").to(device)
            generated = generation.generate(model, batch["input_ids"], batch.get("attention_mask"), tokenizer, **overrides)
            for i, text in zip(idx, _decode(tokenizer, generated)):
                results[i] = {"generated_text": text}
        return results  # type: ignore[return-value]


def _decode(tokenizer, generated: torch.Tensor) -> list[str]:
    return [text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)]


def _mostly_unknown(encoded: list[list[int]], unk: int | None) -> list[int]:
    if unk is None:
        return []
    return [i for i, ids in enumerate(encoded) if ids and sum(t == unk for t in ids) > 0.5 * max(len(ids) - 2, 1)]
