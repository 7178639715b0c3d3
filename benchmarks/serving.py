"""Serving under load, side by side: `tunesmith serve` (PyTorch fp32 and bf16, ONNX fp32 and int8) against the
server a user would write by hand (FastAPI calling a transformers `pipeline` per request), and the SmolLM2 chat
endpoint in tokens/s.

The classifier: the bundled all-MiniLM-L6-v2 fine-tuned briefly on Rotten Tomatoes (the same run for every arm;
quality is not measured here). Each server runs in its own process (`tunesmith serve ...`, or this file's
`--baseline-server`), bound to loopback; the load comes from this process: N concurrent clients, each sending one
review per request (where micro-batching matters), for a fixed time after a warm-up; latency per request (p50 /
p95 / p99) and requests/s. Server and clients share the machine's cores, the same for every arm.

    python benchmarks/serving.py            # about 10 minutes on 2 cores
    python benchmarks/serving.py --quick    # tiny in-process models, smoke test (~2 minutes)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONCURRENCY = (1, 8, 32)
CHAT_CONCURRENCY = (1, 4)
FULL = {"seconds": 12.0, "warmup": 2.0, "train_steps": 30, "chat_seconds": 25.0, "chat_tokens": 32}
QUICK = {"seconds": 2.0, "warmup": 0.5, "train_steps": 2, "chat_seconds": 3.0, "chat_tokens": 8}


# --------------------------------------------------------------------------- the runs served


def reviews(n: int) -> list[str]:
    from tunesmith.assets import bundled_dataset_frame

    frame = bundled_dataset_frame("bundled:rotten_tomatoes").sample(frac=1.0, random_state=0)
    return [str(t) for t in frame.text[:n]]


def prepare(tmp: Path, quick: bool, settings: dict) -> dict[str, Path]:
    """The classifier run, its two ONNX exports and a chat run."""
    import tunesmith
    from tunesmith.assets import bundled_dataset_frame
    from tunesmith.export.onnx import export_onnx

    if quick:
        from tunesmith.tasks.causal_lm.examples import build_smollm
        from tunesmith.tasks.contract import tiny_checkpoint

        classifier = str(tiny_checkpoint(tmp / "tiny-bert", reviews(400)[0].split() + ["good", "bad"]))
        decoder = str(build_smollm(tmp / "tiny-smollm"))
    else:
        classifier, decoder = "bundled:all-MiniLM-L6-v2", "bundled:SmolLM2-135M-Instruct"
    frame = bundled_dataset_frame("bundled:rotten_tomatoes").sample(frac=1.0, random_state=1).reset_index(drop=True)
    rows = [{"text": str(t), "label": str(label)} for t, label in zip(frame.text, frame.label)]
    files = {}
    for name, part in (("train", rows[:800]), ("validation", rows[800:1000])):
        files[name] = tmp / f"rt-{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    quiet = {"eval_strategy": "no", "max_steps": settings["train_steps"], "seed": 0}
    sentiment = tunesmith.train({
        "model": {"name_or_path": classifier}, "data": {"train_file": str(files["train"]),
                                                         "validation_file": str(files["validation"])},
        "task": {"name": "classification", "max_length": 64}, "method": {"name": "full"},
        "train": {**quiet, "per_device_train_batch_size": 16}, "output": {"dir": str(tmp / "sentiment")}},
        show_progress=False).run_dir
    chat_rows = [{"prompt": f"Is this review positive or negative?\n\n{r['text']}", "completion": "positive"
                  if r["label"] in ("1", "pos") else "negative"} for r in rows[:64]]
    (tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows), encoding="utf-8")
    chat = tunesmith.train({
        "model": {"name_or_path": decoder}, "data": {"train_file": str(tmp / "chat.jsonl")},
        "task": {"name": "causal_lm", "format": "prompt_completion", "max_length": 256, "sample_prompts": 0},
        "method": {"name": "lora"}, "train": {**quiet, "max_steps": 2, "per_device_train_batch_size": 4},
        "output": {"dir": str(tmp / "chat")}}, show_progress=False).run_dir
    export_onnx(sentiment, tmp / "onnx-fp32")
    export_onnx(sentiment, tmp / "onnx-int8", quantize="int8")
    return {"run": Path(sentiment), "onnx-fp32": tmp / "onnx-fp32", "onnx-int8": tmp / "onnx-int8", "chat": Path(chat)}


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], port: int) -> subprocess.Popen:
    import httpx

    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # a pipe nobody reads would block the server
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    server.log_path = log.name
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server stopped: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not come up in 300 s")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        print(Path(server.log_path).read_text()[-3000:])
        raise RuntimeError("the server died under load (its log above)")
    server.terminate()
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        server.kill()


def tunesmith_server(target: Path, port: int, *options: str) -> list[str]:
    return [sys.executable, "-m", "tunesmith.cli", "serve", str(target), "--port", str(port), "--name", "model", *options]


def baseline_server(model_dir: Path, port: int) -> list[str]:
    return [sys.executable, __file__, "--baseline-server", str(model_dir), "--port", str(port)]


def run_baseline_server(model_dir: str, port: int) -> None:
    """What a user writes by hand: FastAPI, a transformers pipeline, one call per request."""
    import uvicorn
    from fastapi import FastAPI
    from transformers import pipeline

    classify = pipeline("text-classification", model=model_dir, device="cpu")
    app = FastAPI()

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.post("/v1/predict")
    def predict(body: dict):  # a plain def: FastAPI runs it in its thread pool
        return {"predictions": classify(body["texts"])}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# --------------------------------------------------------------------------- load


async def _load(url: str, bodies: list[dict], clients: int, seconds: float, warmup: float) -> dict:
    import httpx

    latencies, errors, tokens = [], 0, 0
    loop = asyncio.get_running_loop()
    begin = loop.time() + warmup
    end = begin + seconds

    async def client(i: int, http: httpx.AsyncClient):
        nonlocal errors, tokens
        n = i
        while loop.time() < end:
            started = loop.time()
            response = await http.post(url, json=bodies[n % len(bodies)])
            n += clients
            if started < begin:
                continue  # warm-up
            latencies.append(loop.time() - started)
            if response.status_code != 200:
                errors += 1
            elif "usage" in response.json():
                tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"clients": clients, "requests": len(ordered), "errors": errors, "requests_per_second": len(ordered) / seconds,
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "mean_ms": 1000 * statistics.mean(ordered),
            "tokens_per_second": tokens / seconds if tokens else None}


def measure(name: str, command: list[str], port: int, path: str, bodies: list[dict], levels, settings: dict,
            seconds_key: str = "seconds") -> list[dict]:
    server = start(command, port)
    try:
        rows = []
        server.name = name
        for clients in levels:
            row = asyncio.run(_load(f"http://127.0.0.1:{port}{path}", bodies, clients, settings[seconds_key],
                                    settings["warmup"]))
            rows.append({"system": name, **row})
            print(f"  {name}, {clients} clients: {row['requests_per_second']:.1f} req/s, p95 {row['p95_ms']:.0f} ms"
                  + (f", {row['tokens_per_second']:.1f} tokens/s" if row["tokens_per_second"] else "")
                  + (f", {row['errors']} errors" if row["errors"] else ""), flush=True)
        return rows
    except Exception:
        print(f"{name}: the load failed; the server's log ends:\n{Path(server.log_path).read_text()[-3000:]}")
        raise
    finally:
        stop(server)


# --------------------------------------------------------------------------- report


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(t for t, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(format(r[k], f) if isinstance(r.get(k), (int, float)) else str(r.get(k, "—"))
                                        for _, k, f in columns) + " |")
    return "\n".join(lines)


def serve_defaults() -> dict:
    import dataclasses

    from tunesmith.serving import ServeSettings

    return {k: v for k, v in dataclasses.asdict(ServeSettings()).items() if k in ("max_batch_size", "max_wait_ms",
                                                                             "predict_batch_size")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--baseline-server", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        run_baseline_server(args.baseline_server, args.port)
        return

    import torch
    import transformers

    from tunesmith.paths import cache_root
    from tunesmith.speed.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model

    settings = {**FULL, **(QUICK if args.quick else {})}
    flags = sorted(cpu_flags() & ({"avx2", "avx512f", "avx512_vnni"} | NATIVE_BF16_FLAGS))
    machine = {"cpu": cpu_model(), "flags": flags, "cores": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"CPU: {machine['cpu']} | flags: {', '.join(flags)} | cores {machine['cores']} | torch {torch.__version__}")
    output = args.output or (cache_root() / "serving-quick.json" if args.quick else
                             Path(__file__).parent / "results" / "serving.json")
    # the quick run's tiny BERT has 64 positions, and the hand-written baseline does not truncate
    texts = [" ".join(t.split()[:20]) if args.quick else t for t in reviews(512)]
    bodies = [{"texts": [t]} for t in texts]
    with tempfile.TemporaryDirectory() as tmp:
        built = prepare(Path(tmp), args.quick, settings)
        exports = {name: {k: v for k, v in json.loads((built[name] / "export.json").read_text()).items()
                          if k in ("quantize", "quantized", "samples", "max_abs_diff", "agreement")}
                   for name in ("onnx-fp32", "onnx-int8")}
        print("exports:", json.dumps(exports))
        arms = [("hand-written FastAPI + pipeline", lambda p: baseline_server(built["run"] / "model", p)),
                ("tunesmith PyTorch fp32", lambda p: tunesmith_server(built["run"], p, "--dtype", "fp32")),
                ("tunesmith PyTorch bf16", lambda p: tunesmith_server(built["run"], p, "--dtype", "bf16")),
                ("tunesmith ONNX fp32", lambda p: tunesmith_server(built["onnx-fp32"], p, "--backend", "onnx")),
                ("tunesmith ONNX int8", lambda p: tunesmith_server(built["onnx-int8"], p, "--backend", "onnx"))]
        rows = []
        for name, command in arms:
            port = free_port()
            rows += measure(name, command(port), port, "/v1/predict", bodies, CONCURRENCY, settings)
        chat_bodies = [{"model": "model", "messages": [{"role": "user", "content": f"Is this review positive or negative?"
                                                        f"\n\n{t}"}], "max_tokens": settings["chat_tokens"],
                        "temperature": 0} for t in texts[:64]]
        chat = []
        for dtype in ("fp32", "bf16"):
            port = free_port()
            chat += measure(f"tunesmith chat (SmolLM2) {dtype}", tunesmith_server(built["chat"], port, "--dtype", dtype),
                            port, "/v1/chat/completions", chat_bodies, CHAT_CONCURRENCY, settings, "chat_seconds")
    print("\nClassification, one review per request:\n")
    print(table(rows, [("server", "system", ""), ("clients", "clients", "d"), ("requests/s", "requests_per_second", ".1f"),
                       ("p50 ms", "p50_ms", ".1f"), ("p95 ms", "p95_ms", ".1f"), ("p99 ms", "p99_ms", ".1f"),
                       ("errors", "errors", "d")]))
    print("\nChat completions (greedy, max_tokens %d):\n" % settings["chat_tokens"])
    print(table(chat, [("server", "system", ""), ("clients", "clients", "d"), ("requests/s", "requests_per_second", ".2f"),
                       ("tokens/s", "tokens_per_second", ".1f"), ("p50 ms", "p50_ms", ".0f"), ("p95 ms", "p95_ms", ".0f")]))
    payload = {"benchmark": "serving", "machine": machine, "settings": settings, "quick": args.quick,
               "exports": exports, "serve_defaults": serve_defaults(),
               "classification": rows, "chat": chat, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
