"""Batches with little padding: length-grouped sampling plus dynamic per-batch padding.

Random batches of short sentences are about half padding; sorting by length within shuffled
mega-batches (transformers' `LengthGroupedSampler`) keeps batches random across the epoch while
each batch pads only to its own longest member.
"""

from __future__ import annotations

import datasets
import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from transformers import DataCollatorWithPadding
from transformers.trainer_pt_utils import LengthGroupedSampler

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def _model_columns(dataset: datasets.Dataset, collator=None) -> list[str]:
    """The columns a batch carries: model inputs and labels, plus the columns the collator declares in
    `extra_columns` (question answering's window metadata: offsets, CLS position, which question)."""
    wanted = set(MODEL_INPUTS) | set(getattr(collator, "extra_columns", ()))
    return [c for c in dataset.column_names if c in wanted]


def train_loader(
    dataset: datasets.Dataset, tokenizer, batch_size: int, group_by_length: bool, seed: int, num_workers: int = 0, collator=None
) -> DataLoader:
    """`collator` pads a batch (default `DataCollatorWithPadding`; token tasks pad labels with -100). A collator
    that draws at random (masked LM's dynamic masking) gives the training copy of itself by `for_training(seed)`;
    the loop tells that copy each epoch (`set_epoch`) so its draws depend on (seed, epoch, example) only."""
    if hasattr(collator, "for_training"):
        collator = collator.for_training(seed)
    generator = torch.Generator().manual_seed(seed)
    if group_by_length:
        sampler = LengthGroupedSampler(batch_size, lengths=list(dataset["length"]), generator=generator)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(
        dataset.with_format(columns=_model_columns(dataset, collator)),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collator or DataCollatorWithPadding(tokenizer),
        num_workers=num_workers,
    )


def eval_loader(dataset: datasets.Dataset, tokenizer, batch_size: int, collator=None) -> DataLoader:
    """Evaluation reads in length order (less padding); metrics do not depend on order."""
    if "length" in dataset.column_names:
        lengths = dataset["length"]
        ordered = dataset.select(sorted(range(len(dataset)), key=lengths.__getitem__))
    else:
        ordered = dataset
    return DataLoader(
        ordered.with_format(columns=_model_columns(ordered, collator)),
        batch_size=batch_size,
        sampler=SequentialSampler(ordered),
        collate_fn=collator or DataCollatorWithPadding(tokenizer),
    )


def padding_share(batch: dict) -> tuple[int, int]:
    """(real tokens, padded slots) of a batch."""
    mask = batch.get("attention_mask")
    if mask is None:  # packed rows (causal LMs) carry no mask: every slot holds a token of some example
        ids = batch.get("input_ids")
        return (ids.numel(), ids.numel()) if ids is not None else (0, 0)
    return int(mask.sum()), int(mask.numel())
