"""The masked LM family's material for the contract suite (tests/contract/)."""

from __future__ import annotations

from pathlib import Path

from tunesmith.tasks.contract import ContractExamples, data_section, tiny_checkpoint

SUBJECTS = ["cats", "dogs", "birds", "fish"]
VERBS = {"cats": "sleep", "dogs": "run", "birds": "fly", "fish": "swim"}
PLACES = ["here", "there", "now", "today"]
WORDS = [*SUBJECTS, *VERBS.values(), *PLACES, "the", "always"]


def _rows(n: int) -> list[dict]:
    # Each verb follows from its subject: a masked verb (or subject) is predictable from the rest.
    return [{"text": f"the {SUBJECTS[i % 4]} always {VERBS[SUBJECTS[i % 4]]} {PLACES[(i // 4) % 4]}"} for i in range(n)]


def _data(folder: Path) -> dict:
    rows = _rows(16)
    return data_section(folder, rows, rows[:8])


def _bad_data(folder: Path) -> dict:
    rows = [*_rows(6), {"text": "   "}]  # a blank row
    return data_section(folder, rows, rows[:4], stem="bad-")


def contract_examples() -> ContractExamples:
    return ContractExamples(
        build_model=lambda folder: tiny_checkpoint(folder, WORDS, "AutoModelForMaskedLM"),
        write_data=_data, write_bad_data=_bad_data,
        task={"name": "masked_lm", "max_length": 16, "line_by_line": True, "mlm_probability": 0.3,
              "pseudo_perplexity_samples": 4},
        # Few masked tokens per batch make each step's loss noisy: more epochs so the last step is clearly lower.
        train={"num_train_epochs": 40, "per_device_train_batch_size": 8},
        predict_inputs=["the cats always [MASK] here", "the [MASK] always run now"],
    )
