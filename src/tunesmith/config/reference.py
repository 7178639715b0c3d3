"""The generated config reference (docs/config.md, `tunesmith config reference`): every key of every
section, the task section once per registered family, the method section once per method."""

from __future__ import annotations

import inspect
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from tunesmith.config.loading import pipeline_names
from tunesmith.config.schema import (
    GenerationSection,
    METHODS, SCHEMA_VERSION, DataConfig, ModelConfig, OutputConfig, TrainConfig, task_configs,
)


def config_reference() -> str:
    """Markdown reference of every key, generated from the schema (docs/config.md)."""
    lines = [
        "# Config reference",
        "",
        f"Generated from `tunesmith.config.schema` and the registered task families (schema version {SCHEMA_VERSION})",
        "by `tunesmith config reference`.",
        "Do not edit by hand. Unknown keys are errors that name the closest valid key (or, for a Hugging Face",
        "name, its equivalent). Names with an exact equivalent are read as these keys, with a note: `output_dir`,",
        "`train.bf16`/`train.fp16`, `train.load_best_model_at_end: true`, and the pipeline task names "
        f"({', '.join(f'`{tag}`' for tag in pipeline_names())}).",
        "",
    ]
    sections: list[tuple[str, type[BaseModel]]] = [
        ("model", ModelConfig),
        ("data", DataConfig),
        *((f"task (name: {m.model_fields['name'].default})", m) for m in task_configs()),
        *((f"method (name: {m.model_fields['name'].default})", m) for m in METHODS),
        ("train", TrainConfig),
        ("generation", GenerationSection),
        ("output", OutputConfig),
    ]
    for title, model in sections:
        lines += [f"## `{title}`", "", inspect.cleandoc(model.__doc__ or ""), "", "| key | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            kind = _type_name(field.annotation) + _constraints(field.metadata)
            cells = [f"`{name}`", f"`{kind}`", f"`{field.default!r}`", field.description or ""]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    """`str | None`, `'auto' | 'fp32'`, `list[float]` rather than `<class 'str'>`, `typing.Union[...]`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(metadata: list) -> str:
    bounds = []
    for item in metadata:
        for attribute, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(item, attribute, None)
            if value is not None:
                bounds.append(f"{symbol} {value}")
    return f" ({', '.join(bounds)})" if bounds else ""
