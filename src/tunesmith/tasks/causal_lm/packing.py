"""Packing: several documents or examples in one row, none of them reading another.

A packed row gives each example its own position ids (restarting at 0) and no attention mask: transformers
then builds a block-diagonal causal mask from the restarts (`masking_utils.find_packed_sequence_indices`, for
SDPA and eager attention; flash-attention-2 reads the same restarts as variable-length sequences), so a token
attends only to earlier tokens of its own example. The first token of every example is labelled -100: the
loss never asks the previous example's last token to predict it. With both, each token's loss is the same
packed as alone (tests/test_causal_lm.py). Rows without packing carry an attention mask and no position ids.

Padding a batch of packed rows adds a run of pad tokens with positions 0..k-1: one more "example" that no real
token can attend to, with no labels.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

import torch

IGNORE = -100


def block_rows(documents: Iterable[list[int]], block_size: int) -> Iterator[dict]:
    """Documents (token ids, each ending with EOS) joined and cut into rows of `block_size` tokens (the last may
    be shorter). A document cut by a row's end goes on in the next row, from position 0."""
    ids: list[int] = []
    positions: list[int] = []
    starts: list[int] = []  # where, in `ids`, an example begins (its first token is not a target)
    for doc in documents:
        offset = 0
        while offset < len(doc):
            piece = doc[offset:offset + block_size - len(ids)]
            starts.append(len(ids))
            ids += piece
            positions += range(len(piece))
            offset += len(piece)
            if len(ids) == block_size:
                yield _row(ids, ids, positions, starts)
                ids, positions, starts = [], [], []
    if ids:
        yield _row(ids, ids, positions, starts)


def pack_examples(examples: list[tuple[list[int], list[int]]], max_length: int) -> list[list[int]]:
    """Which examples share a row: best-fit decreasing over their lengths (TRL's `bfd`), so rows are nearly full;
    returns each row's example indices. Deterministic: ties keep the examples' order."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i][0]), i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: the tightest row that fits is found by bisect
    for i in order:
        size = min(len(examples[i][0]), max_length)
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            room, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (room - size, row))
        else:
            rows.append([i])
            bisect.insort(free, (max_length - size, len(rows) - 1))
    return rows


def packed_row(examples: list[tuple[list[int], list[int]]]) -> dict:
    """One row of the given (input_ids, labels) examples, each with its own positions."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    starts: list[int] = []
    for input_ids, example_labels in examples:
        starts.append(len(ids))
        ids += input_ids
        labels += example_labels
        positions += range(len(input_ids))
    return _row(ids, labels, positions, starts)


def _row(ids: list[int], labels: list[int], positions: list[int], starts: list[int]) -> dict:
    labels = list(labels)
    for start in starts:
        labels[start] = IGNORE
    return {"input_ids": list(ids), "labels": labels, "position_ids": list(positions), "length": len(ids)}


class CausalLMCollator:
    """Pads rows on the right: input ids with the pad id, labels with -100. Packed rows (with `position_ids`) get
    no attention mask (see the module docstring); others get one."""

    extra_columns = ("position_ids", "example_index", "prompt_length")

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": self._pad(features, "input_ids", self.pad_token_id, longest)}
        if "labels" in features[0]:
            batch["labels"] = self._pad(features, "labels", IGNORE, longest)
        if "position_ids" in features[0]:
            batch["position_ids"] = torch.tensor([list(f["position_ids"]) + list(range(longest - len(f["position_ids"])))
                                                  for f in features])
        else:
            batch["attention_mask"] = torch.tensor([[1] * len(f["input_ids"]) + [0] * (longest - len(f["input_ids"]))
                                                    for f in features])
        for key in ("example_index", "prompt_length"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features])
        return batch

    @staticmethod
    def _pad(features: list[dict], key: str, value: int, longest: int) -> torch.Tensor:
        return torch.tensor([list(f[key]) + [value] * (longest - len(f[key])) for f in features])
