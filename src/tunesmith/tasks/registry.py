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
class PredictOption:
    """A `tunesmith predict` option of a family's own (`--question`), declared here so that the CLI builds its
    options from the registry without importing any task module."""

    name: str  # the option without its dashes, and the keyword it arrives as
    help: str
    repeatable: bool = False  # given several times: a list
    feeds: str = "inputs"  # "inputs": handed to Task.predict_inputs; "predict": a keyword argument of Task.predict


@dataclass(frozen=True)
class Family:
    name: str  # task.name in configs
    config: type[TaskConfigBase]  # the family's config section
    task: str  # "tunesmith.tasks.classification.task:ClassificationTask", imported on first use
    predict_options: tuple[PredictOption, ...] = ()
    demo: str | None = None  # "module:function" that `tunesmith demo` runs (the first registered family with one)
    # "module:function" returning the family's `tasks.contract.ContractExamples` (or a dict of them by variant,
    # e.g. one per architecture): with it, the contract suite (tests/contract/) runs for the family (each variant)
    examples: str | None = None

    def __post_init__(self) -> None:
        named = self.config.model_fields["name"].default
        if named != self.name:
            raise ValueError(f"task family '{self.name}': its config {self.config.__name__} has name default {named!r}; "
                             f"expected name: Literal[{self.name!r}] = {self.name!r}")
        for field, value in (("task", self.task), ("demo", self.demo), ("examples", self.examples)):
            if value is not None and ":" not in value:
                raise ValueError(f"task family '{self.name}': {field} {value!r}; expected 'module:name'")


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


def load(reference: str):
    """The object a "module:name" reference names (imported now)."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def get_task(name: str) -> "Task":
    """A new instance of the family's Task class (imported now, the first time)."""
    family = _FAMILIES.get(name)
    if family is None:
        raise KeyError(f"no task family '{name}' is registered (registered: {', '.join(_FAMILIES)})")
    return load(family.task)()
