"""ONNX export with a parity check. The run's model (adapters merged) is written in its family's layout
(`Task.onnx_layout`: one graph, or an encoder-decoder's three) with dynamic batch and sequence axes (torch.onnx,
opset 18), optionally quantized to int8 weights (onnxruntime's dynamic quantization), and checked before the
folder is published: on a validation sample the family's own `predict` runs once on the PyTorch model and once on
the ONNX one. fp32 must match every output of every forward call (a generating family: every decoding step)
within `ATOL + RTOL * |value|`; int8 must give the same predictions on at least `INT8_AGREEMENT` of the sample.
Otherwise the export fails, naming the largest difference. The folder holds the .onnx files, the tokenizer,
config.json (the label map), generation_config.json for a generating family, the run's config.yaml / task.json /
metrics.json and export.json (what was measured), so it serves like a run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from tunesmith.errors import ConfigError, DataError

from tunesmith.export.runtime import OPSET, quiet

ATOL, RTOL = 1e-4, 1e-3
INT8_AGREEMENT = 0.99
# What int8 quantizes, tried in order until the check passes: every weight (the matmuls and the embedding tables),
# then every weight but the embeddings. On all-MiniLM-L6-v2 fine-tuned 30 steps on Rotten Tomatoes the first gave
# 98.0% same predictions (4 of 200 flipped, all near the decision boundary; 23.7 MB), the second 100% (59.5 MB).
INT8_PLANS = (("every weight", None), ("every weight but the embeddings", ["MatMul"]))
RUN_FILES = ("config.yaml", "task.json", "metrics.json")


@dataclasses.dataclass(frozen=True)
class ExportResult:
    folder: Path
    quantize: str | None
    samples: int  # inputs the check ran
    max_abs_diff: float  # largest |onnx - torch| over every output of the sample
    agreement: float  # share of the sample's inputs with the same prediction
    seconds: float
    quantized: str | None = None  # which INT8_PLANS passed

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "folder": str(self.folder), "atol": ATOL, "rtol": RTOL,
                "int8_agreement_required": INT8_AGREEMENT if self.quantize else None}


class _Recorder:
    """Keeps every output of every forward call a predict made (a generating family: every decoding step), to
    compare the two backends number by number."""

    def __init__(self, model, outputs: tuple[str, ...]):
        self.outputs, self.seen = outputs, []
        self.handle = model.register_forward_hook(self._keep)

    def _keep(self, _module, _args, result) -> None:
        self.seen.append([getattr(result, name).detach().float() for name in self.outputs])


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
    layout = task.onnx_layout
    if layout is None:
        raise ConfigError(f"'{run_dir}' is a {task.name} run, which has no ONNX export (exported: classification, "
                          "token classification, question answering, seq2seq); serve this run with "
                          "tunesmith serve RUN_DIR instead")
    model = _plain(loaded.model)
    inputs = sample_inputs(loaded, sample_file, samples)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        layout.export(model, loaded.tokenizer, staging)
        result = _int8(loaded, model, layout, staging, inputs) if quantize else _fp32(loaded, model, layout, staging, inputs)
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


def _fp32(loaded, model, layout, folder: Path, inputs: list) -> ExportResult:
    result, allowed, where = _measure(loaded, model, layout, folder, inputs, None)
    if not allowed:
        raise ConfigError(f"the ONNX export does not match the PyTorch model: the largest difference is "
                          f"{result.max_abs_diff:.3g} ({where}), over the tolerance {ATOL:g} + {RTOL:g} x |value|; nothing "
                          f"was written. Report it with the model's architecture ({type(model).__name__})")
    return result


def _int8(loaded, model, layout, folder: Path, inputs: list) -> ExportResult:
    """The first of INT8_PLANS whose predictions agree with PyTorch's on INT8_AGREEMENT of the sample."""
    fp32 = folder / "fp32"
    fp32.mkdir()
    for name in layout.files:
        os.replace(folder / name, fp32 / name)
    tried = []
    for plan, op_types in INT8_PLANS:
        for name in layout.files:
            _quantize(fp32 / name, folder / name, op_types)
        result, _, _ = _measure(loaded, model, layout, folder, inputs, "int8")
        if result.agreement >= INT8_AGREEMENT:
            shutil.rmtree(fp32)
            return dataclasses.replace(result, quantized=plan)
        tried.append(f"{plan}: {result.agreement:.1%}, largest output difference {result.max_abs_diff:.3g}")
    raise ConfigError(f"the int8 export gives the PyTorch model's predictions on too few of {len(inputs)} sample inputs "
                      f"(required {INT8_AGREEMENT:.0%}; quantizing {'; '.join(tried)}); nothing was written. Export "
                      "without --quantize (fp32), or check on a larger --sample")


def _quantize(source: Path, target: Path, op_types: list[str] | None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet("root"):  # its advice to pre-process image models
        # per-channel scales: on the demo's MiniLM 99.0% same predictions, against 97.5% with one scale per tensor
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=op_types)


def _measure(loaded, model, layout, folder: Path, inputs: list, quantize: str | None) -> tuple[ExportResult, bool, str]:
    """Both backends through the family's predict: the result, whether every output was within tolerance, and
    where the largest difference was."""
    task, state, tokenizer = loaded.task, loaded.state, loaded.tokenizer
    max_length = loaded.config.task.max_length
    onnx_model = layout.load(folder, model.config, getattr(model, "generation_config", None))
    plain, exported = _Recorder(model, layout.outputs), _Recorder(onnx_model, layout.outputs)
    with torch.inference_mode():
        want = task.predict(model, tokenizer, inputs, state, max_length=max_length)
        got = task.predict(onnx_model, tokenizer, inputs, state, max_length=max_length)
    plain.handle.remove()
    exported.handle.remove()
    worst, where, allowed = 0.0, "", True
    # Calls pair up in order (batch after batch; a generating family: step after step, which stay aligned while
    # both backends chose the same tokens, as fp32 does).
    for batch, (a_outputs, b_outputs) in enumerate(zip(plain.seen, exported.seen)):
        for name, a, b in zip(layout.outputs, a_outputs, b_outputs):
            if a.shape != b.shape:  # the backends generated different tokens before this step
                allowed, worst, where = False, float("inf"), f"{name} of call {batch}: the shapes differ"
                continue
            diff = (a - b).abs()
            allowed = allowed and bool((diff <= ATOL + RTOL * a.abs()).all())
            if float(diff.max()) > worst:
                worst, where = float(diff.max()), f"{name} of call {batch}"
    same = sum(task.prediction_decision(a) == task.prediction_decision(b) for a, b in zip(want, got)) / len(want)
    return ExportResult(folder, quantize, len(inputs), worst, same, 0.0), allowed, where


def _write_beside(loaded, model, folder: Path, result: ExportResult) -> None:
    loaded.tokenizer.save_pretrained(folder)
    model.config.save_pretrained(folder)
    if loaded.task.generates:  # the run's generation settings, which generate() on the export reads
        model.generation_config.save_pretrained(folder)
    for name in RUN_FILES:
        if (Path(loaded.run_dir) / name).exists():
            shutil.copy2(Path(loaded.run_dir) / name, folder / name)
    layout = loaded.task.onnx_layout
    (folder / "export.json").write_text(json.dumps({"format": "onnx", "opset": OPSET, "source_run": str(loaded.run_dir),
                                                    "layout": layout.name, "files": list(layout.files),
                                                    "outputs": list(layout.outputs), **result.to_json()},
                                                   indent=2) + "\n", encoding="utf-8")


def load_export(folder: str | os.PathLike):
    """An export folder as a LoadedRun whose model is the ONNX session (what `tunesmith serve --backend onnx` runs)."""
    import transformers

    from tunesmith.api import LoadedRun, read_run_files

    _require_onnx()
    folder = Path(folder)
    if not (folder / "export.json").is_file():
        raise ConfigError(f"'{folder}': not an ONNX export (expected export.json beside the .onnx files); write one "
                          "with tunesmith export RUN_DIR --format onnx OUT, or serve a run directory without --backend onnx")
    cfg, task, state = read_run_files(folder)
    layout = task.onnx_layout
    missing = [name for name in layout.files if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"'{folder}': the export lacks {', '.join(missing)} (a {task.name} export holds "
                          f"{', '.join(layout.files)}); export the run again")
    config = transformers.AutoConfig.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    generation = transformers.GenerationConfig.from_pretrained(folder) if task.generates else None
    return LoadedRun(folder, cfg, task, state, layout.load(folder, config, generation), tokenizer)
