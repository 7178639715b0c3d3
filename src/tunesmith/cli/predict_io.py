"""Inputs for `tunesmith predict`: --text options, a data file, a .txt file, or stdin lines."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

from tunesmith.config import RunConfig
from tunesmith.data.loaders import DELIMITERS, Table, _decode, read_delimited_text
from tunesmith.errors import DataError, summarise

STDIN = "stdin"  # how messages name piped input


def _split_pair(line: str, has_pair: bool) -> str | tuple[str, str]:
    # Sentence-pair models read "text<TAB>pair" lines.
    if has_pair and "\t" in line:
        first, second = line.split("\t", 1)
        return first, second
    return line


def read_inputs(
    cfg: RunConfig,
    input_file: Path | None,
    texts: list[str] | None,
    questions: list[str] | None = None,
    contexts: list[str] | None = None,
) -> tuple[list, list[dict]]:
    """Returns (model inputs, records echoed in the output)."""
    if cfg.task.name == "question_answering":
        return _question_inputs(cfg, input_file, texts, questions or [], contexts or [])
    if questions or contexts:
        raise DataError(f"--question/--context apply to question answering runs only (this run: {cfg.task.name}); use --text or --input")
    text_column = getattr(cfg.task, "text_column", "text")
    pair_column = getattr(cfg.task, "text_pair_column", None)
    tokens_column = getattr(cfg.task, "tokens_column", None)  # token classification: pre-tokenized input
    if texts:
        lines = list(texts)
    elif input_file is not None and input_file.suffix.lower() != ".txt":
        table = _reader(cfg)(input_file, cfg.data.encoding, "--input")
        return _table_inputs(table, str(input_file), text_column, pair_column, tokens_column)
    elif input_file is not None:
        if not input_file.exists():
            raise DataError(f"--input: file '{input_file}' not found; check the path")
        lines = _decode(input_file, cfg.data.encoding).splitlines()
    else:
        if sys.stdin.isatty():
            raise DataError("no input: pass --text 'some text', --input FILE, or pipe lines on stdin")
        piped = sys.stdin.read().removeprefix("\ufeff")
        if _table_header(piped, text_column):
            # `cat new.csv | tunesmith predict RUN`: the file's rows, as --input new.csv reads them, not its lines.
            table = read_delimited_text(piped, STDIN, ",")
            return _table_inputs(table, STDIN, text_column, pair_column, tokens_column)
        lines = piped.splitlines()
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise DataError("no input texts: expected at least one non-empty line, found only empty lines; pass some text")
    inputs = [_split_pair(line, bool(pair_column)) for line in lines]
    records = [{text_column: x} if isinstance(x, str) else {text_column: x[0], pair_column: x[1]} for x in inputs]
    return inputs, records


def _table_header(text: str, text_column: str) -> bool:
    """Whether piped text starts with a CSV/TSV header naming the run's text column (`text,label`,
    `id<TAB>text`, or just `text` above one text per line), rather than with a text to predict for."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    for sep in DELIMITERS:
        try:
            header = next(csv.reader([first], delimiter=sep), [])
        except csv.Error:
            continue
        # Column names carry no surrounding spaces: a text such as `text, or not` is not a header.
        names_only = all(name == name.strip() for name in header)
        if text_column in header and names_only and (len(header) > 1 or first.strip() == text_column):
            return True
    return False


def _table_inputs(
    table: Table, source: str, text_column: str, pair_column: str | None, tokens_column: str | None
) -> tuple[list, list[dict]]:
    """Inputs and echoed records from a table (an --input file, or a table piped on stdin)."""
    for line in table.notes:
        logging.getLogger("tunesmith").info(line)
    column = "tokens" if "fields" in table.frame.columns else tokens_column  # CoNLL files: their token column
    if column and column in table.frame.columns:
        inputs = [[str(t) for t in tokens] for tokens in table.frame[column]]
        return inputs, [{} for _ in inputs]
    if text_column not in table.frame.columns:
        raise DataError(
            f"{source}: missing column '{text_column}' (the run's task.text_column); columns found: "
            + ", ".join(map(str, table.frame.columns))
            + f"; rename the text column to '{text_column}', or pass a .txt file with one text per line"
        )
    frame = table.frame.fillna("")
    if pair_column and pair_column in frame.columns:
        inputs = list(zip(frame[text_column].astype(str), frame[pair_column].astype(str)))
        records = [{text_column: a, pair_column: b} for a, b in inputs]
        return inputs, records
    inputs = frame[text_column].astype(str).tolist()
    return inputs, [{text_column: t} for t in inputs]


def _question_inputs(
    cfg: RunConfig, input_file: Path | None, texts: list[str] | None, questions: list[str], contexts: list[str]
) -> tuple[list, list[dict]]:
    """(question, context) pairs from --question/--context, or from a file with the run's question and
    context columns (SQuAD JSON too); records echo the id (when the file has one) and the question."""
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
    from tunesmith.tasks.question_answering.task import read_examples

    examples, problems, _, _ = read_examples(cfg.task, _reader(cfg)(input_file, cfg.data.encoding, "--input"), labelled=False)
    if problems:
        raise DataError(summarise(problems))
    inputs = [(e.question, e.context) for e in examples]
    return inputs, [({"id": e.id} if e.id is not None else {}) | {"question": e.question} for e in examples]


def _reader(cfg: RunConfig):
    from tunesmith.tasks import get_task

    return get_task(cfg.task.name).reader(cfg.task)


def render_predictions(records: list[dict], predictions: list[dict], fmt: str) -> list[str]:
    """Output lines: `jsonl` (the input record with its prediction), or `conll` (token<TAB>tag, a blank
    line after each sentence; token classification runs)."""
    if fmt == "jsonl":
        return [json.dumps({**record, **prediction}, ensure_ascii=False) for record, prediction in zip(records, predictions)]
    if fmt != "conll":
        raise DataError(f"--format: expected jsonl or conll, found '{fmt}'")
    lines: list[str] = []
    for prediction in predictions:
        if "tokens" not in prediction or "tags" not in prediction:
            raise DataError("--format conll: these predictions have no tokens and tags (not a token classification run); use --format jsonl")
        lines += [f"{token}\t{tag}" for token, tag in zip(prediction["tokens"], prediction["tags"])] + [""]
    return lines
