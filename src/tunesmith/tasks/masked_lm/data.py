"""Reading, checking and tokenizing raw text for masked language modelling."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import datasets
import pandas as pd

from tunesmith.data.loaders import Table, _decode, _existing_file, _lines, read_file
from tunesmith.data.tokenize import cached_map


def read_text_or_table(path, encoding: str = "utf-8", field: str = "data.train_file", text_column: str = "text") -> Table:
    """A .txt file is one text per line (not a tab-separated table, as `read_file` reads it); other files are tables."""
    path = Path(path)
    if path.suffix.lower() != ".txt":
        return read_file(path, encoding, field)
    path = _existing_file(path, field)
    lines = _lines(_decode(path, encoding).removeprefix("\ufeff"))
    if lines and lines[-1] == "":
        lines = lines[:-1]  # the newline ending the last line
    return Table(pd.DataFrame({text_column: lines}), str(path), lambda i: f"line {i + 1}")


def text_problems(table: Table, column: str) -> list[str]:
    """A missing column, and each empty or blank-only row (file and row named)."""
    frame = table.frame
    if column not in frame.columns:
        return [f"{table.source}: no column '{column}' (found: {', '.join(map(str, frame.columns))}); expected a text "
                "per row; set task.text_column, or give a .txt file with one text per line"]
    problems = [f"{table.where(i)}: column '{column}' is empty or blank; expected text (remove the row)"
                for i, value in enumerate(frame[column]) if value is None or not str(value).strip() or str(value) == "nan"]
    if len(frame) == 0:
        problems.append(f"{table.source}: no rows; expected at least one text")
    return problems


def _is_cjk(text: str) -> bool:
    return any(unicodedata.name(ch, "").startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL")) for ch in text)


def word_numbers(encoding, text: str, start: int = 0) -> list[int]:
    """A word number per token (-1: no word): the fast tokenizer's word ids, except that each CJK character is a
    word of its own (tokenizers without word boundaries would make a whole Chinese sentence one word)."""
    numbers, current, last = [], start - 1, None
    for word, (a, b) in zip(encoding.word_ids, encoding.offsets):
        if word is None:
            numbers.append(-1)
            continue
        if word != last or _is_cjk(text[a:b]):
            current += 1
        numbers.append(current)
        last = word
    return numbers


def encode_lines(cfg, texts: list[str], tokenizer) -> dict:
    encoded = tokenizer(texts, truncation=True, max_length=cfg.max_length, return_offsets_mapping=True)
    words = [word_numbers(encoded[i], text) for i, text in enumerate(texts)]
    return {"input_ids": encoded["input_ids"], "word_ids": words}


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after a single text ([CLS] ... [SEP], <s> ... </s>): read
    from how it encodes one word (transformers 5 tokenizers have no `build_inputs_with_special_tokens`)."""
    encoded = tokenizer("a", add_special_tokens=True, return_special_tokens_mask=True)
    ids, specials = encoded["input_ids"], encoded["special_tokens_mask"]
    content = [i for i, s in enumerate(specials) if not s]
    if not content:
        return [], []
    return ids[:content[0]], ids[content[-1] + 1:]


def encode_blocks(cfg, texts: list[str], tokenizer) -> dict:
    """All texts concatenated (without special tokens) and cut into blocks of max_length with the tokenizer's
    special tokens around each (as run_mlm.py's group_texts); the last, shorter block is kept."""
    before, after = special_frame(tokenizer)
    inner = cfg.max_length - len(before) - len(after)
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids, words, offset = [], [], 0
    for i, text in enumerate(texts):
        numbers = word_numbers(encoded[i], text, offset)
        ids += encoded["input_ids"][i]
        words += numbers
        offset = max([offset - 1, *numbers]) + 1
    blocks = {"input_ids": [], "word_ids": []}
    for start in range(0, len(ids), inner):
        piece = words[start:start + inner]
        first = min([w for w in piece if w >= 0], default=0)
        blocks["input_ids"].append([*before, *ids[start:start + inner], *after])
        blocks["word_ids"].append([-1] * len(before) + [w - first if w >= 0 else -1 for w in piece] + [-1] * len(after))
    return blocks


def encode_table(cfg, table: Table, tokenizer) -> datasets.Dataset:
    texts = [str(t) for t in table.frame[cfg.text_column].tolist()]
    build = encode_lines if cfg.line_by_line else encode_blocks

    def tokenize(batch):
        out = build(cfg, batch["text"], tokenizer)
        out["length"] = [len(x) for x in out["input_ids"]]
        return out

    raw = datasets.Dataset.from_dict({"text": texts})
    if not cfg.line_by_line:  # blocks cross rows: one batch over all texts (map's batches would cut blocks short)
        encoded = datasets.Dataset.from_dict(tokenize({"text": texts}))
    else:
        encoded = cached_map(raw, tokenize, tokenizer, key_extra=f"mlm-lines-{cfg.max_length}", remove_columns=["text"])
    return encoded.add_column("example_index", list(range(len(encoded))))
