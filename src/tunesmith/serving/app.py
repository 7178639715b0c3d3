"""The server: `create_app(runs, settings)` -> a FastAPI app over `tunesmith.predict` / `LoadedRun.complete`.

    GET  /healthz, /readyz          liveness; readiness (503 while starting or shutting down)
    GET  /v1/models                 the served runs (task, labels, base model, method, metrics)
    POST /v1/predict                a task-shaped body (the family's `Task.request_model`), routed by `model`
    POST /v1/chat/completions       OpenAI-compatible, causal-LM runs (openai_api.py)
    POST /v1/completions
    GET  /metrics                   Prometheus text

Every refusal is a JSON error in OpenAI's shape; bad input is 4xx, never 500."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.errors import TunesmithError
from tunesmith.serving.guard import Guard, error_body
from tunesmith.serving.requests import PredictRequest
from tunesmith.serving.served import ServedRun
from tunesmith.serving.settings import ServeSettings
from tunesmith.serving.telemetry import Telemetry

log = logging.getLogger("tunesmith")


class RequestRefused(Exception):
    """A 4xx answer with a message that says what was expected, what was found and how to fix it."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, **extra):
        super().__init__(message)
        self.status, self.body = status, error_body(status, message, kind, param, **extra)


def create_app(runs: list[ServedRun], settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    telemetry = Telemetry()
    by_name = {run.name: run for run in runs}

    for run in runs:
        run.start(telemetry.batch_size.labels(run.name).observe)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.ready = True
        yield
        app.state.ready = False  # readiness fails first, so a balancer stops sending while in-flight requests finish
        for run in runs:
            if run.batcher is not None:
                await run.batcher.close()
            run.close()

    app = FastAPI(title="tunesmith", version="1", lifespan=lifespan,
                  description="Fine-tuned runs served: " + ", ".join(f"`{r.name}` ({r.task.name})" for r in runs))
    app.state.ready = False
    _errors(app)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if not app.state.ready:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return {"status": "ready", "models": list(by_name)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [run.info for run in runs]}

    @app.get("/metrics")
    async def metrics():
        return Response(telemetry.render(), media_type=telemetry.content_type)

    definitions: dict = {}

    @app.post("/v1/predict", openapi_extra=body_schema(list(dict.fromkeys(run.task.request_model for run in runs)),
                                                       definitions, list(by_name)))
    async def predict(request: Request):
        body = await json_body(request)
        run = pick_run(by_name, body)
        parsed = validated(run.task.request_model, body)
        items = parsed.items()
        check_limits(parsed.strings(), len(items), settings, getattr(parsed, "max_new_tokens", None),
                     getattr(parsed, "num_beams", None))
        results = await within_timeout(run.batcher.submit(items, parsed.options()), settings)
        return {"model": run.name, "task": run.task.name, "predictions": results}

    from tunesmith.serving.openai_api import add_openai_routes

    add_openai_routes(app, by_name, settings, telemetry, definitions)
    _with_definitions(app, definitions)
    return Guard(app, settings, telemetry)  # type: ignore[return-value]


# --------------------------------------------------------------------------- request handling shared by the routes


async def json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise RequestRefused(422, f"the body is not valid JSON ({err}); send a JSON object", "invalid_json") from None
    if not isinstance(body, dict):
        raise RequestRefused(422, f"expected a JSON object, found a JSON {type(body).__name__}", "invalid_json")
    return body


def pick_run(by_name: dict[str, ServedRun], body: dict, need_completions: bool = False) -> ServedRun:
    name = body.get("model")
    if name is None and len(by_name) == 1:
        run = next(iter(by_name.values()))
    elif not isinstance(name, str) or name not in by_name:
        found = "no `model`" if name is None else f"model {name!r}"
        raise RequestRefused(404 if isinstance(name, str) else 422,
                             f"{found}: expected one of {', '.join(sorted(by_name))} (GET /v1/models)", "model_not_found",
                             "model")
    else:
        run = by_name[name]
    if need_completions and not run.task.completes:
        raise RequestRefused(422, f"model {run.name!r} is a {run.task.name} run, which does not generate chat or text "
                                  "completions; use POST /v1/predict", "unsupported_model", "model")
    return run


def validated(model: type[PredictRequest], body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise RequestRefused(422, validation_message(err), "invalid_request_error",
                             ".".join(str(p) for p in err.errors()[0]["loc"]) or None) from None


def validation_message(err: ValidationError) -> str:
    problems = []
    for e in err.errors()[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        found = "" if e["type"] == "missing" else f", found {str(e.get('input'))[:60]!r}"
        problems.append(f"{where}: {e['msg'].lower()}{found}")
    return "; ".join(problems) + " (the body schema: GET /openapi.json)"


def check_limits(texts: list[str], items: int, settings: ServeSettings, max_new_tokens: int | None,
                 num_beams: int | None = None) -> None:
    if items > settings.max_items:
        raise RequestRefused(413, f"{items} inputs in one request; the server's limit is {settings.max_items} (--max-items): "
                                  "split the request", "request_too_large", limit="max_items", value=settings.max_items)
    if items == 0:
        raise RequestRefused(422, "no inputs: expected at least one", "invalid_request_error")
    longest = max((len(t) for t in texts), default=0)
    if longest > settings.max_chars:
        raise RequestRefused(413, f"a text of {longest} characters; the server's limit is {settings.max_chars} per text "
                                  "(--max-chars): shorten it", "request_too_large", limit="max_chars", value=settings.max_chars)
    if max_new_tokens is not None and max_new_tokens > settings.max_new_tokens:
        raise RequestRefused(422, f"max_new_tokens {max_new_tokens}; the server's limit is {settings.max_new_tokens} "
                                  "(--max-new-tokens): ask for fewer", "invalid_request_error", "max_new_tokens",
                             limit="max_new_tokens", value=settings.max_new_tokens)
    if num_beams is not None and num_beams > settings.max_num_beams:
        raise RequestRefused(422, f"num_beams {num_beams}; the server's limit is {settings.max_num_beams} (--max-num-beams): "
                                  "ask for fewer beams", "invalid_request_error", "num_beams", limit="max_num_beams",
                             value=settings.max_num_beams)


async def within_timeout(awaitable, settings: ServeSettings):
    try:
        return await asyncio.wait_for(awaitable, settings.request_timeout_s)
    except asyncio.TimeoutError:
        raise RequestRefused(504, f"no answer within the server's {settings.request_timeout_s:g} s (--timeout); send fewer "
                                  "inputs or ask for fewer new tokens", "timeout") from None


def _errors(app: FastAPI) -> None:
    @app.exception_handler(RequestRefused)
    async def refused(_, err: RequestRefused):
        return JSONResponse(err.body, status_code=err.status)

    @app.exception_handler(TunesmithError)
    async def input_error(_, err: TunesmithError):  # the family's own checks of an input (a text without [MASK])
        return JSONResponse(error_body(422, str(err), "invalid_request_error"), status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, err: RequestValidationError):
        return JSONResponse(error_body(422, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].lower()}"
                                                      for e in err.errors()[:5]), "invalid_request_error"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):
        return JSONResponse(error_body(err.status_code, str(err.detail), "invalid_request_error"), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def crashed(_, err: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(500, f"internal error ({type(err).__name__}); the server log has the details",
                                       "server_error"), status_code=500)


def body_schema(models: list, definitions: dict, names: list[str]) -> dict:
    """A route's OpenAPI request body read from raw JSON (the route validates it itself, to route by `model` and
    answer in one error shape): the pydantic models' schemas, one of them, `model` one of the served `names`
    (required when there are several); their sub-schemas go to `definitions`."""
    schemas = [m.model_json_schema(ref_template="#/components/schemas/{model}") for m in models]
    for schema in schemas:
        definitions.update(schema.pop("$defs", {}))
        if "model" in schema.get("properties", {}):
            schema["properties"]["model"] = {"type": "string", "enum": names, "description": "The served run that answers."}
            if len(names) > 1:
                schema["required"] = sorted({*schema.get("required", []), "model"})
    examples = {m.__name__: {"value": m.example} for m in models if getattr(m, "example", None)}
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": schemas[0] if len(schemas) == 1 else {"anyOf": schemas}, **({"examples": examples} if examples else {})}}}}


def _with_definitions(app: FastAPI, definitions: dict) -> None:
    original = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = original()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
