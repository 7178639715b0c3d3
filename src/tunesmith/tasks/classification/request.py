"""The classification family's body of `POST /v1/predict`."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from tunesmith.serving.requests import PredictRequest, Texts, listed


class PairRequest(PredictRequest):
    """Sequence classification: `texts`, and for sentence-pair models `text_pairs` of the same length."""

    example: ClassVar[dict[str, Any]] = {"texts": ["a witty, warm film"]}
    texts: Texts
    text_pairs: Texts | None = Field(None, description="Second sentences of pairs, one per text.")

    @model_validator(mode="after")
    def _same_length(self):
        if self.text_pairs is not None and len(listed(self.text_pairs)) != len(listed(self.texts)):
            raise ValueError(f"text_pairs: expected one per text ({len(listed(self.texts))}), found "
                             f"{len(listed(self.text_pairs))}")
        return self

    def items(self) -> list:
        texts = listed(self.texts)
        return texts if self.text_pairs is None else list(zip(texts, listed(self.text_pairs)))

    @classmethod
    def body_for(cls, inputs: list) -> dict:
        if all(isinstance(x, str) for x in inputs):
            return {"texts": list(inputs)}
        return {"texts": [x[0] for x in inputs], "text_pairs": [x[1] for x in inputs]}
