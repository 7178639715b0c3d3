"""Extractive question answering: the answer is a span of the context (SQuAD v1.1 and v2.0).

Data: SQuAD JSON (`data.squad`: `data` -> `paragraphs` -> `qas`), or flat JSONL/CSV/Parquet rows with a
question, a context and `answers` (`{"text": [...], "answer_start": [...]}`, character offsets; a JSON
string in a CSV cell). Questions without answers (v2 `is_impossible`, or empty answer lists) make the run
SQuAD v2 (`task.version_2_with_negative: auto`): the model may then answer nothing.

Answer offsets: an `answer_start` that points at its text once surrounding whitespace is stripped from
both (the official dev sets hold answers such as `" 1990"` whose offset is a character early) is repaired
with a note; other wrong offsets in training data are errors unless `task.repair`. Evaluation data
(validation, test, `tunesmith eval`) needs only the answer texts, as the metrics compare texts: a missing
or wrong offset there is replaced by the occurrence of the text nearest to it, with a note.

Contexts longer than a window become overlapping windows (`qa.encode_windows`: the tokenizer's overflow
with `doc_stride` tokens of overlap and its offset mapping). A window's labels are the answer's first
and last tokens when it holds the whole answer, else its CLS token. Evaluation folds every batch of
windows into each question's best span at once (`qa.reduce_batch`) and scores exact match and F1
(`metrics.question_answering`); for v2 the no-answer threshold is then tuned on validation.
Prediction is `qa.answer`, the same code any QA model can use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch

from tunesmith.tasks.question_answering import inference as qa
from tunesmith.tasks.question_answering.config import QuestionAnsweringTaskConfig
from tunesmith.data.loaders import Table
from tunesmith.tasks.question_answering.squad import read_questions
from tunesmith.data.tokenize import cached_map
from tunesmith.errors import DataError, summarise
from tunesmith.tasks.question_answering.metrics import SpanAccumulator, best_null_threshold, score, squad_metrics
from tunesmith.tasks.base import CardSection, Losses, Task, TaskState
from tunesmith.export.layouts import OneForward
from tunesmith.tasks.question_answering.request import QuestionsRequest

ANSWERS_SHAPE = '{"text": ["<answer>"], "answer_start": [<character offset>]}'
log = logging.getLogger(__name__)


@dataclass
class Example:
    id: str | None  # None where the file has no id
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, character offset); empty: the question has no answer
    where: str
    # Answers whose offset was fixed while reading, each as (answer number, text, offset as given, text, offset):
    # `trimmed` differed from the context only by surrounding whitespace; `located` (evaluation data) had a
    # missing or wrong offset and was found by its text.
    trimmed: list[tuple] = field(default_factory=list)
    located: list[tuple] = field(default_factory=list)


@dataclass
class Gold:
    """What the metrics of one encoded table need: each question's context and gold answer texts."""

    contexts: list[str]
    answers: list[list[str]]


# --------------------------------------------------------------------------- reading records


def _columns(cfg: QuestionAnsweringTaskConfig, table: Table) -> dict[str, str]:
    if table.frame.attrs.get("format") == "squad":
        return {"question": "question", "context": "context", "answers": "answers", "id": "id"}
    return {"question": cfg.question_column, "context": cfg.context_column, "answers": cfg.answers_column, "id": cfg.id_column}


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_list(value) -> list:
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    return [value]


def _offset(value) -> int | None:
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value) if value >= 0 else None
    if isinstance(value, (float, np.floating)) and float(value).is_integer() and value >= 0:
        return int(value)
    return None


def _parse_answers(
    value, where: str, column: str, offsets: bool = True
) -> tuple[list[tuple[str, int | None]] | None, str | None]:
    """(answers as (text, offset) pairs, problem). Without `offsets` (evaluation data, scored by answer
    text only) a missing or invalid `answer_start` is an offset of None, to be located by the text."""
    fix = f"expected {ANSWERS_SHAPE} (empty lists for a question without answer)"
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return None, f"{where}: column '{column}' is {value!r:.80}, not JSON; {fix}"
    if not isinstance(value, dict) or "text" not in value or ("answer_start" not in value and offsets):
        return None, f"{where}: column '{column}' is {value!r:.80}; {fix}"
    texts = _as_list(value["text"])
    starts = _as_list(value["answer_start"]) if "answer_start" in value else []
    if not offsets and len(texts) != len(starts):
        starts = [None] * len(texts)  # offsets that cannot be paired with the texts: locate every text
    if len(texts) != len(starts):
        return None, (
            f"{where}: column '{column}' has {len(texts)} answer texts but {len(starts)} answer_start offsets; "
            "expected one offset per text; make the lists the same length"
        )
    answers = []
    for k, (text, start) in enumerate(zip(texts, starts), start=1):
        if not isinstance(text, str) or not text.strip():
            return None, f"{where}: answer {k} has text {text!r:.60}; expected the answer as it appears in the context; fill it in or remove the answer"
        if _offset(start) is None and offsets:
            return None, f"{where}: answer {k} ({text!r:.60}) has answer_start {start!r:.30}; expected a character offset >= 0 (an integer)"
        answers.append((text, _offset(start)))
    return answers, None


def _text(value):
    """Text as read: numbers (a CSV column of digits) become their digits; anything else stays as it is."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) and not _missing(value):
        return str(value)
    return value


def _text_problem(where: str, column: str, kind: str, value) -> str | None:
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        return f"{where}: '{column}' is empty; expected the {kind} text; fill it in or remove the record"
    if not isinstance(value, str):
        return f"{where}: '{column}' is {value!r:.60}; expected the {kind} text (a string); write it as text"
    return None


def _nearest(context: str, text: str, start: int) -> int | None:
    """The occurrence of `text` in `context` closest to `start`, or None."""
    found, position = [], context.find(text)
    while position >= 0:
        found.append(position)
        position = context.find(text, position + 1)
    return min(found, key=lambda p: (abs(p - start), p)) if found else None


def _trimmed(context: str, text: str, start: int) -> tuple[str, int] | None:
    """(text, offset) of the answer once surrounding whitespace is stripped from the text and from the
    context where `start` points, when that is all that differs: `start` at a space before the word, a
    text with a leading or trailing space, or both (`" 1990"` with its offset one character early)."""
    core = text.strip()
    for claimed in dict.fromkeys((start, start + len(text) - len(text.lstrip()))):  # at the text, or at its first non-space
        position = claimed
        while position < len(context) and context[position].isspace():
            position += 1
        if context.startswith(core, position):
            return core, position
    return None


def _check_offsets(example: Example, repair: bool, offsets: bool = True) -> tuple[Example, list[str], list[str], int]:
    """(example with repaired offsets, problems, offset mismatches, number repaired by `task.repair`).
    Without `offsets` (evaluation data) a missing or wrong offset is no mismatch: the text is located."""
    problems, mismatches, answers, repaired = [], [], [], 0
    trimmed, located = [], []
    for k, (text, start) in enumerate(example.answers, start=1):
        if start is not None and example.context[start : start + len(text)] == text:
            answers.append((text, start))
            continue
        fixed = _trimmed(example.context, text, start) if start is not None else None
        if fixed is not None:
            answers.append(fixed)
            trimmed.append((k, text, start) + fixed)
            continue
        nearest = _nearest(example.context, text, start or 0)
        if nearest is None:
            problems.append(
                f"{example.where}: answer {k} {text!r:.60} does not occur in the context; expected a span of the context "
                "(same spelling and case); fix the answer text, or remove the answer"
            )
        elif not offsets:
            answers.append((text, nearest))
            located.append((k, text, start, text, nearest))
        elif repair:
            answers.append((text, nearest))
            repaired += 1
        else:
            there = example.context[start : start + len(text)]
            mismatches.append(
                f"{example.where}: answer {k} {text!r:.60} has answer_start {start}, but the context there reads {there!r:.60}; "
                f"expected the offset of the text (nearest occurrence: {nearest}); fix it, or set task.repair=true"
            )
    fixed = Example(example.id, example.question, example.context, answers, example.where, trimmed, located)
    return fixed, problems, mismatches, repaired


def read_examples(
    cfg: QuestionAnsweringTaskConfig, table: Table, labelled: bool = True, offsets: bool = True
) -> tuple[list[Example], list[str], list[str], int]:
    """The table's questions, and (problems, answer offset mismatches, offsets repaired by `task.repair`).
    `offsets`: whether the answer offsets must be right (training data) or only the texts (evaluation data)."""
    names, frame = _columns(cfg, table), table.frame
    wanted = [names["question"], names["context"]] + ([names["answers"]] if labelled else [])
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        setting = {names[k]: f"task.{k}_column" for k in ("question", "context", "answers")}
        found = ", ".join(map(str, frame.columns)) or "(none)"
        return [], [
            f"{table.source}: missing column '{c}' ({setting[c]}); columns found: {found}; rename the column or set {setting[c]}"
            for c in missing
        ], [], 0
    ids = frame[names["id"]] if names["id"] in frame.columns else [None] * len(frame)
    impossible = frame["is_impossible"] if "is_impossible" in frame.columns else [False] * len(frame)
    examples, problems, mismatches, repaired = [], [], [], 0
    for i, (question, context, qid, no_answer) in enumerate(zip(frame[names["question"]], frame[names["context"]], ids, impossible)):
        where = table.where(i)
        question, context = _text(question), _text(context)  # a CSV column of digits is read as numbers
        bad = [p for p in (_text_problem(where, names[k], k, v) for k, v in (("question", question), ("context", context))) if p]
        if bad:
            problems += bad
            continue
        answers: list[tuple[str, int]] = []
        if labelled:
            value = frame[names["answers"]].iloc[i]
            if _missing(value):
                problems.append(f"{where}: no '{names['answers']}'; expected {ANSWERS_SHAPE} (empty lists for a question without answer)")
                continue
            answers, problem = _parse_answers(value, where, names["answers"], offsets)
            if problem:
                problems.append(problem)
                continue
            if str(no_answer).strip().lower() in ("true", "1") and answers:  # SQuAD's bool, or a CSV cell
                problems.append(
                    f"{where}: is_impossible is true but the record has {len(answers)} answer(s); expected no answers for an "
                    "unanswerable question; set is_impossible to false, or empty the answers"
                )
                continue
        example = Example(None if _missing(qid) else str(qid), question, context, answers, where)
        example, found, wrong, fixed = _check_offsets(example, cfg.repair, offsets)
        problems += found
        mismatches += wrong
        repaired += fixed
        if not found and not wrong:
            examples.append(example)
    return examples, problems, mismatches, repaired


def _offset_problems(mismatches: list[str], counts: Counter) -> list[str]:
    """A count line first (how many, per file), then the mismatches themselves."""
    if not mismatches:
        return []
    per_file = ", ".join(f"{source}: {n}" for source, n in counts.items())
    head = (
        f"{len(mismatches)} answers have an answer_start that does not point at their text ({per_file}); "
        "set task.repair=true to move each to the nearest occurrence of its text, or fix the offsets"
    )
    return [head] + mismatches


def _offset_notes(examples: list[Example]) -> list[str]:
    """Counted notes on the offsets fixed while reading, each with its first case."""
    notes = []
    trimmed = [(e, fix) for e in examples for fix in e.trimmed]
    if trimmed:
        e, (k, text, start, core, position) = trimmed[0]
        notes.append(
            f"repaired {len(trimmed)} answer{'s' if len(trimmed) > 1 else ''} whose text or offset differed only by surrounding "
            f"whitespace (e.g. {e.where}: answer {k} {text!r:.60} at {start}, read as {core!r:.60} at {position})"
        )
    located = [(e, fix) for e in examples for fix in e.located]
    if located:
        e, (k, text, start, _, position) = located[0]
        given = "no answer_start" if start is None else f"answer_start {start}"
        many = len(located) > 1
        notes.append(
            f"located {len(located)} evaluation answer{'s' if many else ''} by {'their' if many else 'its'} "
            f"text: the answer_start was missing or did not point at the text (e.g. {e.where}: answer {k} {text!r:.60} "
            f"has {given}, found at {position}); evaluation compares answer texts only, so nothing needs fixing"
        )
    return notes


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class QuestionAnsweringState(TaskState):
    version_2: bool  # questions may have no answer (SQuAD v2)
    null_score_threshold: float  # no-answer logit margin over the best span above which the answer is empty (tuned)
    doc_stride: int
    max_answer_length: int
    n_best_size: int


class QuestionAnsweringTask(Task):
    request_model = QuestionsRequest
    onnx_layout = OneForward(("start_logits", "end_logits"))
    name = "question_answering"
    auto_model_class = "AutoModelForQuestionAnswering"
    peft_task_type = "QUESTION_ANS"
    state_type = QuestionAnsweringState
    pipeline_tag = "question-answering"

    def reader(self, cfg: QuestionAnsweringTaskConfig):
        return read_questions

    def collator(self, tokenizer, model=None):
        return qa.WindowCollator(tokenizer)

    def split_batch(self, batch: dict):
        return qa.split_batch(batch)

    def logits(self, outputs) -> torch.Tensor:
        return qa.stacked_logits(outputs)

    def stratify_key(self, cfg):
        return lambda frame: None

    # ------------------------------------------------------------------ preflight

    def _read_all(self, cfg, tables: dict[str, Table]) -> tuple[dict[str, list[Example]], list[str], int]:
        """Examples by split, notes, offsets repaired by `task.repair`; raises the problems found. Only the
        training split's offsets must be right: they become the labels (the others are scored by text)."""
        examples, problems, mismatches, repaired, counts = {}, [], [], 0, Counter()
        for split, table in tables.items():
            examples[split], found, wrong, fixed = read_examples(cfg, table, offsets=split == "train")
            problems += found
            mismatches += wrong
            repaired += fixed
            counts[table.source] += len(wrong)
        errors = _offset_problems(list(dict.fromkeys(mismatches)), +counts) + problems
        if errors:
            raise DataError(summarise(errors))
        return examples, _offset_notes([e for split in examples.values() for e in split]), repaired

    def preflight(self, cfg: QuestionAnsweringTaskConfig, tables: dict[str, Table]) -> tuple[dict, list[str]]:
        examples, warnings, repaired = self._read_all(cfg, tables)
        unanswerable = [e for split in examples.values() for e in split if not e.answers]
        if cfg.version_2_with_negative is False and unanswerable:
            raise DataError(summarise([
                f"{e.where}: the question has no answer, but task.version_2_with_negative is false; expected an answer; "
                "set task.version_2_with_negative=auto (or true) to train with unanswerable questions, or remove it"
                for e in unanswerable
            ]))
        version_2 = bool(unanswerable) if cfg.version_2_with_negative == "auto" else cfg.version_2_with_negative
        if repaired:
            warnings.append(f"task.repair: moved {repaired} answer_start offsets to the nearest occurrence of their answer text")
        state = QuestionAnsweringState(version_2=version_2, null_score_threshold=cfg.null_score_threshold,
                                       doc_stride=cfg.doc_stride, max_answer_length=cfg.max_answer_length,
                                       n_best_size=cfg.n_best_size)
        return state, warnings

    def preflight_eval(self, cfg: QuestionAnsweringTaskConfig, state: dict, table: Table) -> None:
        _, notes, _ = self._read_all(cfg, {"data": table})
        for note in notes:  # preflight_eval has no return channel for notes: the log is where `tunesmith eval` shows them
            log.warning(note)

    def tokenizer_warnings(self, cfg, tables: dict[str, Table], tokenizer) -> list[str]:
        qa.require_offsets(tokenizer)  # before any model loads; question lengths are checked by `encode`
        return []

    # ------------------------------------------------------------------ encoding

    def encode(self, cfg: QuestionAnsweringTaskConfig, table: Table, tokenizer, state: dict) -> datasets.Dataset:
        qa.require_offsets(tokenizer)
        # Offsets as lenient as evaluation data: the training split's were checked by `preflight` (which
        # refuses wrong ones there), and an evaluation table needs only its texts right.
        examples, problems, mismatches, _ = read_examples(cfg, table, offsets=False)
        if problems or mismatches:
            raise DataError(summarise(mismatches + problems))
        too_long = qa.long_questions(tokenizer, [e.question for e in examples], cfg.max_length, cfg.doc_stride)
        if too_long:
            raise DataError(summarise([
                qa.too_long_message(examples[i].where, n, tokenizer, cfg.max_length, cfg.doc_stride) for i, n in too_long
            ]))
        first = [e.answers[0] if e.answers else ("", -1) for e in examples]
        raw = datasets.Dataset.from_dict({
            "question": [e.question for e in examples],
            "context": [e.context for e in examples],
            "answer_start": [start for _, start in first],
            "answer_end": [start + len(text) if start >= 0 else -1 for text, start in first],
            "example_index": list(range(len(examples))),
        })

        def tokenize(batch: dict) -> dict:
            features = qa.encode_windows(tokenizer, batch["question"], batch["context"], cfg.max_length, cfg.doc_stride)
            for f in features:
                local = f["example_index"]
                f["start_positions"], f["end_positions"] = qa.answer_tokens(
                    f["offsets"], batch["answer_start"][local], batch["answer_end"][local], f["cls_index"]
                )
                f["example_index"] = batch["example_index"][local]
                f["length"] = len(f["input_ids"])
            return {name: [f[name] for f in features] for name in (features[0] if features else {})}

        key_extra = f"qa-{cfg.max_length}-{cfg.doc_stride}-{qa.question_first(tokenizer)}"
        return cached_map(raw, tokenize, tokenizer, key_extra=key_extra, remove_columns=raw.column_names)

    # ------------------------------------------------------------------ model, loss, metrics

    def model_kwargs(self, state: dict) -> dict:
        return {"num_labels": 2}  # start and end logits, whatever head the checkpoint had

    def loss_fn(self, cfg, state: dict, train, label_smoothing: float = 0.0) -> Callable:
        return lambda logits, labels: Losses.per_example(qa.span_loss(logits, labels))

    def references(self, cfg: QuestionAnsweringTaskConfig, table: Table, state: dict) -> Gold:
        """Each question's context and gold answers: evaluation batches hold windows, the metrics score questions."""
        examples = read_examples(cfg, table, offsets=False)[0]
        return Gold([e.context for e in examples], [[text for text, _ in e.answers] for e in examples])

    def new_accumulator(self, state: dict, references: Gold | None = None) -> SpanAccumulator:
        return SpanAccumulator(references or Gold([], []))

    def scores(self, logits: torch.Tensor, state: dict) -> torch.Tensor:
        return logits.float()

    def evaluation_batch(self, model, inputs: dict, labels, extras: dict, loss_fn, state: dict, *, tokenizer=None) -> dict:
        logits = self.logits(model(**inputs))
        losses = loss_fn(logits, labels)
        reduced = qa.window_candidates(logits, extras, state.n_best_size, state.max_answer_length,
                                       SpanAccumulator.spans_per_window)
        return {**reduced, "loss_sums": losses.sums, "loss_units": losses.units}

    def update(self, accumulator: SpanAccumulator, reduced: dict, state: dict) -> None:
        accumulator.add(reduced)

    def compute_metrics(self, accumulator: SpanAccumulator, state: dict) -> dict:
        gold = accumulator.gold or Gold([], [])
        threshold = state.null_score_threshold if state.version_2 else None
        predictions = accumulator.predictions(threshold)
        out = {"loss": accumulator.loss, "samples": len(gold.answers), "windows": accumulator.windows,
               **squad_metrics(predictions, gold.answers)}
        if state.version_2 and gold.answers:
            best, value = self._tuned(accumulator)
            out.update(best_f1=value, best_f1_threshold=best, null_score_threshold=state.null_score_threshold)
        return out

    def _tuned(self, accumulator: SpanAccumulator) -> tuple[float, float]:
        scored = score(accumulator.predictions(None), accumulator.gold.answers)
        return best_null_threshold(accumulator.null_margins(), scored.f1, scored.has_answer)

    def default_metric(self, state: dict) -> tuple[str, bool]:
        return "f1", True

    def summary_metrics(self, state: QuestionAnsweringState) -> tuple[str, ...]:
        return "exact_match", "f1"

    def after_training(self, cfg: QuestionAnsweringTaskConfig, state: dict, accumulator: SpanAccumulator) -> dict:
        if state.version_2 and cfg.tune_null_threshold and accumulator.gold and accumulator.gold.answers:
            return dataclasses.replace(state, null_score_threshold=self._tuned(accumulator)[0])
        return state

    def predict_inputs(self, cfg: QuestionAnsweringTaskConfig, encoding: str, input_file: Path | None,
                       texts: list[str] | None, options: dict) -> tuple[list, list[dict]]:
        """(question, context) pairs from --question/--context, or from a file with the run's question and
        context columns (SQuAD JSON too); records echo the id (when the file has one) and the question."""
        questions, contexts = list(options.get("question") or []), list(options.get("context") or [])
        if texts:
            raise DataError("--text: a question answering run needs a question and its context; pass --question Q --context C")
        if questions or contexts:
            if len(contexts) == 1:
                contexts = contexts * len(questions)
            if not questions or len(questions) != len(contexts):
                raise DataError(
                    f"--question/--context: expected one --context per --question, or one --context for all of them; found "
                    f"{len(questions)} --question and {len(contexts)} --context"
                )
            return list(zip(questions, contexts)), [{"question": q} for q in questions]
        if input_file is None:
            raise DataError("no input: pass --question Q --context C, or --input FILE with question and context columns (or SQuAD JSON)")
        examples, problems, _, _ = read_examples(cfg, self.reader(cfg)(input_file, encoding, "--input"), labelled=False)
        if problems:
            raise DataError(summarise(problems))
        inputs = [(e.question, e.context) for e in examples]
        return inputs, [({"id": e.id} if e.id is not None else {}) | {"question": e.question} for e in examples]

    def card(self, state: QuestionAnsweringState) -> CardSection:
        # transformers 5 has no question-answering pipeline: the card shows tunesmith's own QA inference.
        return CardSection(self.pipeline_tag, kind="SQuAD v2 (questions may have no answer)" if state.version_2 else "SQuAD v1", usage=[
            "from transformers import AutoModelForQuestionAnswering, AutoTokenizer",
            "from tunesmith.qa import answer",
            'model = AutoModelForQuestionAnswering.from_pretrained("PATH/TO/RUN/model")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/RUN/model")',
            'answer(model, tokenizer, ["Who wrote it?"], ["It was written by Ada Lovelace."])',
        ], cli_example="--question 'Who wrote it?' --context 'It was written by Ada Lovelace.'")

    # ------------------------------------------------------------------ prediction

    def predict(self, model, tokenizer, inputs: list, state: dict, batch_size: int = 64, max_length: int = 384) -> list[dict]:
        """`inputs`: (question, context) pairs or {"question", "context"} dicts. One answer per input:
        `{"answer", "score", "start", "end"}` (character offsets into the context; None for no answer)."""
        pairs = [(x["question"], x["context"]) if isinstance(x, dict) else tuple(x) for x in inputs]
        return qa.answer(
            model, tokenizer, [q for q, _ in pairs], [c for _, c in pairs], max_length=max_length,
            doc_stride=state.doc_stride, max_answer_length=state.max_answer_length, n_best_size=state.n_best_size,
            handle_impossible_answer=state.version_2, null_threshold=state.null_score_threshold, batch_size=batch_size,
        )
