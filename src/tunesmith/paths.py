"""Joining a name that comes from outside (a config value, a URL, a request) onto a base folder.

`safe_join(base, name)` is `base / name` that can only land inside `base`: it refuses names that are
empty, hold a NUL character, are absolute (`/etc`, `C:\\x`, `\\\\server\\share`), climb out with `..`,
or reach outside through a symlink inside `base`. Used for bundled asset names and for run and model
names a server receives; a refusal is a `ConfigError` naming the field, what was found and the fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from tunesmith.errors import ConfigError, DataError, shown

_DRIVE = re.compile(r"^[A-Za-z]:")  # Windows drive letters, refused on every platform


def safe_join(base: str | os.PathLike, name: str | os.PathLike, field: str = "name") -> Path:
    """`base / name`, refused with a `ConfigError` unless it stays inside `base` (see the module docstring).
    `field` is what the user set (e.g. `model.name_or_path`), named in the message."""
    text = os.fspath(name)
    if not isinstance(text, str):
        text = os.fsdecode(text)

    def refuse(why: str) -> ConfigError:
        return ConfigError(
            f"{field}: expected a name inside '{shown(base)}' (letters, digits, '-', '_', '.', sub-folders with '/'), "
            f"found '{shown(text)}', {why}; use a plain relative name"
        )

    if not text.strip():
        raise refuse("which is empty")
    if "\x00" in text:
        raise refuse("which holds a NUL character")
    parts = text.replace("\\", "/")
    if parts.startswith("/") or _DRIVE.match(parts) or Path(text).is_absolute():
        raise refuse("which is an absolute path")
    depth = 0
    for part in PurePosixPath(parts).parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            raise refuse("which climbs out of it with '..'")
    if depth == 0:
        raise refuse("which names the folder itself")
    root = Path(base)
    joined = root.joinpath(*[p for p in PurePosixPath(parts).parts if p != "."])
    resolved_root = root.resolve()
    resolved = joined.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise refuse(f"which leads outside it through a symbolic link (to '{shown(resolved)}')")
    return joined


def check_data_path(path: str | os.PathLike, field: str) -> Path:
    """A data path from the config exists (file or folder), checked before anything heavy is imported:
    a typo is reported in a second. What the file holds is the loaders' concern."""
    if "\x00" in str(path):
        raise DataError(f"{field}: the path '{shown(path)}' contains a NUL character; expected a file path; fix {field}")
    path = Path(path)
    try:
        exists = path.exists()
    except OSError as err:  # a name too long for the file system, a loop of symlinks
        raise DataError(f"{field}: cannot use the path '{shown(path)[:200]}' ({err.strerror or err}); expected a file path; fix {field}") from None
    if not exists:
        raise DataError(f"{field}: file '{shown(path)}' not found (working directory {Path.cwd()}); check the path or set {field}")
    return path


DATA_FILE_FIELDS = ("train_file", "validation_file", "test_file")


def check_data_paths(data) -> None:
    """Every data file the `data` config section names exists (`DataConfig`; hub and bundled data sets are
    checked where they load)."""
    for key in DATA_FILE_FIELDS:
        value = getattr(data, key)
        if value:
            check_data_path(value, f"data.{key}")


def cache_root() -> Path:
    """tunesmith's cache folder (tokenized data, the precision decision): `$TUNESMITH_CACHE`, else
    `$XDG_CACHE_HOME/tunesmith`, else `~/.cache/tunesmith`."""
    root = os.environ.get("TUNESMITH_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore a relative path; a relative cache would move with the working directory.
    return Path(xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")) / "tunesmith"
