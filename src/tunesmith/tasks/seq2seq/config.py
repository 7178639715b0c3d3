"""The `task` section of the sequence-to-sequence family (`task: {name: seq2seq, ...}`): summarization,
translation, simplification, any text-to-text task. Registered in tunesmith.tasks. Generation settings are
the shared `generation` section."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from tunesmith.config.task_base import TaskConfigBase

DEFAULT_SOURCE_LENGTH = 512


class Seq2SeqTaskConfig(TaskConfigBase):
    """Text to text with an encoder-decoder (T5, BART, Pegasus, Marian, mBART/M2M/NLLB, or a warm-started bert2bert)."""

    pipeline_tag: ClassVar[str] = "text2text-generation"
    name: Literal["seq2seq"] = "seq2seq"
    source_column: str = Field("source", description="Column with the input text (run_summarization's `text_column`).")
    target_column: str = Field("target", description="Column with the output text (run_summarization's `summary_column`).")
    source_prefix: str = Field("", description="Text put before every source, e.g. `summarize: ` for T5 / Flan-T5 (kept for prediction).")
    source_lang: str | None = Field(
        None, description="Source language code (`en`, `en_XX`, `eng_Latn`): the tokenizer's `src_lang` for mBART/M2M/NLLB; "
        "with target_lang, rows of `{translation: {en: ..., fr: ...}}` are read."
    )
    target_lang: str | None = Field(
        None, description="Target language code: the tokenizer's `tgt_lang`, the forced first token of mBART/M2M/NLLB, and "
        "sacreBLEU's tokenizer (`zh`, `ja-mecab`, `13a`)."
    )
    max_source_length: int = Field(DEFAULT_SOURCE_LENGTH, gt=1, description="Longest tokenized source; longer ones are truncated (warned).")
    max_target_length: int = Field(128, gt=1, description="Longest tokenized target in training; longer ones are truncated (warned).")
    max_length: int = Field(
        DEFAULT_SOURCE_LENGTH, gt=1, description="The same as `max_source_length` (set that one); shared code reads this name."
    )
    tie_encoder_decoder: bool = Field(
        False, description="Warm-started encoder-decoder (bert2bert from an encoder checkpoint): share the encoder's and "
        "decoder's weights (half the parameters)."
    )

    @model_validator(mode="before")
    @classmethod
    def _source_length_is_max_length(cls, data: Any) -> Any:
        # One length, two names: `max_length` is what the other families and shared code say, `max_source_length`
        # what run_summarization.py users say. Given one, both follow it; given both, they must agree.
        if not isinstance(data, dict):
            return data
        given, source = data.get("max_length"), data.get("max_source_length")
        if given is not None and source is not None and given != source:
            raise ValueError(f"task.max_length ({given}) and task.max_source_length ({source}) differ; they are the same "
                             "setting (the longest source): set only task.max_source_length")
        length = source if source is not None else given
        if length is not None:
            data = {**data, "max_source_length": length, "max_length": length}
        return data
