"""Delimiter detection: a file whose header clearly uses another delimiter than its suffix says (a TSV
saved as `.csv`, a semicolon CSV from a European spreadsheet) is read with the header's delimiter and
a note says so; an ambiguous one keeps the suffix's delimiter and, failing to parse, says what it looks
like and how to fix it. The same reader serves `tunesmith predict`/`eval` files and a table piped on stdin.
"""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import pytest

from tunesmith.config import parse_config
from tunesmith.tasks.classification.config import ClassificationTaskConfig
from tunesmith.data.loaders import detect_delimiter, read_file
from tunesmith.errors import DataError
from tunesmith.data.inputs import read_inputs
from tunesmith.tasks import get_task

# Texts holding commas: read at commas, a TSV's second line has two fields under a one-field header.
ROWS = [("a fine, warm film", "pos"), ("dull; slow | long", "neg"), ("bad, bad, bad", "neg"), ("loved it", "pos")]


def _write(path: Path, sep: str, rows=ROWS, header=("text", "label")) -> Path:
    path.write_text("\n".join(sep.join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name, sep, note",
    [
        ("reviews.csv", "\t", "read as tab-separated (its header has tabs, no commas)"),
        ("reviews.txt", ",", "read as comma-separated (its header has commas, no tabs)"),
        ("reviews.tsv", ",", "read as comma-separated (its header has commas, no tabs)"),
    ],
)
def test_header_delimiter_wins_over_the_suffix(name, sep, note, tmp_path):
    rows = ROWS if sep == "\t" else [(f'"{t}"', lab) for t, lab in ROWS]  # commas in a CSV's texts are quoted
    path = _write(tmp_path / name, sep, rows)
    table = read_file(path)
    assert table.frame.to_dict("list") == {"text": [t for t, _ in ROWS], "label": [lab for _, lab in ROWS]}
    assert table.notes == [f"{path}: {note}"]
    from tunesmith.config import DataConfig
    from tunesmith.data.splits import make_splits

    _, notes = make_splits(DataConfig(train_file=str(path)), 0)
    assert notes[0] == f"{path}: {note}"  # in train's log and provenance.json, once
    assert table.where(2) == f"{path} line 4"


def test_semicolon_and_pipe_files(tmp_path):
    semicolon = tmp_path / "scores.csv"
    semicolon.write_text("text;label;score\nnice, really;pos;0,5\nmeh;neg;1,0\n", encoding="utf-8")  # decimal commas
    table = read_file(semicolon)
    assert table.frame.to_dict("list") == {"text": ["nice, really", "meh"], "label": ["pos", "neg"], "score": ["0,5", "1,0"]}
    assert table.notes == [f"{semicolon}: read as semicolon-separated (its header has semicolons, no commas)"]
    pipe = _write(tmp_path / "pipe.csv", "|", [("a, b", "pos"), ("c; d", "neg")])
    assert read_file(pipe).frame["text"].tolist() == ["a, b", "c; d"]


def test_the_suffixs_delimiter_stays_when_the_header_uses_it(tmp_path):
    # Tabs and semicolons in quoted texts, and a tab in a column name, do not outvote the header's commas.
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"a\tb; c",pos\n"d\te",neg\n', encoding="utf-8")
    table = read_file(path)
    assert table.frame["text"].tolist() == ["a\tb; c", "d\te"] and table.notes == []
    assert detect_delimiter("text\n" + "one\ttwo\n" * 3, ",") == ","  # a one-column header names no delimiter
    assert detect_delimiter("a\tb;c\n1\t2;3\n", ",") == ","  # tab or semicolon: ambiguous, keep the suffix's


def test_ambiguous_file_that_fails_says_what_it_looks_like(tmp_path):
    # Line 3 has one tab more than the header: not clearly tab-separated, so read at commas, which fails.
    path = tmp_path / "reviews.csv"
    path.write_text("text\tlabel\nhello, world\tpos\nbad\tbad, x\tneg\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_file(path)
    assert caught.value.problems == [
        f"{path}: cannot parse as CSV (Expected 1 fields in line 2, saw 2); it looks tab-separated (its header has tabs, "
        "no commas), but line 3 has 3 tab-separated fields and the header 2; expected as many fields on every line as in "
        "the header: quote the fields that contain tabs on line 3 (or remove the stray tab), and the file is read as "
        "tab-separated"
    ]


def _run_config(**task):
    return parse_config({"data": {"train_file": "unused.csv"}, "task": {"name": "classification", **task}})


def test_predict_and_eval_read_a_tsv_named_csv(tmp_path):
    path = _write(tmp_path / "new.csv", "\t")
    inputs, records = read_inputs(_run_config(), path, None)
    assert inputs == [t for t, _ in ROWS] and records == [{"text": t} for t, _ in ROWS]
    # `tunesmith eval RUN new.csv`: the task's reader, then its evaluation preflight against the trained labels.
    task, cfg = get_task("classification"), ClassificationTaskConfig()
    state, _ = task.preflight(cfg, {"train": read_file(_write(tmp_path / "train.csv", ",", [("x", "pos"), ("y", "neg")]))})
    table = task.reader(cfg)(path, "utf-8", "DATA")
    task.preflight_eval(cfg, state, table)
    assert table.frame["label"].tolist() == [lab for _, lab in ROWS]


# --------------------------------------------------------------------------- a table piped on stdin


def _piped(monkeypatch, text: str, **task):
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    return read_inputs(_run_config(**task), None, None)


def test_stdin_csv_is_read_as_a_table(monkeypatch):
    inputs, records = _piped(monkeypatch, 'id,text,label\n1,"a fine, warm film",pos\n2,"two\nlines",neg\n')
    assert inputs == ["a fine, warm film", "two\nlines"]  # the header is no text; a quoted field keeps its comma and line break
    assert records == [{"text": "a fine, warm film"}, {"text": "two\nlines"}]


def test_stdin_tsv_with_a_pair_column(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="tunesmith"):
        inputs, records = _piped(monkeypatch, "text\tpair\tlabel\nA man, sleeping\tA man rests\t1\n", text_pair_column="pair")
    assert inputs == [("A man, sleeping", "A man rests")]
    assert records == [{"text": "A man, sleeping", "pair": "A man rests"}]
    assert "stdin: read as tab-separated (its header has tabs, no commas)" in caplog.messages


def test_stdin_lone_text_header(monkeypatch):
    assert _piped(monkeypatch, "text\ngood\nbad\n")[0] == ["good", "bad"]


@pytest.mark.parametrize(
    "text",
    [
        "a wonderful superb film\n\ndull and awful\n",
        "text, or not: that is the question\nfine\n",  # `text` then a spaced field: a sentence, not a header
        "review,label\ngood,pos\n",  # no column named like the run's text column: lines, as before
    ],
)
def test_stdin_plain_lines_stay_lines(monkeypatch, text):
    inputs, records = _piped(monkeypatch, text)
    assert inputs == [line for line in text.splitlines() if line.strip()]
    assert records == [{"text": line} for line in inputs]


def test_stdin_table_errors_name_stdin(monkeypatch):
    with pytest.raises(DataError) as caught:
        _piped(monkeypatch, "text,label\n")
    assert caught.value.problems == [
        "stdin: no rows; expected a header (or keys) and at least one row of data; add rows or point at another file"
    ]
    with pytest.raises(DataError) as caught:
        _piped(monkeypatch, 'text,label\n"ok",pos\nx,y,z\n')
    (problem,) = caught.value.problems
    assert problem.startswith("stdin: cannot parse as CSV (Expected 2 fields in line 3, saw 3)"), problem
