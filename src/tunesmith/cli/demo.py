"""`make demo` / `tunesmith demo`: where it writes, and the demo of the first registered family that has one
(`Family.demo`; today the classification family's: the bundled MiniLM on Rotten Tomatoes sentences)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def run_demo(output_dir: Path, full: bool = False, printer: Console | None = None, overwrite: bool = False) -> dict:
    from tunesmith.tasks import families
    from tunesmith.tasks.registry import load

    family = next((f for f in families().values() if f.demo), None)
    if family is None:
        from tunesmith.errors import ConfigError

        raise ConfigError("tunesmith demo: no registered task family has a demo; run `tunesmith train CONFIG` instead")
    return load(family.demo)(output_dir, full=full, printer=printer, overwrite=overwrite)


DEFAULT_DIR = Path("runs/demo")


def demo_run_dir(output_dir: Path | None, overwrite: bool = False) -> Path:
    """Where the demo writes. An explicit folder follows `train`'s rules (a run there is replaced only with
    --overwrite); the default never replaces an earlier demo: runs/demo, else runs/demo-2, runs/demo-3, ..."""
    if output_dir is not None or overwrite:
        return output_dir or DEFAULT_DIR
    from tunesmith.runs.rundir import is_run_dir

    candidate, n = DEFAULT_DIR, 1
    while candidate.exists() and (is_run_dir(candidate) or any(candidate.iterdir())):
        n += 1
        candidate = DEFAULT_DIR.with_name(f"{DEFAULT_DIR.name}-{n}")
    if candidate != DEFAULT_DIR:
        import logging

        logging.getLogger("tunesmith").info("%s holds an earlier demo run (kept); writing this one to %s", DEFAULT_DIR, candidate)
    return candidate
