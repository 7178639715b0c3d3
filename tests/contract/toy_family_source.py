'''A toy family written only from CONTRIBUTING.md's "Adding a task family" and tasks/base.py: each
sentence's score (a number) regressed from its text. test_toy_family.py copies this file into a
temporary package, registers it and runs the contract suite on it. It imports shared code only.'''

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tunesmith.config.task_base import TaskConfigBase
from tunesmith.tasks.contract import ContractExamples, data_section, tiny_checkpoint, write_jsonl
from tunesmith.tasks.registry import Family


class ToyScoreTaskConfig(TaskConfigBase):
    name: Literal["toy_score"] = "toy_score"
    max_length: int = 32
    text_column: str = "text"
    score_column: str = "score"


FAMILY = Family(name="toy_score", config=ToyScoreTaskConfig, task=f"{__name__}:ToyScoreTask",
                examples=f"{__name__}:contract_examples")


def _task_class():
    # Defined on first use: the family module itself imports no torch (CONTRIBUTING, step 1).
    import datasets
    import torch

    from tunesmith.data.tokenize import cached_map
    from tunesmith.errors import DataError, summarise
    from tunesmith.tasks.base import Losses, Task, TaskState

    @dataclass(frozen=True)
    class ToyScoreState(TaskState):
        mean: float

    class Accumulator:
        def __init__(self) -> None:
            self.squared, self.loss_sum, self.units, self.count = 0.0, 0.0, 0.0, 0

        def update(self, scores, labels, loss_sums, loss_units) -> None:
            self.squared += float(((scores.double() - labels.double()) ** 2).sum())
            self.loss_sum += float(loss_sums.double().sum())
            self.units += float(loss_units.double().sum())
            self.count += len(scores)

    class ToyScoreTask(Task):
        name = "toy_score"
        auto_model_class = "AutoModelForSequenceClassification"
        peft_task_type = "SEQ_CLS"
        pipeline_tag = "text-classification"
        state_type = ToyScoreState
        sequence_head = True

        def stratify_key(self, cfg):
            return lambda frame: None

        def _problems(self, cfg, table) -> list[str]:
            frame, problems = table.frame, []
            for column in (cfg.text_column, cfg.score_column):
                if column not in frame.columns:
                    return [f"{table.source}: no column '{column}' (found: {', '.join(map(str, frame.columns))}); "
                            f"expected a text and a number per row, or set task.{'text' if column == cfg.text_column else 'score'}_column"]
            for i, value in enumerate(frame[cfg.score_column]):
                try:
                    ok = math.isfinite(float(value))
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    problems.append(f"{table.where(i)}: column '{cfg.score_column}' is {value!r}; expected a finite number")
            return problems

        def preflight(self, cfg, tables):
            problems = [p for table in tables.values() for p in self._problems(cfg, table)]
            if problems:
                raise DataError(summarise(problems))
            return ToyScoreState(mean=float(tables["train"].frame[cfg.score_column].astype(float).mean())), []

        def preflight_eval(self, cfg, state, table) -> None:
            problems = self._problems(cfg, table)
            if problems:
                raise DataError(summarise(problems))

        def tokenizer_warnings(self, cfg, tables, tokenizer) -> list[str]:
            return []

        def encode(self, cfg, table, tokenizer, state):
            columns = {"text": table.frame[cfg.text_column].astype(str).tolist()}
            if cfg.score_column in table.frame.columns:
                columns["labels"] = table.frame[cfg.score_column].astype(float).tolist()

            def tokenize(batch):
                encoded = tokenizer(batch["text"], truncation=True, max_length=cfg.max_length)
                encoded["length"] = [len(ids) for ids in encoded["input_ids"]]
                return encoded

            return cached_map(datasets.Dataset.from_dict(columns), tokenize, tokenizer, key_extra=f"toy-{cfg.max_length}",
                              remove_columns=["text"])

        def model_kwargs(self, state) -> dict:
            return {"problem_type": "regression", "id2label": {0: "score"}, "label2id": {"score": 0}}

        def loss_fn(self, cfg, state, train):
            return lambda logits, labels: Losses.per_example((logits.squeeze(-1).float() - labels.float()) ** 2)

        def new_accumulator(self, state, references=None):
            return Accumulator()

        def scores(self, logits, state):
            return logits.squeeze(-1).float()

        def compute_metrics(self, accumulator, state) -> dict:
            n = max(accumulator.count, 1)
            return {"loss": accumulator.loss_sum / accumulator.units if accumulator.units else 0.0,
                    "mse": accumulator.squared / n, "samples": accumulator.count}

        def default_metric(self, state):
            return "mse", False

        @torch.inference_mode()
        def predict(self, model, tokenizer, inputs, state, batch_size: int = 64, max_length: int = 32) -> list[dict]:
            model.eval()
            device = next(model.parameters()).device
            results = []
            for start in range(0, len(inputs), batch_size):
                batch = tokenizer(list(inputs[start:start + batch_size]), truncation=True, max_length=max_length,
                                  padding=True, return_tensors="pt").to(device)
                results += [{"score": float(v)} for v in model(**batch).logits.squeeze(-1).float().cpu()]
            return results

    return ToyScoreTask


def __getattr__(name: str):
    if name == "ToyScoreTask":
        return _task_class()
    raise AttributeError(name)


WORDS = ["one", "two", "three", "four", "cats", "dogs", "sleep", "run", "here", "now"]


def _rows(n: int) -> list[dict]:
    return [{"text": f"{WORDS[4 + i % 2]} {WORDS[6 + i % 2]} {WORDS[i % 4]}", "score": float(i % 4)} for i in range(n)]


def _data(folder: Path) -> dict:
    rows = _rows(16)
    return data_section(folder, rows, rows[:8])


def _bad_data(folder: Path) -> dict:
    rows = [*_rows(7), {"text": "cats run", "score": "lots"}]
    return {"train_file": str(write_jsonl(folder / "bad.jsonl", rows)), "validation_split": 0.25}


def contract_examples() -> ContractExamples:
    return ContractExamples(build_model=lambda folder: tiny_checkpoint(folder, WORDS), write_data=_data,
                            write_bad_data=_bad_data, task={"name": "toy_score", "max_length": 32},
                            predict_inputs=["cats sleep three", "dogs run one"])
