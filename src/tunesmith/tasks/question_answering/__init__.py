"""The question answering family. Importing the package imports only its config section (no torch)."""

from tunesmith.tasks.question_answering.config import QuestionAnsweringTaskConfig
from tunesmith.tasks.registry import Family

FAMILY = Family(
    name="question_answering", config=QuestionAnsweringTaskConfig, task="tunesmith.tasks.question_answering.task:QuestionAnsweringTask"
)
