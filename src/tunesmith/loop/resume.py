"""`--resume RUN_DIR | auto`: find the checkpoint to continue from and check it is the same run.

An exact resume needs the same config and the same data: both are fingerprinted into every
checkpoint, and a mismatch is an error that names what changed (rather than a silently different
run). Settings that do not change the result (checkpoint cadence, workers) may differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from tunesmith.loop.checkpoint import Checkpoint, latest_checkpoint
from tunesmith.config import RunConfig, coerce_config, is_legacy_method_default, parse_config, read_yaml, renamed_key
from tunesmith.errors import ConfigError, DataError

log = logging.getLogger("tunesmith")

# Keys that may differ between the interrupted run and its resumption.
RESUMABLE_CHANGES = {
    "output",
    "train.save_steps",
    "train.save_total_limit",
    "train.max_nonfinite_steps",
    "train.dataloader_num_workers",
    "train.memory_check",
    "train.num_threads",
}


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, inner in value.items():
            flat.update(_flatten(inner, f"{prefix}.{key}" if prefix else key))
        return flat
    return {prefix: value}


def _comparable(cfg: RunConfig) -> dict:
    flat = _flatten(cfg.model_dump(mode="json"))
    return {k: v for k, v in flat.items() if k not in RESUMABLE_CHANGES and k.split(".")[0] not in RESUMABLE_CHANGES}


def fingerprint(cfg: RunConfig, tables: dict) -> dict:
    """Config and data hashes stored in each checkpoint."""
    config_hash = hashlib.sha256(json.dumps(_comparable(cfg), sort_keys=True, default=str).encode()).hexdigest()
    data = {}
    for split, table in sorted(tables.items()):
        text = table.frame.to_json(orient="values", force_ascii=False, default_handler=str)
        data[split] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return {"config": _comparable(cfg), "config_sha256": config_hash, "data_sha256": data}


def _changed_keys(saved: dict, current: dict) -> list[str]:
    """Config keys that differ from the checkpoint's. A key added to the schema after the checkpoint was
    written is no change while it keeps its default (the run used what the default does); a key renamed
    since is compared under its new name; nor is a key an older version wrote for every method, at its
    default, that the run's method does not have."""
    old, new = saved.get("config"), current["config"]
    if not old:
        return ["(the checkpoint records no config)"]
    old = {renamed_key(k): v for k, v in old.items()}
    defaults = _comparable(RunConfig())
    return sorted(k for k in set(old) | set(new)
                  if old.get(k) != new.get(k) and not (k not in old and k in defaults and new.get(k) == defaults[k])
                  and not (k not in new and is_legacy_method_default(k, old[k])))


def check_fingerprint(checkpoint: Checkpoint, current: dict) -> None:
    saved = checkpoint.state
    changed = _changed_keys(saved, current) if saved.get("config_sha256") != current["config_sha256"] else []
    if changed:
        old, new = {renamed_key(k): v for k, v in saved.get("config", {}).items()}, current["config"]
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:8])
        raise ConfigError(
            f"--resume: the config differs from the run's ({detail}); an exact resume needs the same settings. "
            "Resume without changes, or start a new run in another output.dir"
        )
    changed = [s for s, h in current["data_sha256"].items() if saved.get("data_sha256", {}).get(s) != h]
    if changed:
        raise DataError(
            f"--resume: the {', '.join(changed)} data changed since the checkpoint in '{checkpoint.path}' was written; "
            "restore the original files to resume, or start a new run in another output.dir"
        )


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").exists() and ((run_dir / "model").is_dir() or (run_dir / "adapter").is_dir())


def plan_resume(config, overrides: list[str] | None, resume: str | os.PathLike) -> tuple[RunConfig, Checkpoint | None]:
    """The config to run and the checkpoint to continue from (None: start fresh, `auto` only)."""
    if str(resume) == "auto":
        if config is None:
            raise ConfigError("--resume auto: pass the run's config too (tunesmith train CONFIG --resume auto)")
        cfg = coerce_config(config, overrides)
        if not cfg.output.dir:
            raise ConfigError("--resume auto (which --max-restarts uses) needs output.dir in the config: it is where the "
                              "checkpoint is looked for")
        run_dir = Path(cfg.output.dir)
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is None:
            if is_finished(run_dir):
                raise ConfigError(f"--resume auto: '{run_dir}' holds a finished run; nothing to resume (choose a new output.dir)")
            if run_dir.is_dir() and (run_dir / "config.yaml").exists():
                log.info("--resume auto: '%s' has no checkpoint yet; starting the run over", run_dir)
                cfg.output.overwrite = True
            else:
                log.info("--resume auto: no checkpoint in '%s'; starting a new run", run_dir)
        return cfg, checkpoint

    run_dir = Path(resume)
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        raise ConfigError(f"--resume: '{run_dir}' is not a tunesmith run directory (no config.yaml); pass the output.dir of a run")
    saved = parse_config(read_yaml(saved_path), str(saved_path))
    cfg = coerce_config(config, overrides) if config is not None else coerce_config(saved, overrides)
    cfg.output.dir = str(run_dir)
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        if is_finished(run_dir):
            raise ConfigError(f"--resume: '{run_dir}' holds a finished run; nothing to resume")
        raise ConfigError(
            f"--resume: '{run_dir}' has no checkpoint (the run stopped before writing one); "
            f"start it over with: tunesmith train {saved_path} --overwrite"
        )
    return cfg, checkpoint
