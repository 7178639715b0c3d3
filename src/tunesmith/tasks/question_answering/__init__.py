"""The question answering family. Importing the package imports only its config section (no torch)."""

from tunesmith.tasks.question_answering.config import QuestionAnsweringTaskConfig
from tunesmith.tasks.registry import Family, PredictOption

FAMILY = Family(
    name="question_answering", config=QuestionAnsweringTaskConfig, examples="tunesmith.tasks.question_answering.examples:contract_examples",
    task="tunesmith.tasks.question_answering.task:QuestionAnsweringTask",
    predict_options=(
        PredictOption("question", "Question answering: a question (repeatable).", repeatable=True),
        PredictOption("context", "Question answering: its context (one per --question, or one for all).", repeatable=True),
    ),
)
