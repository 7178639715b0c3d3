"""The masked-LM family's body of `POST /v1/predict`."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from tunesmith.serving.requests import TextsRequest


class FillMaskRequest(TextsRequest):
    """Masked LM: texts holding the tokenizer's mask token; `top_k` fill-ins for each."""

    option_fields: ClassVar[tuple[str, ...]] = ("top_k",)
    example: ClassVar[dict[str, Any]] = {"inputs": ["Paris is the [MASK] of France."], "top_k": 3}
    top_k: int | None = Field(None, gt=0)
