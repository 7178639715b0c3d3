"""`tunesmith serve` end to end: a real uvicorn server on a free loopback port serving a classification run and a
chat run (tiny in-process models), every endpoint, the API key, every limit, concurrent callers each getting their
own answer, the OpenAI client streaming and not, and the CLI starting and stopping cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn

import tunesmith
from tunesmith.serving import ServeSettings, create_app, load_runs
from tunesmith.tasks.causal_lm.examples import contract_examples as causal_examples
from tunesmith.tasks.classification.examples import contract_examples as classification_examples

from tiny import train_contract_example

KEY = "test-key-123"
LIMITS = ServeSettings(api_key=KEY, max_batch_size=16, max_wait_ms=50, max_body_bytes=20_000, max_items=8, max_chars=500,
                       max_new_tokens=64, request_timeout_s=60)
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["the film was great", "really dull plot", "great acting", "dull and slow", "a great plot", "slow film"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving")
    return {"sentiment": train_contract_example(classification_examples(), root / "cls", 5),
            "chat": train_contract_example(causal_examples()["smollm-chat"], root / "chat", 3)}


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def server(runs) -> str:
    app = create_app(load_runs([runs["sentiment"], runs["chat"]], LIMITS, names=["sentiment", "chat"]), LIMITS)
    sock = _listening_socket()
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    uv.should_exit = True
    thread.join(10)


def _post(server: str, path: str, body, headers=AUTH, **kwargs) -> httpx.Response:
    return httpx.post(server + path, json=body, headers=headers, timeout=60, **kwargs)


def _close(a, b) -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    else:
        assert a == b


# --------------------------------------------------------------------------- endpoints


def test_health_and_readiness_need_no_key_and_the_rest_does(server):
    assert httpx.get(server + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server + "/readyz").json() == {"status": "ready", "models": ["sentiment", "chat"]}
    refused = httpx.get(server + "/v1/models")
    assert refused.status_code == 401 and "Authorization: Bearer" in refused.json()["error"]["message"]
    assert httpx.get(server + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server + "/metrics").status_code == 401


def test_models_lists_each_run_with_its_task_labels_and_metrics(server, runs):
    models = {m["id"]: m for m in httpx.get(server + "/v1/models", headers=AUTH).json()["data"]}
    assert models["sentiment"]["task"] == "classification" and models["chat"]["task"] == "causal_lm"
    assert sorted(models["sentiment"]["labels"]) == sorted(tunesmith.load(runs["sentiment"]).state.labels)
    assert models["sentiment"]["metrics"]["validation"]["accuracy"] >= 0
    assert "/v1/chat/completions" in models["chat"]["endpoints"]
    assert "/v1/chat/completions" not in models["sentiment"]["endpoints"]


def test_predict_answers_like_tunesmith_predict(server, runs):
    got = _post(server, "/v1/predict", {"model": "sentiment", "texts": TEXTS[:3]})
    assert got.status_code == 200, got.text
    assert got.json()["task"] == "classification"
    _close(got.json()["predictions"], tunesmith.predict(runs["sentiment"], TEXTS[:3]))
    one = _post(server, "/v1/predict", {"model": "sentiment", "texts": TEXTS[0]}).json()["predictions"]
    _close(one, tunesmith.predict(runs["sentiment"], TEXTS[:1]))


def test_concurrent_callers_each_get_their_own_answer_and_are_batched(server, runs):
    texts = [f"{TEXTS[i % len(TEXTS)]} {'great ' * (i % 4)}".strip() for i in range(40)]
    expected = tunesmith.predict(runs["sentiment"], texts)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda t: _post(server, "/v1/predict", {"model": "sentiment", "texts": [t]}), texts))
    assert all(a.status_code == 200 for a in answers)
    for answer, want in zip(answers, expected):
        _close(answer.json()["predictions"], [want])
    metrics = httpx.get(server + "/metrics", headers=AUTH).text
    count = _metric(metrics, 'tunesmith_batch_size_count{model="sentiment"}')
    singles = _metric(metrics, 'tunesmith_batch_size_bucket{le="1.0",model="sentiment"}')
    assert count > singles  # some groups held more than one caller's input


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))


@pytest.mark.parametrize("body, status, needle", [
    ({"model": "sentiment", "texts": ["a"] * 9}, 413, "max_items"),
    ({"model": "sentiment", "texts": ["x" * 501]}, 413, "max-chars"),
    ({"model": "sentiment", "texts": 5}, 422, "texts"),
    ({"model": "sentiment", "text": ["a"]}, 422, "text"),
    ({"model": "sentiment", "texts": []}, 422, "no inputs"),
    ({"model": "nope", "texts": ["a"]}, 404, "sentiment"),
    ({"texts": ["a"]}, 422, "expected one of chat, sentiment"),
    ({"model": "chat", "inputs": ["hi"], "max_new_tokens": 65}, 422, "max-new-tokens"),
    ({"model": "chat", "inputs": ["hi"], "temperature": -1}, 422, "temperature"),
    ({"model": "chat", "inputs": ["hi"], "num_beams": 10 ** 9}, 422, "max_num_beams"),
])
def test_bad_requests_are_4xx_json_errors_that_say_what_to_fix(server, body, status, needle):
    got = _post(server, "/v1/predict", body)
    assert got.status_code == status, got.text
    error = got.json()["error"]
    assert needle in error["message"] or needle == error.get("limit"), error
    assert error["code"] == status


def test_malformed_json_and_huge_bodies_are_refused(server):
    bad = httpx.post(server + "/v1/predict", content=b"{not json", headers={**AUTH, "content-type": "application/json"})
    assert bad.status_code == 422 and "not valid JSON" in bad.json()["error"]["message"]
    listed = _post(server, "/v1/predict", ["a"])
    assert listed.status_code == 422 and "JSON object" in listed.json()["error"]["message"]
    huge = _post(server, "/v1/predict", {"model": "sentiment", "texts": ["word " * 5000]})
    assert huge.status_code == 413 and huge.json()["error"]["limit"] == "max_body_bytes"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(30):
            yield b" " * 1000

    streamed = httpx.post(server + "/v1/predict", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert streamed.status_code == 413


def test_metrics_count_requests_and_errors_by_route_and_code(server):
    # its own requests: under xdist the module's other tests may run in another process
    assert _post(server, "/v1/predict", {"model": "sentiment", "texts": ["a"]}).status_code == 200
    _post(server, "/v1/predict", {"model": "nope", "texts": ["a"]})
    text = httpx.get(server + "/metrics", headers=AUTH).text
    assert _metric(text, 'tunesmith_errors_total{code="404",route="/v1/predict"}') >= 1
    assert _metric(text, 'tunesmith_requests_total{code="200",route="/v1/predict"}') >= 1
    assert 'tunesmith_request_seconds_bucket{le="0.005",route="/v1/predict"}' in text


def test_the_openapi_schema_holds_every_served_familys_body(server):
    schema = httpx.get(server + "/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    titles = {s["title"] for s in body["anyOf"]}
    assert titles == {"PairRequest", "SamplingRequest"}
    assert "/v1/chat/completions" in schema["paths"]


# --------------------------------------------------------------------------- OpenAI compatibility


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


MESSAGES = [{"role": "user", "content": "three small birds"}]


def test_chat_completions_with_the_openai_client(client, runs):
    reply = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=12)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == tunesmith.chat(runs["chat"], MESSAGES, max_new_tokens=12)
    assert choice.finish_reason in {"stop", "length"}
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12


def test_streamed_chat_equals_the_whole_reply(client):
    whole = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=12).choices[0]
    chunks = list(client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [whole.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_text_completions_continue_the_prompt_as_given(client, runs):
    loaded = tunesmith.load(runs["chat"])
    got = client.completions.create(model="chat", prompt="one red cat", max_tokens=8, temperature=0)
    assert got.choices[0].text == loaded.complete("one red cat", max_new_tokens=8, do_sample=False).text
    two = client.completions.create(model="chat", prompt=["one red cat", "two big"], max_tokens=4)
    assert [c.index for c in two.choices] == [0, 1]
    empty = client.completions.create(model="chat", prompt="", max_tokens=4)  # starts from BOS / EOS, as OpenAI's does
    assert empty.choices[0].finish_reason in {"stop", "length"} and empty.usage.prompt_tokens == 1
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="chat", prompt="one red cat",
                                                                           max_tokens=8, temperature=0, stream=True))
    assert streamed == got.choices[0].text


def test_a_temperature_too_small_to_divide_by_is_greedy_and_refused_where_sampling_is_asked_for(client, server):
    # schemathesis sent temperature 5e-324: logits / temperature were inf and sampling raised (a 500)
    greedy = client.completions.create(model="chat", prompt="one red cat", max_tokens=6, temperature=0)
    tiny = client.completions.create(model="chat", prompt="one red cat", max_tokens=6, temperature=5e-324)
    assert tiny.choices[0].text == greedy.choices[0].text
    refused = _post(server, "/v1/predict", {"model": "chat", "inputs": ["one red cat"], "do_sample": True,
                                            "temperature": 1e-300})
    assert refused.status_code == 422 and "temperature" in refused.text


def test_seeded_sampling_repeats(client):
    a, b = (client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=7)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_openai_errors_are_4xx(client, server):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.UnprocessableEntityError, match="does not generate chat"):
        client.chat.completions.create(model="sentiment", messages=MESSAGES)
    with pytest.raises(openai.UnprocessableEntityError, match="n"):
        client.chat.completions.create(model="chat", messages=MESSAGES, n=2)
    with pytest.raises(openai.UnprocessableEntityError, match="assistant"):
        client.chat.completions.create(model="chat", messages=[*MESSAGES, {"role": "assistant", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()


# --------------------------------------------------------------------------- the CLI


def test_the_cli_serves_until_sigterm_and_refuses_a_missing_run(runs, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNESMITH_API_KEY": KEY}
    missing = subprocess.run([sys.executable, "-m", "tunesmith.cli", "serve", str(tmp_path / "nope")], env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "nope" in missing.stderr
    with _listening_socket() as sock:
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "serve", str(runs["sentiment"]), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        got = _post(f"http://127.0.0.1:{port}", "/v1/predict", {"texts": ["great film"]})
        assert got.status_code == 200 and len(got.json()["predictions"]) == 1
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the parent sees how its child ended
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        proc.kill()
    log = proc.stdout.read()
    assert "http://127.0.0.1:" in log and "Application shutdown complete" in log
    assert "--dtype auto: " in log  # the CLI's default, with the measurement it followed


# --------------------------------------------------------------------------- schemathesis over the schema

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings as hypothesis_settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(runs):
    open_server = ServeSettings(max_items=8, max_chars=300, max_new_tokens=8)
    app = create_app(load_runs([runs["sentiment"], runs["chat"]], open_server, names=["sentiment", "chat"]), open_server)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_generated_request_is_a_server_error(api_schema):
    # each operation's generated requests (valid and invalid bodies, by its schema) through the app in-process
    from hypothesis import given

    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/predict", "/v1/chat/completions", "/v1/completions", "/v1/models"}
    seen: dict[str, set[int]] = {}
    for operation in operations:
        @given(operation.as_strategy())
        @hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                             derandomize=True)  # the same requests on every run: CI never flakes on a new find
        def no_server_error(case):
            response = case.call_and_validate(checks=[not_a_server_error])
            seen.setdefault(operation.path, set()).add(response.status_code)

        no_server_error()
    print(seen)
    assert 200 in seen["/v1/predict"] and 422 in seen["/v1/predict"]  # valid and invalid bodies both tried


def test_bf16_serving_gives_the_same_labels_and_onnx_refuses_it(runs):
    from fastapi.testclient import TestClient

    from tunesmith.errors import ConfigError

    settings = ServeSettings()
    served = load_runs([runs["sentiment"]], settings, dtype="bf16")
    assert next(served[0].loaded.model.parameters()).dtype.is_floating_point
    assert str(next(served[0].loaded.model.parameters()).dtype) == "torch.bfloat16"
    with TestClient(create_app(served, settings)) as client:
        got = client.post("/v1/predict", json={"texts": TEXTS}).json()["predictions"]
    want = tunesmith.predict(runs["sentiment"], TEXTS)
    assert [p["label"] for p in got] == [p["label"] for p in want]
    assert all(abs(a["score"] - b["score"]) < 0.02 for a, b in zip(got, want))
    with pytest.raises(ConfigError, match="bf16 with the torch backend"):
        load_runs([runs["sentiment"]], settings, backend="onnx", dtype="bf16")


@pytest.mark.parametrize("measured", ["bf16", "fp32"])
def test_dtype_auto_follows_the_cpus_measurement_and_says_so(runs, monkeypatch, measured):
    import torch
    from fastapi.testclient import TestClient

    from tunesmith.speed import precision

    monkeypatch.setattr(precision, "choose_precision", lambda requested, device, recheck=False:
                        precision.PrecisionChoice(measured, f"measured {measured}"))
    settings = ServeSettings()
    served = load_runs([runs["sentiment"]], settings, dtype="auto")
    assert served[0].dtype == measured
    assert next(served[0].loaded.model.parameters()).dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[measured]
    with TestClient(create_app(served, settings)) as client:
        assert client.get("/v1/models").json()["data"][0]["dtype"] == measured


def test_the_dockerfile_entrypoint_is_a_command_line_the_cli_accepts(tmp_path):
    # docker is not run by the tests; its command line is: the image's ENTRYPOINT + CMD, with a missing folder
    from typer.testing import CliRunner

    from tunesmith.cli import app

    lines = (Path(__file__).parents[1] / "Dockerfile").read_text().splitlines()
    entry = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT")).split(None, 1)[1])
    cmd = json.loads(next(line for line in lines if line.startswith("CMD")).split(None, 1)[1])
    assert entry[:2] == ["tunesmith", "serve"] and any(line.startswith("USER ") for line in lines)
    result = CliRunner().invoke(app, [*entry[1:], str(tmp_path / cmd[0].strip("/"))])
    assert result.exit_code == 2 and "model" in result.output and "Traceback" not in result.output


def _slow(served, seconds: float) -> threading.Event:
    original, entered = served._predict, threading.Event()

    def slow(items, options):
        entered.set()
        time.sleep(seconds)
        return original(items, options)

    served._predict = slow
    served.start(lambda size: None)  # the batcher takes the slowed call
    return entered


def test_a_request_over_the_timeout_is_504_and_in_flight_requests_finish_on_shutdown(runs):
    from fastapi.testclient import TestClient

    settings = ServeSettings(request_timeout_s=0.2)
    served = load_runs([runs["sentiment"]], settings)
    app = create_app(served, settings)
    _slow(served[0], 1.0)
    with TestClient(app) as client:
        late = client.post("/v1/predict", json={"texts": ["great"]})
    assert late.status_code == 504 and "--timeout" in late.json()["error"]["message"]

    settings = ServeSettings()
    served = load_runs([runs["sentiment"]], settings)
    app = create_app(served, settings)
    entered = _slow(served[0], 1.5)
    sock = _listening_socket()
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, url + "/v1/predict", json={"texts": ["great"]}, timeout=30)
        assert entered.wait(30)  # the request is inside the model call
        uv.should_exit = True  # what SIGTERM does
        answer = pending.result()
    thread.join(15)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
    assert not thread.is_alive()
