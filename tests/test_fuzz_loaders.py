"""Fuzzing the data readers with hypothesis: whatever bytes a data file holds, reading it (and running
the task's preflight on it) ends in one of two ways:

- a correct load: a `Table` whose rows are the rows written, each row nameable by `where(i)`;
- a `DataError`/`ConfigError` whose problems are one line each, free of control characters, and name
  the file (or the config field) so the user knows where to look.

Never another exception, never a hang (each example has a hypothesis deadline). Formats: CSV, TSV,
JSON, JSONL, Parquet (classification reader and preflight), CoNLL (token classification reader and
preflight) and SQuAD JSON (`tunesmith.tasks.question_answering.squad.read_squad` and the QA task's reader, then QA preflight;
skipped if that module is missing).

Examples are derandomized (the same inputs on every run) and few per property, so the file runs in
seconds; `TUNESMITH_FUZZ_EXAMPLES=5000` explores further. Every bug fuzzing found is pinned as an `@example`.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
import unicodedata
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tunesmith.tasks.classification.config import ClassificationTaskConfig
from tunesmith.tasks.token_classification.config import TokenClassificationTaskConfig
from tunesmith.data.loaders import Table, read_file
from tunesmith.errors import ConfigError, DataError
from tunesmith.tasks import get_task
from tunesmith.tasks.base import TaskState

EXAMPLES = int(os.environ.get("TUNESMITH_FUZZ_EXAMPLES", "80"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FUZZ, max_examples=max(25, EXAMPLES // 3))

SUFFIXES = [".csv", ".tsv", ".json", ".jsonl", ".parquet"]
CONLL = TokenClassificationTaskConfig()
TOKEN_TASK = get_task("token_classification")
CLS_TASK = get_task("classification")


# --------------------------------------------------------------------------- the property


@contextmanager
def _file(name: str, data: bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        yield path


def _check_problems(err: DataError | ConfigError, path: Path | None) -> None:
    """One line per problem, no control characters, and each names the file or a config field."""
    assert err.problems, "an error without a message"
    for problem in err.problems:
        assert problem.strip(), err.problems
        bad = [c for c in problem if unicodedata.category(c) == "Cc" and c != "\t"]
        assert not bad, f"control characters {bad!r} in {problem!r}"
        if path is not None and not problem.startswith("... and "):
            assert str(path) in problem or "data." in problem or "task." in problem, problem


def _check_table(table: Table, path: Path) -> None:
    assert isinstance(table.frame, pd.DataFrame)
    for i in range(len(table.frame)):
        where = table.where(i)
        assert where.startswith(str(path)) and "\n" not in where


def outcome(read, path: Path) -> Table | DataError:
    """Read `path`; a Table or the user error it raised (checked). Any other exception fails the test."""
    try:
        table = read(path)
    except (DataError, ConfigError) as err:
        _check_problems(err, path)
        return err
    _check_table(table, path)
    return table


def preflight(task, cfg, table: Table, path: Path) -> TaskState | DataError:
    try:
        state, warnings = task.preflight(cfg, {"train": table})
    except (DataError, ConfigError) as err:
        _check_problems(err, path)
        return err
    assert all("\n" not in w for w in warnings)
    return state


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _same(found, expected) -> bool:
    if _missing(expected):
        return _missing(found)
    if isinstance(expected, (list, tuple)):
        return len(found) == len(expected) and all(_same(a, b) for a, b in zip(found, expected))
    if isinstance(expected, dict):
        return isinstance(found, dict) and found.keys() == expected.keys() and all(_same(found[k], v) for k, v in expected.items())
    if isinstance(expected, bool) or isinstance(found, bool):
        return type(found) is type(expected) and found == expected
    return found == expected


def _rows_of(table: Table) -> list[dict]:
    return [{k: (v.tolist() if hasattr(v, "tolist") and not isinstance(v, str) else v) for k, v in r.items()}
            for r in table.frame.to_dict("records")]


# --------------------------------------------------------------------------- strategies

# Text a user may put in a cell: any Unicode except surrogates (not encodable) and NUL (refused as binary).
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
ONE_LINE_TEXT = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\x85\ufeff"), min_size=1, max_size=20
).filter(lambda s: s.strip() != "")
LABEL = st.one_of(st.sampled_from(["pos", "neg", "neutral", "0", "1", "2", "0.5", "007", "1e3", "inf", "NA", ""]), TEXT)
JSON_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=False, allow_infinity=False), TEXT
)
JSON_VALUE = st.recursive(JSON_SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8)
JSON_RECORD = st.dictionaries(st.sampled_from(["text", "label", "extra", "", "te\nxt"]) | TEXT, JSON_VALUE, max_size=4)


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """`data` with a few byte-level edits: truncation, a stray quote/NUL/brace/BOM/latin-1 byte, a duplicated chunk."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["cut", "insert", "replace", "dup"]))
        piece = draw(st.sampled_from([b'"', b"\x00", b"{", b"[", b"\xef\xbb\xbf", b"\xe9", b"\xff\xfe", b",", b"\t", b"\n", b"\r", b"\\"]))
        if kind == "cut":
            data = data[:at]
        elif kind == "insert":
            data[at:at] = piece
        elif kind == "replace" and at < len(data):
            data[at : at + 1] = piece
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 40))]
    return bytes(data)


def _csv_bytes(rows: list[list[str]], sep: str = ",", newline: str = "\n") -> bytes:
    """CSV as spreadsheets write it: fields holding the separator, a quote or a line break (\\r too) quoted."""

    def field(value: str) -> str:
        return f'"{value.replace(chr(34), chr(34) * 2)}"' if any(c in value for c in (sep, '"', "\r", "\n")) else value

    return "".join(sep.join(map(field, row)) + newline for row in rows).encode("utf-8")


def _valid_file(suffix: str, rows: list[dict]) -> bytes:
    if suffix in (".csv", ".tsv"):
        return _csv_bytes([["text", "label"]] + [[r["text"], r["label"]] for r in rows], "\t" if suffix == ".tsv" else ",")
    if suffix == ".json":
        return json.dumps(rows, ensure_ascii=False).encode("utf-8")
    if suffix == ".jsonl":
        return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("utf-8")
    out = io.BytesIO()
    pd.DataFrame(rows, columns=["text", "label"]).to_parquet(out, index=False)
    return out.getvalue()


ROWS = st.lists(st.fixed_dictionaries({"text": ONE_LINE_TEXT, "label": st.sampled_from(["pos", "neg"])}), min_size=1, max_size=8)


# --------------------------------------------------------------------------- any bytes, any suffix


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES + [".txt"]), data=st.binary(max_size=600))
@example(suffix=".json", data=b"[" * 20_000 + b"]" * 20_000)  # RecursionError escaped
@example(suffix=".jsonl", data=b'{"a": ' + b"[" * 20_000 + b"]" * 20_000 + b"}")  # RecursionError escaped
@example(suffix=".jsonl", data=b'{"text": "a", "label": ' + b"9" * 5000 + b"}")  # ValueError: int digits limit
@example(suffix=".json", data=b'[{"text": "\\ud800", "label": 1}]')  # UnicodeEncodeError in pandas/pyarrow
@example(suffix=".json", data=b'{"text": ["a", "b"], "label": [1]}')  # ValueError: arrays of unequal length
@example(suffix=".csv", data=b'"te\x0cxt\x1b[31m",label\na,1\nb,0\n')  # control characters reached messages
@example(suffix=".json", data=b"[]")
@example(suffix=".csv", data=b"text,label\n")
@example(suffix=".csv", data=b"")
@example(suffix=".parquet", data=b"PAR1\x00\x00PAR1")
def test_any_bytes_load_or_fail_cleanly(suffix, data):
    with _file("train" + suffix, data) as path:
        outcome(read_file, path)


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), rows=ROWS, data=st.data())
def test_damaged_valid_files_load_or_fail_cleanly(suffix, rows, data):
    damaged = data.draw(mutated(_valid_file(suffix, rows)))
    with _file("train" + suffix, damaged) as path:
        result = outcome(read_file, path)
        if isinstance(result, Table):
            preflight(CLS_TASK, ClassificationTaskConfig(), result, path)


# --------------------------------------------------------------------------- valid files round-trip


def _expected_cell(text: str):
    return None if text == "" else text


def _numeric(column: list[str]) -> list | None:
    """What a numeric CSV column reads as: numbers, when every value is a plain number written as Python writes it."""

    def number(s: str):
        try:
            return int(s) if str(int(s)) == s else None
        except ValueError:
            pass
        try:
            value = float(s)
        except ValueError:
            return None
        return value if repr(value) == s else None

    values = [number(s) for s in column if s != ""]
    if not values or any(v is None for v in values):
        return None
    # pandas reads integers as int64, as uint64 when all are >= 0, else (and beside floats) as float64: a
    # column where that loses an integer's digits stays text.
    ints = [v for v in values if isinstance(v, int)]
    if any(isinstance(v, float) for v in values):
        exact = all(int(float(i)) == i for i in ints)
    else:
        exact = all(-(2**63) <= i < 2**63 for i in ints) or all(0 <= i < 2**64 for i in ints)
    if not exact:
        return None
    return [None if s == "" else number(s) for s in column]


@FUZZ
@given(cells=st.lists(st.tuples(TEXT, LABEL), min_size=1, max_size=8), sep=st.sampled_from([",", "\t"]), newline=st.sampled_from(["\n", "\r\n"]))
@example(cells=[("007", "1"), ("1", "0")], sep=",", newline="\n")  # "007" was read as the number 7
def test_delimited_round_trip(cells, sep, newline):
    data = _csv_bytes([["text", "label"], *map(list, cells)], sep, newline)
    with _file("train" + (".csv" if sep == "," else ".tsv"), data) as path:
        table = outcome(read_file, path)
        assert isinstance(table, Table), table
        assert len(table.frame) == len(cells)
        for column, values in (("text", [t for t, _ in cells]), ("label", [lab for _, lab in cells])):
            expected = _numeric(values) or [_expected_cell(v) for v in values]
            found = table.frame[column].tolist()
            assert all(_same(f, e) for f, e in zip(found, expected)), (column, found, expected)


@FUZZ
@given(
    cells=st.lists(st.tuples(TEXT, LABEL), min_size=1, max_size=8),
    sep=st.sampled_from([",", "\t", ";", "|"]),
    suffix=st.sampled_from([".csv", ".tsv", ".txt"]),
)
@example(cells=[("a, b", "pos"), ("c", "neg")], sep="\t", suffix=".csv")  # a TSV named .csv: "Expected 1 fields in line 2"
@example(cells=[("20000000000000000001", "pos")], sep=",", suffix=".csv")  # past uint64: read as the float 2e+19
def test_header_delimiter_round_trip(cells, sep, suffix):
    """Whatever the suffix, a file written with one delimiter (fields holding it quoted) reads back its rows,
    with a note when that delimiter is not the suffix's."""
    data = _csv_bytes([["text", "label"], *map(list, cells)], sep)
    with _file("train" + suffix, data) as path:
        table = outcome(read_file, path)
        assert isinstance(table, Table), table
        assert len(table.frame) == len(cells) and list(table.frame.columns) == ["text", "label"]
        for column, values in (("text", [t for t, _ in cells]), ("label", [lab for _, lab in cells])):
            expected = _numeric(values) or [_expected_cell(v) for v in values]
            found = table.frame[column].tolist()
            assert all(_same(f, e) for f, e in zip(found, expected)), (column, found, expected)
        default = "," if suffix == ".csv" else "\t"
        assert len(table.notes) == (sep != default) and all(n.startswith(f"{path}: read as ") for n in table.notes)


@FUZZ
@given(widths=st.lists(st.integers(0, 4), min_size=1, max_size=6), header=st.integers(1, 3), sep=st.sampled_from([",", "\t"]))
@example(widths=[3, 3], header=2, sep=",")  # one field more on every row: pandas made the first column the index
@example(widths=[2, 0, 3], header=2, sep=",")
def test_ragged_rows(widths, header, sep):
    lines = [sep.join(f"h{j}" for j in range(header))] + [sep.join(f"r{i}c{j}" for j in range(w)) for i, w in enumerate(widths)]
    with _file("train" + (".csv" if sep == "," else ".tsv"), ("\n".join(lines) + "\n").encode()) as path:
        result = outcome(read_file, path)
        too_long = [n for n, w in enumerate(widths, start=2) if w > header]
        if too_long:
            assert isinstance(result, DataError), result.frame
            assert f"line {too_long[0]}" in result.problems[0] and f"{header} field" in result.problems[0], result.problems
            return
        rows = [w for w in widths if w > 0]  # blank lines are skipped
        if not rows:
            assert isinstance(result, DataError) and "no rows" in result.problems[0]
            return
        assert isinstance(result, Table), result
        assert len(result.frame) == len(rows)
        for (i, w), row in zip([(i, w) for i, w in enumerate(widths) if w > 0], _rows_of(result)):
            assert [row[f"h{j}"] for j in range(w)] == [f"r{i}c{j}" for j in range(w)]
            assert all(_missing(row[f"h{j}"]) for j in range(w, header))


@FUZZ
@given(records=st.lists(JSON_RECORD, min_size=1, max_size=6), shape=st.sampled_from(["jsonl", "records", "data"]))
@example(records=[{"text": "a\u2028b", "label": 1}, {"text": "c\x85", "label": 0}], shape="jsonl")  # split at U+2028
def test_json_round_trip(records, shape):
    if shape == "jsonl":
        data, name = "\n".join(json.dumps(r, ensure_ascii=False) for r in records), "train.jsonl"
    else:
        data, name = json.dumps(records if shape == "records" else {"data": records}, ensure_ascii=False), "train.json"
    with _file(name, data.encode("utf-8")) as path:
        result = outcome(read_file, path)
        if isinstance(result, DataError):
            # Only shapes that cannot be a table are refused: no columns at all, or a column name on two lines.
            assert all(not r for r in records) or any(any(c in k for c in "\n\r") or _has_control(k) for r in records for k in r), result
            return
        rows = _rows_of(result)
        assert len(rows) == len(records)
        for found, written in zip(rows, records):
            for key, value in written.items():
                assert _same(found[key], value), (key, found[key], value)
            assert all(_missing(v) for k, v in found.items() if k not in written)


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


@FEW
@given(rows=st.lists(st.fixed_dictionaries({"text": TEXT, "label": st.integers(-5, 5) | st.none()}), min_size=1, max_size=6))
def test_parquet_round_trip_and_truncation(rows):
    data = _valid_file(".parquet", rows)
    with _file("train.parquet", data) as path:
        table = outcome(read_file, path)
        assert isinstance(table, Table)
        assert [r["text"] for r in rows] == table.frame["text"].tolist()
        assert all(_same(f, r["label"]) for f, r in zip(table.frame["label"].tolist(), rows))
    with _file("train.parquet", data[: len(data) // 2]) as path:
        assert isinstance(outcome(read_file, path), DataError)


# --------------------------------------------------------------------------- wrong encodings


@FUZZ
@given(texts=st.lists(ONE_LINE_TEXT, min_size=1, max_size=6), encoding=st.sampled_from(["latin-1", "cp1252", "utf-16", "utf-16-le", "utf-8-sig"]))
def test_wrong_encoding_is_named_or_harmless(texts, encoding):
    body = "text,label\n" + "".join(f'"{t.replace(chr(34), chr(34) * 2)}",pos\n' for t in texts)
    try:
        data = body.encode(encoding)
    except UnicodeEncodeError:
        return  # not representable in that encoding
    with _file("train.csv", data) as path:
        result = outcome(read_file, path)
        if isinstance(result, DataError):
            assert "data.encoding" in result.problems[0]
            if encoding in ("latin-1", "cp1252"):  # the line named is the first one that is not valid UTF-8
                first = next(n for n, line in enumerate(data.split(b"\n"), start=1) if not _is_utf8(line))
                assert f"line {first}:" in result.problems[0], (first, result.problems)
        else:  # the bytes happen to be UTF-8: read as they decode, one row per line
            assert _is_utf8(data.removeprefix(b"\xef\xbb\xbf")) and len(result.frame) == len(texts)
        # Read with the right encoding, the file loads as written.
        right = outcome(lambda p: read_file(p, encoding=encoding), path)
        assert isinstance(right, Table) and right.frame["text"].tolist() == (_numeric(texts) or texts)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@FEW
@given(encoding=st.text(max_size=12))
@example(encoding="utf-8\x00")  # ValueError: embedded null character
@example(encoding="rot13")
def test_any_encoding_name(encoding):
    with _file("train.csv", b"text,label\na,1\nb,0\n") as path:
        result = outcome(lambda p: read_file(p, encoding=encoding), path)
        if isinstance(result, DataError):
            assert "data.encoding" in result.problems[0]


# --------------------------------------------------------------------------- preflight, end to end


@FUZZ
@given(
    rows=st.lists(st.fixed_dictionaries({"text": JSON_VALUE, "label": JSON_VALUE}), min_size=1, max_size=8),
    suffix=st.sampled_from([".csv", ".json", ".jsonl"]),
)
@example(rows=[{"text": {"a": 1}, "label": "pos"}, {"text": "b", "label": "neg"}], suffix=".jsonl")  # a dict trained as "{'a': 1}"
@example(rows=[{"text": "a", "label": {"x": 1}}, {"text": "b", "label": "neg"}], suffix=".jsonl")  # a dict label
def test_classification_preflight_on_mixed_types(rows, suffix):
    """Cells of any JSON type: preflight either accepts the table (every text is text, every label a label)
    or names the row and column."""
    if suffix == ".csv":
        data = _csv_bytes([["text", "label"]] + [[json.dumps(r["text"]), json.dumps(r["label"])] for r in rows])
    elif suffix == ".json":
        data = json.dumps(rows).encode()
    else:
        data = "\n".join(json.dumps(r) for r in rows).encode()
    with _file("train" + suffix, data) as path:
        table = outcome(read_file, path)
        if isinstance(table, DataError):
            return
        state = preflight(CLS_TASK, ClassificationTaskConfig(), table, path)
        if isinstance(state, TaskState):
            for value in table.frame["text"]:
                assert isinstance(value, (str, int, float)) and not _missing(value) and str(value).strip()
            if state.problem_type != "multi_label":
                assert all(not isinstance(v, dict) for v in table.frame["label"])


@FUZZ
@given(
    rows=st.lists(st.fixed_dictionaries({"text": ONE_LINE_TEXT, "label": st.sampled_from(["pos", "neg"])}), min_size=2, max_size=10),
    holes=st.sets(st.integers(0, 9), max_size=3),
    suffix=st.sampled_from([".csv", ".tsv", ".jsonl", ".json"]),
    data=st.data(),
)
def test_preflight_names_the_line_of_each_empty_text(rows, holes, suffix, data):
    holes = {h for h in holes if h < len(rows)}
    for h in holes:
        rows[h]["text"] = data.draw(st.sampled_from(["", " ", "\t "]))
    rows[0]["label"], rows[1]["label"] = "pos", "neg"
    with _file("train" + suffix, _valid_file(suffix, rows)) as path:
        table = outcome(read_file, path)
        assert isinstance(table, Table), table
        result = preflight(CLS_TASK, ClassificationTaskConfig(), table, path)
        if not holes:
            assert isinstance(result, TaskState), result
            return
        assert isinstance(result, DataError)
        first = {".csv": 2, ".tsv": 2, ".jsonl": 1}
        named = [f"line {h + first[suffix]}:" if suffix in first else f"record {h + 1}:" for h in sorted(holes)]
        for where in named:
            assert any(f"{path} {where} column 'text' is empty" in p for p in result.problems), (where, result.problems)


# --------------------------------------------------------------------------- CoNLL


def _conll_reader(path: Path) -> Table:
    return TOKEN_TASK.reader(CONLL)(path, "utf-8", "data.train_file")


TOKEN = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters="\x85\ufeff"), min_size=1, max_size=8)
TAG = st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-ORG", "NN", "VB"])
SENTENCES = st.lists(st.lists(st.tuples(TOKEN, TAG), min_size=1, max_size=5), min_size=1, max_size=5)


@FUZZ
@given(sentences=SENTENCES, sep=st.sampled_from(["\t", " "]), newline=st.sampled_from(["\n", "\r\n"]), docstart=st.booleans())
@example(sentences=[[("a\u2028b", "O"), ("c", "B-PER")]], sep="\t", newline="\n", docstart=False)  # line split at U+2028
def test_conll_round_trip(sentences, sep, newline, docstart):
    lines = ["-DOCSTART- -X- O O", ""] if docstart else []
    for sentence in sentences:
        lines += [f"{token}{sep}{tag}" for token, tag in sentence] + ["", ""]
    with _file("train.conll", newline.join(lines).encode("utf-8")) as path:
        table = outcome(_conll_reader, path)
        assert isinstance(table, Table), table
        assert table.frame["tokens"].tolist() == [[t for t, _ in s] for s in sentences]
        # Each token's line number is the line it is on in the file.
        file_lines = newline.join(lines).split(newline)
        for tokens, numbers in zip(table.frame["tokens"], table.frame["lines"]):
            assert [file_lines[n - 1].split(sep)[0] for n in numbers] == tokens
        result = preflight(TOKEN_TASK, CONLL, table, path)
        if isinstance(result, TaskState):  # accepted: the labels are the tags written
            assert set(result.labels) == {tag for s in sentences for _, tag in s}


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            st.just(""), st.just("-DOCSTART-"), st.just("\t"), st.just(" \tO"), st.just("\tO"),
            st.lists(TOKEN | st.just(""), min_size=1, max_size=4).map("\t".join),
            st.lists(TOKEN, min_size=1, max_size=4).map(" ".join),
            TEXT,
        ),
        max_size=15,
    ),
    suffix=st.sampled_from([".conll", ".txt", ".iob", ".tsv"]),
)
@example(lines=[" \tB-PER", "Paris\tI-PER", "", "a\tO", "b\tB-LOC"], suffix=".conll")  # an empty token reached the tokenizer
def test_conll_malformed_lines(lines, suffix):
    with _file("train" + suffix, "\n".join(lines).encode("utf-8")) as path:
        table = outcome(_conll_reader, path)
        if isinstance(table, DataError):
            return
        state = preflight(TOKEN_TASK, CONLL, table, path)
        if isinstance(state, TaskState):
            # Accepted: every token is visible text (the tokenizer would drop an empty word and its tag).
            assert all(t.strip() for tokens in table.frame["tokens"] for t in tokens)


@FEW
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".conll", ".txt", ".jsonl"]))
def test_conll_reader_any_bytes(data, suffix):
    with _file("train" + suffix, data) as path:
        table = outcome(_conll_reader, path)
        if isinstance(table, Table):
            preflight(TOKEN_TASK, CONLL, table, path)


# --------------------------------------------------------------------------- huge lines


BIG = 3_000_000


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".conll"])
def test_a_multi_megabyte_line_loads_and_later_lines_keep_their_numbers(suffix):
    big = "word " * (BIG // 5)
    if suffix in (".csv", ".tsv"):
        sep = "\t" if suffix == ".tsv" else ","
        # Line 2: a 3 MB text; line 3: blank; line 4: fine; line 5: empty text.
        data = f"text{sep}label\n{big}{sep}pos\n\nok{sep}neg\n{sep}pos\n".encode()
        expect = "line 5:"
    elif suffix == ".json":
        data = json.dumps([{"text": big, "label": "pos"}, {"text": "ok", "label": "neg"}, {"text": "", "label": "pos"}]).encode()
        expect = "record 3:"
    elif suffix == ".jsonl":
        data = "\n".join(json.dumps(r) for r in [{"text": big, "label": "pos"}, {"text": "ok", "label": "neg"}, {"text": "", "label": "pos"}]).encode()
        expect = "line 3:"
    else:
        data = f"{'x' * BIG}\tB-PER\n\nParis\tB-LOC\n".encode()
        expect = None
    start = time.perf_counter()
    with _file("train" + suffix, data) as path:
        if suffix == ".conll":
            table = outcome(_conll_reader, path)
            assert isinstance(table, Table) and len(table.frame["tokens"][0][0]) == BIG
            assert table.frame["lines"].tolist() == [[1], [3]]
        else:
            table = outcome(read_file, path)
            assert isinstance(table, Table) and table.frame["text"].tolist()[0] == big
            result = preflight(CLS_TASK, ClassificationTaskConfig(), table, path)
            assert isinstance(result, DataError) and result.problems == [
                f"{path} {expect} column 'text' is empty; expected text; fill it in or remove the row"
            ]
    assert time.perf_counter() - start < 20


# --------------------------------------------------------------------------- paths


@FEW
@given(name=st.text(max_size=40))
@example(name="a\x00b.csv")  # ValueError: embedded null byte (Path.exists)
@example(name="x" * 5000 + ".csv")  # OSError: file name too long
def test_any_data_path(name):
    try:
        read_file(name)
    except (DataError, ConfigError) as err:
        _check_problems(err, None)
        assert "data.train_file" in err.problems[0]
    else:  # pragma: no cover - only an existing file could load, and the name is random
        pass


# --------------------------------------------------------------------------- SQuAD

try:
    from tunesmith.tasks.question_answering.squad import read_questions, read_squad
    from tunesmith.tasks.question_answering.config import QuestionAnsweringTaskConfig
except ImportError:  # the QA task is being written; these tests run once it exists
    read_squad = read_questions = None
needs_squad = pytest.mark.skipif(read_squad is None, reason="tunesmith.tasks.question_answering.squad (QA task) not written yet")


def _squad_readers():
    """`read_squad` itself and the QA task's reader (SQuAD JSON or flat rows)."""
    return [lambda path: read_squad(path, "utf-8", "data.train_file"), lambda path: read_questions(path, "utf-8", "data.train_file")]


@st.composite
def squad_documents(draw) -> tuple[dict, int]:
    """A valid SQuAD v2 document and its number of questions."""
    articles, questions = [], 0
    for a in range(draw(st.integers(1, 2))):
        paragraphs = []
        for p in range(draw(st.integers(1, 2))):
            context = draw(ONE_LINE_TEXT) + " " + draw(ONE_LINE_TEXT)
            qas = []
            for q in range(draw(st.integers(1, 3))):
                start = draw(st.integers(0, len(context) - 1))
                end = draw(st.integers(start + 1, len(context)))
                impossible = draw(st.booleans()) or not context[start:end].strip()  # a blank answer is no answer
                answers = [] if impossible else [{"text": context[start:end], "answer_start": start}]
                qas.append({"id": f"q{a}-{p}-{q}", "question": draw(ONE_LINE_TEXT), "answers": answers, "is_impossible": impossible})
                questions += 1
            paragraphs.append({"context": context, "qas": qas})
        articles.append({"title": f"article {a}", "paragraphs": paragraphs})
    return {"version": "v2.0", "data": articles}, questions


def _break(document, draw):
    """Replace one value somewhere in the document by something of another type, or drop a key."""
    path, node = [], document
    while isinstance(node, (dict, list)) and node and (not path or draw(st.booleans())):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append((node, key))
        node = node[key]
    if not path:
        return draw(JSON_VALUE)
    parent, key = path[-1]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[key]
    else:
        parent[key] = draw(JSON_VALUE | st.sampled_from([-1, 10**6, "12", None, [], {}, 1.5, True, "\ud800"]))
    return document


def _qa_preflight(table: Table, path: Path):
    return preflight(get_task("question_answering"), QuestionAnsweringTaskConfig(), table, path)


@needs_squad
@FUZZ
@given(doc=squad_documents())
def test_squad_valid_documents_load(doc):
    document, questions = doc
    with _file("train.json", json.dumps(document, ensure_ascii=False).encode()) as path:
        for read in _squad_readers():
            table = outcome(read, path)
            assert isinstance(table, Table), table
            assert len(table.frame) == questions
            state = _qa_preflight(table, path)
            assert isinstance(state, TaskState), state


@needs_squad
@FUZZ
@given(doc=squad_documents(), data=st.data())
def test_squad_broken_documents_load_or_fail_cleanly(doc, data):
    document = doc[0]
    for _ in range(data.draw(st.integers(1, 3))):
        document = _break(document, data.draw)
    with _file("train.json", json.dumps(document).encode()) as path:  # ASCII: a lone surrogate is written as its escape
        for read in _squad_readers():
            table = outcome(read, path)
            if isinstance(table, Table):
                _qa_preflight(table, path)


@needs_squad
@FUZZ
@given(data=st.binary(max_size=400), data_suffix=st.sampled_from([".json", ".jsonl", ".csv"]))
@example(data=b'{"data": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", data_suffix=".json")
@example(data=b"[]", data_suffix=".json")
@example(data=b"5", data_suffix=".json")
@example(data=b'"data"', data_suffix=".json")
@example(data=b'{"data": [{"paragraphs": [{"context": "abc", "qas": [{"question": "q", "answers": [{"text": "zz", "answer_start": 1}]}]}]}]}', data_suffix=".json")
@example(data=b'{"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "\\ud800", "question": "q\\ud800", "answers": []}]}]}]}', data_suffix=".json")
@example(data=b'{"question": "q", "context": "abc", "answers": {"text": ["b"], "answer_start": [7]}}', data_suffix=".jsonl")
@example(data=b'question,context,answers\nq,abc,"{""text"": [""b""], ""answer_start"": [1]}"\n', data_suffix=".csv")
def test_squad_any_bytes(data, data_suffix):
    with _file("train" + data_suffix, data) as path:
        for read in _squad_readers()[data_suffix != ".json" :]:
            table = outcome(read, path)
            if isinstance(table, Table):
                _qa_preflight(table, path)


@needs_squad
def test_squad_integer_with_thousands_of_digits():
    # Found by fuzzing: the SQuAD readers called json.loads directly and let its ValueError escape.
    data = b'{"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": ' + b"9" * 5000 + b', "question": "q", "answers": []}]}]}]}'
    with _file("train.json", data) as path:
        for read in _squad_readers():
            assert isinstance(outcome(read, path), DataError)
