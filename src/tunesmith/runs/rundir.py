"""The run directory: resolved config, provenance, logs, metrics, model card.

Layout of `output.dir`:

    config.yaml       the fully resolved config (reload with `tunesmith train config.yaml`)
    task.json         task state needed for inference (labels, problem type, tuned threshold)
    provenance.json   schema version, package versions, data hashes, git commit, CPU flags, threads, seed, precision,
                      speed options (threads and why, gradient checkpointing, torch.compile)
    log.jsonl         one JSON object per logged step and evaluation
    metrics.json      validation (best model) and test metrics, training throughput
    README.md         model card
    model/            plain transformers model + tokenizer (merged, for adapter methods)
    adapter/          peft adapter with the task head (lora, dora, ia3)
    checkpoints/      resumable checkpoints (see checkpoint.py) and best.safetensors; removed when the run
                      has finished saving
    .lock             held (flock) while a run writes the folder (see lock.py)
    .tunesmith-run    marker written when the directory is created: `output.overwrite` replaces only
                      folders that are tunesmith runs (this marker, or config.yaml with task.json or
                      checkpoints/ from runs made before it), and never `/`, the home directory, the
                      working directory or a folder containing it
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from tunesmith.config import SCHEMA_VERSION, RunConfig, dump_config
from tunesmith.errors import ConfigError
from tunesmith.runs.lock import LOCK_NAME

PACKAGES = ("tunesmith", "torch", "transformers", "datasets", "accelerate", "peft", "tokenizers", "scikit-learn", "numpy", "pydantic")


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.task.name}-{cfg.method.name}-{stamp}"


RUN_MARKER = ".tunesmith-run"
MARKER_TEXT = "This folder is a tunesmith run directory; `output.overwrite: true` may delete and replace its contents.\n"


def is_run_dir(path: Path) -> bool:
    """Whether `path` is a tunesmith run: the marker, or (runs from before it) config.yaml with task.json or checkpoints/."""
    path = Path(path)
    return (path / RUN_MARKER).is_file() or (
        (path / "config.yaml").is_file() and ((path / "task.json").is_file() or (path / "checkpoints").is_dir())
    )


def _protected(run_dir: Path) -> str | None:
    """Why emptying `run_dir` would destroy more than a run (None when it would not)."""
    resolved = run_dir.resolve()
    if resolved == Path(resolved.anchor):
        return "the file system root"
    try:
        if resolved == Path.home().resolve():
            return "your home directory"
    except RuntimeError:  # no home directory known
        pass
    cwd = Path.cwd().resolve()
    if resolved == cwd:
        return "the current working directory"
    if resolved in cwd.parents:
        return "a folder containing the current working directory"
    return None


def check_replaceable(run_dir: Path) -> None:
    """Refuse to empty `run_dir` (output.overwrite) unless it is a tunesmith run and nothing more precious."""
    why = _protected(run_dir)
    if why:
        raise ConfigError(
            f"output.dir: '{run_dir}' is {why} ({run_dir.resolve()}); expected a folder of its own for the run, as "
            "output.overwrite=true deletes everything in it; set output.dir to a new folder, e.g. runs/my-run"
        )
    if not is_run_dir(run_dir):
        entries = sorted(p.name for p in run_dir.iterdir())
        raise ConfigError(
            f"output.dir: '{run_dir}' is not a tunesmith run (no {RUN_MARKER} marker, nor config.yaml with task.json or "
            f"checkpoints/); found {len(entries)} other entries ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}), "
            "left untouched, as output.overwrite=true only replaces tunesmith runs; choose a new output.dir, or empty the "
            "folder yourself"
        )


def _entries(run_dir: Path) -> list[Path]:
    """What the folder holds besides the lock of the run that is about to write it."""
    return [p for p in run_dir.iterdir() if p.name != LOCK_NAME]


# What tunesmith writes into a run directory. Everything else in it (a user's notes.txt, an analysis/
# folder) is the user's: `--overwrite` replaces only these, and keeps the rest where it is.
RUN_ENTRIES = frozenset({
    RUN_MARKER, "config.yaml", "task.json", "provenance.json", "log.jsonl", "metrics.json", "README.md",
    "model", "adapter", "checkpoints",
})
# While `--overwrite` trains the replacement, the previous run waits here; it goes back in place if the
# new run fails, is interrupted or its process dies, and is deleted only once the new run has saved.
REPLACED = ".replaced-run"


def _written_by_tunesmith(path: Path) -> bool:
    name = path.name
    return name in RUN_ENTRIES or name.endswith(".tmp") or name.startswith(".shared-check-")


def check_writable(run_dir: Path) -> None:
    """Fail before any model loads when `run_dir` cannot be created or written (a read-only disk, /proc,
    a folder of another user's): the probe makes and removes a folder next to where the run would go."""
    import tempfile

    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output.dir: '{run_dir}' cannot be created: '{existing}' is a file, not a folder; choose another output.dir")
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".tunesmith-write-check-").cleanup()
    except OSError as err:
        raise ConfigError(
            f"output.dir: cannot write to '{existing}' ({err.strerror or err}), so the run directory '{run_dir}' cannot be "
            "made there; expected a folder you can write to; choose another output.dir, e.g. runs/my-run"
        ) from None


def check_run_dir(cfg: RunConfig) -> Path:
    """Fail fast, before data or models load, if the run directory would be overwritten (or is not safe to replace)."""
    run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.dir: '{run_dir}' exists and is a file; choose another output.dir")
    restore_replaced_run(run_dir)
    if run_dir.is_dir() and _entries(run_dir):
        if cfg.output.overwrite:
            check_replaceable(run_dir)
        elif is_run_dir(run_dir):
            raise ConfigError(f"output.dir: '{run_dir}' already holds a run; " + _next_steps(run_dir))
        else:
            raise ConfigError(
                f"output.dir: '{run_dir}' is not empty and holds no tunesmith run; expected a new or empty folder; choose "
                "another output.dir (output.overwrite=true only replaces tunesmith runs)"
            )
    check_writable(run_dir)
    return run_dir


def run_state(run_dir: Path) -> str:
    """`finished`, `resumable` (stopped after a checkpoint), `unstarted` (stopped before its first checkpoint)."""
    if (run_dir / "metrics.json").exists() and ((run_dir / "model").is_dir() or (run_dir / "adapter").is_dir()):
        return "finished"
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(re.fullmatch(r"step-\d+", p.name) for p in checkpoints.iterdir()):
        return "resumable"
    return "unstarted"


def _next_steps(run_dir: Path) -> str:
    """The commands that work on an existing run directory, by what it holds."""
    state = run_state(run_dir)
    if state == "resumable":
        return (f"it stopped before finishing; continue it with `tunesmith train --resume {run_dir}`, start it over with "
                f"`tunesmith train {run_dir / 'config.yaml'} --overwrite`, or choose a new output.dir")
    if state == "unstarted":
        return (f"it stopped before its first checkpoint, so there is nothing to resume; start it over with "
                f"`tunesmith train {run_dir / 'config.yaml'} --overwrite`, or choose a new output.dir")
    return "replace it with --overwrite (output.overwrite=true; the old run is kept until the new one has saved), or choose a new output.dir"


def create_run_dir(run_dir: Path, overwrite: bool) -> Path:
    """Create the run directory and mark it as a tunesmith run. With `overwrite`, the previous run's files
    are set aside (see `set_aside_previous_run`); the caller puts them back or deletes them."""
    if run_dir.is_dir() and overwrite and _entries(run_dir):
        check_replaceable(run_dir)  # again here: callers other than `train` may skip `check_run_dir`
        set_aside_previous_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    return run_dir


def set_aside_previous_run(run_dir: Path) -> list[str]:
    """Move what the previous run wrote into RUN_DIR/.replaced-run (renames, same file system: instant).
    Returns the names of the entries left in place because tunesmith did not write them."""
    backup = run_dir / REPLACED
    backup.mkdir()
    kept = []
    for child in sorted(_entries(run_dir)):
        if child.name == REPLACED:
            continue
        if _written_by_tunesmith(child):
            os.replace(child, backup / child.name)
        else:
            kept.append(child.name + ("/" if child.is_dir() and not child.is_symlink() else ""))
    if kept:
        logging.getLogger("tunesmith").info(
            "output.dir: replacing the run in '%s'; keeping %d entr%s tunesmith did not write: %s", run_dir, len(kept),
            "y" if len(kept) == 1 else "ies", ", ".join(kept))
    return kept


def put_back_previous_run(run_dir: Path) -> bool:
    """Undo `set_aside_previous_run`: remove what the unfinished new run wrote, move the previous run back.
    False when there was nothing set aside."""
    import shutil

    backup = run_dir / REPLACED
    if not backup.is_dir():
        return False
    for child in _entries(run_dir):
        if child.name != REPLACED and _written_by_tunesmith(child):
            # A symlink is removed, never followed: what it points at is not part of the run.
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for child in backup.iterdir():
        os.replace(child, run_dir / child.name)
    backup.rmdir()
    return True


def drop_previous_run(run_dir: Path) -> None:
    """The new run has saved: the previous one, set aside by `--overwrite`, can go."""
    import shutil

    shutil.rmtree(run_dir / REPLACED, ignore_errors=True)


def restore_replaced_run(run_dir: Path) -> None:
    """A process that died during an `--overwrite` (killed, out of memory, power cut) left the previous run
    set aside: put it back, unless a live run is still writing the folder."""
    if not (run_dir / REPLACED).is_dir():
        return
    from tunesmith.runs.lock import check_unlocked

    check_unlocked(run_dir)
    if put_back_previous_run(run_dir):
        logging.getLogger("tunesmith").warning(
            "output.dir: an --overwrite of '%s' did not finish (its process ended before saving); the previous run "
            "was put back as it was", run_dir)


def finished_run_dir(run_dir: Path) -> Path:
    """The folder that holds the finished run `run_dir` names, or a one-line error saying what it holds
    instead and the command that gets it finished."""
    from tunesmith.runs.lock import is_locked

    if not run_dir.exists():
        raise ConfigError(f"run directory '{run_dir}' not found; pass the output.dir of a finished run (e.g. runs/my-run)")
    if not run_dir.is_dir():
        raise ConfigError(f"'{run_dir}' is a file; expected a run directory (the output.dir of a finished run)")
    if (run_dir / REPLACED).is_dir():
        if is_locked(run_dir):  # an --overwrite is training its replacement: the previous run is still the run
            logging.getLogger("tunesmith").info("'%s' is being replaced by a run in progress; using the previous run until the new one has saved", run_dir)
            return run_dir / REPLACED
        restore_replaced_run(run_dir)
    if not (run_dir / "config.yaml").exists():
        what = "an unfinished tunesmith run" if is_run_dir(run_dir) else "not a tunesmith run directory"
        raise ConfigError(f"'{run_dir}' is {what} (no config.yaml); pass the output.dir of a finished run")
    state = run_state(run_dir)
    if state == "resumable" or (state == "unstarted" and not (run_dir / "task.json").exists()):
        if is_locked(run_dir):
            raise ConfigError(f"'{run_dir}' is still training (another tunesmith process holds it); wait for it to finish")
        how = (f"continue it with `tunesmith train --resume {run_dir}`" if state == "resumable" else
               f"it stopped before its first checkpoint; start it again with `tunesmith train {run_dir / 'config.yaml'} --overwrite`")
        raise ConfigError(f"'{run_dir}' did not finish training, so it has no saved model yet; {how}")
    if not (run_dir / "task.json").exists():
        raise ConfigError(f"'{run_dir}/task.json' is missing; expected it next to config.yaml in a finished run; restore it "
                          "from a copy, or train the run again")
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").exists() and not (run_dir / "adapter").is_dir():
        found = "is empty" if model_dir.is_dir() else "is missing"
        raise ConfigError(f"'{model_dir}' {found}: expected the saved model there (or an adapter/ folder); restore it from a "
                          "copy, or train the run again")
    if not model_dir.is_dir():
        raise ConfigError(f"'{model_dir}' is missing: expected the tokenizer saved there next to adapter/; restore it, or train the run again")
    return run_dir


def discard_new_run_dir(run_dir: Path, created: bool) -> None:
    """Undo `create_run_dir` + `save_config` for a run refused or stopped before its first checkpoint: remove
    what tunesmith wrote (and the folder, if this run made it), so the same command can simply be run
    again. The run lock's file goes too: this process still holds its flock until the run ends, and
    releasing it only closes the descriptor when the file is gone."""
    import shutil

    for child in _entries(run_dir):
        if _written_by_tunesmith(child):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    (run_dir / LOCK_NAME).unlink(missing_ok=True)
    if created:
        try:
            run_dir.rmdir()
        except OSError:  # the user's own files are in it: leave them
            pass


def _replace_text(path: Path, text: str) -> None:
    """Write a text file atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, payload: Any) -> None:
    _replace_text(path, json.dumps(payload, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_config(run_dir: Path, cfg: RunConfig) -> None:
    (run_dir / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _git_commit(directory: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(cfg: RunConfig, data_files: list[Path], precision: dict, extra: dict | None = None) -> dict:
    from tunesmith.speed.precision import cpu_flags, cpu_model

    import torch

    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config_schema_version": SCHEMA_VERSION,
        "command": sys.argv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "data_files": {str(p): {"sha256": _file_sha256(p), "bytes": p.stat().st_size} for p in data_files},
        "git_commit": {"working_directory": _git_commit(Path.cwd()), "tunesmith": _git_commit(Path(__file__).parent)},
        "cpu": {"model": cpu_model(), "flags": sorted(cpu_flags()), "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads()},
        "seed": cfg.train.seed,
        "precision": precision,
        **(extra or {}),
    }


def _metric_rows(metrics: dict, before: dict | None = None) -> str:
    """The metrics as a table; with `before` (the same split evaluated before training), both columns."""
    if before:
        rows = [f"| {k} | {before[k]:.4f} | {v:.4f} |" for k, v in metrics.items()
                if isinstance(v, float) and isinstance(before.get(k), float)]
        return "\n".join(["| metric | before training | after |", "|---|---|---|", *rows])
    rows = [f"| {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, float)]
    return "\n".join(["| metric | value |", "|---|---|", *rows])


def model_card(cfg: RunConfig, section, metrics: dict, base_model: str, params: str) -> str:
    """`section`: the task's part (`tasks.base.CardSection`)."""
    test = metrics.get("test") or {}
    valid = metrics.get("validation") or {}
    lines = [
        "---",
        "library_name: transformers",
        f"base_model: {base_model}",
        f"tags: [tunesmith, {section.pipeline_tag}]",
        "---",
        "",
        f"# {cfg.task.name} model fine-tuned with tunesmith",
        "",
        f"- Base model: `{base_model}`",
        f"- Task: {cfg.task.name}" + (f" ({section.kind})" if section.kind else ""),
        f"- Method: {cfg.method.name} — {params}",
        *([f"- Labels: {', '.join(section.labels)}"] if section.labels is not None else []),
        f"- Data: {cfg.data.train_file or cfg.data.dataset_name}",
        f"- Epochs: {cfg.train.num_train_epochs}, learning rate {cfg.train.learning_rate}, batch {cfg.train.per_device_train_batch_size}, seed {cfg.train.seed}",
        "",
        "## Validation metrics (best checkpoint)",
        "",
        _metric_rows(valid, metrics.get("validation_before_training")),
        "",
    ]
    if test:
        lines += ["## Test metrics", "", _metric_rows(test), ""]
    lines += [
        "## Use",
        "",
        "```python",
        *section.usage,
        "```",
        "",
        f"Or with tunesmith: `tunesmith predict RUN_DIR {section.cli_example}`.",
        "",
        "The resolved config is in `config.yaml`; provenance (package versions, data hashes, CPU) in `provenance.json`.",
        "",
    ]
    return "\n".join(lines)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace a JSONL file atomically (a resumed run restarts its log from the checkpoint's records)."""
    _replace_text(path, "".join(json.dumps(r, default=_json_default, ensure_ascii=False) + "\n" for r in records))


def truncate_file(path: Path, size: int) -> int:
    """Cut a file back to its first `size` bytes (a resumed run drops the log lines written after its
    checkpoint); returns the size it had (smaller than `size`: nothing is cut)."""
    with open(path, "r+b") as handle:
        found = handle.seek(0, os.SEEK_END)
        if found > size:
            handle.truncate(size)
    return found


class JsonlLog:
    """Append-only log; each line is flushed so a crash loses at most the line being written."""

    def __init__(self, path: Path, enabled: bool = True):
        # Disabled in non-main processes under DDP: one log per run.
        self.path = path
        self._handle = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self._handle is not None:
            self._handle.write(json.dumps(record, default=_json_default, ensure_ascii=False) + "\n")
            self._handle.flush()

    def sync(self) -> int:
        """Flush and fsync (a checkpoint records where the log stood); returns the file's size, 0 where disabled."""
        if self._handle is None:
            return 0
        self._handle.flush()
        os.fsync(self._handle.fileno())
        return os.fstat(self._handle.fileno()).st_size

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
