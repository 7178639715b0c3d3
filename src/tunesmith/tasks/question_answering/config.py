"""The `task` section of the question answering family (`task: {name: question_answering, ...}`),
registered in tunesmith.tasks."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from tunesmith.config.task_base import TaskConfigBase


class QuestionAnsweringTaskConfig(TaskConfigBase):
    """Extractive question answering: SQuAD v1.1/v2.0 JSON or flat rows; the answer is a span of the context."""

    pipeline_tag: ClassVar[str] = "question-answering"
    name: Literal["question_answering"] = "question_answering"
    question_column: str = Field("question", description="Flat JSONL/CSV: column with the question (SQuAD JSON is read as is).")
    context_column: str = Field("context", description="Flat JSONL/CSV: column with the context the answer is a span of.")
    answers_column: str = Field(
        "answers",
        description="Flat JSONL/CSV: column with `{text: [...], answer_start: [...]}` (character offsets; a JSON string in CSV); "
        "empty lists: no answer.",
    )
    id_column: str = Field("id", description="Flat JSONL/CSV: optional column with a record id, named in errors and predictions.")
    max_length: int = Field(
        384, gt=16, description="Tokens per window (question + context + special tokens); longer contexts become overlapping windows."
    )
    doc_stride: int = Field(128, ge=0, description="Context tokens that consecutive windows share (overlap).")
    max_answer_length: int = Field(30, gt=0, description="Longest answer, in tokens, considered at prediction.")
    n_best_size: int = Field(20, gt=0, description="Best start and end positions per window combined into candidate spans.")
    version_2_with_negative: Literal["auto"] | bool = Field(
        "auto",
        description="SQuAD v2: questions may have no answer and the model may answer nothing. `auto`: on when any train or "
        "validation question has no answer.",
    )
    null_score_threshold: float = Field(
        0.0, description="v2: answer nothing when the no-answer score beats the best span's score by more than this (logits)."
    )
    tune_null_threshold: bool = Field(True, description="v2: after training, set the threshold that maximises F1 on validation.")
    repair: bool = Field(
        False,
        description="Training data: move each `answer_start` that does not point at its answer text to the nearest occurrence "
        "of that text. Offsets off only by surrounding whitespace are repaired anyway; evaluation data needs only answer texts.",
    )

    @model_validator(mode="after")
    def _stride_fits(self) -> "QuestionAnsweringTaskConfig":
        if self.doc_stride >= self.max_length:
            raise ValueError(
                f"doc_stride ({self.doc_stride}) must be less than max_length ({self.max_length}): windows overlap by doc_stride "
                "tokens and must still advance; lower task.doc_stride (128 for max_length 384 is usual)"
            )
        return self
