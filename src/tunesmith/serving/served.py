"""The runs one server answers for: each loaded once, named (its folder's name unless given), with one thread of
its own that every inference on it runs in (a model is never run from two threads at once) and its batcher."""

from __future__ import annotations

import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import ConfigError
from tunesmith.serving.batcher import MicroBatcher
from tunesmith.serving.settings import ServeSettings


@dataclass
class ServedRun:
    name: str
    loaded: object  # tunesmith.api.LoadedRun
    settings: ServeSettings
    dtype: str = "fp32"  # what the weights compute in (fp32, bf16; an ONNX export: fp32 or its int8 weights)
    created: int = field(default_factory=lambda: int(time.time()))
    executor: ThreadPoolExecutor = field(init=False)
    batcher: MicroBatcher | None = field(init=False, default=None)

    def __post_init__(self):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{self.name}")

    @property
    def task(self):
        return self.loaded.task

    def start(self, observe_batch) -> None:
        self.batcher = MicroBatcher(self._predict, self.executor, self.settings.max_batch_size, self.settings.max_wait_ms,
                                    observe_batch)

    def _predict(self, items: list, options: dict) -> list:
        from tunesmith.api import predict

        return predict(self.loaded, items, batch_size=self.settings.predict_batch_size, **options)

    @functools.cached_property
    def info(self) -> dict:
        """`GET /v1/models`: OpenAI's model object plus what the run is (read once: a served run does not change)."""
        cfg, run_dir = self.loaded.config, Path(self.loaded.run_dir)
        metrics_file = run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "tunesmith",
                "task": self.task.name, "labels": list(getattr(self.loaded.state, "labels", None) or []) or None,
                "base_model": cfg.model.name_or_path, "method": cfg.method.name, "run_dir": str(run_dir),
                "dtype": self.dtype,
                "metrics": {k: metrics[k] for k in ("validation", "test") if k in metrics},
                "endpoints": ["/v1/predict", *(["/v1/chat/completions", "/v1/completions"] if self.task.completes else [])]}

    def close(self) -> None:
        self.executor.shutdown(wait=True)


def load_runs(run_dirs: list, settings: ServeSettings, names: list[str] | None = None, backend: str = "torch",
              dtype: str = "fp32") -> list[ServedRun]:
    """Each run directory loaded (tunesmith.load: its errors name the folder), under its folder's name; with
    backend "onnx", each folder is a `tunesmith export --format onnx` folder run by onnxruntime. `dtype` bf16
    casts PyTorch models to bfloat16 (faster on CPUs with native bf16, and half the memory); auto chooses as
    training's `precision: auto` does (bf16 where this CPU's bf16 matmul measured faster; `serving_dtype`)."""
    if backend not in ("torch", "onnx"):
        raise ConfigError(f"--backend: expected torch or onnx, found {backend!r}")
    if dtype not in ("fp32", "bf16", "auto") or (dtype == "bf16" and backend == "onnx"):
        raise ConfigError(f"--dtype: expected auto, fp32, or bf16 with the torch backend; found {dtype!r} with {backend}")
    if backend == "onnx":
        from tunesmith.export.onnx import load_export as load
    else:
        from tunesmith.api import load

    names = list(names) if names else [Path(d).resolve().name for d in run_dirs]
    if len(names) != len(run_dirs):
        raise ConfigError(f"--name: expected one name per run directory ({len(run_dirs)}), found {len(names)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"two served runs are both named {', '.join(repeated)}; requests pick a model by name, so give "
                          "each one its own with --name (one per run directory, in order)")
    if dtype == "auto":
        dtype = serving_dtype() if backend == "torch" else "fp32"
    served = [ServedRun(name, load(run_dir), settings, dtype) for name, run_dir in zip(names, run_dirs)]
    if dtype == "bf16":
        import torch

        for run in served:
            run.loaded.model.to(torch.bfloat16)
    return served


def serving_dtype() -> str:
    """bf16 where the CPU runs bf16 matmuls natively and measurably faster (the cached measurement training's
    `precision: auto` uses), else fp32; logged with the reason."""
    import logging

    import torch

    from tunesmith.speed.precision import choose_precision

    choice = choose_precision("auto", torch.device("cpu"))
    logging.getLogger("tunesmith").info("--dtype auto: %s (%s; --dtype fp32 serves the scores tunesmith predict gives)",
                                        choice.precision, choice.reason)
    return choice.precision  # on a CPU: fp32 or bf16
