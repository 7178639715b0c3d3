"""The token classification family's body of `POST /v1/predict`."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from tunesmith.serving.requests import PredictRequest, Texts, listed


class TokensRequest(PredictRequest):
    """Token classification: `texts` (entity spans back) or `tokens` (pre-split words: one tag per token back)."""

    option_fields: ClassVar[tuple[str, ...]] = ("aggregation",)
    example: ClassVar[dict[str, Any]] = {"texts": ["Ada Lovelace lived in London"]}
    texts: Texts | None = None
    tokens: list[list[str]] | None = Field(None, description="Pre-split sentences: one tag per token.")
    aggregation: str | None = Field(None, description="How a word's sub-token scores combine; the family checks the name.")

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.texts is None) == (self.tokens is None):
            raise ValueError("expected exactly one of `texts` (strings) and `tokens` (lists of words)")
        return self

    def items(self) -> list:
        return listed(self.texts) if self.texts is not None else [list(t) for t in self.tokens or []]

    @classmethod
    def body_for(cls, inputs: list) -> dict:
        return {"texts": list(inputs)} if all(isinstance(x, str) for x in inputs) else {"tokens": [list(x) for x in inputs]}
