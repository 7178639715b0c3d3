"""Source/target pairs from a table: two text columns, or the `{"translation": {"en": ..., "fr": ...}}` rows of
translation datasets (with task.source_lang / task.target_lang), checked row by row before any model loads."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tunesmith.data.loaders import Table
from tunesmith.errors import shown
from tunesmith.tasks.seq2seq.config import Seq2SeqTaskConfig

TRANSLATION = "translation"


@dataclass(frozen=True)
class Pairs:
    sources: list[str]
    targets: list[str] | None  # None: a table without targets (prediction input)


def _translation_rows(cfg: Seq2SeqTaskConfig, table: Table) -> bool:
    columns = table.frame.columns
    return cfg.source_column not in columns and TRANSLATION in columns and bool(cfg.source_lang and cfg.target_lang)


def _cells(cfg: Seq2SeqTaskConfig, table: Table, side: str) -> tuple[list, str]:
    """A side's cells and how they are named in messages."""
    if _translation_rows(cfg, table):
        lang = cfg.source_lang if side == "source" else cfg.target_lang
        return [row.get(lang) if isinstance(row, dict) else row for row in table.frame[TRANSLATION]], f"{TRANSLATION}.{lang}"
    column = cfg.source_column if side == "source" else cfg.target_column
    return list(table.frame[column]), column


def _as_text(value) -> str:
    # A number in a JSON file is text that happens to look like one (a target "42"); ints stay ints.
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _cell_problem(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "is empty"
    if isinstance(value, str):
        return "is empty" if not value.strip() else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"is {value!r:.60}, not text"
    return None


def _missing_columns(cfg: Seq2SeqTaskConfig, table: Table, need_targets: bool) -> list[str]:
    columns = [str(c) for c in table.frame.columns]
    if _translation_rows(cfg, table):
        return []
    wanted = [(cfg.source_column, "task.source_column")] + ([(cfg.target_column, "task.target_column")] if need_targets else [])
    found = ", ".join(map(shown, columns)) or "(none)"
    hint = ("; its `translation` rows need task.source_lang and task.target_lang (e.g. en and fr)"
            if TRANSLATION in columns else "")
    return [f"{table.source}: missing column '{shown(column)}' ({key}); columns found: {found}; rename the column or set "
            f"{key}=<one of them>{hint}" for column, key in wanted if column not in columns]


def check_table(cfg: Seq2SeqTaskConfig, table: Table, need_targets: bool = True) -> list[str]:
    """Every problem of a table, one line each naming the file, row and field."""
    missing = _missing_columns(cfg, table, need_targets)
    if missing:
        return missing
    problems = []
    for side in ("source", "target") if need_targets else ("source",):
        cells, field = _cells(cfg, table, side)
        for i, value in enumerate(cells):
            problem = _cell_problem(value)
            if problem:
                problems.append(f"{table.where(i)}: {side} '{field}' {problem}; expected text; fill it in or remove the row")
    return problems


def read_pairs(cfg: Seq2SeqTaskConfig, table: Table, need_targets: bool = True) -> Pairs:
    """The texts of a checked table; targets None when the table has none and they are not needed."""
    sources = [_as_text(v) for v in _cells(cfg, table, "source")[0]]
    if not need_targets and not _translation_rows(cfg, table) and cfg.target_column not in table.frame.columns:
        return Pairs(sources, None)
    return Pairs(sources, [_as_text(v) for v in _cells(cfg, table, "target")[0]])
