"""Task families, registered by name. Adding a family: a folder here (config.py, task.py and a
`FAMILY` in its __init__.py) plus one line below. Importing this package imports no torch: `Task`
(tasks/base.py) is loaded on first access."""

from __future__ import annotations

from typing import Any

from tunesmith.tasks.registry import Family, families, get_task, register, unregister

from tunesmith.tasks import (  # noqa: E402
    causal_lm,
    classification,
    masked_lm,
    question_answering,
    seq2seq,
    token_classification,
)

register(classification.FAMILY)  # the first registered family is the default task
register(token_classification.FAMILY)
register(question_answering.FAMILY)
register(seq2seq.FAMILY)
register(causal_lm.FAMILY)
register(masked_lm.FAMILY)


def __getattr__(name: str) -> Any:
    # `Task` needs the task modules (torch); imported only when asked for.
    if name == "Task":
        from tunesmith.tasks.base import Task

        return Task
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Family", "Task", "families", "get_task", "register", "unregister"]
