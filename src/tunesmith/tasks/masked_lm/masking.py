"""Dynamic masking (BERT: choose `probability` of the tokens; of those 80% [MASK], 10% a random token, 10% kept).

Each example's mask is drawn from its own generator seeded by (seed, epoch, example index), never from a
global RNG: a resumed run (or another process, or a worker) draws exactly the masks the uninterrupted run
drew, whatever order and batching brought the example. Evaluation uses a fixed seed and epoch, so every
evaluation scores the same masked copies and its loss is comparable across evaluations."""

from __future__ import annotations

import dataclasses
import hashlib

import torch

EVAL_SEED = 20200101  # any fixed value: evaluation masks are the same at every evaluation and in `evaluate`
IGNORE = -100


def example_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator whose draws depend only on (seed, epoch, example index)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@dataclasses.dataclass(frozen=True)
class MaskingRule:
    probability: float
    mask_id: int
    vocab_size: int
    whole_word: bool = False


def chosen_positions(maskable: torch.Tensor, word_ids: torch.Tensor | None, probability: float,
                     generator: torch.Generator) -> torch.Tensor:
    """Which positions are predicted: each maskable token with `probability`, or (whole words) each word with
    `probability` and then all its pieces. `word_ids` -1 where a token has no word (specials)."""
    if word_ids is None:
        return maskable & (torch.rand(maskable.shape, generator=generator) < probability)
    words = torch.where(maskable, word_ids, -1)
    count = int(words.max()) + 1 if maskable.any() else 0
    picked = torch.rand(count, generator=generator) < probability
    return maskable & (words >= 0) & picked[words.clamp_min(0)]


def mask_example(input_ids: torch.Tensor, maskable: torch.Tensor, word_ids: torch.Tensor | None, rule: MaskingRule,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input ids, labels) of one example: labels are the original ids at chosen positions, -100 elsewhere."""
    chosen = chosen_positions(maskable, word_ids, rule.probability, generator)
    labels = torch.where(chosen, input_ids, IGNORE)
    split = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(rule.vocab_size, input_ids.shape, generator=generator)
    masked = torch.where(chosen & (split < 0.8), rule.mask_id, input_ids)
    masked = torch.where(chosen & (split >= 0.8) & (split < 0.9), random_ids, masked)
    return masked, labels


class MaskingCollator:
    """Pads a batch and masks each example (module docstring). `for_training(seed)` gives the training loader's
    copy, told each epoch by the loop (`set_epoch`); this one (evaluation) masks with a fixed seed. Batches carry
    `original_ids` and `example_index` for the metrics (pseudo-perplexity)."""

    extra_columns = ("example_index", "word_ids")

    def __init__(self, tokenizer, rule: MaskingRule, seed: int = EVAL_SEED, epoch: int = 0):
        self.tokenizer, self.rule, self.seed, self.epoch = tokenizer, rule, seed, epoch
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def for_training(self, seed: int) -> "MaskingCollator":
        return MaskingCollator(self.tokenizer, self.rule, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(features), longest), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        words = torch.full_like(ids, -1)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.as_tensor(feature["input_ids"])
            attention[row, :n] = 1
            if self.rule.whole_word and "word_ids" in feature:
                words[row, :n] = torch.as_tensor(feature["word_ids"])
        maskable = attention.bool() & ~torch.isin(ids, self.special)  # never specials or padding
        masked, labels = ids.clone(), torch.full_like(ids, IGNORE)
        indices = [int(f.get("example_index", i)) for i, f in enumerate(features)]
        for row, index in enumerate(indices):
            generator = example_generator(self.seed, self.epoch, index)
            word_ids = words[row] if self.rule.whole_word else None
            masked[row], labels[row] = mask_example(ids[row], maskable[row], word_ids, self.rule, generator)
        batch = {"input_ids": masked, "attention_mask": attention, "labels": labels, "original_ids": ids,
                 "example_index": torch.tensor(indices, dtype=torch.long)}
        if "token_type_ids" in features[0]:
            batch["token_type_ids"] = torch.zeros_like(ids)
        return batch
