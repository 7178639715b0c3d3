"""The contract suite's fixtures: one family's examples and its tiny checkpoint, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.tasks import families
from tunesmith.tasks.registry import load


def family_names() -> list[str]:
    """Each registered family, or `family/variant` for each variant of a family whose examples function returns
    several (seq2seq: one per architecture)."""
    names = []
    for name, family in families().items():
        examples = load(family.examples)() if family.examples else None
        names += [f"{name}/{variant}" for variant in examples] if isinstance(examples, dict) else [name]
    return names


def contract_examples(name: str):
    family_name, _, variant = name.partition("/")
    family = families()[family_name]
    if family.examples is None:
        pytest.skip(f"task family '{family_name}' registers no contract examples (Family.examples)")
    examples = load(family.examples)()
    return examples[variant] if variant else examples


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
