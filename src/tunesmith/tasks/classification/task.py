"""Sequence classification: single-label, multi-label, regression and sentence pairs."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from collections.abc import Callable

import datasets
import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from tunesmith.data.inputs import InputColumns
from tunesmith.tasks.classification.config import ClassificationTaskConfig
from tunesmith.data.loaders import Table
from tunesmith.data.tokenize import cached_map
from tunesmith.errors import DataError, shown, summarise as _summarise
from tunesmith.tasks.classification.metrics import (
    ScoreAccumulator,
    multi_label_metrics,
    regression_metrics,
    single_label_metrics,
    tune_threshold,
)
from tunesmith.tasks.base import CardSection, Losses, Task, TaskState
from tunesmith.export.layouts import OneForward
from tunesmith.tasks.classification.request import PairRequest

IMBALANCE_RATIO = 10.0


def _label_key(value) -> str:
    """Labels compare as strings; 1, 1.0 and "1" are the same label."""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, (np.integer,)):
        value = int(value)
    return str(value).strip() if isinstance(value, str) else str(value)


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _is_missing_label(value) -> bool:
    # CSVs are read with pandas' NA strings off (a text may be "NA"), but a label cell saying NaN is a hole.
    return _is_missing(value) or (isinstance(value, str) and value.strip().lower() == "nan")


def _is_listlike(value) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _sort_labels(keys: set[str]) -> list[str]:
    # Integer labels sort numerically (so "0","1",... keep their ids), others alphabetically.
    if all(re.fullmatch(r"-?[0-9]+", k) for k in keys):
        return sorted(keys, key=int)
    return sorted(keys)


@dataclasses.dataclass(frozen=True)
class ClassificationState(TaskState):
    problem_type: str  # single_label, multi_label or regression
    labels: list[str]  # in the model's output order; empty for regression
    threshold: float | None = None  # multi-label decision threshold (tuned on validation)


class ClassificationTask(Task):
    request_model = PairRequest
    onnx_layout = OneForward(("logits",))
    name = "classification"
    auto_model_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    state_type = ClassificationState
    pipeline_tag = "text-classification"
    sequence_head = True

    # ------------------------------------------------------------------ labels

    def _multi_labels(self, cfg: ClassificationTaskConfig, row: pd.Series) -> list[str] | None:
        if cfg.label_columns:
            return [c for c in cfg.label_columns if _label_key(row[c]) in {"1", "True", "true"}]
        value = row[cfg.label_column]
        if _is_listlike(value):
            return [_label_key(v) for v in value]
        if _is_missing(value):
            return None
        return [p.strip() for p in str(value).split(cfg.label_separator) if p.strip()]

    def problem_type(self, cfg: ClassificationTaskConfig, frame: pd.DataFrame) -> str:
        if cfg.problem_type != "auto":
            return cfg.problem_type
        if cfg.label_columns:
            return "multi_label"
        if cfg.label_column not in frame.columns:
            return "single_label"
        values = frame[cfg.label_column].dropna()
        if any(_is_listlike(v) for v in values):
            return "multi_label"
        if values.map(lambda v: isinstance(v, str) and cfg.label_separator in v).any():
            return "multi_label"
        numeric = pd.to_numeric(values, errors="coerce")
        if len(values) and numeric.notna().all() and not (numeric == numeric.round()).all():
            return "regression"
        return "single_label"

    def stratify_key(self, cfg: ClassificationTaskConfig):
        def key(frame: pd.DataFrame):
            if self.problem_type(cfg, frame) != "single_label":
                return None
            return frame[cfg.label_column].map(_label_key).to_numpy()

        return key

    # ------------------------------------------------------------------ preflight

    def _required_columns(self, cfg: ClassificationTaskConfig) -> list[tuple[str, str]]:
        columns = [(cfg.text_column, "task.text_column")]
        if cfg.text_pair_column:
            columns.append((cfg.text_pair_column, "task.text_pair_column"))
        if cfg.label_columns:
            columns += [(c, "task.label_columns") for c in cfg.label_columns]
        else:
            columns.append((cfg.label_column, "task.label_column"))
        return columns

    def _check_table(self, cfg: ClassificationTaskConfig, table: Table, problem: str) -> list[str]:
        frame, errors = table.frame, []
        missing = [(c, field) for c, field in self._required_columns(cfg) if c not in frame.columns]
        if missing:
            found = ", ".join(map(str, frame.columns)) or "(none)"
            return [
                f"{table.source}: missing column '{c}' ({field}); columns found: {found}; "
                f"rename the column or set {field}=<one of them>"
                for c, field in missing
            ]
        for column in [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else []):
            for i, value in enumerate(frame[column]):
                if _is_missing(value):
                    errors.append(f"{table.where(i)}: column '{column}' is empty; expected text; fill it in or remove the row")
                elif _is_listlike(value) or isinstance(value, dict):
                    errors.append(f"{table.where(i)}: column '{column}' is {value!r:.60}; expected text; write the text as one string")
        label_columns = cfg.label_columns or [cfg.label_column]
        for column in label_columns:
            for i, value in enumerate(frame[column]):
                if _is_listlike(value) or isinstance(value, dict):
                    if isinstance(value, dict) or any(_is_listlike(v) or isinstance(v, dict) for v in value):
                        errors.append(
                            f"{table.where(i)}: column '{column}' is {value!r:.60}; expected a label (text or number) or a list "
                            "of labels; write the label as text"
                        )
                    continue
                if _is_missing_label(value):
                    errors.append(f"{table.where(i)}: column '{column}' has no label (empty or NaN); expected a label; fill it in or remove the row")
                elif problem == "regression":
                    number = pd.to_numeric(value, errors="coerce")
                    if pd.isna(number) or not math.isfinite(float(number)):
                        errors.append(
                            f"{table.where(i)}: column '{column}' is {value!r}; expected a finite number for regression; "
                            "fix the value or set task.problem_type=single_label"
                        )
                elif cfg.label_columns and _label_key(value) not in {"0", "1", "True", "False", "true", "false"}:
                    errors.append(
                        f"{table.where(i)}: column '{column}' is {value!r}; expected 0 or 1 in a multi-label indicator column; "
                        "set it to 0 or 1, or remove the row"
                    )
        return errors

    def preflight(self, cfg: ClassificationTaskConfig, tables: dict[str, Table]) -> tuple[dict, list[str]]:
        problem = self.problem_type(cfg, tables["train"].frame)
        errors: list[str] = []
        for table in tables.values():
            errors += self._check_table(cfg, table, problem)
        if errors:
            raise DataError(_summarise(errors))
        warnings: list[str] = []
        labels: list[str] = []
        if problem != "regression":
            labels, label_errors, warnings = self._check_labels(cfg, tables, problem)
            if isinstance(cfg.class_weights, list) and len(cfg.class_weights) != len(labels) and not label_errors:
                # Checked here, not only when the loss is built: by then the run directory exists.
                label_errors.append(
                    f"task.class_weights: expected {len(labels)} weights (one per label: {', '.join(labels)}), "
                    f"found {len(cfg.class_weights)}; list one weight per label in that order, or use task.class_weights=balanced"
                )
            if label_errors:
                raise DataError(_summarise(label_errors))
        state = ClassificationState(problem, labels, cfg.threshold if problem == "multi_label" else None)
        warnings += _duplicate_warnings(cfg, tables)
        return state, warnings

    def _row_labels(self, cfg, table: Table, problem: str) -> list[list[str]]:
        if problem == "multi_label":
            return [self._multi_labels(cfg, row) or [] for _, row in table.frame.iterrows()]
        return [[_label_key(v)] for v in table.frame[cfg.label_column]]

    def _check_labels(self, cfg, tables: dict[str, Table], problem: str) -> tuple[list[str], list[str], list[str]]:
        train_rows = self._row_labels(cfg, tables["train"], problem)
        counts = Counter(label for labels in train_rows for label in labels)
        labels = list(cfg.label_columns) if cfg.label_columns else _sort_labels(set(counts))
        errors, warnings = [], []
        if problem == "single_label" and len(counts) < 2:
            only = next(iter(counts), "(none)")
            errors.append(
                f"{tables['train'].source}: column '{cfg.label_column}' has a single class ('{shown(only)}'); "
                "expected at least 2 classes to learn from; add examples of other classes or use task.problem_type=regression"
            )
        for split in ("validation", "test"):
            if split in tables:
                errors += self._unseen_labels(cfg, tables[split], problem, labels)
        if counts and problem == "single_label":
            most, least = max(counts.values()), min(counts.values())
            if most / least >= IMBALANCE_RATIO:
                rare = min(counts, key=counts.get)
                warnings.append(
                    f"class imbalance: '{shown(rare)}' has {least} train examples vs {most} for the largest class "
                    f"({most / least:.0f}:1); consider task.class_weights=balanced"
                )
        return labels, errors, warnings

    def _unseen_labels(self, cfg, table: Table, problem: str, labels: list[str]) -> list[str]:
        known, errors = set(labels), []
        column = ", ".join(cfg.label_columns) if cfg.label_columns else cfg.label_column
        for i, row_labels in enumerate(self._row_labels(cfg, table, problem)):
            errors += [
                f"{table.where(i)}: column '{column}' has label '{shown(label)}', which does not occur in train "
                f"(train labels: {', '.join(map(shown, labels))}); "
                "fix the label, add train examples of it, or remove the row"
                for label in row_labels
                if label not in known
            ]
        return errors

    def preflight_eval(self, cfg: ClassificationTaskConfig, state: dict, table: Table) -> None:
        """Check a labelled evaluation file against a trained model's labels."""
        problem = state.problem_type
        errors = self._check_table(cfg, table, problem)
        if not errors and problem != "regression":
            errors = self._unseen_labels(cfg, table, problem, state.labels)
        if errors:
            raise DataError(_summarise(errors))

    def tokenizer_warnings(self, cfg: ClassificationTaskConfig, tables: dict[str, Table], tokenizer) -> list[str]:
        warnings = []
        frame = tables["train"].frame
        texts = frame[cfg.text_column].astype(str).tolist()
        pairs = frame[cfg.text_pair_column].astype(str).tolist() if cfg.text_pair_column else None
        encoded = tokenizer(texts, pairs, truncation=False, add_special_tokens=True)["input_ids"]
        lengths = np.array([len(ids) for ids in encoded])
        over = int((lengths > cfg.max_length).sum())
        if over:
            warnings.append(
                f"{over} of {len(lengths)} train texts ({over / len(lengths):.1%}) are longer than task.max_length={cfg.max_length} "
                f"tokens and will be truncated (longest: {lengths.max()}); raise task.max_length if the end matters"
            )
        unk = tokenizer.unk_token_id
        if unk is not None:
            mostly_unknown = [i for i, ids in enumerate(encoded) if ids and sum(t == unk for t in ids) > 0.5 * max(len(ids) - 2, 1)]
            if mostly_unknown:
                warnings.append(
                    f"{len(mostly_unknown)} train texts are mostly unknown tokens for this tokenizer "
                    f"(e.g. {tables['train'].where(mostly_unknown[0])}); the model cannot read that script — "
                    "choose a multilingual model for this language"
                )
        return warnings

    # ------------------------------------------------------------------ encoding

    def targets(self, cfg, table: Table, state: dict) -> list:
        problem = state.problem_type
        if problem == "regression":
            return [float(v) for v in pd.to_numeric(table.frame[cfg.label_column])]
        index = {label: i for i, label in enumerate(state.labels)}
        if problem == "multi_label":
            rows = self._row_labels(cfg, table, problem)
            return [[1.0 if label in set(row) else 0.0 for label in state.labels] for row in rows]
        return [index[_label_key(v)] for v in table.frame[cfg.label_column]]

    def encode(self, cfg: ClassificationTaskConfig, table: Table, tokenizer, state: dict) -> datasets.Dataset:
        columns = {"text": table.frame[cfg.text_column].astype(str).tolist()}
        if cfg.text_pair_column:
            columns["text_pair"] = table.frame[cfg.text_pair_column].astype(str).tolist()
        if all(c in table.frame.columns for c, _ in self._required_columns(cfg)):
            columns["labels"] = self.targets(cfg, table, state)
        raw = datasets.Dataset.from_dict(columns)

        def tokenize(batch):
            encoded = tokenizer(batch["text"], batch.get("text_pair"), truncation=True, max_length=cfg.max_length)
            encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
            return encoded

        return cached_map(raw, tokenize, tokenizer, key_extra=f"cls-{cfg.max_length}", remove_columns=list(columns.keys() - {"labels"}))

    # ------------------------------------------------------------------ model, loss, metrics

    def model_kwargs(self, state: dict) -> dict:
        problem = state.problem_type
        if problem == "regression":
            return {"problem_type": "regression", "id2label": {0: "score"}, "label2id": {"score": 0}}
        labels = state.labels
        # id2label alone sets num_labels; passing both trips a consistency warning in transformers 5.
        return {
            "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)},
            "problem_type": "multi_label_classification" if problem == "multi_label" else "single_label_classification",
        }

    def supports_label_smoothing(self, state: ClassificationState) -> bool:
        return state.problem_type == "single_label"

    def loss_fn(self, cfg: ClassificationTaskConfig, state: dict, train: datasets.Dataset | None,
                label_smoothing: float = 0.0) -> Callable:
        """`train` is None for evaluation-only use: the plain, unweighted loss."""
        problem = state.problem_type
        if problem == "regression":
            return lambda logits, labels: Losses.per_example(F.mse_loss(logits.squeeze(-1).float(), labels.float(), reduction="none"))
        weights = _class_weights(cfg, state, train) if train is not None else None
        if problem == "multi_label":
            pos_weight = weights

            def multi_label(logits: torch.Tensor, labels: torch.Tensor) -> Losses:
                losses = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pos_weight, reduction="none")
                return Losses.per_example(losses.mean(-1))  # each example weighs the same, whatever its labels

            return multi_label

        def single_label(logits: torch.Tensor, labels: torch.Tensor) -> Losses:
            losses = F.cross_entropy(logits.float(), labels, weight=weights, reduction="none", label_smoothing=label_smoothing)
            # With class weights an example counts as its class's weight (torch's weighted mean divides by them too).
            return Losses(losses, weights[labels]) if weights is not None else Losses.per_example(losses)

        return single_label

    def new_accumulator(self, state: dict, references=None) -> ScoreAccumulator:
        return ScoreAccumulator()

    def scores(self, logits: torch.Tensor, state: dict) -> torch.Tensor:
        problem = state.problem_type
        logits = logits.float()
        if problem == "regression":
            return logits.squeeze(-1)
        return torch.sigmoid(logits) if problem == "multi_label" else torch.softmax(logits, -1)

    def compute_metrics(self, accumulator: ScoreAccumulator, state: dict) -> dict:
        problem = state.problem_type
        if problem == "regression":
            out = regression_metrics(accumulator.scores, accumulator.targets)
        elif problem == "multi_label":
            out = multi_label_metrics(accumulator.scores, accumulator.targets, state.labels, state.threshold)
        else:
            out = single_label_metrics(accumulator.scores, accumulator.targets, state.labels)
        return {"loss": accumulator.loss, "samples": accumulator.count, **out}

    def default_metric(self, state: dict) -> tuple[str, bool]:
        return {"regression": ("mse", False), "multi_label": ("f1_micro", True)}.get(state.problem_type, ("accuracy", True))

    def summary_metrics(self, state: ClassificationState) -> tuple[str, ...]:
        return {"regression": ("mse", "pearson"), "multi_label": ("f1_micro", "f1_macro")}.get(
            state.problem_type, ("accuracy", "f1_macro", "f1_micro"))

    def after_training(self, cfg: ClassificationTaskConfig, state: dict, accumulator: ScoreAccumulator) -> dict:
        if state.problem_type == "multi_label" and cfg.tune_threshold and accumulator.count:
            return dataclasses.replace(state, threshold=tune_threshold(accumulator.scores, accumulator.targets))
        return state

    def input_columns(self, cfg: ClassificationTaskConfig) -> InputColumns:
        return InputColumns(cfg.text_column, cfg.text_pair_column)

    def before_save(self, model, state: ClassificationState) -> None:
        if state.threshold is not None:
            model.config.multi_label_threshold = state.threshold  # plain transformers users read it there

    def card(self, state: ClassificationState) -> CardSection:
        section = super().card(state)
        return dataclasses.replace(section, kind=state.problem_type, labels=state.labels or ["(regression)"])

    # ------------------------------------------------------------------ prediction

    @torch.inference_mode()
    def predict(self, model, tokenizer, inputs: list, state: dict, batch_size: int = 64, max_length: int = 512) -> list[dict]:
        """`inputs`: strings, or (text, text_pair) pairs. Returns one dict per input, in order."""
        texts = [x if isinstance(x, str) else x[0] for x in inputs]
        pairs = None if all(isinstance(x, str) for x in inputs) else [None if isinstance(x, str) else x[1] for x in inputs]
        model.eval()
        device = next(model.parameters()).device
        # Sort by length so each batch pads little; results are put back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        results: list[dict | None] = [None] * len(texts)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx],
                [pairs[i] for i in idx] if pairs else None,
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            scores = self.scores(model(**batch).logits, state).cpu()
            for row, i in enumerate(idx):
                results[i] = self._format(scores[row], state)
        return results  # type: ignore[return-value]

    def prediction_decision(self, prediction: dict):
        # a regression's value has no label to agree on: two values within 1e-2 count as the same
        if "value" in prediction:
            return round(prediction["value"], 2)
        return super().prediction_decision(prediction)

    def _format(self, scores: torch.Tensor, state: dict) -> dict:
        problem = state.problem_type
        if problem == "regression":
            return {"value": float(scores)}
        named = {label: float(s) for label, s in zip(state.labels, scores.tolist())}
        if problem == "multi_label":
            return {"labels": [k for k, v in named.items() if v >= state.threshold], "scores": named}
        best = max(named, key=named.get)
        return {"label": best, "score": named[best], "scores": named}


def _class_weights(cfg: ClassificationTaskConfig, state: dict, train: datasets.Dataset) -> torch.Tensor | None:
    labels = state.labels
    if cfg.class_weights == "none":
        return None
    if isinstance(cfg.class_weights, list):
        if len(cfg.class_weights) != len(labels):
            raise DataError(
                f"task.class_weights: expected {len(labels)} weights (one per label: {', '.join(labels)}), "
                f"found {len(cfg.class_weights)}; list one weight per label in that order, or use task.class_weights=balanced"
            )
        return torch.tensor(cfg.class_weights, dtype=torch.float32)
    targets = np.asarray(train["labels"])
    if state.problem_type == "multi_label":
        positives = targets.sum(0).clip(min=1)
        return torch.tensor((len(targets) - positives) / positives, dtype=torch.float32)
    counts = np.bincount(targets, minlength=len(labels)).clip(min=1)
    return torch.tensor(len(targets) / (len(labels) * counts), dtype=torch.float32)


def _duplicate_warnings(cfg: ClassificationTaskConfig, tables: dict[str, Table]) -> list[str]:
    if "validation" not in tables:
        return []

    def keys(frame: pd.DataFrame) -> pd.Series:
        key = frame[cfg.text_column].astype(str).str.strip()
        if cfg.text_pair_column:
            key = key + "\x1f" + frame[cfg.text_pair_column].astype(str).str.strip()
        return key

    train_keys = set(keys(tables["train"].frame))
    overlap = [i for i, k in enumerate(keys(tables["validation"].frame)) if k in train_keys]
    if not overlap:
        return []
    return [
        f"{len(overlap)} validation texts also occur in train (e.g. {tables['validation'].where(overlap[0])}); "
        "validation scores will be optimistic — de-duplicate the splits"
    ]
