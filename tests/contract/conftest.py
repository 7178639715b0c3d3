"""The contract suite's fixtures: one family's examples and its tiny checkpoint, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.tasks import families
from tunesmith.tasks.registry import load


def family_names() -> list[str]:
    return list(families())


def contract_examples(name: str):
    family = families()[name]
    if family.examples is None:
        pytest.skip(f"task family '{name}' registers no contract examples (Family.examples)")
    return load(family.examples)()


class Checkpoints:
    """Each family's tiny checkpoint, built on first use."""

    def __init__(self, root: Path):
        self.root, self.built = root, {}

    def __call__(self, name: str, examples) -> Path:
        if name not in self.built:
            self.built[name] = examples.build_model(self.root / name)
        return self.built[name]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("contract-models"))
