"""Rows to examples for the causal-LM family: every conversational format (messages, ShareGPT, Alpaca,
prompt/completion, TRL's conversational prompt/completion) becomes one shape, a list of
`{"role": "system"|"user"|"assistant", "content": str}` turns, so chat.py renders one thing only.

`.txt` files and folders of them are format `text`: each file is split on blank lines into documents
(lines inside a document joined with "\\n"), the convention of plain-text corpora; HF `run_clm` joins every line
and cuts blocks, which is the same once documents are joined with EOS and packed.

One function (`_row`) reads a row and names its problems, so `check_conversations` (preflight) and
`read_conversations` (tokenization) can never disagree about which rows are usable.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from tunesmith.data.loaders import Table, _decode, _lines, read_file
from tunesmith.errors import DataError, shown

Conversation = list[dict[str, str]]

# ShareGPT exports name the assistant after the model they came from; `model` is Gemini's.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "model": "assistant", "system": "system"}


def turns_column(cfg, fmt: str) -> str:
    return cfg.messages_column or ("conversations" if fmt == "sharegpt" else "messages")


def format_needs(cfg) -> dict[str, list[str]]:
    """The columns each format reads."""
    return {"messages": [cfg.messages_column or "messages"], "sharegpt": [cfg.messages_column or "conversations"],
            "alpaca": ["instruction", "output"], "prompt_completion": [cfg.prompt_column, cfg.completion_column],
            "text": [cfg.text_column]}


def detect_format(cfg, columns: list[str], source: str) -> str:
    """`cfg.format`, or for `auto` the first format whose columns are all present (in the order of `format_needs`)."""
    if cfg.format != "auto":
        return cfg.format
    found = {str(c) for c in columns}
    for fmt, needed in format_needs(cfg).items():
        if all(c in found for c in needed):
            return fmt
    wanted = "; ".join(f"{fmt}: {', '.join(needed)}" for fmt, needed in format_needs(cfg).items())
    raise DataError(f"{source}: cannot tell the data format from its columns ({', '.join(map(shown, columns)) or 'none'}); "
                    f"expected the columns of one format ({wanted}); rename the columns or set task.format and its *_column keys")


def _empty(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_list(value, what: str):
    """A cell of turns as a Python list: JSON text (a CSV cell) parsed, Parquet's numpy arrays listed."""
    if _empty(value):
        raise ValueError(f"{what} is empty")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise ValueError(f"{what} is text that is not JSON ({err.msg} at character {err.pos})") from None
    if hasattr(value, "tolist") and not isinstance(value, (dict, str)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, dict) for t in value):
        raise ValueError(f"{what} is {shown(repr(value))[:80]}, expected a list of {{role, content}} turns")
    return list(value)


def _turn(raw: dict, where: str) -> dict[str, str]:
    """One turn in either spelling: {role, content} or ShareGPT's {from, value}."""
    role = raw.get("role", raw.get("from"))
    content = raw.get("content", raw.get("value"))
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise ValueError(f"{where} has role {shown(repr(role))}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"{where} content is {shown(repr(content))[:60]}, not text")
    return {"role": ROLES[role.lower()], "content": content}


def _text(cell, what: str) -> str:
    if _empty(cell) or (isinstance(cell, str) and not cell.strip()):
        raise ValueError(f"{what} is empty")
    if not isinstance(cell, str):
        raise ValueError(f"{what} is {shown(repr(cell))[:60]}, not text")
    return cell


def _turns(cell, what: str) -> Conversation:
    return [_turn(t, f"{what} turn {k + 1}") for k, t in enumerate(_as_list(cell, what))]


def _alpaca(row: dict) -> Conversation:
    instruction, extra = _text(row.get("instruction"), "'instruction'"), row.get("input")
    user = instruction + "\n\n" + extra if isinstance(extra, str) and extra.strip() else instruction
    system = row.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else []
    return [*head, {"role": "user", "content": user}, {"role": "assistant", "content": _text(row.get("output"), "'output'")}]


def _json_list(text: str) -> bool:
    """Whether a text cell is a JSON list (TRL's conversational prompt saved in a CSV), not a prompt like "[INST] hi"."""
    try:
        return isinstance(json.loads(text), list)
    except ValueError:
        return False


def _prompt_completion(cfg, row: dict) -> Conversation:
    """Standard (two strings) or TRL's conversational prompt/completion (two lists of turns)."""
    prompt, completion = row.get(cfg.prompt_column), row.get(cfg.completion_column)
    p_name, c_name = f"'{cfg.prompt_column}'", f"'{cfg.completion_column}'"
    if isinstance(prompt, str) and not _json_list(prompt):
        return [{"role": "user", "content": _text(prompt, p_name)}, {"role": "assistant", "content": _text(completion, c_name)}]
    return [*_turns(prompt, p_name), *_turns(completion, c_name)]


def _conversation(cfg, row: dict, fmt: str) -> Conversation:
    if fmt == "alpaca":
        turns = _alpaca(row)
    elif fmt == "prompt_completion":
        turns = _prompt_completion(cfg, row)
    else:
        column = turns_column(cfg, fmt)
        turns = _turns(row.get(column), f"'{column}'")
    if cfg.system_prompt and not any(t["role"] == "system" for t in turns):
        turns = [{"role": "system", "content": cfg.system_prompt}, *turns]
    return turns


def _learnable(turns: Conversation) -> None:
    assistant = [k for k, t in enumerate(turns) if t["role"] == "assistant"]
    if not assistant:
        raise ValueError("has no assistant turn (nothing to learn)")
    for k in assistant:
        if not turns[k]["content"].strip():
            raise ValueError(f"turn {k + 1} (assistant) is empty")


def _missing(cfg, table: Table, fmt: str) -> list[str]:
    columns = [str(c) for c in table.frame.columns]
    needed = format_needs(cfg)[fmt] if fmt != "prompt_completion" else [cfg.prompt_column, cfg.completion_column]
    return [f"{table.source}: missing column '{shown(c)}' (format {fmt}); columns found: {', '.join(map(shown, columns))}; "
            f"rename the column or set task.format / task.*_column" for c in needed if c not in columns]


def _rows(cfg, table: Table, fmt: str) -> list[tuple[Conversation | None, str | None]]:
    """(conversation, None) or (None, problem) for each row, in order."""
    return [_row(cfg, table, i, {str(k): v for k, v in row.items()}, fmt)
            for i, row in enumerate(table.frame.to_dict("records"))]


def _row(cfg, table: Table, i: int, row: dict, fmt: str) -> tuple[Conversation | None, str | None]:
    try:
        turns = _conversation(cfg, row, fmt)
        _learnable(turns)
    except ValueError as err:
        return None, f"{table.where(i)}: {err}; fix the row or remove it"
    return turns, None


def check_conversations(cfg, table: Table, fmt: str) -> list[str]:
    """Every problem of a table's rows, one line each naming file, row and field. Role order is the chat
    template's business (it raises; chat.py reports the row)."""
    missing = _missing(cfg, table, fmt)
    if missing or fmt == "text":
        return missing
    return [problem for _, problem in _rows(cfg, table, fmt) if problem]


def read_conversations(cfg, table: Table, fmt: str) -> list[Conversation | None]:
    """One conversation per row, in order; None for a row `check_conversations` reports."""
    return [turns for turns, _ in _rows(cfg, table, fmt)]


def read_texts(cfg, table: Table) -> list[str]:
    """The non-empty documents of format text; empty rows are left out (the caller counts them as
    `len(table.frame) - len(result)`), not errors: blank lines are common in corpora."""
    if cfg.text_column not in table.frame.columns:
        raise DataError(_missing(cfg, table, "text")[0])
    cells = table.frame[cfg.text_column]
    return [c if isinstance(c, str) else str(c) for c in cells if not _empty(c) and str(c).strip()]


# --------------------------------------------------------------------------- .txt files and folders


def _documents(text: str) -> list[tuple[int, str]]:
    """(first line, text) of each blank-line-separated document."""
    found, start, lines = [], None, []
    for number, line in enumerate(_lines(text) + [""], start=1):
        if line.strip():
            start = number if start is None else start
            lines.append(line)
        elif lines:
            found.append((start, "\n".join(lines)))
            start, lines = None, []
    return found


def read_text_file(path, encoding: str = "utf-8", field: str = "data.train_file", column: str = "text") -> Table:
    """The family's `Task.reader`: a `.txt` file or a folder of them (every `*.txt` below it, sorted) as a table
    of documents in `column` (use functools.partial for `task.text_column`); other files go to `read_file`.
    Folders are refused by `read_file`, so the folder check happens here."""
    from tunesmith.paths import check_data_path

    path = check_data_path(path, field)
    if path.is_dir() and not any(path.rglob("*.txt")):
        return read_file(path, encoding, field)  # a save_to_disk folder or an error, as for every family
    if not path.is_dir() and path.suffix.lower() != ".txt":
        return read_file(path, encoding, field)
    # Hidden folders (.git, .ipynb_checkpoints) hold copies, not corpus.
    files = sorted(f for f in path.rglob("*.txt") if not any(p.startswith(".") for p in f.relative_to(path).parts)) \
        if path.is_dir() else [path]
    rows, labels = [], []
    for file in files:
        name = file.relative_to(path).as_posix() if path.is_dir() else ""
        for line, doc in _documents(_decode(file, encoding)):
            rows.append(doc)
            labels.append(f"{name} line {line}".strip())
    if not rows:
        raise DataError(f"{field}: '{path}' holds no text; expected UTF-8 text (documents separated by blank lines)")
    return Table(pd.DataFrame({column: rows}), str(path), lambda i: labels[i],
                 notes=[f"{path}: {len(rows)} documents from {len(files)} .txt file(s), split on blank lines"])
