"""The question answering family's material for the contract suite (tests/contract/)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.tasks.contract import ContractExamples, data_section, tiny_checkpoint

PEOPLE, PLACES = ["chen", "maria", "elena"], ["paris", "lagos", "oslo"]
WORDS = ["lives", "in", "who", "where", "does", "live", "?", "."]


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        per, loc = PEOPLE[i % 3], PLACES[(i // 3) % 3]
        context = f"{per} lives in {loc} ."
        question, answer = (f"who lives in {loc} ?", per) if i % 2 else (f"where does {per} live ?", loc)
        rows.append({"id": f"q{i}", "question": question, "context": context,
                     "answers": {"text": [answer], "answer_start": [context.index(answer)]}})
    return rows


def _data(folder: Path) -> dict:
    rows = _rows(12)
    return data_section(folder, rows, rows[:6])


def _bad_data(folder: Path) -> dict:
    rows = _rows(6)
    rows[1]["answers"]["answer_start"] = [99]  # past the end of its context
    return data_section(folder, rows, rows, stem="bad-")


def contract_examples() -> ContractExamples:
    return ContractExamples(
        build_model=lambda folder: tiny_checkpoint(folder, PEOPLE + PLACES + WORDS),
        write_data=_data, write_bad_data=_bad_data,
        task={"name": "question_answering", "max_length": 32, "doc_stride": 8},
        predict_inputs=[{"question": "who lives in oslo ?", "context": "elena lives in oslo ."}],
    )
