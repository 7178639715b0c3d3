"""Task families, registered by name. Adding a family: one module here plus one line below."""

from __future__ import annotations

from .base import Task
from .classification import ClassificationTask
from .question_answering import QuestionAnsweringTask
from .token_classification import TokenClassificationTask

TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "token_classification": TokenClassificationTask,
    "question_answering": QuestionAnsweringTask,
}


def get_task(name: str) -> Task:
    return TASKS[name]()


__all__ = ["TASKS", "Task", "get_task"]
