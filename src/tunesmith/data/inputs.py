"""Inputs for `predict` from the command line: --text options, a data file, a .txt file, or stdin lines.

`read_inputs` asks the run's task (`Task.predict_inputs`); most families read texts through
`read_text_inputs`, parameterised by their columns."""

from __future__ import annotations

import csv
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from tunesmith.config.schema import RunConfig
from tunesmith.data.loaders import DELIMITERS, Table, _decode, read_delimited_text
from tunesmith.errors import DataError

STDIN = "stdin"  # how messages name piped input


def _split_pair(line: str, has_pair: bool) -> str | tuple[str, str]:
    # Sentence-pair models read "text<TAB>pair" lines.
    if has_pair and "\t" in line:
        first, second = line.split("\t", 1)
        return first, second
    return line


def read_inputs(cfg: RunConfig, input_file: Path | None, texts: list[str] | None, options: dict | None = None) -> tuple[list, list[dict]]:
    """(model inputs, records echoed in the output) for the run's task; `options`: the task family's own
    input options that were given (e.g. questions and contexts)."""
    from tunesmith.tasks import get_task

    return get_task(cfg.task.name).predict_inputs(cfg.task, cfg.data.encoding, input_file, texts, options or {})


@dataclass(frozen=True)
class InputColumns:
    """Where a family's inputs are in a table: the text, a second text of a pair, or pre-split tokens."""

    text: str = "text"
    pair: str | None = None
    tokens: str | None = None


def read_text_inputs(reader, encoding: str, input_file: Path | None, texts: list[str] | None,
                     columns: InputColumns) -> tuple[list, list[dict]]:
    """Texts (or text pairs, or token lists) from --text values, a table file (read by the task's `reader`),
    a .txt file with one text per line, or stdin (lines, or a piped table with the text column)."""
    text_column, pair_column, tokens_column = columns.text, columns.pair, columns.tokens
    if texts:
        lines = list(texts)
    elif input_file is not None and input_file.suffix.lower() != ".txt":
        table = reader(input_file, encoding, "--input")
        return _table_inputs(table, str(input_file), text_column, pair_column, tokens_column)
    elif input_file is not None:
        if not input_file.exists():
            raise DataError(f"--input: file '{input_file}' not found; check the path")
        lines = _decode(input_file, encoding).splitlines()
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
