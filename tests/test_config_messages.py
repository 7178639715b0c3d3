"""What a config file that is not what it should be gets told: unreadable, binary, non-UTF-8, empty files,
duplicate keys, and the Hugging Face (TrainingArguments, pipeline, run_glue.py) names people bring along.
Each message is one line naming the file and key, what was expected and how to fix it; the CLI prints it
as one `error:` line, exit code 2, no traceback."""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunesmith.config import loading as config_module
from tunesmith.cli import app
from tunesmith.config import RunConfig, TrainConfig, load_config, parse_config
from tunesmith.errors import ConfigError

SECTIONS = "model, data, task, method, train, generation, output"


def write(tmp_path: Path, content: str | bytes, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def problems(path: Path, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return caught.value.problems


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "cfg.yaml")
    return caught.value.problems


def cli_error(*args: str) -> str:
    """The one `error:` line the CLI prints (exit code 2, a clean exit, nothing else printed)."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2, result.output
    assert type(result.exception) is SystemExit, result.exception  # not an escaped exception
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0].removeprefix("error: ")


# --------------------------------------------------------------------------- files that are not UTF-8 YAML text

LATIN1 = "train:\n  seed: 1\nmodel:\n  name_or_path: café\n".encode("latin-1")


def test_latin1_file_names_line_and_byte_offset(tmp_path):
    path = write(tmp_path, LATIN1)
    offset = LATIN1.index(b"\xe9")
    assert problems(path) == [
        f"{path}: line 4, byte offset {offset}: found byte 0xe9, which is not UTF-8; expected UTF-8 text; re-save it as UTF-8"
    ]


@pytest.mark.parametrize(
    "content, line, offset",
    [
        (b"\x00\x01\x02\x03", 1, 0),
        (b"train:\n  seed: 1\n\x00\x00\n", 3, 17),
        ("train: 1\n".encode("utf-16"), 1, 3),  # UTF-16 text: every ASCII character has a NUL byte
        (random.Random(0).randbytes(512), None, None),  # random bytes: NUL or not UTF-8, never a traceback
    ],
    ids=["nul-start", "nul-later", "utf16", "random"],
)
def test_binary_file_is_named_as_binary(tmp_path, content, line, offset):
    path = write(tmp_path, content)
    (problem,) = problems(path)
    if line is None:
        assert problem.startswith(f"{path}: line ") and ("binary data" in problem or "not UTF-8" in problem)
    else:
        assert problem == (
            f"{path}: line {line}, byte offset {offset}: found a NUL byte: binary data, not YAML text; expected a YAML "
            "config file in UTF-8; pass the config file (UTF-16 text: re-save it as UTF-8)"
        )


def test_control_character_names_its_line(tmp_path):
    path = write(tmp_path, "train:\n  seed: 1\n\x07\n")
    assert problems(path) == [
        f"{path}: line 3: found the control character U+0007, which YAML does not allow; expected YAML text; remove it"
    ]


def test_directory_is_not_a_config_file(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    assert problems(folder) == [
        f"{folder}: is a directory; expected a YAML config file; pass the path of a .yaml file "
        f"(create one with `tunesmith config init FILE`)"
    ]
    (folder / "config.yaml").write_text("train: {}\n", encoding="utf-8")  # a run directory holds its config
    assert problems(folder) == [
        f"{folder}: is a directory; expected a YAML config file; pass the config file inside it: {folder / 'config.yaml'}"
    ]


def test_unreadable_file_names_the_reason(tmp_path, monkeypatch):
    path = write(tmp_path, "train: {}\n")
    real_open = Path.open

    def refuse(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    # The tests run as root too, where chmod 000 does not stop a read.
    monkeypatch.setattr(Path, "open", refuse)
    assert problems(path) == [
        f"{path}: cannot read the file (Permission denied); expected a readable YAML file; check its permissions "
        f"(chmod u+r {path})"
    ]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_through_the_cli(tmp_path):
    path = write(tmp_path, "train: {}\n")
    path.chmod(0)
    assert "cannot read the file (Permission denied)" in cli_error("config", "validate", str(path))


def test_huge_file_is_not_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(config_module, "MAX_CONFIG_BYTES", 100)
    path = write(tmp_path, "# " + "x" * 200 + "\n")
    assert problems(path) == [
        f"{path}: more than 100 bytes; expected a YAML config file (a few KB); is it the right file?"
    ]


@pytest.mark.parametrize(
    "text", ["", "\n\n", "# only\n# comments\n", "---\n", "\ufeff"], ids=["empty", "blank", "comments", "marker", "bom"]
)
def test_empty_file_is_an_error(tmp_path, text):
    path = write(tmp_path, text)
    assert problems(path) == [
        f"{path}: is empty; expected sections {SECTIONS}; create a starter with `tunesmith config init --force {path}`"
    ]


def test_an_explicit_empty_mapping_means_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "{}\n")) == RunConfig()
    assert load_config(None) == RunConfig()  # no file at all: the defaults


def test_utf8_with_bom_and_non_ascii_text_reads(tmp_path):
    path = write(tmp_path, "\ufeffmodel:\n  name_or_path: café\n")
    assert load_config(path).model.name_or_path == "café"


CLI_CASES = {
    "latin1": (LATIN1, "found byte 0xe9, which is not UTF-8; expected UTF-8 text; re-save it as UTF-8"),
    "binary": (bytes(range(256)), "found a NUL byte: binary data"),
    "random": (bytes(b or 1 for b in random.Random(1).randbytes(300)), "which is not UTF-8"),
    "empty": (b"", "is empty; expected sections"),
    "comments": (b"# nothing here\n", "is empty; expected sections"),
    "duplicate": (b"train:\n  seed: 1\ntrain:\n  seed: 2\n", "duplicate key 'train' on lines 1 and 3"),
}


@pytest.mark.parametrize("command", ["validate", "show"])
@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_prints_one_error_line(tmp_path, command, case):
    content, expected = CLI_CASES[case]
    path = write(tmp_path, content)
    line = cli_error("config", command, str(path))
    assert line.startswith(f"{path}: ") and expected in line


@pytest.mark.parametrize("command", ["validate", "show"])
def test_cli_directory(tmp_path, command):
    assert cli_error("config", command, str(tmp_path)).startswith(f"{tmp_path}: is a directory; expected a YAML config file")


def test_real_cli_process_prints_no_traceback(tmp_path):
    """The installed command, in its own process: what a user sees (rich's traceback included, if one escaped)."""
    exe = shutil.which("tunesmith", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "tunesmith.cli"]
    env = {**os.environ, "COLUMNS": "300"}
    for content in (LATIN1, bytes(range(256)), b"", b"train:\n  seed: 1\n  seed: 2\n"):
        path = write(tmp_path, content)
        done = subprocess.run([*command, "config", "validate", str(path)], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr + done.stdout
        assert [line for line in done.stderr.splitlines() if line.strip()] == [done.stderr.strip()]
        assert done.stderr.startswith(f"error: {path}: ")


# --------------------------------------------------------------------------- duplicate keys


def test_duplicate_section(tmp_path):
    path = write(tmp_path, "train:\n  seed: 1\nmodel: {}\ntrain:\n  learning_rate: 1.0e-4\n")
    assert problems(path) == [
        f"{path}: duplicate key 'train' on lines 1 and 4; the last one would silently win; keep one of them"
    ]


def test_duplicate_keys_at_any_depth_are_all_reported(tmp_path):
    path = write(
        tmp_path,
        "train:\n  learning_rate: 1.0e-4\n  seed: 1\n  learning_rate: 3.0e-5\n"
        "task:\n  name: classification\n  text_column: a\n  text_column: b\n  text_column: c\n",
    )
    assert problems(path) == [
        f"{path}: duplicate key 'train.learning_rate' on lines 2 and 4; the last one would silently win; keep one of them",
        f"{path}: duplicate key 'task.text_column' on lines 7, 8 and 9; the last one would silently win; keep one of them",
    ]


def test_duplicate_keys_inside_lists_and_flow_mappings(tmp_path):
    path = write(tmp_path, "task: {name: classification, max_length: 8, max_length: 9}\n")
    assert problems(path) == [
        f"{path}: duplicate key 'task.max_length' twice on line 1; the last one would silently win; keep one of them"
    ]
    path = write(tmp_path, "method:\n  target_modules:\n    - {a: 1, a: 2}\n")
    assert problems(path)[0] == (
        f"{path}: duplicate key 'method.target_modules[0].a' twice on line 3; the last one would silently win; keep one of them"
    )


def test_merge_keys_are_not_duplicates():
    # `<<: *base` then a key of base: the explicit key overriding the merged one is what merge keys are for,
    # also when the merged mapping has merge keys itself.
    # `top` flattens `a.b` (merging it) before `a.b` is built itself: `a.b` must be checked as written.
    text = "defaults: &d {seed: 1, learning_rate: 1.0e-4}\na:\n  b: &m\n    <<: *d\n    seed: 2\ntop:\n  <<: *m\n  seed: 3\n"
    loaded = config_module._load_yaml(text, "x.yaml")
    assert loaded["a"]["b"] == {"seed": 2, "learning_rate": 1e-4}
    assert loaded["top"] == {"seed": 3, "learning_rate": 1e-4}


def test_same_key_in_different_sections_is_not_a_duplicate(tmp_path):
    path = write(tmp_path, "task:\n  max_length: 64\ndata:\n  max_train_samples: 10\ntrain:\n  seed: 3\n  max_steps: 2\n")
    cfg = load_config(path)
    assert (cfg.task.max_length, cfg.train.seed) == (64, 3)


def test_bad_override_value_is_an_error_not_a_traceback():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["train.seed=[1"])
    (problem,) = caught.value.problems
    assert problem.startswith("override 'train.seed=[1': the value is not valid YAML (")
    assert problem.endswith("); expected a YAML value such as 4, 1e-4, true or [a, b]")
    with pytest.raises(ConfigError, match=r"override 'task\.label_columns=\{a: 1, a: 2\}': duplicate key 'a'"):
        load_config(None, ["task.label_columns={a: 1, a: 2}"])


# --------------------------------------------------------------------------- Hugging Face names: rewritten


def test_output_dir_is_read_as_output_dir(tmp_path):
    for text in ("output_dir: runs/x\n", "train:\n  output_dir: runs/x\n", "output:\n  output_dir: runs/x\n"):
        notes: list[str] = []
        path = write(tmp_path, text)
        assert load_config(path, notes=notes).output.dir == "runs/x"
        written = "output_dir" if text.startswith("output_dir") else f"{text.split(':')[0]}.output_dir"
        assert notes == [f"{path}: read '{written}' as 'output.dir' (the TrainingArguments name)"]
    assert load_config(None, ["output_dir=runs/y"]).output.dir == "runs/y"  # in an override too


def test_output_dir_conflict():
    assert problems_of({"output_dir": "runs/a", "output": {"dir": "runs/b"}}) == [
        "cfg.yaml: 'output_dir' ('runs/a') and 'output.dir' ('runs/b') are both set; 'output_dir' is the TrainingArguments "
        "name for 'output.dir'; keep one"
    ]
    notes: list[str] = []
    assert parse_config({"output_dir": "runs/a", "output": {"dir": "runs/a"}}, notes=notes).output.dir == "runs/a"
    assert len(notes) == 1


@pytest.mark.parametrize("flag", ["bf16", "fp16"])
def test_precision_flags(flag):
    notes: list[str] = []
    assert parse_config({"train": {flag: True}}, "cfg.yaml", notes=notes).train.precision == flag
    assert notes == [f"cfg.yaml: read 'train.{flag}: true' as 'train.precision: {flag}' (the TrainingArguments name)"]
    notes.clear()
    assert parse_config({"train": {flag: False}}, "cfg.yaml", notes=notes).train.precision == "auto"
    assert notes == [
        f"cfg.yaml: ignored 'train.{flag}: false': train.precision decides (default 'auto'); set train.precision=fp32 "
        "to train in fp32"
    ]
    assert load_config(None, [f"train.{flag}=true"]).train.precision == flag
    assert parse_config({"train": {flag: True, "precision": flag}}).train.precision == flag  # the same thing twice


def test_precision_flag_errors():
    assert problems_of({"train": {"bf16": True, "fp16": True}}) == [
        "cfg.yaml: train.bf16 and train.fp16 are both true; expected one precision; set train.precision to bf16 or fp16 "
        "and remove both"
    ]
    assert problems_of({"train": {"bf16": True, "precision": "fp32"}}) == [
        "cfg.yaml: 'train.bf16: true' and 'train.precision: fp32' disagree; keep one (train.bf16: true is "
        "train.precision: bf16)"
    ]
    assert problems_of({"train": {"fp16": "yes please"}}) == [
        "cfg.yaml: train.fp16: expected true or false, found 'yes please'; better: train.precision: fp16"
    ]


def test_load_best_model_at_end():
    notes: list[str] = []
    parse_config({"train": {"load_best_model_at_end": True}}, "cfg.yaml", notes=notes)
    assert notes == [
        "cfg.yaml: ignored 'train.load_best_model_at_end: true': tunesmith always loads the best checkpoint at the end"
    ]
    assert problems_of({"train": {"load_best_model_at_end": False}}) == [
        "cfg.yaml: train.load_best_model_at_end: false is not supported: tunesmith always loads the best checkpoint at "
        "the end of training; remove the key (train.eval_strategy=no trains without evaluation and keeps the final weights)"
    ]


@pytest.mark.parametrize(
    "pipeline, name",
    [("text-classification", "classification"), ("token-classification", "token_classification"),
     ("question-answering", "question_answering")],
)
def test_pipeline_task_names(tmp_path, pipeline, name):
    for text in (f"task: {pipeline}\n", f"task:\n  name: {pipeline}\n"):
        notes: list[str] = []
        path = write(tmp_path, text)
        assert load_config(path, notes=notes).task.name == name
        written = f"task: {pipeline}" if text.startswith(f"task: {pipeline}") else f"task.name: {pipeline}"
        assert notes == [f"{path}: read '{written}' as '{written.replace(pipeline, name)}' (the pipeline task name)"]
    assert load_config(None, [f"task={pipeline}"]).task.name == name
    assert load_config(None, [f"task.name={pipeline}"]).task.name == name


def test_pipeline_names_live_on_the_task_classes():
    from tunesmith.config import task_configs
    from tunesmith.tasks.classification.config import ClassificationTaskConfig

    assert {m.pipeline_tag for m in task_configs()} == {"text-classification", "token-classification", "question-answering", "text2text-generation", "text-generation", "fill-mask"}
    assert "pipeline_tag" not in ClassificationTaskConfig.model_fields  # not a config key


def test_notes_are_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tunesmith.config.loading"):
        load_config(write(tmp_path, "train:\n  bf16: true\n"))
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'cfg.yaml'}: read 'train.bf16: true' as 'train.precision: bf16' (the TrainingArguments name)"
    ]


def test_aliases_do_not_touch_the_callers_dict():
    raw = {"output_dir": "runs/a", "train": {"bf16": True}}
    parse_config(raw)
    assert raw == {"output_dir": "runs/a", "train": {"bf16": True}}


# --------------------------------------------------------------------------- warmup_steps


def test_warmup_steps():
    assert TrainConfig().warmup_steps == 0
    assert load_config(None, ["train.warmup_steps=100"]).train.warmup_steps == 100
    assert problems_of({"train": {"warmup_steps": 10, "warmup_ratio": 0.1}}) == [
        "cfg.yaml: train: train.warmup_steps (10) and train.warmup_ratio (0.1) are both set; expected one of them; "
        "set the other to 0"
    ]
    assert problems_of({"train": {"warmup_steps": -1}}) == [
        "cfg.yaml: train.warmup_steps: Input should be greater than or equal to 0 (found -1)"
    ]


# --------------------------------------------------------------------------- Hugging Face names: explained


@pytest.mark.parametrize(
    "raw, ours",
    [
        ({"train": {"batch_size": 8}}, "train.per_device_train_batch_size"),
        ({"train": {"per_gpu_train_batch_size": 8}}, "train.per_device_train_batch_size"),
        ({"train": {"lr": 1e-4}}, "train.learning_rate"),
        ({"lr": 1e-4}, "train.learning_rate"),
        ({"train": {"evaluation_strategy": "epoch"}}, "train.eval_strategy"),
        ({"train": {"num_epochs": 3}}, "train.num_train_epochs"),
        ({"epochs": 3}, "train.num_train_epochs"),
        ({"train": {"gradient_accumulation": 2}}, "train.gradient_accumulation_steps"),
        ({"train": {"overwrite_output_dir": True}}, "output.overwrite"),
        ({"model_name_or_path": "bert-base-uncased"}, "model.name_or_path"),
        ({"tokenizer_name": "bert-base-uncased"}, "model.tokenizer_name_or_path"),
        ({"max_seq_length": 128}, "task.max_length"),
    ],
)
def test_hugging_face_names_get_their_equivalent(raw, ours):
    ((section, value),) = raw.items()
    written = section if not isinstance(value, dict) else f"{section}.{next(iter(value))}"
    assert problems_of(raw) == [f"cfg.yaml: unknown key '{written}'; tunesmith calls it '{ours}'"]


@pytest.mark.parametrize(
    "raw, section, ours",
    [
        ({"data": {"text_column": "t"}}, "task", "task.text_column"),
        ({"data": {"label_column": "y"}}, "task", "task.label_column"),
        ({"train_file": "a.csv"}, "data", "data.train_file"),
        ({"learning_rate": 1e-4}, "train", "train.learning_rate"),
    ],
)
def test_a_key_of_another_section_is_named_there(raw, section, ours):
    ((parent, value),) = raw.items()
    written = parent if not isinstance(value, dict) else f"{parent}.{next(iter(value))}"
    assert problems_of(raw) == [
        f"cfg.yaml: unknown key '{written}'; it is a key of the {section} section: did you mean '{ours}'?"
    ]


@pytest.mark.parametrize(
    "raw, hint",
    [
        (
            {"train": {"save_strategy": "epoch"}},
            "unknown key 'train.save_strategy'; checkpoints are written every train.save_steps optimizer steps and after "
            "each evaluation and epoch (train.save_steps=0: only then); remove it",
        ),
        (
            {"train": {"report_to": "wandb"}},
            "unknown key 'train.report_to'; metrics are logged to RUN_DIR/log.jsonl (no integrations such as wandb or "
            "tensorboard yet); remove it",
        ),
        (
            {"train": {"logging_dir": "logs"}},
            "unknown key 'train.logging_dir'; logs (log.jsonl) are written into the run directory, output.dir; remove it "
            "or set output.dir",
        ),
    ],
)
def test_hugging_face_names_without_an_equivalent_are_explained(raw, hint):
    assert problems_of(raw) == [f"cfg.yaml: {hint}"]


def test_every_named_equivalent_is_a_real_key():
    keys = config_module._section_keys()
    for name, hint in config_module._FOREIGN_KEYS.items():
        if " " not in hint:  # a key, not an explanation
            section, key = hint.split(".")
            assert key in keys[section], (name, hint)
        assert not any(name in section_keys for section_keys in keys.values()), f"'{name}' is a real key"


@pytest.mark.parametrize(
    "raw, hint",
    [
        ({"train": {"zzz": 1}}, f"unknown key 'train.zzz'; see `tunesmith config reference` (docs/config.md) for the "
                                f"{len(TrainConfig.model_fields)} keys of train"),
        ({"zzz": 1}, f"unknown key 'zzz'; valid keys: {SECTIONS}"),
        ({"output": {"zzz": 1}}, "unknown key 'output.zzz'; valid keys: dir, overwrite"),
        # No misleading near-misses: none of these is what a TrainingArguments user meant.
        ({"train": {"fp32": True}}, f"unknown key 'train.fp32'; see `tunesmith config reference` (docs/config.md) for "
                                    f"the {len(TrainConfig.model_fields)} keys of train"),
        # The task's own keys: token classification's, not classification's.
        (
            {"task": {"name": "token_classification", "tags_colum": "t"}},
            "unknown key 'task.tags_colum'; did you mean 'task.tags_column'?",
        ),
        (
            {"task": {"name": "question_answering", "max_answer_len": 3}},
            "unknown key 'task.max_answer_len'; did you mean 'task.max_answer_length'?",
        ),
    ],
)
def test_no_close_match(raw, hint):
    assert problems_of(raw) == [f"cfg.yaml: {hint}"]


def test_the_brief_s_examples_no_longer_mislead():
    # Before: fp16 -> fsdp, batch_size -> per_device_eval_batch_size, text_column -> data.test_file,
    # save_strategy -> eval_strategy; bf16, output_dir, report_to, lr -> all 35 keys of train.
    text = "\n".join(
        problems_of({"train": {"batch_size": 1, "save_strategy": "no", "report_to": [], "lr": 1.0}, "data": {"text_column": "t"}})
    )
    for wrong in ("fsdp", "per_device_eval_batch_size", "test_file", "'train.eval_strategy'", "valid keys:"):
        assert wrong not in text
    assert parse_config({"train": {"fp16": True, "bf16": False}, "output_dir": "x"}).train.precision == "fp16"
