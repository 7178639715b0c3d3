"""Inputs for `tunesmith predict`: --text options, a data file, a .txt file, or stdin lines."""

from __future__ import annotations

import sys
from pathlib import Path

from .config import RunConfig
from .data.loaders import _decode, read_file
from .errors import DataError


def _split_pair(line: str, has_pair: bool) -> str | tuple[str, str]:
    # Sentence-pair models read "text<TAB>pair" lines.
    if has_pair and "\t" in line:
        first, second = line.split("\t", 1)
        return first, second
    return line


def read_inputs(cfg: RunConfig, input_file: Path | None, texts: list[str] | None) -> tuple[list, list[dict]]:
    """Returns (model inputs, records echoed in the output)."""
    text_column = getattr(cfg.task, "text_column", "text")
    pair_column = getattr(cfg.task, "text_pair_column", None)
    if texts:
        lines = list(texts)
    elif input_file is not None and input_file.suffix.lower() != ".txt":
        table = read_file(input_file, cfg.data.encoding, field="--input")
        if text_column not in table.frame.columns:
            raise DataError(
                f"{input_file}: missing column '{text_column}' (the run's task.text_column); columns found: "
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
    elif input_file is not None:
        if not input_file.exists():
            raise DataError(f"--input: file '{input_file}' not found; check the path")
        lines = _decode(input_file, cfg.data.encoding).splitlines()
    else:
        if sys.stdin.isatty():
            raise DataError("no input: pass --text 'some text', --input FILE, or pipe lines on stdin")
        lines = sys.stdin.read().splitlines()
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise DataError("no input texts: expected at least one non-empty line, found only empty lines; pass some text")
    inputs = [_split_pair(line, bool(pair_column)) for line in lines]
    records = [{text_column: x} if isinstance(x, str) else {text_column: x[0], pair_column: x[1]} for x in inputs]
    return inputs, records
