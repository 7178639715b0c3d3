"""The classification family. Importing the package imports only its config section (no torch)."""

from tunesmith.tasks.classification.config import ClassificationTaskConfig
from tunesmith.tasks.registry import Family

FAMILY = Family(
    name="classification", config=ClassificationTaskConfig, examples="tunesmith.tasks.classification.examples:contract_examples",
    task="tunesmith.tasks.classification.task:ClassificationTask",
    demo="tunesmith.tasks.classification.demo:run_demo",  # `make demo`: the bundled MiniLM on Rotten Tomatoes
)
