"""The bodies of `POST /v1/predict` that families share (strict: unknown keys and wrong types are 422): the base
every body extends, texts, and the generating families' generation settings. A family with an input shape of its
own keeps its body in its folder (`tasks/<family>/request.py`) and names it in `Task.request_model`; the server
reads `items()` (the inputs `tunesmith.predict` takes), `options()` (the family's prediction options) and
`example` (for the docs page). No FastAPI import here: the task families depend on these models only."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.config.schema import GenerationSection

Texts = str | list[str]


class PredictRequest(BaseModel):
    """`model`: which served run answers (optional when one is served). Every family's body has it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = Field(None, description="The served model's name (GET /v1/models); optional when one is served.")
    # Prediction options the family's predict takes from this body (the rest are its inputs).
    option_fields: ClassVar[tuple[str, ...]] = ()
    # A short example body, shown on the OpenAPI docs page.
    example: ClassVar[dict[str, Any]] = {}

    def items(self) -> list:
        raise NotImplementedError

    def strings(self) -> list[str]:
        """Every string of the request, for the per-text character limit."""
        out: list[str] = []
        for item in self.items():
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict):
                out.extend(str(v) for v in item.values())
            else:
                out.extend(str(v) for v in item)
        return out

    def options(self) -> dict:
        return {k: getattr(self, k) for k in self.option_fields if getattr(self, k) is not None}

    @classmethod
    def body_for(cls, inputs: list) -> dict:
        """The JSON body that asks for `inputs` (the inverse of `items`): how clients and the contract test call."""
        raise NotImplementedError


def listed(value: Texts) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class TextsRequest(PredictRequest):
    """Families whose inputs are strings: `{"inputs": "a text"}` or `{"inputs": ["one", "two"]}`."""

    example: ClassVar[dict[str, Any]] = {"inputs": ["a text"]}
    inputs: Texts = Field(description="One text or a list of texts.")

    def items(self) -> list:
        return listed(self.inputs)

    @classmethod
    def body_for(cls, inputs: list) -> dict:
        return {"inputs": list(inputs)}


class GenerationRequest(TextsRequest, GenerationSection):
    """Generating families: prompts (a chat run's user messages, a text run's text to continue, a seq2seq source)
    and this request's generation settings, named and checked as the config's `generation` section (the run's
    `generation_config.json` otherwise)."""

    option_fields: ClassVar[tuple[str, ...]] = tuple(GenerationSection.model_fields)
    example: ClassVar[dict[str, Any]] = {"inputs": ["A source text."], "num_beams": 4}


class SamplingRequest(GenerationRequest):
    """Causal LMs: generation settings plus a `seed` that makes sampling reproducible."""

    option_fields: ClassVar[tuple[str, ...]] = (*GenerationSection.model_fields, "seed")
    example: ClassVar[dict[str, Any]] = {"inputs": ["Hello!"], "max_new_tokens": 32}
    seed: int | None = Field(None, description="Makes sampling reproducible.")
