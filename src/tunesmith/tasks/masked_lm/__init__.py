"""The masked language modelling family. Importing the package imports only its config section (no torch)."""

from tunesmith.tasks.masked_lm.config import MaskedLMTaskConfig
from tunesmith.tasks.registry import Family

FAMILY = Family(
    name="masked_lm", config=MaskedLMTaskConfig,
    task="tunesmith.tasks.masked_lm.task:MaskedLMTask",
    examples="tunesmith.tasks.masked_lm.examples:contract_examples",
)
