"""The `task` section of the token classification family (`task: {name: token_classification, ...}`),
registered in tunesmith.tasks."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tunesmith.config.task_base import TaskConfigBase


class TokenClassificationTaskConfig(TaskConfigBase):
    """Token classification: named entities, part-of-speech tags, chunks."""

    pipeline_tag: ClassVar[str] = "token-classification"
    name: Literal["token_classification"] = "token_classification"
    format: Literal["auto", "conll", "tokens", "spans"] = Field(
        "auto",
        description="`conll`: one token per line, tag in a column, blank line between sentences; `tokens`: records with "
        "token and tag lists; `spans`: records with text and character-offset entities. `auto`: .conll/.iob/.bio/.txt/.tsv "
        "files are CoNLL, other files by their columns.",
    )
    tokens_column: str = Field("tokens", description="`tokens` format: column with the list of tokens.")
    tags_column: str = Field("tags", description="`tokens` format: column with the list of tags, one per token.")
    text_column: str = Field("text", description="`spans` format: column with the raw text.")
    entities_column: str = Field(
        "entities", description="`spans` format: column with entities `{start, end, label}` (character offsets, end exclusive)."
    )
    conll_token_column: int = Field(0, ge=0, description="CoNLL: column of the token (0-based).")
    conll_tag_column: int = Field(-1, description="CoNLL: column of the tag (0-based; -1 is the last column).")
    scheme: Literal["auto", "BIO", "BIOES", "IO", "none"] = Field(
        "auto",
        description="Tag scheme of the data. `auto`: E-/S- tags -> BIOES, B- tags -> BIO, only I- -> IO, "
        "tags without prefixes -> none (POS tags: no entities, token accuracy).",
    )
    convert_scheme: Literal["keep", "BIO", "BIOES", "IO"] = Field(
        "keep", description="Convert every split's tags to this scheme before training (`keep`: leave them)."
    )
    repair: bool = Field(False, description="Turn an I-X that follows no X into B-X instead of reporting it as an error.")
    label_all_subtokens: bool = Field(
        False, description="Train on every sub-token of a word (default: the first one only, the rest ignored)."
    )
    max_length: int = Field(
        128, gt=4, description="Longest tokenized window; longer sentences are split into windows at word boundaries."
    )
    strict: bool = Field(False, description="seqeval strict mode (IOB2/IOBES); default: conlleval-compatible matching.")
    aggregation: Literal["first", "average", "max"] = Field(
        "first", description="How sub-token scores make a word's tag at prediction (as the transformers pipeline)."
    )
