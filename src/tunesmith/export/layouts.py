"""How a family's model becomes ONNX files and comes back as a module its `predict` can call. A family names its
layout (`Task.onnx_layout`); the export (onnx.py) traces, quantizes, checks and publishes any layout the same way.
`OneForward`: models that answer in one forward pass (classification, token classification, QA)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from types import SimpleNamespace

import torch

from tunesmith.export.runtime import session, trace

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class OnnxLayout(ABC):
    name: str
    files: tuple[str, ...]  # the .onnx files the layout writes (each quantized under --quantize int8)
    outputs: tuple[str, ...]  # the outputs of the model's forward that the check compares, backend against backend

    @abstractmethod
    def export(self, model, tokenizer, folder: Path) -> None:
        """Writes `files` into `folder` from the fp32 model (adapters merged, eval mode)."""

    @abstractmethod
    def load(self, folder: Path, config, generation_config=None) -> torch.nn.Module:
        """The exported files as a module the family's `predict` calls as it calls the PyTorch model."""


class OnnxModule(torch.nn.Module):
    """Sessions behind a module: `next(model.parameters()).device` and `.eval()` work as on the PyTorch model."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)


class OneForward(OnnxLayout):
    name = "one_forward"
    files = ("model.onnx",)

    def __init__(self, outputs: tuple[str, ...]):
        self.outputs = outputs

    def export(self, model, tokenizer, folder: Path) -> None:
        names = [n for n in INPUT_NAMES if n in tokenizer.model_input_names or n == "attention_mask"]
        example = tokenizer(["an example to trace", "two"], padding=True, return_tensors="pt")
        example.setdefault("token_type_ids", torch.zeros_like(example["input_ids"]))
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        trace(_Forward(model, self.outputs), tuple(example[n] for n in names), folder / "model.onnx", names,
              list(self.outputs), {name: {0: batch, 1: sequence} for name in names})

    def load(self, folder: Path, config, generation_config=None) -> torch.nn.Module:
        return ForwardSession(folder / "model.onnx", config, self.outputs)


class _Forward(torch.nn.Module):
    """The model as a function of plain tensors returning the family's outputs, as ONNX sees it."""

    def __init__(self, model, outputs: tuple[str, ...]):
        super().__init__()
        self.model, self.outputs = model, outputs

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        result = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return tuple(getattr(result, name) for name in self.outputs)


class ForwardSession(OnnxModule):
    """An onnxruntime session behind the call a family's `predict` makes (`model(**batch).logits`), so predictions
    from an export go through the same post-processing as from the PyTorch model."""

    def __init__(self, path: Path, config, outputs: tuple[str, ...]):
        super().__init__()
        self.session = session(path)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = outputs
        self.config = config

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_ignored):
        given = {"input_ids": input_ids, "attention_mask": attention_mask if attention_mask is not None else
                 torch.ones_like(input_ids), "token_type_ids": token_type_ids if token_type_ids is not None else
                 torch.zeros_like(input_ids)}
        found = self.session.run(list(self.outputs), {name: given[name].cpu().numpy() for name in self.inputs})
        return SimpleNamespace(**{name: torch.from_numpy(value) for name, value in zip(self.outputs, found)})
