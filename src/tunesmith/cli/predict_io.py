"""How `tunesmith predict` writes its predictions: JSON lines, or CoNLL columns for token tags."""

from __future__ import annotations

import json

from tunesmith.errors import DataError


def render_predictions(records: list[dict], predictions: list[dict], fmt: str) -> list[str]:
    """Output lines: `jsonl` (the input record with its prediction), or `conll` (token<TAB>tag, a blank
    line after each sentence; token classification runs)."""
    if fmt == "jsonl":
        return [json.dumps({**record, **prediction}, ensure_ascii=False) for record, prediction in zip(records, predictions)]
    if fmt != "conll":
        raise DataError(f"--format: expected jsonl or conll, found '{fmt}'")
    lines: list[str] = []
    for prediction in predictions:
        if "tokens" not in prediction or "tags" not in prediction:
            raise DataError("--format conll: these predictions have no tokens and tags (not a token classification run); use --format jsonl")
        lines += [f"{token}\t{tag}" for token, tag in zip(prediction["tokens"], prediction["tags"])] + [""]
    return lines
