"""GGUF (llama.cpp) checkpoints -> plain transformers folders that train and save like any model.

A GGUF file stores quantized weights (Q4_1: 4-bit blocks with a scale and a minimum). transformers can load it
(`from_pretrained(folder, gguf_file=...)`): it dequantizes every tensor to float and builds the config and a
fast tokenizer, chat template included, from the file's metadata. What it leaves behind blocks training and
saving: a `hf_quantizer`, `is_quantized` and a `quantization_config` in the config. `import_gguf` drops them and
writes safetensors in fp32 or bf16, the tokenizer, a generation_config.json and a README that says plainly that
the weights are a dequantized quantized model (quality claims then hold for the quantized model, not the original
bf16 checkpoint). Parsing a GGUF file is slow (seconds per parse, and transformers parses it several times), so a
run should start from the imported folder rather than the file.

The folder is written next to its destination and renamed into place: a crash leaves no half folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import ConfigError

log = logging.getLogger("tunesmith")

DTYPES = ("float32", "bfloat16")
MAGIC = b"GGUF"


@dataclass
class ImportResult:
    folder: Path
    parameters: int
    file_type: str  # llama.cpp's name of the quantization: MOSTLY_Q4_1, MOSTLY_F16, ...
    architecture: str
    notes: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.file_type not in ("ALL_F32", "MOSTLY_F16", "MOSTLY_BF16")


def check_gguf_file(file: str | os.PathLike, field_name: str = "FILE") -> Path:
    """The path of a readable GGUF file, else a ConfigError saying what was found."""
    path = Path(file).expanduser()
    if not path.is_file():
        found = "a folder" if path.is_dir() else "nothing"
        raise ConfigError(f"{field_name}: expected a .gguf file, found {found} at '{path}'; give the path of the file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != MAGIC:
        raise ConfigError(f"{field_name}: '{path}' is not a GGUF file (it starts with {magic!r}, a GGUF file with "
                          f"{MAGIC!r}); give a llama.cpp .gguf file, or load a transformers folder directly")
    return path


def _metadata(path: Path) -> tuple[str, str]:
    """(architecture, file type name) from the file's header."""
    import gguf

    reader = gguf.GGUFReader(path)
    architecture = str(reader.fields["general.architecture"].contents()) if "general.architecture" in reader.fields else "?"
    kind = reader.fields.get("general.file_type")
    try:
        file_type = gguf.LlamaFileType(int(kind.contents())).name if kind is not None else _guess_type(reader)
    except ValueError:
        file_type = f"file type {kind.contents()}"
    return architecture, file_type


def _guess_type(reader) -> str:
    """An old file without general.file_type: named after its most common tensor type."""
    from collections import Counter

    common = Counter(t.tensor_type.name for t in reader.tensors).most_common(1)
    return f"MOSTLY_{common[0][0]}" if common else "unknown"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"OUT: '{out}' already exists and is not an empty folder; expected a new folder to write the "
                          "model into; choose another path or remove it")


def _load(path: Path, dtype: str):
    import torch
    import transformers

    folder, name = str(path.parent), path.name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise ConfigError(f"FILE: transformers cannot read '{path}' ({str(err).splitlines()[0][:200]}); it reads GGUF "
                          "files of the architectures in transformers.integrations.ggml (llama, mistral, qwen2, qwen3, "
                          "phi3, gemma2/3, t5, ...); convert the checkpoint with llama.cpp or use its transformers "
                          "folder") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.to(getattr(torch, dtype)), tokenizer


def _generation_config(model, tokenizer) -> None:
    """Stop at the tokenizer's eos and pad with its pad token: generate() reads generation_config.json only."""
    gen = model.generation_config
    if tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _readme(source: Path, result: ImportResult, dtype: str) -> str:
    caveat = (f"The weights are the {result.file_type.removeprefix('MOSTLY_')} quantized values of the GGUF file expanded to {dtype}: this is a "
              "**dequantized quantized model**, not the original bf16 checkpoint. It trains, saves and generates like "
              "any transformers model; its quality is the quantized model's (measure it; do not quote the original's "
              "numbers).") if result.quantized else f"The weights are the file's {result.file_type} values, in {dtype}."
    return "\n".join([
        "---", "library_name: transformers", "tags: [tunesmith, gguf-import]", "---", "",
        f"# {source.name}, imported from GGUF", "",
        f"- Source: `{source.name}` ({result.architecture}, {result.file_type}, {source.stat().st_size:,} bytes)",
        f"- Parameters: {result.parameters:,}", f"- Stored as: {dtype} safetensors", "",
        caveat, "",
        "Imported with `tunesmith model import`; the tokenizer (with its chat template) comes from the file's metadata.", "",
    ])


def import_gguf(file: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32") -> ImportResult:
    """Write the GGUF `file` as a plain transformers folder `out` (config.json without quantization attributes,
    `dtype` safetensors, tokenizer with its chat template, generation_config.json, README with the caveat)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: expected one of {', '.join(DTYPES)}, found '{dtype}'")
    path = check_gguf_file(file)
    out = Path(out).expanduser()
    _check_out(out)
    architecture, file_type = _metadata(path)
    model, tokenizer = _load(path, dtype)
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    result = ImportResult(out, parameters, file_type, architecture)
    if result.quantized:
        result.notes.append(f"{path.name} is {file_type}: the imported model is a dequantized quantized model, stored "
                            f"as {dtype}; its quality is the quantized model's, not the original checkpoint's")
    _generation_config(model, tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(_readme(path, result, dtype), encoding="utf-8")
        (staging / "gguf_import.json").write_text(json.dumps({
            "source": path.name, "bytes": path.stat().st_size, "architecture": architecture, "file_type": file_type,
            "dtype": dtype, "parameters": parameters, "dequantized": result.quantized}, indent=2), encoding="utf-8")
        _usual_permissions(staging)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _usual_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder (0700) and some writers private files: give them the umask's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def imported_copy(file: Path, cache: Path, dtype: str = "float32") -> Path:
    """A transformers folder of the GGUF `file` under `cache`, imported on first use and reused after (keyed by the
    file's name, size and modification time, so an upgraded package is imported again)."""
    stat = file.stat()
    folder = cache / f"{file.stem}-{stat.st_size}-{int(stat.st_mtime)}-{dtype}"
    if (folder / "config.json").is_file():
        return folder
    log.info("importing %s into %s once (a dequantized copy: later runs start from it)", file.name, folder)
    try:
        for line in import_gguf(file, folder, dtype).notes:
            log.info(line)
    except ConfigError:
        if (folder / "config.json").is_file():  # another process imported it meanwhile
            return folder
        raise
    return folder
