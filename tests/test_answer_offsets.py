"""SQuAD answer offsets: whitespace-only mismatches (the official dev sets' extra answers such as
`" Carolina Panthers"` one character early) are repaired by default with a counted note; other wrong
offsets stay errors in training data unless `task.repair`; evaluation data (validation, test,
`tunesmith eval`, `tunesmith predict --input`) needs only the answer texts.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest

from tunesmith.config import parse_config
from tunesmith.data.splits import make_splits
from tunesmith.errors import DataError
from tunesmith.data.inputs import read_inputs
from tunesmith.tasks import get_task
from tunesmith.tasks.question_answering.task import read_examples

TASK = {"name": "question_answering", "max_length": 64, "doc_stride": 16}

# The first paragraph of the official SQuAD v1.1 dev set (dev-v1.1.json), in its shape: three annotators'
# answers per question, `answers` before `question` and `id`.
CONTEXT = (
    "Super Bowl 50 was an American football game to determine the champion of the National Football League (NFL) for "
    "the 2015 season. The American Football Conference (AFC) champion Denver Broncos defeated the National Football "
    "Conference (NFC) champion Carolina Panthers 24\u201310 to earn their third Super Bowl title. The game was played on "
    "February 7, 2016, at Levi's Stadium in the San Francisco Bay Area at Santa Clara, California. As this was the 50th "
    "Super Bowl, the league emphasized the \"golden anniversary\" with various gold-themed initiatives, as well as "
    "temporarily suspending the tradition of naming each Super Bowl game with Roman numerals (under which the game would "
    "have been known as \"Super Bowl L\"), so that the logo could prominently feature the Arabic numerals 50."
)
DEV = {
    "data": [{
        "title": "Super_Bowl_50",
        "paragraphs": [{
            "context": CONTEXT,
            "qas": [
                {"answers": [{"answer_start": 177, "text": "Denver Broncos"} for _ in range(3)],
                 "question": "Which NFL team represented the AFC at Super Bowl 50?", "id": "56be4db0acb8001400a502ec"},
                {"answers": [{"answer_start": 249, "text": "Carolina Panthers"} for _ in range(3)],
                 "question": "Which NFL team represented the NFC at Super Bowl 50?", "id": "56be4db0acb8001400a502ed"},
                {"answers": [{"answer_start": 403, "text": "Santa Clara, California"}, {"answer_start": 355, "text": "Levi's Stadium"},
                             {"answer_start": 355, "text": "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California."}],
                 "question": "Where did Super Bowl 50 take place?", "id": "56be4db0acb8001400a502ee"},
            ],
        }],
    }],
    "version": "1.1",
}


def _whitespace_quirks() -> dict:
    """The dev paragraph with extra answers that differ from the context only by surrounding whitespace."""
    doc = copy.deepcopy(DEV)
    qas = doc["data"][0]["paragraphs"][0]["qas"]
    qas[0]["answers"].append({"answer_start": 176, "text": "Denver Broncos"})  # the offset of the space before the word
    qas[1]["answers"].append({"answer_start": 247, "text": " Carolina Panthers"})  # a leading space, one character early
    qas[2]["answers"].append({"answer_start": 403, "text": "Santa Clara, California "})  # a trailing space; the context has "."
    return doc


def _write(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return path


def _tables(files: dict, **task):
    cfg = parse_config({"data": {f"{split}_file": str(path) for split, path in files.items()}, "task": {**TASK, **task}})
    t = get_task("question_answering")
    tables, _ = make_splits(cfg.data, 0, t.stratify_key(cfg.task), t.reader(cfg.task))
    return t, cfg, tables


def test_whitespace_only_mismatches_are_repaired_by_default(tmp_path):
    path = _write(tmp_path / "dev-v1.1.json", _whitespace_quirks())
    t, cfg, tables = _tables({"train": path, "validation": path})
    assert cfg.task.repair is False
    state, warnings = t.preflight(cfg.task, tables)
    note = (
        "repaired 6 answers whose text or offset differed only by surrounding whitespace (e.g. "
        f"{path} record '56be4db0acb8001400a502ec' (data[0].paragraphs[0].qas[0]): answer 4 'Denver Broncos' at 176, "
        "read as 'Denver Broncos' at 177)"
    )
    assert warnings == [note]  # 3 in train, the same 3 in validation
    examples, problems, mismatches, repaired = read_examples(cfg.task, tables["train"])
    assert problems == mismatches == [] and repaired == 0  # whitespace fixes are not task.repair's
    assert [e.answers[-1] for e in examples] == [("Denver Broncos", 177), ("Carolina Panthers", 249), ("Santa Clara, California", 403)]


def test_other_mismatches_keep_needing_task_repair(tmp_path):
    doc = _whitespace_quirks()
    doc["data"][0]["paragraphs"][0]["qas"][0]["answers"][1]["answer_start"] = 170  # "champion Denver" - not whitespace
    path = _write(tmp_path / "train.json", doc)
    t, cfg, tables = _tables({"train": path, "validation": path})
    with pytest.raises(DataError) as caught:
        t.preflight(cfg.task, tables)
    assert caught.value.problems[:2] == [
        f"1 answers have an answer_start that does not point at their text ({path}: 1); set task.repair=true to move each "
        "to the nearest occurrence of its text, or fix the offsets",
        f"{path} record '56be4db0acb8001400a502ec' (data[0].paragraphs[0].qas[0]): answer 2 'Denver Broncos' has answer_start 170, "
        "but the context there reads 'ampion Denver '; expected the offset of the text (nearest occurrence: 177); fix it, "
        "or set task.repair=true",
    ]
    t, cfg, tables = _tables({"train": path, "validation": path}, repair=True)
    _, warnings = t.preflight(cfg.task, tables)
    assert warnings[0].startswith("repaired 6 answers whose text or offset differed only by surrounding whitespace")
    assert "task.repair: moved 1 answer_start offsets to the nearest occurrence of their answer text" in warnings
    # The validation copy of the same file is evaluation data: its wrong offset is located by its text.
    assert any(w.startswith("located 1 evaluation answer by its text") for w in warnings), warnings


def _eval_file(tmp_path: Path) -> Path:
    """Dev data with a missing and a wrong (not whitespace) answer_start: fine for evaluation, which scores texts."""
    doc = copy.deepcopy(DEV)
    qas = doc["data"][0]["paragraphs"][0]["qas"]
    del qas[0]["answers"][1]["answer_start"]
    qas[2]["answers"][1]["answer_start"] = 999
    return _write(tmp_path / "dev.json", doc)


def test_evaluation_data_needs_only_answer_texts(tmp_path, caplog):
    dev = _eval_file(tmp_path)
    train = _write(tmp_path / "train.json", DEV)
    t, cfg, tables = _tables({"train": train, "validation": dev, "test": dev})
    state, warnings = t.preflight(cfg.task, tables)

    def located(n: int) -> str:
        return (
            f"located {n} evaluation answers by their text: the answer_start was missing or did not point at the text (e.g. "
            f"{dev} record '56be4db0acb8001400a502ec' (data[0].paragraphs[0].qas[0]): answer 2 'Denver Broncos' has no "
            "answer_start, found at 177); evaluation compares answer texts only, so nothing needs fixing"
        )

    assert warnings == [located(4)]  # 2 in validation, 2 in test
    # `tunesmith eval RUN dev.json`: the task's reader with the CLI's field, then preflight_eval (which logs the note).
    table = t.reader(cfg.task)(dev, "utf-8", "DATA")
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        t.preflight_eval(cfg.task, state, table)
    assert located(2) in caplog.messages
    examples, problems, mismatches, _ = read_examples(cfg.task, table, offsets=False)
    assert problems == mismatches == []
    assert examples[0].answers[1] == ("Denver Broncos", 177) and examples[2].answers[1] == ("Levi's Stadium", 355)


def test_training_data_still_needs_offsets(tmp_path):
    dev = _eval_file(tmp_path)
    with pytest.raises(DataError) as caught:
        _tables({"train": dev})
    assert caught.value.problems == [
        f"{dev} record '56be4db0acb8001400a502ec' (data[0].paragraphs[0].qas[0]): answers[1]: expected "
        '{"text": <answer text>, "answer_start": <character offset >= 0>}, found text str \'Denver Broncos\', '
        "answer_start NoneType None; fix the answer or remove it"
    ]


def test_flat_evaluation_rows_without_answer_start(tmp_path, caplog):
    rows = [
        {"id": "a", "question": "Who won?", "context": CONTEXT, "answers": {"text": ["Denver Broncos"]}},  # no answer_start at all
        # Two texts, one offset: the offsets cannot be paired with the texts, so both texts are located.
        {"id": "b", "question": "Who lost?", "context": CONTEXT,
         "answers": {"text": ["Carolina Panthers", "Panthers"], "answer_start": [0]}},
    ]
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    t, cfg, tables = _tables({"train": _write(tmp_path / "train.json", DEV)})
    state, _ = t.preflight(cfg.task, tables)
    with caplog.at_level(logging.WARNING, logger="tunesmith"):
        t.preflight_eval(cfg.task, state, t.reader(cfg.task)(dev, "utf-8", "DATA"))
    assert any(m.startswith("located 3 evaluation answers by their text") for m in caplog.messages), caplog.messages
    # The same rows as training data: refused as today.
    t, cfg, tables = _tables({"train": dev, "validation": dev})
    with pytest.raises(DataError) as caught:
        t.preflight(cfg.task, tables)
    assert caught.value.problems[0].startswith(f"{dev} line 1: column 'answers' is {{'text': ['Denver Broncos']}}; expected")


def test_located_answers_encode_and_predict_input_reads(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    dev = _eval_file(tmp_path)
    t, cfg, tables = _tables({"train": _write(tmp_path / "train.json", DEV), "validation": dev})
    state, _ = t.preflight(cfg.task, tables)
    encoded = t.encode(cfg.task, tables["validation"], AutoTokenizer.from_pretrained(tiny_bert), state)
    labelled = {index for index, start in zip(encoded["example_index"], encoded["start_positions"]) if start > 0}
    assert labelled == {0, 1, 2}  # every question's first answer is a span of some window
    # `tunesmith predict RUN --input dev.json` reads the questions, whatever the answers' offsets.
    run = parse_config({"data": {"train_file": "unused.json"}, "task": TASK})
    inputs, records = read_inputs(run, dev, None)
    assert [q for q, _ in inputs] == [qa["question"] for qa in DEV["data"][0]["paragraphs"][0]["qas"]]
    assert records[0] == {"id": "56be4db0acb8001400a502ec", "question": "Which NFL team represented the AFC at Super Bowl 50?"}
