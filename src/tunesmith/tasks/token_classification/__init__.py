"""The token classification family. Importing the package imports only its config section (no torch)."""

from tunesmith.tasks.token_classification.config import TokenClassificationTaskConfig
from tunesmith.tasks.registry import Family, PredictOption

FAMILY = Family(
    name="token_classification", config=TokenClassificationTaskConfig,
    examples="tunesmith.tasks.token_classification.examples:contract_examples",
    task="tunesmith.tasks.token_classification.task:TokenClassificationTask",
    predict_options=(
        PredictOption("aggregation", "Token classification: first, average or max (default: the run's).", feeds="predict"),
    ),
)
