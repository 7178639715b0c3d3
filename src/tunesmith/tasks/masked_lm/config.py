"""The `task` section of the masked language modelling family (`task: {name: masked_lm, ...}`): domain
adaptation of encoders (BERT-style) on raw text. No torch here: the CLI validates configs first."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tunesmith.config.task_base import TaskConfigBase


class MaskedLMTaskConfig(TaskConfigBase):
    """Masked language modelling: continue an encoder's pretraining on your own text."""

    pipeline_tag: ClassVar[str] = "fill-mask"
    name: Literal["masked_lm"] = "masked_lm"
    text_column: str = Field("text", description="Column with the text (CSV/JSONL/Parquet); a .txt file is one text per line.")
    line_by_line: bool = Field(
        False, description="Each row (line) is one example, truncated to max_length. Default: all texts are "
        "concatenated and cut into max_length blocks, each with the tokenizer's special tokens (as run_mlm.py).")
    max_length: int = Field(128, gt=4, description="Tokens per block (grouped) or longest example (line_by_line).")
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0, description="Share of tokens chosen for prediction; of "
                                   "those 80% become the mask token, 10% a random token, 10% stay.")
    whole_word_masking: bool = Field(False, description="Choose whole words: every piece of a chosen word is masked "
                                     "(words from the fast tokenizer's word ids; a CJK character is a word).")
    pseudo_perplexity_samples: int = Field(
        64, ge=0, description="Validation examples whose pseudo-perplexity (each token masked in turn; one forward "
        "per token) is measured at each evaluation; 0: none.")
    top_k: int = Field(5, ge=1, description="Fill-ins per mask token returned by predict.")
