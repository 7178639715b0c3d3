"""SQuAD v1.1 / v2.0 JSON into a flat table of questions.

The format: `{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers":
[{"text", "answer_start"}], "is_impossible"}]}]}]}`. One row per question, with columns `id`,
`title`, `question`, `context`, `answers` (`{"text": [...], "answer_start": [...]}`, the layout of
flat JSONL/CSV rows and of the hub's `squad` data set; None when the record has no `answers` key)
and `is_impossible`. Rows are named as the user finds them: `record 'id' (data[0].paragraphs[3].qas[1])`.

Only the structure is checked here (every level has the right type, answers are objects with a text
and an integer offset); whether an offset points at its text, and empty questions, are the task's
preflight. Only training data needs offsets (the labels are spans); a file read for evaluation or
prediction (any other config field) may lack them or have wrong ones, since SQuAD metrics compare answer
texts: there a missing or invalid `answer_start` is read as None and the task locates the text.
Any malformed input, whatever the bytes, is a `DataError` naming the file, the place and the fix —
never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tunesmith.errors import DataError, summarise
from tunesmith.data.loaders import Table, _decode, _existing_file, _json_loads, read_file

SQUAD_COLUMNS = ("id", "title", "question", "context", "answers", "is_impossible")
TRAINING_FIELD = "data.train_file"  # the one file whose answer offsets become labels
SHAPE = '{"data": [{"title": ..., "paragraphs": [{"context": ..., "qas": [{"id", "question", "answers": [{"text", "answer_start"}]}]}]}]}'


def is_squad(payload) -> bool:
    """Whether a parsed JSON document is SQuAD-shaped (articles with paragraphs), however broken inside."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        return False
    return any(isinstance(article, dict) and "paragraphs" in article for article in payload["data"])


def read_squad(path: str | Path, encoding: str = "utf-8", field: str = "data.train_file") -> Table:
    """Read a SQuAD JSON file into one row per question."""
    path = _existing_file(path, field)
    payload = _parse(path, _decode(path, encoding))
    if not is_squad(payload):
        raise DataError(f"{path}: expected SQuAD JSON {SHAPE}, found {_shape(payload)}; reshape the file, or give flat JSONL rows")
    return squad_table(payload, str(path), offsets=field == TRAINING_FIELD)


def read_questions(path: str | Path, encoding: str = "utf-8", field: str = "data.train_file") -> Table:
    """SQuAD JSON when a .json file is SQuAD-shaped; any other file as the table it is (`read_file`)."""
    candidate = Path(path)
    if candidate.suffix.lower() != ".json" or not candidate.is_file():
        return read_file(path, encoding, field)
    text = _decode(candidate, encoding)
    try:
        payload = _json_loads(text, str(candidate), "write SQuAD JSON or a list of records")
    except json.JSONDecodeError:
        return read_file(path, encoding, field)  # its messages name the broken line (and read JSON Lines)
    if not is_squad(payload):
        return read_file(path, encoding, field)
    return squad_table(payload, str(candidate), offsets=field == TRAINING_FIELD)


def _parse(path: Path, text: str):
    try:
        return _json_loads(text, str(path), f"write the file as SQuAD JSON {SHAPE}")
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: line {err.lineno} column {err.colno}: expected SQuAD JSON, found invalid JSON ({err.msg}); fix the syntax there"
        ) from None


def _shape(payload) -> str:
    if isinstance(payload, dict):
        keys = ", ".join(repr(k) for k in list(payload)[:5])
        inner = payload.get("data")
        if isinstance(inner, list):
            return f"'data' holding {len(inner)} item(s) without 'paragraphs'"
        return f"an object with keys {keys}" if keys else "an empty object"
    return f"a JSON {type(payload).__name__}" if payload is not None else "null"


def _text(value) -> bool:
    """A string that can be encoded (JSON escapes can produce lone surrogates, which no tokenizer reads)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _offset(value) -> int | None:
    """An answer offset: a non-negative integer (3.0 is accepted as 3; booleans are not numbers here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _found(value) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def squad_table(payload: dict, source: str, offsets: bool = True) -> Table:
    """The rows of a SQuAD-shaped document; every structural problem is reported (summarised) at once.
    Without `offsets` (evaluation data), an answer's `answer_start` may be missing or invalid: None."""
    rows, labels, problems = [], [], []
    for a, article in enumerate(payload["data"]):
        at = f"data[{a}]"
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
            found = _found(article.get("paragraphs")) if isinstance(article, dict) else _found(article)
            problems.append(f"{source} {at}: expected an article object with a 'paragraphs' list, found {found}; fix or remove the article")
            continue
        title = article.get("title")
        title = title if _text(title) else ""
        for p, paragraph in enumerate(article["paragraphs"]):
            at = f"data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not _text(paragraph.get("context")) or not isinstance(paragraph.get("qas"), list):
                problems.append(_paragraph_problem(source, at, paragraph))
                continue
            for q, qa in enumerate(paragraph["qas"]):
                row, label, problem = _question(source, f"{at}.qas[{q}]", qa, title, paragraph["context"], offsets)
                if problem:
                    problems.append(problem)
                else:
                    rows.append(row)
                    labels.append(label)
    if problems:
        raise DataError(summarise(problems))
    if not rows:
        raise DataError(f"{source}: no questions; expected articles with paragraphs holding 'qas' ({SHAPE})")
    frame = pd.DataFrame(rows, columns=list(SQUAD_COLUMNS))
    frame.attrs["format"] = "squad"  # column names are the format's, whatever the task config calls them
    return Table(frame, source, lambda i: labels[i])


def _paragraph_problem(source: str, at: str, paragraph) -> str:
    if not isinstance(paragraph, dict):
        return f"{source} {at}: expected a paragraph object with 'context' and 'qas', found {_found(paragraph)}; fix or remove it"
    if "context" not in paragraph:
        return f"{source} {at}: missing field 'context'; expected the paragraph's text; add it or remove the paragraph"
    if not _text(paragraph["context"]):
        return f"{source} {at}.context: expected text, found {_found(paragraph['context'])}; write the paragraph's text as a string"
    return (
        f"{source} {at}.qas: expected a list of questions, found {_found(paragraph.get('qas'))}; "
        "write the questions as a list (an empty list for none)"
    )


def _question(source: str, at: str, qa, title: str, context: str, offsets: bool = True) -> tuple[dict, str, str | None]:
    """(row, row label, problem): a question record as a row, or the first thing wrong with it."""
    if not isinstance(qa, dict):
        return {}, "", f"{source} {at}: expected a question object with 'question' and 'answers', found {_found(qa)}; fix or remove it"
    qid = qa.get("id")
    qid = str(qid) if isinstance(qid, (str, int)) and not isinstance(qid, bool) and _text(str(qid)) else None
    label = f"record {qid!r} ({at})" if qid is not None else f"record {at}"
    where = f"{source} {label}"
    if "question" not in qa:
        return {}, "", f"{where}: missing field 'question'; add the question text or remove the record"
    if not _text(qa["question"]):
        return {}, "", f"{where}: field 'question': expected text, found {_found(qa['question'])}; write the question as a string"
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        return {}, "", f"{where}: field 'is_impossible': expected true or false, found {_found(impossible)}; write a JSON boolean"
    answers = qa.get("answers")
    if answers is None and "answers" not in qa:
        columns = None  # unlabelled (prediction input); training and evaluation report it in preflight
    elif not isinstance(answers, list):
        return {}, "", (
            f"{where}: field 'answers': expected a list of {{\"text\", \"answer_start\"}} objects, found {_found(answers)}; "
            "write a list ([] for a question without answer)"
        )
    else:
        columns = {"text": [], "answer_start": []}
        for k, item in enumerate(answers):
            bad_offset = offsets and _offset(item.get("answer_start") if isinstance(item, dict) else None) is None
            if not isinstance(item, dict) or not _text(item.get("text")) or bad_offset:
                found = _found(item) if not isinstance(item, dict) else (
                    f"text {_found(item.get('text'))}, answer_start {_found(item.get('answer_start'))}"
                )
                return {}, "", (
                    f"{where}: answers[{k}]: expected {{\"text\": <answer text>, \"answer_start\": <character offset >= 0>}}, "
                    f"found {found}; fix the answer or remove it"
                )
            columns["text"].append(item["text"])
            columns["answer_start"].append(_offset(item.get("answer_start")))  # None: evaluation data, located by text
    row = {"id": qid if qid is not None else at, "title": title, "question": qa["question"], "context": context,
           "answers": columns, "is_impossible": impossible}
    return row, label, None
