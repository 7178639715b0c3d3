"""Task families, registered by name. Adding a family: one module here plus one line below."""

from __future__ import annotations

from .base import Task
from .classification import ClassificationTask

TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
}


def get_task(name: str) -> Task:
    return TASKS[name]()


__all__ = ["TASKS", "Task", "get_task"]
