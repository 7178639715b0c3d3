"""OpenAI-compatible `POST /v1/chat/completions` and `POST /v1/completions` for causal-LM runs: the run's chat
template, system prompt and `generation_config.json` apply unless the request overrides them; `stream: true`
answers with server-sent events (`chat.completion.chunk` / `text_completion` chunks, a final `finish_reason`,
`data: [DONE]`); `usage` counts tokens. Generations run one at a time in the model's thread (no micro-batching:
each request has its own settings and length)."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunesmith import generation
from tunesmith.config.schema import MIN_TEMPERATURE
from tunesmith.errors import TunesmithError
from tunesmith.serving.app import RequestRefused, body_schema, check_limits, json_body, pick_run, validated, within_timeout
from tunesmith.serving.guard import error_body
from tunesmith.serving.served import ServedRun
from tunesmith.serving.settings import ServeSettings
from tunesmith.serving.telemetry import Telemetry

# ---------------------------------------------------------------------------- request bodies


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id, ...: not used by a chat template here
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Sampling(BaseModel):
    """OpenAI's sampling parameters mapped onto the run's generation settings, plus top_k, repetition_penalty and
    num_beams as vLLM and TGI accept them."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = None
    max_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    num_beams: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=1, description="One choice per request.")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="Not supported: only 0.")
    presence_penalty: float | None = Field(None, ge=0, le=0, description="Not supported: only 0.")

    def generation(self) -> dict:
        out: dict = {}
        if self.max_new_tokens is not None:
            out["max_new_tokens"] = self.max_new_tokens
        if self.temperature is not None:
            # OpenAI's temperature 0 is greedy; so is anything too small to divide logits by (as vLLM treats it)
            out["do_sample"] = self.temperature >= MIN_TEMPERATURE
            if out["do_sample"]:
                out["temperature"] = self.temperature
        if out.get("do_sample", self.temperature is None) and self.top_p is not None:
            out["do_sample"], out["top_p"] = True, self.top_p
        if out.get("do_sample") and self.top_k is not None:
            out["top_k"] = self.top_k
        for key in ("repetition_penalty", "num_beams"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.stop:
            out["stop_strings"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return out

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @model_validator(mode="after")
    def _ends_with_a_question(self):
        if self.messages[-1].role == "assistant":
            raise ValueError("messages: the last turn is the assistant's; expected a user (or system) turn to answer")
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = Field(False, description="Not supported: only false.")

    @model_validator(mode="after")
    def _supported(self):
        if self.echo:
            raise ValueError("echo: not supported; expected false")
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("stream: one prompt per streamed request; send the prompts one by one")
        return self


# ---------------------------------------------------------------------------- streaming text


class StreamedText:
    """The deltas of a streamed generation, so that their concatenation is the final text: nothing from a stop string
    on, no leading or trailing whitespace the final text strips (held back until more text follows)."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in stops or [] if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.raw, self.sent, self.stopped = "", "", False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.raw += piece
        text = self.raw
        for stop in self.stops:
            if stop in text:
                text, self.stopped = text.split(stop, 1)[0], True
        text = text.lstrip()
        if not self.stopped and self.hold:
            text = text[:max(0, len(text) - self.hold)]
        return self._advance(text.rstrip())

    def finish(self, final: str) -> str:
        return self._advance(final)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------- routes


def add_openai_routes(app: FastAPI, by_name: dict[str, ServedRun], settings: ServeSettings, telemetry: Telemetry,
                      definitions: dict) -> None:
    def prepared(body: dict, kind: type[_Sampling]) -> tuple[ServedRun, _Sampling, dict]:
        run = pick_run(by_name, body, need_completions=True)
        parsed = validated(kind, body)
        wanted = parsed.generation()
        try:
            generation.overrides(dict(wanted))  # a bad combination is a 422 before any streaming starts
        except TunesmithError as err:
            raise RequestRefused(422, str(err)) from None
        return run, parsed, wanted

    completing = [name for name, run in by_name.items() if run.task.completes]

    @app.post("/v1/chat/completions", openapi_extra=body_schema([ChatRequest], definitions, completing))
    async def chat_completions(request: Request):
        run, parsed, wanted = prepared(await json_body(request), ChatRequest)
        messages = [m.plain() for m in parsed.messages]
        check_limits([m["content"] for m in messages], len(messages), settings, parsed.max_new_tokens, parsed.num_beams)
        respond = _Responder(run, settings, telemetry, "chat.completion", "chatcmpl")
        if parsed.stream:
            return respond.stream(messages, wanted, parsed)
        completion = await respond.complete(messages, wanted, parsed.seed)
        return respond.body([{"index": 0, "message": {"role": "assistant", "content": completion.text},
                              "finish_reason": completion.finish_reason, "logprobs": None}], [completion])

    @app.post("/v1/completions", openapi_extra=body_schema([CompletionRequest], definitions, completing))
    async def completions(request: Request):
        run, parsed, wanted = prepared(await json_body(request), CompletionRequest)
        prompts = [parsed.prompt] if isinstance(parsed.prompt, str) else list(parsed.prompt)
        check_limits(prompts, len(prompts), settings, parsed.max_new_tokens, parsed.num_beams)
        respond = _Responder(run, settings, telemetry, "text_completion", "cmpl")
        if parsed.stream:
            return respond.stream(prompts[0], wanted, parsed)
        done = [await respond.complete(prompt, wanted, parsed.seed) for prompt in prompts]
        return respond.body([{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                             for i, c in enumerate(done)], done)


class _Responder:
    """One request's answer: the model call in the run's thread, the response body or its event stream."""

    def __init__(self, run: ServedRun, settings: ServeSettings, telemetry: Telemetry, kind: str, prefix: str):
        self.run, self.settings, self.telemetry, self.kind = run, settings, telemetry, kind
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())

    def _call(self, prompt, wanted: dict, seed: int | None):
        call = functools.partial(self.run.loaded.complete, prompt, seed=seed, **wanted)
        return asyncio.get_running_loop().run_in_executor(self.run.executor, call)

    async def complete(self, prompt, wanted: dict, seed: int | None):
        completion = await within_timeout(self._call(prompt, wanted, seed), self.settings)
        self.telemetry.generated_tokens.labels(self.run.name).inc(completion.completion_tokens)
        return completion

    def body(self, choices: list[dict], done: list) -> dict:
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.run.name, "choices": choices,
                "usage": _usage(done)}

    def _chunk(self, delta: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.kind == "chat.completion":
            part = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": part, "finish_reason": finish_reason, "logprobs": None}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.run.name, "choices": [choice]}

    def stream(self, prompt, wanted: dict, parsed: _Sampling) -> StreamingResponse:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.run.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=self.settings.request_timeout_s)

        def produce():
            try:
                return self.run.loaded.complete(prompt, streamer=streamer, seed=parsed.seed, **wanted)
            finally:
                streamer.end()  # wakes the reader when generation failed before it began

        async def events():
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self.run.executor, produce)
            text = StreamedText(wanted.get("stop_strings") or getattr(self.run.loaded.model.generation_config,
                                                                       "stop_strings", None))
            if self.kind == "chat.completion":
                yield _sse(self._chunk(None, role=True))
            pieces = iter(streamer)
            try:
                while (piece := await loop.run_in_executor(None, next, pieces, None)) is not None:
                    if delta := text.feed(piece):
                        yield _sse(self._chunk(delta))
                completion = await future
            except Exception as err:  # the status line is sent: the error goes into the stream
                yield _sse(error_body(500 if not isinstance(err, TunesmithError) else 422, str(err), "server_error"))
                yield _sse("[DONE]")
                return
            self.telemetry.generated_tokens.labels(self.run.name).inc(completion.completion_tokens)
            if rest := text.finish(completion.text):
                yield _sse(self._chunk(rest))
            yield _sse(self._chunk(None, completion.finish_reason))
            if parsed.stream_options and parsed.stream_options.include_usage:
                yield _sse({**self._chunk(None), "choices": [], "usage": _usage([completion])})
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


def _usage(done: list) -> dict:
    prompt, completion = sum(c.prompt_tokens for c in done), sum(c.completion_tokens for c in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
