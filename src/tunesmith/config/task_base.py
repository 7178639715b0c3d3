"""What every task family's config section has: the keys shared code reads.

A family's section (tasks/<family>/config.py) subclasses `TaskConfigBase`, narrows `name` to a
`Literal` of its registered name and may override a shared key to give it its own default,
bounds and description (`max_length: int = Field(384, gt=16, ...)`). Shared code (memory
estimate, prediction) reads `cfg.task.max_length` without guessing whether the family has one.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from tunesmith.config.section import Section


class TaskConfigBase(Section):
    """The `task` section's shared keys; each family narrows `name` and adds its own."""

    # The transformers pipeline's name for the family (`text-classification`), accepted as `task:`; None: none.
    pipeline_tag: ClassVar[str | None] = None

    name: str = Field(description="The task family.")
    max_length: int = Field(128, gt=1, description="Longest tokenized input.")
