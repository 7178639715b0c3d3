"""`tunesmith.qa.answer`: the public name of extractive question answering with any
`AutoModelForQuestionAnswering`; it lives with its task family (`tasks/question_answering/inference.py`)."""

from .tasks.question_answering.inference import Span, answer

__all__ = ["Span", "answer"]
