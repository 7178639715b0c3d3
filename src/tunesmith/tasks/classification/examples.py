"""The classification family's material for the contract suite (tests/contract/)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.tasks.contract import ContractExamples, data_section, tiny_checkpoint, write_jsonl

POSITIVE, NEGATIVE = ["good", "great", "lovely", "superb"], ["bad", "awful", "dull", "boring"]
FILLER = ["the", "film", "was", "really", "plot", "and"]


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        label = i % 2
        word = (POSITIVE if label else NEGATIVE)[(i // 2) % 4]
        rows.append({"text": f"{FILLER[i % 6]} {word} {FILLER[(i + 3) % 6]}", "label": "pos" if label else "neg"})
    return rows


def _data(folder: Path) -> dict:
    rows = _rows(16)
    return data_section(folder, rows, rows[:8])


def _bad_data(folder: Path) -> dict:
    rows = [{"text": r["text"], "sentiment": r["label"]} for r in _rows(8)]  # no `label` column
    return {"train_file": str(write_jsonl(folder / "bad.jsonl", rows)), "validation_split": 0.25}


def contract_examples() -> ContractExamples:
    return ContractExamples(
        build_model=lambda folder: tiny_checkpoint(folder, POSITIVE + NEGATIVE + FILLER),
        write_data=_data, write_bad_data=_bad_data,
        task={"name": "classification", "max_length": 32},
        predict_inputs=["the film was great", "really dull plot"],
    )
