"""Preflight: every way the data can be wrong is reported before a model loads, naming the file, the
row or line, the column, what was expected, what was found and how to fix it.

Each error path is checked through the Python API (`tunesmith.train` raises `DataError`) and through
`tunesmith train CONFIG.yaml` in a subprocess (exit code 2, the same one-line message, no traceback),
and neither may create or overwrite a run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

import tunesmith
from tiny import sentiment_rows, tiny_config, write_csv
from tunesmith.data.loaders import read_file
from tunesmith.data.splits import make_splits
from tunesmith.errors import ConfigError, DataError, TunesmithError
from tunesmith.runs.rundir import RUN_MARKER
from tunesmith.tasks import get_task


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("tunesmith", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "tunesmith.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


# --------------------------------------------------------------------------- the error paths


@dataclass
class Case:
    """A broken data set: `make(folder)` writes it and returns config sections; `expect` are fragments of
    the first error line (`{dir}` is the folder), `error` the exception type."""

    make: Callable[[Path], dict]
    expect: list[str]
    error: type[TunesmithError] = DataError


def _rows(n: int = 12) -> list[dict]:
    return sentiment_rows(n, seed=3)


def _not_found(d: Path) -> dict:
    return {"data": {"train_file": str(d / "missing.csv")}}


def _latin1(d: Path) -> dict:
    # Lines: 1 header, 2-3 fine, 4 holds a latin-1 'é' (byte 0xe9), which is not UTF-8.
    body = "text,label\nthe film was good,pos\nthe film was bad,neg\nun bon film au café,pos\nok,neg\n"
    (d / "train.csv").write_bytes(body.encode("latin-1"))
    return {"data": {"train_file": str(d / "train.csv")}}


def _binary(d: Path) -> dict:
    # A PNG header and some noise, saved with a .csv name.
    (d / "train.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    return {"data": {"train_file": str(d / "train.csv")}}


def _missing_column(d: Path) -> dict:
    write_csv(d / "train.csv", [{"sentence": r["text"], "label": r["label"]} for r in _rows()])
    return {"data": {"train_file": str(d / "train.csv")}}


def _empty_text(d: Path) -> dict:
    rows = _rows()
    rows[2]["text"] = ""  # data row 3 -> line 4 (the header is line 1)
    write_csv(d / "train.csv", rows)
    return {"data": {"train_file": str(d / "train.csv")}}


def _empty_label(d: Path) -> dict:
    rows = _rows()
    rows[4]["label"] = ""  # line 6
    write_csv(d / "train.csv", rows)
    return {"data": {"train_file": str(d / "train.csv")}}


def _nan_label_csv(d: Path) -> dict:
    rows = _rows()
    rows[6]["label"] = "NaN"  # line 8; pandas' NA strings are off for CSVs, so this must still count as missing
    write_csv(d / "train.csv", rows)
    return {"data": {"train_file": str(d / "train.csv")}}


def _null_label_jsonl(d: Path) -> dict:
    rows = _rows()
    rows[1]["label"] = None  # JSON null on line 2
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return {"data": {"train_file": str(d / "train.jsonl")}}


def _unseen_validation_label(d: Path) -> dict:
    write_csv(d / "train.csv", _rows())
    valid = _rows(6)
    valid[1]["label"] = "neutral"  # line 3 of validation.csv
    write_csv(d / "validation.csv", valid)
    return {"data": {"train_file": str(d / "train.csv"), "validation_file": str(d / "validation.csv")}}


def _single_class(d: Path) -> dict:
    write_csv(d / "train.csv", [{"text": r["text"], "label": "pos"} for r in _rows()])
    return {"data": {"train_file": str(d / "train.csv")}}


def _regression_text_target(d: Path) -> dict:
    rows = [{"text": r["text"], "label": 0.25 * (i % 5)} for i, r in enumerate(_rows())]
    rows[3]["label"] = "high"  # line 5
    write_csv(d / "train.csv", rows)
    return {"data": {"train_file": str(d / "train.csv")}, "task": {"problem_type": "regression"}}


def _invalid_jsonl(d: Path) -> dict:
    lines = [json.dumps(r) for r in _rows(6)]
    lines.insert(2, '{"text": "a broken line", "label": }')  # line 3
    (d / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"data": {"train_file": str(d / "train.jsonl")}}


CASES = {
    "file_not_found": Case(_not_found, ["data.train_file", "{dir}/missing.csv", "not found", "check the path"]),
    "latin1_in_utf8_csv": Case(
        _latin1,
        ["{dir}/train.csv", "line 4", "expected utf-8 text", "found byte 0xe9", "re-save the file as UTF-8", "data.encoding"],
    ),
    "binary_file": Case(
        _binary, ["{dir}/train.csv", "line 3", "expected a CSV text file", "found binary data", "export it as UTF-8"]
    ),
    "missing_column": Case(
        _missing_column,
        [
            "{dir}/train.csv",
            "missing column 'text'",
            "task.text_column",
            "columns found: sentence, label",
            "set task.text_column=",
        ],
    ),
    "empty_text": Case(
        _empty_text, ["{dir}/train.csv line 4", "column 'text'", "is empty", "expected text", "fill it in or remove the row"]
    ),
    "empty_label": Case(_empty_label, ["{dir}/train.csv line 6", "column 'label'", "no label", "expected a label", "fill it in"]),
    "nan_label_csv": Case(_nan_label_csv, ["{dir}/train.csv line 8", "column 'label'", "no label (empty or NaN)", "fill it in"]),
    "null_label_jsonl": Case(_null_label_jsonl, ["{dir}/train.jsonl line 2", "column 'label'", "no label", "remove the row"]),
    "unseen_validation_label": Case(
        _unseen_validation_label,
        [
            "{dir}/validation.csv line 3",
            "column 'label'",
            "'neutral'",
            "does not occur in train",
            "train labels: neg, pos",
            "fix the label",
        ],
    ),
    "single_class": Case(
        _single_class,
        ["{dir}/train.csv", "column 'label'", "single class ('pos')", "expected at least 2 classes", "add examples"],
    ),
    "regression_non_numeric": Case(
        _regression_text_target,
        ["{dir}/train.csv line 5", "column 'label'", "'high'", "expected a finite number for regression", "fix the value"],
    ),
    "invalid_jsonl_line": Case(
        _invalid_jsonl,
        ["{dir}/train.jsonl", "line 3", "expected one JSON object per line", "found invalid JSON", "fix or remove the line"],
    ),
}


def _config(case: Case, folder: Path, model: Path) -> dict:
    sections = case.make(folder)
    return tiny_config(model, folder / "placeholder.csv", folder / "run", **sections)


def _expected(case: Case, folder: Path) -> list[str]:
    return [fragment.replace("{dir}", str(folder)) for fragment in case.expect]


@pytest.mark.parametrize("name", list(CASES))
def test_preflight_error_api(name, tmp_path, tiny_bert):
    case = CASES[name]
    cfg = _config(case, tmp_path, tiny_bert)
    with pytest.raises(case.error) as caught:
        tunesmith.train(cfg, show_progress=False)
    first = caught.value.problems[0]
    for fragment in _expected(case, tmp_path):
        assert fragment in first, f"{fragment!r} not in {first!r}"
    assert all("\n" not in problem for problem in caught.value.problems)
    assert not (tmp_path / "run").exists(), "a failed preflight created the run directory"


def _rows_combined(d: Path) -> dict:
    """Every row-level problem at once (empty text, empty and NaN labels, a JSON null label): all are
    reported together, one line each."""
    rows = _rows()
    rows[2]["text"] = ""
    rows[4]["label"] = ""
    rows[6]["label"] = "NaN"
    write_csv(d / "train.csv", rows)
    valid = _rows(4)
    valid[1]["label"] = None
    (d / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in valid) + "\n", encoding="utf-8")
    return {"data": {"train_file": str(d / "train.csv"), "validation_file": str(d / "validation.jsonl")}}


def _labels_combined(d: Path) -> dict:
    """Both label-set problems at once: a single train class, and a validation label train lacks."""
    sections = _single_class(d)
    valid = _rows(4)
    valid[1]["label"] = "neutral"
    write_csv(d / "validation.csv", valid)
    sections["data"]["validation_file"] = str(d / "validation.csv")
    return sections


# One `tunesmith train` subprocess costs seconds of imports: problems that are reported together share one.
# Each run: (writer, the error paths it covers, fragments each of their messages must hold).
CLI_RUNS = {
    name: (CASES[name].make, [name], [CASES[name].expect])
    for name in [
        "file_not_found",
        "latin1_in_utf8_csv",
        "binary_file",
        "missing_column",
        "regression_non_numeric",
        "invalid_jsonl_line",
    ]
}
CLI_RUNS["row_problems"] = (
    _rows_combined,
    ["empty_text", "empty_label", "nan_label_csv", "null_label_jsonl"],
    [
        CASES["empty_text"].expect,
        CASES["empty_label"].expect,
        CASES["nan_label_csv"].expect,
        ["{dir}/validation.jsonl line 2", "column 'label'", "no label", "remove the row"],
    ],
)
CLI_RUNS["label_problems"] = (
    _labels_combined,
    ["single_class", "unseen_validation_label"],
    [
        CASES["single_class"].expect,
        [
            "{dir}/validation.csv line 3",
            "column 'label'",
            "'neutral'",
            "does not occur in train",
            "train labels: pos",
            "fix the label",
        ],
    ],
)


def test_every_case_has_a_cli_run():
    assert sorted(c for _, cases, _ in CLI_RUNS.values() for c in cases) == sorted(CASES)


@pytest.mark.parametrize("name", list(CLI_RUNS))
def test_preflight_error_cli(name, tmp_path, tiny_bert, monkeypatch):
    make, case_names, fragment_lists = CLI_RUNS[name]
    cfg = tiny_config(tiny_bert, tmp_path / "placeholder.csv", tmp_path / "run", **make(tmp_path))
    monkeypatch.chdir(tmp_path)  # messages name the working directory where a file is missing
    with pytest.raises(TunesmithError) as caught:  # the messages the CLI must print, one line per problem
        tunesmith.train(cfg, show_progress=False)
    problems = caught.value.problems
    # Each error path of this run is among the problems, with its full message.
    for case_name, fragments in zip(case_names, fragment_lists):
        expected = [f.replace("{dir}", str(tmp_path)) for f in fragments]
        assert any(all(f in p for f in expected) for p in problems), (case_name, problems)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")

    proc = run_cli("train", "cfg.yaml", cwd=tmp_path)

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [f"error: {p}" for p in problems]
    assert len(problems) >= len(case_names)
    assert not (tmp_path / "run").exists()


def test_many_problems_are_listed_then_summarised(tmp_path):
    rows = _rows(30)
    for row in rows[:15]:
        row["text"] = " "
    write_csv(tmp_path / "train.csv", rows)
    task = get_task("classification")
    cfg = tiny_config(tmp_path, tmp_path / "train.csv", tmp_path / "run")
    from tunesmith.config import parse_config

    run = parse_config(cfg)
    tables, _ = make_splits(run.data, 0, task.stratify_key(run.task))
    with pytest.raises(DataError) as caught:
        task.preflight(run.task, tables)
    problems = caught.value.problems
    assert len(problems) == 11
    assert problems[-1] == "... and 5 more problems like these"
    # Rows keep their file line numbers after the seeded validation carve-out.
    lines = sorted(int(p.split(" line ")[1].split(":")[0]) for p in problems[:-1])
    assert set(lines) <= set(range(2, 17))


def test_csv_line_numbers_count_blank_lines_and_multiline_fields(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"a review\nthat spans lines",pos\n\nthe film was bad,neg\n,pos\ngood,neg\n', encoding="utf-8")
    task = get_task("classification")
    from tunesmith.tasks.classification.config import ClassificationTaskConfig

    with pytest.raises(DataError) as caught:
        task.preflight(ClassificationTaskConfig(), {"train": read_file(path)})
    # Row 3 (empty text) is on line 6: line 2-3 hold row 1, line 4 is blank.
    assert caught.value.problems == [f"{path} line 6: column 'text' is empty; expected text; fill it in or remove the row"]


def test_latin1_file_loads_with_encoding_set(tmp_path):
    _latin1(tmp_path)
    table = read_file(tmp_path / "train.csv", encoding="latin-1")
    assert table.frame["text"].tolist()[2] == "un bon film au café"


def test_invalid_json_document_names_line_and_fix(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"text": "good", "label": "pos"},\n  {"text": "bad" "label": "neg"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_file(path)
    message = caught.value.problems[0]
    assert message.startswith(f"{path}: line 3 column")
    assert "expected valid JSON" in message and "fix the syntax" in message


def test_json_of_wrong_shape_says_what_was_found(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(["just", "strings"]), encoding="utf-8")
    with pytest.raises(DataError, match=r"expected a list of records .* found a list holding a str"):
        read_file(path)


def test_cli_error_messages_are_not_read_as_markup(tmp_path):
    # `[records]` and `{"data": [...]}` in messages must reach the terminal as written.
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"rows": 3}), encoding="utf-8")
    cfg = tiny_config(tmp_path, path, tmp_path / "run")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    from typer.testing import CliRunner

    from tunesmith.cli import app

    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml")])
    assert result.exit_code == 2
    assert '{"data": [records]}' in result.output
    assert "found an object with keys rows" in result.output


# --------------------------------------------------------------------------- run directory safety


def test_existing_run_dir_is_refused_without_overwrite(tmp_path, sentiment_csv, tiny_bert):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_MARKER).write_text("")  # an earlier tunesmith run
    (run_dir / "keep.txt").write_text("earlier run")
    cfg = tiny_config(tiny_bert, sentiment_csv, run_dir)
    with pytest.raises(ConfigError) as caught:
        tunesmith.train(cfg, show_progress=False)
    message = caught.value.problems[0]
    assert f"output.dir: '{run_dir}' already holds a run; it stopped before its first checkpoint" in message
    assert f"start it over with `tunesmith train {run_dir / 'config.yaml'} --overwrite`" in message
    assert (run_dir / "keep.txt").read_text() == "earlier run"

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    from typer.testing import CliRunner

    from tunesmith.cli import app

    result = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml")])
    assert result.exit_code == 2
    assert f"error: {message}" in result.output.splitlines()
    assert sorted(p.name for p in run_dir.iterdir()) == [RUN_MARKER, "keep.txt"]
    # The override turns the refusal off (the bad data below then stops the run, leaving the old one in place).


def test_bad_input_does_not_overwrite_an_existing_run(tmp_path, tiny_bert):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_MARKER).write_text("")
    (run_dir / "keep.txt").write_text("earlier run")
    sections = _single_class(tmp_path)
    cfg = tiny_config(tiny_bert, tmp_path / "x.csv", run_dir, output={"dir": str(run_dir), "overwrite": True}, **sections)
    with pytest.raises(DataError, match="single class"):
        tunesmith.train(cfg, show_progress=False)
    assert sorted(p.name for p in run_dir.iterdir()) == [RUN_MARKER, "keep.txt"]


def test_an_empty_existing_output_dir_is_fine(tmp_path, sentiment_csv):
    from tunesmith.config import parse_config
    from tunesmith.runs.rundir import check_run_dir

    (tmp_path / "run").mkdir()
    assert check_run_dir(parse_config(tiny_config(tmp_path, sentiment_csv, tmp_path / "run"))) == tmp_path / "run"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is a file"):
        check_run_dir(parse_config(tiny_config(tmp_path, sentiment_csv, tmp_path / "file")))


# --------------------------------------------------------------------------- warnings


def _warning_tables(folder: Path) -> tuple[dict, Path, Path]:
    """Train: 22 'pos' vs 2 'neg' (11:1), three texts far longer than 16 tokens; validation repeats two train texts."""
    rows = [{"text": r["text"], "label": "pos"} for r in sentiment_rows(44, seed=5)[1::2]]
    long_text = " ".join(["the film was really very good and the story was lovely"] * 4)
    for i in range(3):
        rows[i]["text"] = f"{long_text} {i}"
    rows += [{"text": "the film was bad and dull", "label": "neg"}, {"text": "awful boring plot", "label": "neg"}]
    train = write_csv(folder / "train.csv", rows)
    valid = write_csv(
        folder / "validation.csv",
        [{"text": "a new and lovely story", "label": "pos"}, rows[5], {"text": "really tedious", "label": "neg"}, rows[-1]],
    )
    return {"data": {"train_file": str(train), "validation_file": str(valid)}, "task": {"max_length": 16}}, train, valid


def test_preflight_warnings(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    from tunesmith.config import parse_config

    sections, train, valid = _warning_tables(tmp_path)
    run = parse_config(tiny_config(tiny_bert, train, tmp_path / "run", **sections))
    task = get_task("classification")
    tables, notes = make_splits(run.data, 0, task.stratify_key(run.task))
    assert notes == []  # a validation file is given: nothing carved
    state, warnings = task.preflight(run.task, tables)
    assert state.labels == ["neg", "pos"]
    imbalance = [w for w in warnings if w.startswith("class imbalance")]
    assert imbalance == [
        "class imbalance: 'neg' has 2 train examples vs 22 for the largest class (11:1); consider task.class_weights=balanced"
    ]
    duplicates = [w for w in warnings if "also occur in train" in w]
    assert len(duplicates) == 1
    assert duplicates[0].startswith(f"2 validation texts also occur in train (e.g. {valid} line 3)")
    assert "de-duplicate" in duplicates[0]

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    long = task.tokenizer_warnings(run.task, tables, tokenizer)
    assert len(long) == 1
    assert long[0].startswith("3 of 24 train texts (12.5%) are longer than task.max_length=16 tokens and will be truncated")
    assert "raise task.max_length" in long[0]


def test_balanced_data_gives_no_warnings(tmp_path, sentiment_csv):
    from tunesmith.config import parse_config

    run = parse_config(tiny_config(tmp_path, sentiment_csv, tmp_path / "run"))
    task = get_task("classification")
    tables, notes = make_splits(run.data, 0, task.stratify_key(run.task))
    assert len(notes) == 1 and "carved 16 rows" in notes[0]
    _, warnings = task.preflight(run.task, tables)
    assert warnings == []


def test_warnings_reach_run_result_and_overwrite_replaces_run(tmp_path, tiny_bert):
    """One tiny real run: the preflight warnings are on the RunResult, and output.overwrite=true replaces
    an existing run directory."""
    sections, train, _ = _warning_tables(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / RUN_MARKER).write_text("")  # only tunesmith runs are replaced
    (run_dir / "stale.txt").write_text("old")
    cfg = tiny_config(
        tiny_bert,
        train,
        run_dir,
        output={"dir": str(run_dir), "overwrite": True},
        train={"num_train_epochs": 1, "eval_strategy": "no"},
        **sections,
    )
    result = tunesmith.train(cfg, show_progress=False)
    text = "\n".join(result.warnings)
    assert "class imbalance" in text
    assert "2 validation texts also occur in train" in text
    assert "3 of 24 train texts (12.5%)" in text
    assert (run_dir / "stale.txt").read_text() == "old"  # not tunesmith's: kept (and logged)
    assert (run_dir / "model" / "config.json").exists() and not (run_dir / ".replaced-run").exists()
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["warnings"] == result.warnings
    assert pd.read_csv(train).shape[0] == 24


# --------------------------------------------------------------------------- more malformed inputs


def _train_problems(tmp_path: Path, data: dict, task: dict | None = None) -> list[str]:
    cfg = tiny_config(tmp_path, tmp_path / "x.csv", tmp_path / "run", data=data, task={"name": "classification", **(task or {})})
    with pytest.raises(TunesmithError) as caught:
        tunesmith.train(cfg, show_progress=False)
    assert all("\n" not in p for p in caught.value.problems), caught.value.problems
    assert not (tmp_path / "run").exists()
    return caught.value.problems


def test_ragged_csv_is_one_line_naming_the_line(tmp_path):
    (tmp_path / "r.csv").write_text("text,label\ngood film,pos\nbad, dull film,neg\n", encoding="utf-8")
    (problem,) = _train_problems(tmp_path, {"train_file": str(tmp_path / "r.csv")})
    assert problem == (
        f"{tmp_path}/r.csv: cannot parse as CSV (Expected 2 fields in line 3, saw 3); expected as many fields on every "
        "line as in the header; quote fields that contain commas or line breaks"
    )


def test_broken_saved_dataset_folder(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text("{broken", encoding="utf-8")
    (problem,) = _train_problems(tmp_path, {"train_file": str(folder)})
    assert problem.startswith(f"{folder}: cannot load as a dataset saved with `save_to_disk` (JSONDecodeError")
    assert problem.endswith("save it again")


def test_file_level_problem_is_reported_once_for_carved_splits(tmp_path):
    write_csv(tmp_path / "train.csv", _rows())
    problems = _train_problems(tmp_path, {"train_file": str(tmp_path / "train.csv")}, {"text_pair_column": "hypothesis"})
    assert problems == [
        f"{tmp_path}/train.csv: missing column 'hypothesis' (task.text_pair_column); columns found: text, label; "
        "rename the column or set task.text_pair_column=<one of them>"
    ]


def test_too_few_rows_to_carve_a_validation_split(tmp_path):
    write_csv(tmp_path / "train.csv", _rows(1))
    (problem,) = _train_problems(tmp_path, {"train_file": str(tmp_path / "train.csv")})
    assert (
        problem == f"{tmp_path}/train.csv: only 1 row(s); need at least 2 to carve out a validation split; "
        "add rows or give data.validation_file"
    )


def test_multi_label_indicator_columns_must_be_0_or_1(tmp_path):
    (tmp_path / "m.csv").write_text("text,x,y\na,1,0\nb,0,2\nc,1,1\nd,0,1\n", encoding="utf-8")
    (problem,) = _train_problems(tmp_path, {"train_file": str(tmp_path / "m.csv")}, {"label_columns": ["x", "y"]})
    assert problem == (
        f"{tmp_path}/m.csv line 3: column 'y' is 2; expected 0 or 1 in a multi-label indicator column; "
        "set it to 0 or 1, or remove the row"
    )


def test_class_weights_must_match_the_labels_before_the_run_starts(tmp_path):
    write_csv(tmp_path / "train.csv", _rows())
    (problem,) = _train_problems(tmp_path, {"train_file": str(tmp_path / "train.csv")}, {"class_weights": [1.0, 2.0, 3.0]})
    assert problem == (
        "task.class_weights: expected 2 weights (one per label: neg, pos), found 3; "
        "list one weight per label in that order, or use task.class_weights=balanced"
    )
