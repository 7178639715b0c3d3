"""Serving trained runs over HTTP (`tunesmith serve`): FastAPI + uvicorn, one app for every task family.

    from tunesmith.serving import ServeSettings, create_app, load_runs
    app = create_app(load_runs(["runs/sentiment"], ServeSettings()))

`app.py` the routes, `openai_api.py` the OpenAI-compatible ones, `requests.py` each family's body,
`batcher.py` micro-batching, `guard.py` API key and body limit, `telemetry.py` Prometheus metrics."""

from tunesmith.serving.settings import API_KEY_ENV, ServeSettings

__all__ = ["API_KEY_ENV", "ServeSettings", "create_app", "load_runs", "serve"]


def create_app(runs, settings=None):
    from tunesmith.serving.app import create_app as build

    return build(runs, settings)


def load_runs(run_dirs, settings, names=None, backend: str = "torch", dtype: str = "fp32"):
    from tunesmith.serving.served import load_runs as load

    return load(run_dirs, settings, names, backend, dtype)


def serve(run_dirs, host: str = "127.0.0.1", port: int = 8000, settings: ServeSettings | None = None, names=None,
          graceful_seconds: float = 30.0, backend: str = "torch", dtype: str = "auto") -> None:
    """Load the runs and serve them until SIGINT/SIGTERM; in-flight requests finish first (up to `graceful_seconds`).
    `dtype` auto: bf16 where this CPU measured it faster (load_runs)."""
    import uvicorn

    settings = settings or ServeSettings()
    app = create_app(load_runs(list(run_dirs), settings, names, backend, dtype), settings)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=graceful_seconds, log_level="info")
