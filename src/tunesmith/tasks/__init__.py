"""Task families, registered by name. Adding a family: one module here plus one line below."""

from __future__ import annotations

from tunesmith.tasks.base import Task
from tunesmith.tasks.classification.task import ClassificationTask
from tunesmith.tasks.question_answering.task import QuestionAnsweringTask
from tunesmith.tasks.token_classification.task import TokenClassificationTask

TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "token_classification": TokenClassificationTask,
    "question_answering": QuestionAnsweringTask,
}


def get_task(name: str) -> Task:
    return TASKS[name]()


__all__ = ["TASKS", "Task", "get_task"]
