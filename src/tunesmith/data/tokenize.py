"""Tokenization with `datasets.map`, cached on disk by content fingerprint.

The cache key covers the raw rows, the tokenizer (its class, vocabulary size and special tokens)
and the task's tokenization settings, so a second run on the same data skips tokenization and a
changed setting never reuses stale features.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import datasets


def cache_dir() -> Path:
    from tunesmith.paths import cache_root

    path = cache_root() / "tokenized"
    path.mkdir(parents=True, exist_ok=True)
    return path


def tokenizer_fingerprint(tokenizer) -> str:
    parts = {
        "class": type(tokenizer).__name__,
        "name": getattr(tokenizer, "name_or_path", ""),
        "vocab": len(tokenizer),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    if hasattr(tokenizer, "backend_tokenizer"):
        parts["backend"] = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cached_map(
    raw: datasets.Dataset,
    function: Callable[[dict], dict],
    tokenizer,
    key_extra: str,
    remove_columns: list[str],
) -> datasets.Dataset:
    """`raw.map(function, batched=True)` with an on-disk cache keyed by content."""
    digest = hashlib.sha256()
    digest.update(key_extra.encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    # Hash the full content: `raw[column]` is a lazy Column in datasets 5 whose str() is only a preview.
    for column, values in raw.to_dict().items():
        digest.update(column.encode())
        digest.update(json.dumps(values, ensure_ascii=False, default=str).encode())
    path = cache_dir() / f"{digest.hexdigest()[:24]}.arrow"
    return raw.map(
        function,
        batched=True,
        remove_columns=remove_columns,
        cache_file_name=str(path),
        load_from_cache_file=True,
        desc="tokenizing",
    )
