"""The `task` section of the classification family (`task: {name: classification, ...}`),
registered in tunesmith.tasks."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from tunesmith.config.task_base import TaskConfigBase


class ClassificationTaskConfig(TaskConfigBase):
    """Sequence classification: single-label, multi-label, regression, sentence pairs."""

    pipeline_tag: ClassVar[str] = "text-classification"  # the transformers pipeline's name, accepted as `task:`
    name: Literal["classification"] = "classification"
    text_column: str = Field("text", description="Column with the input text.")
    text_pair_column: str | None = Field(None, description="Second text column for sentence-pair tasks (NLI, MRPC).")
    label_column: str = Field("label", description="Column with the label (string, int, float, or list for multi-label).")
    label_columns: list[str] | None = Field(
        None, description="Multi-label as several 0/1 columns, one per label (overrides `label_column`)."
    )
    problem_type: Literal["auto", "single_label", "multi_label", "regression"] = Field(
        "auto", description="`auto` infers it from the labels: lists -> multi_label, non-integer floats -> regression."
    )
    label_separator: str = Field("|", description="Separator of labels in one string cell for multi-label (`a|b`).")
    max_length: int = Field(128, gt=1, description="Longest tokenized input; longer texts are truncated (warned).")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Multi-label decision threshold on sigmoid scores.")
    tune_threshold: bool = Field(True, description="Multi-label: pick the threshold maximising micro-F1 on validation.")
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none", description="Loss weights for imbalance: `balanced` (n / (k * count)) or one weight per label."
    )
