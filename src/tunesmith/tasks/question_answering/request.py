"""The question answering family's body of `POST /v1/predict`."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from tunesmith.serving.requests import PredictRequest


class QuestionContext(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    context: str


class QuestionsRequest(PredictRequest):
    """Extractive QA: `{"inputs": {"question", "context"}}` or a list of them."""

    example: ClassVar[dict[str, Any]] = {"inputs": {"question": "Who wrote it?", "context": "Ada wrote it."}}
    inputs: QuestionContext | list[QuestionContext]

    def items(self) -> list:
        listed = [self.inputs] if isinstance(self.inputs, QuestionContext) else self.inputs
        return [{"question": x.question, "context": x.context} for x in listed]

    @classmethod
    def body_for(cls, inputs: list) -> dict:
        return {"inputs": [x if isinstance(x, dict) else {"question": x[0], "context": x[1]} for x in inputs]}
