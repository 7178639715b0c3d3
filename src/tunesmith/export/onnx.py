"""ONNX export with a parity check. The run's model (adapters merged) is exported with dynamic batch and sequence
axes (torch.onnx, opset 18), optionally quantized to int8 weights (onnxruntime's dynamic quantization), and
checked before the folder is published: on a validation sample the family's own `predict` runs once on the
PyTorch model and once on the ONNX one. fp32 must match every output within `ATOL + RTOL * |value|`; int8 must
give the same predictions on at least `INT8_AGREEMENT` of the sample. Otherwise the export fails, naming the
largest difference. The folder holds model.onnx, the tokenizer, config.json (the label map), the run's
config.yaml / task.json / metrics.json and export.json (what was measured), so it serves like a run."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from tunesmith.errors import ConfigError, DataError

ATOL, RTOL = 1e-4, 1e-3
INT8_AGREEMENT = 0.99
OPSET = 18
RUN_FILES = ("config.yaml", "task.json", "metrics.json")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    folder: Path
    quantize: str | None
    samples: int  # inputs the check ran
    max_abs_diff: float  # largest |onnx - torch| over every output of the sample
    agreement: float  # share of the sample's inputs with the same prediction
    seconds: float

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "folder": str(self.folder), "atol": ATOL, "rtol": RTOL,
                "int8_agreement_required": INT8_AGREEMENT if self.quantize else None}


class OnnxModel(torch.nn.Module):
    """An onnxruntime session behind the call a family's `predict` makes (`model(**batch).logits`), so predictions
    from an export go through the same post-processing as from the PyTorch model."""

    def __init__(self, path: Path, config, outputs: tuple[str, ...]):
        import onnxruntime

        super().__init__()
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = outputs
        self.config = config
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # `next(model.parameters()).device`

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_ignored):
        given = {"input_ids": input_ids, "attention_mask": attention_mask if attention_mask is not None else
                 torch.ones_like(input_ids), "token_type_ids": token_type_ids if token_type_ids is not None else
                 torch.zeros_like(input_ids)}
        found = self.session.run(list(self.outputs), {name: given[name].cpu().numpy() for name in self.inputs})
        return SimpleNamespace(**{name: torch.from_numpy(value) for name, value in zip(self.outputs, found)})


class _Graph(torch.nn.Module):
    """The model as a function of plain tensors returning the family's outputs, as ONNX sees it."""

    def __init__(self, model, outputs: tuple[str, ...]):
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        result = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return tuple(getattr(result, name) for name in self.outputs)


class _Recorder(torch.nn.Module):
    """Keeps every output a predict call produced, to compare the two backends number by number."""

    def __init__(self, model, outputs: tuple[str, ...]):
        super().__init__()
        self.model, self.outputs, self.seen = model, outputs, []
        self.config = model.config

    def forward(self, **batch):
        result = self.model(**batch)
        self.seen.append([getattr(result, name).detach().float() for name in self.outputs])
        return result


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike, quantize: str | None = None,
                sample_file: str | os.PathLike | None = None, samples: int = 200, overwrite: bool = False) -> ExportResult:
    from tunesmith.api import load

    started = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"'{out}' exists and is not empty; choose a new folder, or pass --overwrite")
    if quantize not in (None, "int8"):
        raise ConfigError(f"--quantize: expected int8, found {quantize!r}")
    _require_onnx()
    loaded = load(run_dir)
    task = loaded.task
    if not task.onnx_outputs:
        raise ConfigError(f"'{run_dir}' is a {task.name} run; ONNX export covers families whose model is one forward "
                          "pass (classification, token classification, question answering); serve this run with "
                          "tunesmith serve RUN_DIR instead")
    model = _plain(loaded.model)
    inputs = sample_inputs(loaded, sample_file, samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        names = [n for n in INPUT_NAMES if n in loaded.tokenizer.model_input_names or n == "attention_mask"]
        _export(model, loaded.tokenizer, names, task.onnx_outputs, staging / "model.onnx")
        if quantize == "int8":
            _quantize(staging / "model.onnx")
        result = _check(loaded, model, staging / "model.onnx", inputs, quantize)
        result = dataclasses.replace(result, folder=out, seconds=round(time.perf_counter() - started, 2))
        _write_beside(loaded, model, staging, result)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"ONNX export and serving need {', '.join(missing)}, not installed; install the onnx extra: "
                          "pip install 'tunesmith[onnx]'")


def sample_inputs(loaded, sample_file, samples: int) -> list:
    """The first `samples` inputs of `sample_file`, or of the run's own data (its validation split when it has one,
    else its training data; files, folders, bundled or hub data sets alike), read with the family's input columns
    as `tunesmith predict --input` reads them."""
    from tunesmith.data.splits import load_tables

    cfg, task = loaded.config, loaded.task
    if sample_file is not None:
        inputs, _ = task.predict_inputs(cfg.task, cfg.data.encoding, Path(sample_file), None, {})
    else:
        tables = load_tables(cfg.data, task.reader(cfg.task))
        table = tables.get("validation") or tables["train"]
        with tempfile.TemporaryDirectory() as tmp:
            rows = Path(tmp) / "sample.jsonl"
            table.frame.head(samples).to_json(rows, orient="records", lines=True, force_ascii=False)
            inputs, _ = task.predict_inputs(cfg.task, "utf-8", rows, None, {})
    if not inputs:
        raise DataError(f"'{sample_file or 'the run data'}': no inputs to check the export on; pass --sample FILE")
    return list(inputs)[:samples]


def _plain(model):
    """The model without adapters (merged into the weights), fp32, in eval mode."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.float().eval()


def _export(model, tokenizer, names: list[str], outputs: tuple[str, ...], path: Path) -> None:
    import warnings

    example = tokenizer(["an example to trace", "two"], padding=True, return_tensors="pt")
    example.setdefault("token_type_ids", torch.zeros_like(example["input_ids"]))
    graph = _Graph(model, outputs).eval()
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {name: {0: batch, 1: sequence} for name in names}
    with warnings.catch_warnings(), _quiet("torch.onnx", "torch.export", "onnxscript", "onnx_ir"), contextlib.redirect_stdout(io.StringIO()), \
            torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's progress notes
        torch.onnx.export(graph, tuple(example[n] for n in names), str(path), input_names=names, output_names=list(outputs),
                          dynamic_shapes=shapes, opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
    model.eval()  # the exporter may leave the wrapped model in training mode


def _quantize(path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_name("model.int8.onnx")
    with _quiet("root"):  # its advice to pre-process image models
        # per-channel scales: on the demo's MiniLM 99.0% same predictions, against 97.5% with one scale per tensor
        quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8, per_channel=True)
    os.replace(quantized, path)


@contextlib.contextmanager
def _quiet(*names: str):
    """Loggers of the exporter and the quantizer that narrate their work, silenced for the duration."""
    loggers = [logging.getLogger(n) if n != "root" else logging.getLogger() for n in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _check(loaded, model, path: Path, inputs: list, quantize: str | None) -> ExportResult:
    task, state, tokenizer = loaded.task, loaded.state, loaded.tokenizer
    max_length = loaded.config.task.max_length
    plain, exported = _Recorder(model, task.onnx_outputs), _Recorder(OnnxModel(path, model.config, task.onnx_outputs),
                                                                      task.onnx_outputs)
    with torch.inference_mode():
        want = task.predict(plain, tokenizer, inputs, state, max_length=max_length)
        got = task.predict(exported, tokenizer, inputs, state, max_length=max_length)
    worst, where, allowed = 0.0, None, True
    for batch, (a_outputs, b_outputs) in enumerate(zip(plain.seen, exported.seen)):
        for name, a, b in zip(task.onnx_outputs, a_outputs, b_outputs):
            diff = (a - b).abs()
            allowed = allowed and bool((diff <= ATOL + RTOL * a.abs()).all())
            if float(diff.max()) > worst:
                worst, where = float(diff.max()), f"{name} of batch {batch}"
    same = sum(task.prediction_decision(a) == task.prediction_decision(b) for a, b in zip(want, got)) / len(want)
    result = ExportResult(path.parent, quantize, len(inputs), worst, same, 0.0)
    if quantize is None and not allowed:
        raise ConfigError(f"the ONNX export does not match the PyTorch model: the largest difference is {worst:.3g} "
                          f"({where}), over the tolerance {ATOL:g} + {RTOL:g} x |value|; nothing was written. Report it "
                          f"with the model's architecture ({type(model).__name__})")
    if quantize == "int8" and same < INT8_AGREEMENT:
        raise ConfigError(f"the int8 export gives the PyTorch model's predictions on {same:.1%} of {len(inputs)} sample "
                          f"inputs, under the required {INT8_AGREEMENT:.0%} (largest output difference {worst:.3g}); "
                          "nothing was written. Export without --quantize (fp32), or check on a larger --sample")
    return result


def _write_beside(loaded, model, folder: Path, result: ExportResult) -> None:
    loaded.tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    for name in RUN_FILES:
        if (Path(loaded.run_dir) / name).exists():
            shutil.copy2(Path(loaded.run_dir) / name, folder / name)
    (folder / "export.json").write_text(json.dumps({"format": "onnx", "opset": OPSET, "source_run": str(loaded.run_dir),
                                                    "outputs": list(loaded.task.onnx_outputs), **result.to_json()},
                                                   indent=2) + "\n", encoding="utf-8")


def load_export(folder: str | os.PathLike):
    """An export folder as a LoadedRun whose model is the ONNX session (what `tunesmith serve --backend onnx` runs)."""
    import transformers

    from tunesmith.api import LoadedRun, read_run_files

    _require_onnx()
    folder = Path(folder)
    if not (folder / "model.onnx").is_file() or not (folder / "export.json").is_file():
        raise ConfigError(f"'{folder}': not an ONNX export (expected model.onnx and export.json); write one with "
                          "tunesmith export RUN_DIR --format onnx OUT, or serve a run directory without --backend onnx")
    cfg, task, state = read_run_files(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return LoadedRun(folder, cfg, task, state, OnnxModel(folder / "model.onnx", config, task.onnx_outputs), tokenizer)
