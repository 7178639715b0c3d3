"""What every ONNX layout shares: tracing a module to a file with torch.onnx (dynamo, opset 18) without the
exporter's narration, and onnxruntime sessions on the CPU."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

OPSET = 18


def trace(graph: torch.nn.Module, example: tuple, path: Path, input_names: list[str], output_names: list[str],
          dynamic_shapes) -> None:
    """`graph(*example)` written to `path` with the named dynamic axes (`dynamic_shapes`, torch.export's form)."""
    with warnings.catch_warnings(), quiet("torch.onnx", "torch.export", "onnxscript", "onnx_ir"), \
            contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's progress notes
        torch.onnx.export(graph.eval(), example, str(path), input_names=input_names, output_names=output_names,
                          dynamic_shapes=dynamic_shapes, opset_version=OPSET, dynamo=True, external_data=False,
                          verbose=False)
    graph.eval()  # the exporter may leave the wrapped model in training mode


def session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's threads spin after each run by default, taking the cores from the PyTorch and Python work
    # between runs (generate's argmax, the server's event loop): off, a bert2bert batch-16 generation took
    # 1.19 s instead of 1.98 s.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def quiet(*names: str):
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
