"""Hostile input: pickled weights are refused unless allowed; remote code is off unless set; a name
from outside never leaves its folder (`paths.safe_join`, bundled names); `output.overwrite` empties
only tunesmith runs, never `/`, the home directory, the working directory or a folder containing it."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import tunesmith
from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError
from tiny import tiny_config


def test_pickled_weights_refused_by_default(tiny_bert, sentiment_csv, tmp_path):
    pickled = tmp_path / "pickled-bert"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # transformers 5 only writes safetensors
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (pickled / name).write_bytes((tiny_bert / name).read_bytes())
    assert list(pickled.glob("*.bin")) and not list(pickled.glob("*.safetensors"))
    cfg = tiny_config(pickled, sentiment_csv, tmp_path / "run", train={"num_train_epochs": 1})
    with pytest.raises(ConfigError, match="pickled .bin weights.*model.allow_pickle=true"):
        tunesmith.train(cfg, show_progress=False)
    assert not (tmp_path / "run").exists()
    cfg["model"]["allow_pickle"] = True
    assert tunesmith.train(cfg, show_progress=False).metrics["train"]["global_step"] > 0
    assert (tmp_path / "run" / ".tunesmith-run").is_file()  # `train` marks its run directory

    import yaml
    from typer.testing import CliRunner

    from tunesmith.cli import app

    cfg["model"]["allow_pickle"] = False
    cfg["output"]["dir"] = str(tmp_path / "cli-run")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    refused = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), "-q"])
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output
    allowed = CliRunner().invoke(app, ["train", str(tmp_path / "cfg.yaml"), "-q", "--allow-pickle"])
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "cli-run" / "model" / "model.safetensors").is_file()


def test_remote_code_off_by_default():
    assert RunConfig().model.trust_remote_code is False
    assert RunConfig().model.allow_pickle is False


# --------------------------------------------------------------------------- names joined onto folders


@pytest.mark.parametrize(
    "name, why",
    [
        ("../outside", "climbs out of it with '..'"),
        ("a/../../outside", "climbs out of it with '..'"),
        ("..\\outside", "climbs out of it with '..'"),
        ("/etc/passwd", "is an absolute path"),
        ("C:\\Windows", "is an absolute path"),
        ("\\\\server\\share", "is an absolute path"),
        ("run\x00.txt", "holds a NUL character"),
        ("", "is empty"),
        ("a/..", "names the folder itself"),
    ],
)
def test_safe_join_refuses_names_that_leave_the_folder(tmp_path, name, why):
    from tunesmith.paths import safe_join

    with pytest.raises(ConfigError) as caught:
        safe_join(tmp_path, name, "run name")
    (problem,) = caught.value.problems
    assert problem.startswith(f"run name: expected a name inside '{tmp_path}'")
    assert why in problem and problem.endswith("use a plain relative name")
    assert "\n" not in problem and "\x00" not in problem


def test_safe_join_keeps_names_inside_and_refuses_symlinks_out(tmp_path):
    from tunesmith.paths import safe_join

    base = tmp_path / "runs"
    (base / "team").mkdir(parents=True)
    assert safe_join(base, "run-1") == base / "run-1"
    assert safe_join(base, "team/run-2") == base / "team" / "run-2"
    assert safe_join(base, "team/../run-3").resolve() == (base / "run-3").resolve()
    outside = tmp_path / "secrets"
    outside.mkdir()
    (base / "link").symlink_to(outside)
    with pytest.raises(ConfigError, match=r"leads outside it through a symbolic link \(to '.*secrets'\)"):
        safe_join(base, "link")
    with pytest.raises(ConfigError, match="symbolic link"):
        safe_join(base, "link/key.pem")


@pytest.mark.parametrize("name", ["bundled:../../etc", "bundled:all-MiniLM-L6-v2/../../..", "bundled:/etc/passwd"])
def test_bundled_names_never_become_paths(name, tiny_bert, sentiment_csv, tmp_path):
    from tunesmith.assets import bundled_dataset_frame, resolve_model_path
    from tunesmith.errors import DataError

    with pytest.raises(ConfigError, match=r"unknown bundled model .*; available: bundled:all-MiniLM-L6-v2"):
        resolve_model_path(name)
    with pytest.raises(DataError, match=r"unknown bundled data set .*; available: bundled:rotten_tomatoes"):
        bundled_dataset_frame(name)
    cfg = tiny_config(tiny_bert, sentiment_csv, tmp_path / "run")
    cfg["model"]["name_or_path"] = name
    with pytest.raises(ConfigError, match="unknown bundled model"):
        tunesmith.train(cfg, show_progress=False)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- output.overwrite


def _overwrite_cfg(tiny_bert, sentiment_csv, out) -> dict:
    return tiny_config(tiny_bert, sentiment_csv, out, output={"dir": str(out), "overwrite": True})


def test_overwrite_leaves_a_folder_that_is_not_a_run_alone(tiny_bert, sentiment_csv, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("years of work")
    (folder / "figures").mkdir()
    with pytest.raises(ConfigError) as caught:
        tunesmith.train(_overwrite_cfg(tiny_bert, sentiment_csv, folder), show_progress=False)
    (problem,) = caught.value.problems
    assert problem.startswith(f"output.dir: '{folder}' is not a tunesmith run (no .tunesmith-run marker")
    assert "found 2 other entries (chapter1.tex, figures)" in problem and "choose a new output.dir" in problem
    assert (folder / "chapter1.tex").read_text() == "years of work" and (folder / "figures").is_dir()
    # Without overwrite the message does not suggest the override that would be refused.
    cfg = tiny_config(tiny_bert, sentiment_csv, folder)
    with pytest.raises(ConfigError, match="is not empty and holds no tunesmith run; expected a new or empty folder"):
        tunesmith.train(cfg, show_progress=False)
    # Called directly (not through `train`), creating the run directory refuses as well.
    from tunesmith.runs.rundir import create_run_dir

    with pytest.raises(ConfigError, match="is not a tunesmith run"):
        create_run_dir(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["chapter1.tex", "figures"]


@pytest.mark.parametrize("where", ["cwd", "parent_of_cwd", "home", "root"])
def test_overwrite_never_empties_cwd_home_or_root(where, tmp_path, monkeypatch, sentiment_csv):
    from tunesmith.config import parse_config
    from tunesmith.runs.rundir import RUN_MARKER, check_run_dir, create_run_dir

    work = tmp_path / "project" / "code" / "work"
    work.mkdir(parents=True)
    (work / "train.csv").write_text("text,label\n")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "project"))
    target, why = {
        "cwd": (".", "the current working directory"),
        "parent_of_cwd": ("..", "a folder containing the current working directory"),
        "home": (str(tmp_path / "project"), "your home directory"),
        "root": ("/", "the file system root"),
    }[where]
    if where != "root":
        (Path(target) / RUN_MARKER).write_text("")  # even a folder marked as a run is refused
    cfg = parse_config(tiny_config(tmp_path, sentiment_csv, Path(target), output={"dir": target, "overwrite": True}))
    with pytest.raises(ConfigError) as caught:
        check_run_dir(cfg)
    (problem,) = caught.value.problems
    assert problem.startswith(f"output.dir: '{target}' is {why} (")
    assert "output.overwrite=true deletes everything in it; set output.dir to a new folder" in problem
    with pytest.raises(ConfigError, match=why):
        create_run_dir(Path(target), overwrite=True)
    assert (work / "train.csv").exists()


def test_overwrite_sets_runs_aside_and_never_follows_symlinks(tmp_path):
    from tunesmith.runs.rundir import REPLACED, RUN_MARKER, create_run_dir, drop_previous_run, is_run_dir, put_back_previous_run

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.csv").write_text("keep me")
    marked = tmp_path / "marked"
    (marked / "model").mkdir(parents=True)
    (marked / RUN_MARKER).write_text("")
    (marked / "shortcut").symlink_to(precious, target_is_directory=True)  # the user's: kept in place
    legacy = tmp_path / "legacy"  # written before the marker existed
    (legacy / "checkpoints").mkdir(parents=True)
    (legacy / "config.yaml").write_text("{}")
    assert is_run_dir(marked) and is_run_dir(legacy) and not is_run_dir(precious)

    create_run_dir(marked, overwrite=True)
    assert sorted(p.name for p in marked.iterdir()) == [REPLACED, RUN_MARKER, "shortcut"]
    assert sorted(p.name for p in (marked / REPLACED).iterdir()) == [RUN_MARKER, "model"]
    (marked / "model").mkdir()  # the new run's files ...
    assert put_back_previous_run(marked)  # ... go when it fails; the previous run comes back
    assert sorted(p.name for p in marked.iterdir()) == [RUN_MARKER, "model", "shortcut"]
    assert (marked / "shortcut").is_symlink()

    create_run_dir(legacy, overwrite=True)
    drop_previous_run(legacy)  # the new run saved: the previous one goes
    assert sorted(p.name for p in legacy.iterdir()) == [RUN_MARKER]
    assert (precious / "data.csv").read_text() == "keep me"


def test_a_new_run_directory_is_marked(tmp_path):
    from tunesmith.runs.rundir import RUN_MARKER, create_run_dir, is_run_dir

    run = create_run_dir(tmp_path / "runs" / "new", overwrite=False)
    assert (run / RUN_MARKER).read_text().startswith("This folder is a tunesmith run directory")
    assert is_run_dir(run)
