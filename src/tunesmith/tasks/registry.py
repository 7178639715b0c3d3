"""The task families, by name: each one's config section and (imported on first use) its Task class.

No torch or transformers here: the CLI validates configs, whose `task` union is built from this
registry, before any heavy import. A family's Task class is named as "module:Class" and imported
by `get_task`, the first time a run needs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunesmith.config.task_base import TaskConfigBase

if TYPE_CHECKING:
    from tunesmith.tasks.base import Task


@dataclass(frozen=True)
class Family:
    name: str  # task.name in configs
    config: type[TaskConfigBase]  # the family's config section
    task: str  # "tunesmith.tasks.classification.task:ClassificationTask", imported on first use

    def __post_init__(self) -> None:
        named = self.config.model_fields["name"].default
        if named != self.name:
            raise ValueError(f"task family '{self.name}': its config {self.config.__name__} has name default {named!r}; "
                             f"expected name: Literal[{self.name!r}] = {self.name!r}")
        if ":" not in self.task:
            raise ValueError(f"task family '{self.name}': task {self.task!r}; expected 'module:Class'")


_FAMILIES: dict[str, Family] = {}


def _rebuild() -> None:
    # RunConfig's task union is the registered sections; the config module is imported by name because it
    # may be half-imported itself (it imports tunesmith.tasks, which registers the built-in families).
    schema = importlib.import_module("tunesmith.config.schema")
    if _FAMILIES:
        schema.set_task_configs([family.config for family in _FAMILIES.values()])


def register(family: Family) -> None:
    """Add (or replace) a task family; configs naming it validate from now on."""
    _FAMILIES[family.name] = family
    _rebuild()


def unregister(name: str) -> None:
    """Remove a family (a test's toy family); configs naming it are errors again."""
    if name not in _FAMILIES:
        raise KeyError(f"no task family '{name}' is registered (registered: {', '.join(_FAMILIES)})")
    if len(_FAMILIES) == 1:
        raise ValueError(f"task family '{name}' is the last one registered; a run needs at least one")
    del _FAMILIES[name]
    _rebuild()


def families() -> dict[str, Family]:
    """The registered families, in registration order (the first is the default task)."""
    return dict(_FAMILIES)


def get_task(name: str) -> "Task":
    """A new instance of the family's Task class (imported now, the first time)."""
    family = _FAMILIES.get(name)
    if family is None:
        raise KeyError(f"no task family '{name}' is registered (registered: {', '.join(_FAMILIES)})")
    module, _, attribute = family.task.partition(":")
    return getattr(importlib.import_module(module), attribute)()
