"""The tokenization cache is keyed by the full content: a change anywhere re-tokenizes."""

import datasets
from transformers import AutoTokenizer

from tunesmith.data.tokenize import cached_map


def _map(raw, tokenizer):
    return cached_map(raw, lambda b: tokenizer(b["text"]), tokenizer, key_extra="t", remove_columns=["text"])


def test_cache_hit_and_miss(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = [f"the film was good {i}" for i in range(500)]
    first = _map(datasets.Dataset.from_dict({"text": texts}), tokenizer)
    again = _map(datasets.Dataset.from_dict({"text": list(texts)}), tokenizer)
    assert again.cache_files and again.cache_files[0]["filename"] == first.cache_files[0]["filename"]
    changed = texts[:-1] + ["the film was awful"]  # only the last of 500 rows differs
    other = _map(datasets.Dataset.from_dict({"text": changed}), tokenizer)
    assert other.cache_files[0]["filename"] != first.cache_files[0]["filename"]
    assert other[-1]["input_ids"] == tokenizer("the film was awful")["input_ids"]
    shorter = _map(datasets.Dataset.from_dict({"text": texts[:100]}), tokenizer)
    assert len(shorter) == 100
