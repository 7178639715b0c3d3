"""The bodies of `POST /v1/predict`, one pydantic model per task family's input shape (strict: unknown keys and
wrong types are 422). A family names its model in `Task.request_model`; the server reads `items()` (the inputs
`tunesmith.predict` takes) and `options()` (the family's prediction options). No FastAPI import here: the task
families depend on these models only."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunesmith.config.schema import GenerationSection

Text = str
Texts = str | list[str]


class PredictRequest(BaseModel):
    """`model`: which served run answers (optional when one is served). Every family's body has it."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = Field(None, description="The served model's name (GET /v1/models); optional when one is served.")
    # Prediction options the family's predict takes from this body (the rest are its inputs).
    option_fields: ClassVar[tuple[str, ...]] = ()

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


def _listed(value: Texts) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class TextsRequest(PredictRequest):
    """Families whose inputs are strings: `{"inputs": "a text"}` or `{"inputs": ["one", "two"]}`."""

    inputs: Texts = Field(description="One text or a list of texts.")

    def items(self) -> list:
        return _listed(self.inputs)

    @classmethod
    def body_for(cls, inputs: list) -> dict:
        return {"inputs": list(inputs)}


class GenerationRequest(TextsRequest, GenerationSection):
    """Generating families: prompts (a chat run's user messages, a text run's text to continue, a seq2seq source)
    and this request's generation settings, named and checked as the config's `generation` section (the run's
    `generation_config.json` otherwise)."""

    option_fields: ClassVar[tuple[str, ...]] = tuple(GenerationSection.model_fields)


class SamplingRequest(GenerationRequest):
    """Causal LMs: generation settings plus a `seed` that makes sampling reproducible."""

    option_fields: ClassVar[tuple[str, ...]] = (*GenerationSection.model_fields, "seed")
    seed: int | None = Field(None, description="Makes sampling reproducible.")


class PairRequest(PredictRequest):
    """Sequence classification: `texts`, and for sentence-pair models `text_pairs` of the same length."""

    texts: Texts
    text_pairs: Texts | None = Field(None, description="Second sentences of pairs, one per text.")

    @model_validator(mode="after")
    def _same_length(self):
        if self.text_pairs is not None and len(_listed(self.text_pairs)) != len(_listed(self.texts)):
            raise ValueError(f"text_pairs: expected one per text ({len(_listed(self.texts))}), found "
                             f"{len(_listed(self.text_pairs))}")
        return self

    def items(self) -> list:
        texts = _listed(self.texts)
        return texts if self.text_pairs is None else list(zip(texts, _listed(self.text_pairs)))

    @classmethod
    def body_for(cls, inputs: list) -> dict:
        if all(isinstance(x, str) for x in inputs):
            return {"texts": list(inputs)}
        return {"texts": [x[0] for x in inputs], "text_pairs": [x[1] for x in inputs]}


class TokensRequest(PredictRequest):
    """Token classification: `texts` (entity spans back) or `tokens` (pre-split words: one tag per token back)."""

    option_fields: ClassVar[tuple[str, ...]] = ("aggregation",)
    texts: Texts | None = None
    tokens: list[list[str]] | None = Field(None, description="Pre-split sentences: one tag per token.")
    aggregation: str | None = Field(None, description="How a word's sub-token scores combine; the family checks the name.")

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.texts is None) == (self.tokens is None):
            raise ValueError("expected exactly one of `texts` (strings) and `tokens` (lists of words)")
        return self

    def items(self) -> list:
        return _listed(self.texts) if self.texts is not None else [list(t) for t in self.tokens or []]

    @classmethod
    def body_for(cls, inputs: list) -> dict:
        return {"texts": list(inputs)} if all(isinstance(x, str) for x in inputs) else {"tokens": [list(x) for x in inputs]}


class QuestionContext(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: Text
    context: Text


class QuestionsRequest(PredictRequest):
    """Extractive QA: `{"inputs": {"question", "context"}}` or a list of them."""

    inputs: QuestionContext | list[QuestionContext]

    def items(self) -> list:
        listed = [self.inputs] if isinstance(self.inputs, QuestionContext) else self.inputs
        return [{"question": x.question, "context": x.context} for x in listed]

    @classmethod
    def body_for(cls, inputs: list) -> dict:
        return {"inputs": [x if isinstance(x, dict) else {"question": x[0], "context": x[1]} for x in inputs]}


class FillMaskRequest(TextsRequest):
    """Masked LM: texts holding the tokenizer's mask token; `top_k` fill-ins for each."""

    option_fields: ClassVar[tuple[str, ...]] = ("top_k",)
    top_k: int | None = Field(None, gt=0)


def request_schema_example(cls: type[PredictRequest]) -> dict[str, Any]:
    """A short example body per family, for the OpenAPI docs page."""
    examples = {TextsRequest: {"inputs": ["a text"]}, PairRequest: {"texts": ["a witty, warm film"]},
                TokensRequest: {"texts": ["Ada Lovelace lived in London"]},
                QuestionsRequest: {"inputs": {"question": "Who wrote it?", "context": "Ada wrote it."}},
                GenerationRequest: {"inputs": ["A source text."], "num_beams": 4},
                SamplingRequest: {"inputs": ["Hello!"], "max_new_tokens": 32},
                FillMaskRequest: {"inputs": ["Paris is the [MASK] of France."], "top_k": 3}}
    return examples.get(cls, {})
