"""The token classification family's material for the contract suite (tests/contract/)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.tasks.contract import ContractExamples, data_section, tiny_checkpoint

PEOPLE, PLACES = ["chen", "maria", "elena"], ["paris", "lagos", "oslo"]
TEMPLATES = [["PER", "lives", "in", "LOC"], ["the", "film", "by", "PER", "is", "about", "LOC"], ["a", "story", "about", "PER"]]


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        tokens, tags = [], []
        for slot in TEMPLATES[i % len(TEMPLATES)]:
            pool = {"PER": PEOPLE, "LOC": PLACES}.get(slot)
            tokens.append(pool[i % 3] if pool else slot)
            tags.append(f"B-{slot}" if pool else "O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def _data(folder: Path) -> dict:
    rows = _rows(12)
    return data_section(folder, rows, rows[:6])


def _bad_data(folder: Path) -> dict:
    rows = _rows(6)
    rows[2]["tags"] = rows[2]["tags"][:-1]  # one tag fewer than tokens
    return data_section(folder, rows, rows, stem="bad-")


def contract_examples() -> ContractExamples:
    words = PEOPLE + PLACES + [w for t in TEMPLATES for w in t]
    return ContractExamples(
        build_model=lambda folder: tiny_checkpoint(folder, words),
        write_data=_data, write_bad_data=_bad_data,
        task={"name": "token_classification", "max_length": 32},
        predict_inputs=["chen lives in oslo", "a story about maria"],
    )
