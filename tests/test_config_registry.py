"""The task registry builds the config's `task` union; `method` is keyed by name with per-method keys;
data paths that exist in two places; `train` never changes the caller's config."""

import subprocess
import sys
import textwrap

import pytest
import yaml

from tunesmith.config import (
    FullMethodConfig,
    LoraMethodConfig,
    RunConfig,
    config_reference,
    dump_config,
    load_config,
    method_config,
    parse_config,
)
from tunesmith.errors import ConfigError
from tunesmith.tasks import Family, families, get_task, register, unregister
from tunesmith.tasks.classification.config import ClassificationTaskConfig
from tunesmith.tasks.question_answering.config import QuestionAnsweringTaskConfig


def problems_of(raw) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(raw, source="cfg.yaml")
    return err.value.problems


# --------------------------------------------------------------------------- the registry


def test_the_builtin_families_in_order_and_the_first_is_the_default():
    assert list(families()) == ["classification", "token_classification", "question_answering", "seq2seq", "causal_lm", "masked_lm"]
    assert isinstance(RunConfig().task, ClassificationTaskConfig)
    assert isinstance(parse_config({"task": {"max_length": 16}}).task, ClassificationTaskConfig)
    cfg = parse_config({"task": "question_answering"})
    assert isinstance(cfg.task, QuestionAnsweringTaskConfig) and cfg.task.max_length == 384  # the family's default
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_importing_config_and_tasks_imports_no_torch():
    code = ("import sys, tunesmith.tasks, tunesmith.config; tunesmith.config.load_config(None, ['task=question_answering']); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    """A family defined in a temporary module, registered at run time (as a plugin would)."""
    (tmp_path / "toy_family.py").write_text(textwrap.dedent('''
        from typing import ClassVar, Literal
        from pydantic import Field
        from tunesmith.config import TaskConfigBase

        class ToyTaskConfig(TaskConfigBase):
            """A toy family for the registry's tests."""

            pipeline_tag: ClassVar[str] = "toy-pipeline"
            name: Literal["toy"] = "toy"
            max_length: int = Field(7, gt=1, description="Toy windows.")
            colour: str = Field("red", description="A toy key.")

        class ToyTask:
            name = "toy"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import toy_family

    register(Family(name="toy", config=toy_family.ToyTaskConfig, task="toy_family:ToyTask"))
    yield toy_family
    unregister("toy")
    sys.modules.pop("toy_family", None)


def test_a_family_registered_at_run_time_validates(toy_family):
    cfg = parse_config({"task": {"name": "toy", "colour": "blue"}})
    assert isinstance(cfg.task, toy_family.ToyTaskConfig) and (cfg.task.colour, cfg.task.max_length) == ("blue", 7)
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg
    assert parse_config({"task": "toy-pipeline"}).task.name == "toy"  # its pipeline tag
    assert isinstance(RunConfig().task, ClassificationTaskConfig)  # the default stays the first family
    assert "## `task (name: toy)`" in config_reference() and "| `colour` |" in config_reference()
    assert type(get_task("toy")).__name__ == "ToyTask"
    (problem,) = problems_of({"task": {"name": "toy", "colur": "x"}})
    assert problem == "cfg.yaml: unknown key 'task.colur'; did you mean 'task.colour'?"


def test_an_unregistered_family_is_an_error_again(toy_family):
    unregister("toy")
    try:
        (problem,) = problems_of({"task": {"name": "toy"}})
        assert "task.name: expected 'classification', 'token_classification', 'question_answering', 'seq2seq', 'causal_lm', 'masked_lm', found 'toy'" in problem
    finally:
        register(Family(name="toy", config=toy_family.ToyTaskConfig, task="toy_family:ToyTask"))


def test_a_family_whose_config_names_another_is_refused():
    with pytest.raises(ValueError, match="expected name: Literal"):
        Family(name="other", config=ClassificationTaskConfig, task="x:Y")


# --------------------------------------------------------------------------- methods


def test_a_key_of_another_method_is_an_error_naming_its_methods():
    assert problems_of({"method": {"name": "full", "lora_r": 64}}) == [
        "cfg.yaml: method.lora_r: not a key of method 'full' (expected only name); it belongs to lora, dora; remove it, "
        "or set method.name to lora or dora"
    ]
    (problem,) = problems_of({"method": {"name": "ia3", "last_n_layers": 3}})
    assert problem.startswith("cfg.yaml: method.last_n_layers: not a key of method 'ia3' (expected target_modules, "
                              "merge_on_save); it belongs to last_n;")
    with pytest.raises(ConfigError, match="method.lora_r: not a key of method 'full'"):
        load_config(None, ["method.lora_r=4"])


def test_each_method_has_its_own_keys():
    lora = method_config("lora", lora_r=4)
    assert isinstance(lora, LoraMethodConfig) and lora.trains_adapter and lora.lora_r == 4
    assert isinstance(method_config(), FullMethodConfig) and not method_config().trains_adapter
    assert method_config("dora").trains_adapter and method_config("ia3").trains_adapter
    assert set(FullMethodConfig.model_fields) == {"name"}
    assert yaml.safe_load(dump_config(parse_config({"method": "frozen"})))["method"] == {"name": "frozen"}


OLD_FULL_METHOD = {  # what tunesmith wrote into RUN_DIR/config.yaml before methods had their own keys
    "name": "full", "last_n_layers": 2, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "auto",
    "merge_on_save": True,
}


def test_an_old_run_directorys_method_section_still_loads():
    assert parse_config({"method": OLD_FULL_METHOD}).method == FullMethodConfig()
    old_lora = {**OLD_FULL_METHOD, "name": "lora", "lora_r": 4}
    assert parse_config({"method": old_lora}).method == LoraMethodConfig(lora_r=4)
    # Not at the old default: a choice, so an error.
    (problem,) = problems_of({"method": {**OLD_FULL_METHOD, "lora_alpha": 32}})
    assert problem.startswith("cfg.yaml: method.lora_alpha: not a key of method 'full'")


def test_resume_sees_no_change_in_an_old_checkpoints_method_keys():
    from tunesmith.loop.resume import _changed_keys, _comparable

    current = {"config": _comparable(RunConfig())}
    old = dict(current["config"])
    old.update({f"method.{key}": value for key, value in OLD_FULL_METHOD.items()})
    assert _changed_keys({"config": old}, current) == []
    old["method.lora_r"] = 16
    assert _changed_keys({"config": old}, current) == ["method.lora_r"]


# --------------------------------------------------------------------------- relative data paths


def test_a_relative_data_path_in_two_places_is_an_error_naming_both(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "train.csv").write_text("text,label\na,0\n")
    (tmp_path / "conf" / "cfg.yaml").write_text("data:\n  train_file: train.csv\n  test_file: test.csv\n")
    (tmp_path / "conf" / "test.csv").write_text("text,label\na,0\n")
    monkeypatch.chdir(tmp_path)
    # Only next to the config file: read from there.
    cfg = load_config("conf/cfg.yaml")
    assert (cfg.data.train_file, cfg.data.test_file) == ("conf/train.csv", "conf/test.csv")
    (tmp_path / "train.csv").write_text("text,label\nb,1\n")
    with pytest.raises(ConfigError) as err:
        load_config("conf/cfg.yaml")
    (problem,) = err.value.problems
    assert problem.startswith("conf/cfg.yaml: data.train_file: 'train.csv' is relative and exists both next to the "
                              f"config file ('conf/train.csv') and in the working directory ('{tmp_path / 'train.csv'}')")
    # Run from the config's own folder: one file, no ambiguity.
    monkeypatch.chdir(tmp_path / "conf")
    assert load_config("cfg.yaml").data.train_file == "train.csv"


# --------------------------------------------------------------------------- train keeps the caller's config


def test_train_never_changes_the_callers_config(tiny_bert, sentiment_csv, tmp_path):
    import tunesmith
    from tiny import tiny_config

    cfg = parse_config(tiny_config(tiny_bert, sentiment_csv, tmp_path / "run", train={"max_steps": 2, "save_steps": 0}))
    before = cfg.model_copy(deep=True)
    tunesmith.train(cfg, show_progress=False)
    tunesmith.train(cfg, show_progress=False, overwrite=True)
    assert cfg == before and cfg.output.overwrite is False


def test_names_from_before_the_split_still_import():
    from tunesmith.config import schema

    assert schema.parse_config is parse_config and schema.config_reference is config_reference
    with pytest.raises(AttributeError):
        schema.NoSuchName  # noqa: B018
    # A family's task section is imported from its own folder: shared code names no family.
    with pytest.raises(AttributeError):
        schema.ClassificationTaskConfig  # noqa: B018
