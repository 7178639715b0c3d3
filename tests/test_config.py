"""The run config: typos name the closest key, bad values name their dotted path, shorthands and
dotted overrides parse as documented, every shipped example config is valid, and docs/config.md is
the generated reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunesmith.config import RunConfig, apply_overrides, coerce_config, config_reference, dump_config, load_config, parse_config
from tunesmith.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "cfg.yaml")
    return caught.value.problems


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- unknown keys


def test_typo_names_key_and_closest_valid_key(tmp_path):
    path = write(tmp_path, "train:\n  learning_rat: 1e-4\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: unknown key 'train.learning_rat'; did you mean 'train.learning_rate'?"]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"trian": {}}, "unknown key 'trian'; did you mean 'train'?"),
        ({"task": {"text_colum": "x"}}, "unknown key 'task.text_colum'; did you mean 'task.text_column'?"),
        ({"task": "classification", "method": {"name": "lora", "lora_rr": 4}},
         "unknown key 'method.lora_rr'; did you mean 'method.lora_r'?"),
        ({"method": {"lora_rr": 4}}, "unknown key 'method.lora_rr'; did you mean 'method.lora_r'? (a key of method lora, dora; "
                                     "set method.name to one of them)"),
        ({"data": {"train_path": "x.csv"}}, "unknown key 'data.train_path'; did you mean 'data.train_file'?"),
    ],
)
def test_unknown_keys_in_every_section(raw, expected):
    assert problems_of(raw) == [f"cfg.yaml: {expected}"]


def test_unrelated_unknown_key_lists_valid_keys():
    (problem,) = problems_of({"output": {"zzz": 1}})
    assert problem == "cfg.yaml: unknown key 'output.zzz'; valid keys: dir, overwrite"


def test_typo_in_an_override_is_reported_the_same_way():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.learning_rat'; did you mean 'train\.learning_rate'\?"):
        load_config(None, ["train.learning_rat=1e-4"])


# --------------------------------------------------------------------------- types and ranges


@pytest.mark.parametrize(
    "raw, expected",
    [
        (
            {"train": {"learning_rate": "fast"}},
            "train.learning_rate: Input should be a valid number, unable to parse string as a number (found 'fast')",
        ),
        ({"train": {"learning_rate": 0}}, "train.learning_rate: Input should be greater than 0 (found 0)"),
        ({"data": {"validation_split": 1.5}}, "data.validation_split: Input should be less than 1 (found 1.5)"),
        (
            {"task": {"max_length": "long"}},
            "task.max_length: Input should be a valid integer, unable to parse string as an integer (found 'long')",
        ),
        ({"method": {"name": "lora", "lora_r": 0}}, "method.lora_r: Input should be greater than 0 (found 0)"),
        (
            {"output": {"overwrite": "maybe"}},
            "output.overwrite: Input should be a valid boolean, unable to interpret input (found 'maybe')",
        ),
        ({"train": {"precision": "int8"}}, "train.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16' (found 'int8')"),
        ({"method": "lorra"},
         "method.name: expected 'full', 'last_n', 'frozen', 'lora', 'dora', 'ia3', found 'lorra'; did you mean 'lora'?"),
        ({"task": {"name": "classificaton"}}, "task.name: expected 'classification', 'token_classification', "
         "'question_answering', 'seq2seq', 'causal_lm', 'masked_lm', found 'classificaton'; did you mean 'classification'?"),
        # A union type: one message at the key's own path, not one per pydantic branch.
        (
            {"task": {"class_weights": "balance"}},
            "task.class_weights: Input should be 'none' or 'balanced' or a valid list (found 'balance')",
        ),
        ({"task": {"label_columns": ["a", 3]}}, "task.label_columns[1]: Input should be a valid string (found 3)"),
        ({"train": 5}, "train: Input should be a valid dictionary or instance of TrainConfig (found 5)"),
        (
            {"train": {"eval_strategy": "steps"}},
            "train: eval_strategy is 'steps' but eval_steps is not set; set train.eval_steps=N",
        ),
    ],
)
def test_bad_values_name_the_dotted_path(raw, expected):
    assert problems_of(raw) == [f"cfg.yaml: {expected}"]


def test_all_problems_are_reported_at_once():
    problems = problems_of({"train": {"learning_rate": -1, "seed": "x"}, "data": {"test_split": 2}})
    assert [p.split(":")[1].strip() for p in problems] == ["data.test_split", "train.learning_rate", "train.seed"]


def test_yaml_errors_and_shapes(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg\.yaml: not valid YAML: .*line 2"):
        load_config(write(tmp_path, "train:\n  learning_rate: [1\n"))
    with pytest.raises(ConfigError, match="expected a mapping of sections .* found str"):
        load_config(write(tmp_path, "just a string\n"))
    # An empty file is a mistake (the wrong file, or emptied); `{}` says "all defaults" on purpose.
    with pytest.raises(ConfigError, match=r"cfg\.yaml: is empty; expected sections model, data, task"):
        load_config(write(tmp_path, ""))
    assert load_config(write(tmp_path, "{}\n")) == RunConfig()


# --------------------------------------------------------------------------- shorthands


def test_method_and_task_shorthands(tmp_path):
    cfg = load_config(write(tmp_path, "task: classification\nmethod: frozen\n"))
    assert cfg.method.name == "frozen" and cfg.task.name == "classification"
    # A section without `name` gets the default name.
    cfg = parse_config({"method": {}, "task": {"max_length": 32}})
    assert (cfg.method.name, cfg.task.max_length) == ("full", 32)
    # Overrides reach into a shorthand section.
    cfg = load_config(write(tmp_path, "method: lora\n"), ["method.lora_r=4"])
    assert (cfg.method.name, cfg.method.lora_r) == ("lora", 4)
    cfg = load_config(write(tmp_path, "method: lora\n"), ["method=frozen"])
    assert cfg.method.name == "frozen"


# --------------------------------------------------------------------------- dotted overrides


def test_overrides_parse_yaml_scalars():
    cfg = load_config(
        None,
        [
            "train.learning_rate=1e-4",  # YAML 1.1 reads this as a string; it must be a float
            "train.num_train_epochs=2",
            "train.seed=7",
            "train.group_by_length=false",
            "output.overwrite=true",
            "method.name=lora",
            "method.target_modules=[query, value]",
            "task.label_columns=[a, b]",
            "train.eval_steps=null",
            "train.warmup_ratio=.1",
            "train.max_grad_norm=0",
        ],
    )
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.num_train_epochs == 2.0
    assert cfg.train.seed == 7
    assert cfg.train.group_by_length is False
    assert cfg.output.overwrite is True
    assert cfg.method.target_modules == ["query", "value"]
    assert cfg.task.label_columns == ["a", "b"]
    assert cfg.train.eval_steps is None
    assert cfg.train.warmup_ratio == 0.1
    assert cfg.train.max_grad_norm == 0.0


def test_overrides_of_text_keys_keep_the_text():
    raw = apply_overrides({}, ["model.revision=0123", "output.dir=2024", "task.text_column=true"])
    assert raw == {"model": {"revision": "0123"}, "output": {"dir": "2024"}, "task": {"text_column": "true"}}
    cfg = parse_config(apply_overrides({}, ["model.revision=20240101", "data.encoding=latin-1"]))
    assert cfg.model.revision == "20240101" and cfg.data.encoding == "latin-1"
    assert parse_config(apply_overrides({"model": {"revision": "main"}}, ["model.revision=null"])).model.revision is None


def test_override_errors():
    with pytest.raises(ConfigError, match=r"override 'train': expected dotted\.key=value"):
        apply_overrides({}, ["train"])
    with pytest.raises(ConfigError, match="'learning_rate' is not a section"):
        apply_overrides({"train": {"learning_rate": 1.0}}, ["train.learning_rate.x=1"])


def test_overrides_do_not_mutate_the_input_and_round_trip():
    raw = {"train": {"seed": 1}}
    apply_overrides(raw, ["train.seed=2"])
    assert raw == {"train": {"seed": 1}}
    cfg = coerce_config(RunConfig(), ["train.seed=3"])
    assert cfg.train.seed == 3
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


def test_relative_data_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("text,label\na,b\n", encoding="utf-8")
    path = write(tmp_path, "data:\n  train_file: data/train.csv\n")
    monkeypatch.chdir(Path(__file__).parent)
    assert load_config(path).data.train_file == str(tmp_path / "data" / "train.csv")


@pytest.mark.parametrize("train, warmup", [({"warmup_steps": 3}, 3), ({"warmup_ratio": 0.1}, 2), ({}, 0)])
def test_warmup_reaches_the_scheduler(monkeypatch, tmp_path, train, warmup):
    import torch
    from torch.utils.data import DataLoader

    from tunesmith.loop import loop as training
    from tunesmith.loop import optimizer as optimizer_module

    class Stop(Exception):
        pass

    seen = {}

    def scheduler(name, optimizer, num_warmup_steps, num_training_steps):
        seen.update(warmup=num_warmup_steps, total=num_training_steps)
        raise Stop  # the schedule is all this test is about

    monkeypatch.setattr(optimizer_module, "get_scheduler", scheduler)
    with pytest.raises(Stop):
        training.train_loop(
            model=torch.nn.Linear(2, 2), task=None, state={}, train_cfg=parse_config({"train": {"max_steps": 20, **train}}).train,
            train_loader=DataLoader(list(range(10))), eval_loader=None, loss_fn=None, accelerator=None, run_dir=tmp_path,
            metric="loss", bigger_better=False,
        )
    assert seen == {"warmup": warmup, "total": 20}


# --------------------------------------------------------------------------- shipped configs and docs


def test_example_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"sst2-minilm", "multilabel", "regression", "nli", "lora", "frozen", "last_n"} <= names


def test_configs_named_in_docs_and_code_exist():
    import re

    texts = [p.read_text(encoding="utf-8") for p in [*ROOT.glob("*.md"), *(ROOT / "src").rglob("*.py")]]
    # Names of two characters or more: `configs/x.yaml` is a placeholder.
    named = {m for text in texts for m in re.findall(r"configs/[\w.-]{2,}\.yaml", text)}
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"referenced but not in configs/: {missing}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_example_config_validates(path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = load_config(path)
    # A bundled model: every example runs offline.
    from tunesmith.assets import BUNDLED_MODELS, BUNDLED_PREFIX

    assert cfg.model.name_or_path.removeprefix(BUNDLED_PREFIX) in BUNDLED_MODELS, cfg.model.name_or_path
    assert cfg.output.dir and cfg.output.dir.startswith("runs/")
    # Data either comes bundled or from a sample file under configs/data/, which exists.
    if cfg.data.dataset_name:
        assert cfg.data.dataset_name == "bundled:rotten_tomatoes"
    else:
        assert raw["data"]["train_file"].startswith("data/")
        assert Path(cfg.data.train_file).is_file() or any(Path(cfg.data.train_file).glob("*.txt"))
    # Every key written in the file is a real one (no silently ignored sections).
    assert set(raw) <= set(RunConfig.model_fields)


def test_example_configs_cover_each_kind():
    by_name = {p.stem: load_config(p) for p in CONFIGS}
    assert by_name["multilabel"].task.problem_type == "multi_label"
    assert by_name["regression"].task.problem_type == "regression"
    assert by_name["nli"].task.text_pair_column == "hypothesis"
    assert by_name["lora"].method.name == "lora"
    assert by_name["frozen"].method.name == "frozen"
    assert by_name["last_n"].method.name == "last_n" and by_name["last_n"].method.last_n_layers == 2
    assert by_name["sst2-minilm"].data.dataset_name == "bundled:rotten_tomatoes"


@pytest.mark.parametrize(
    "name, problem, labels",
    [
        ("sst2-minilm", "single_label", ["0", "1"]),
        ("multilabel", "multi_label", ["acting", "music", "plot", "visuals"]),
        ("regression", "regression", []),
        ("nli", "single_label", ["contradiction", "entailment", "neutral"]),
    ],
)
def test_sample_data_passes_preflight(name, problem, labels):
    from tunesmith.data.splits import make_splits
    from tunesmith.tasks import get_task

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    task = get_task(cfg.task.name)
    tables, _ = make_splits(cfg.data, cfg.train.seed, task.stratify_key(cfg.task))
    state, warnings = task.preflight(cfg.task, tables)
    assert state.problem_type == problem
    assert state.labels == labels
    assert warnings == []


def test_docs_config_md_is_the_generated_reference():
    docs = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert docs == config_reference() + "\n", "regenerate with `tunesmith config reference -o docs/config.md`"


def test_reference_documents_every_key():
    from tunesmith import config
    from tunesmith.tasks import families

    reference = config_reference()
    sections = [config.ModelConfig, config.DataConfig, config.TrainConfig, config.GenerationSection, config.OutputConfig]
    assert len(sections) + 2 == len(RunConfig.model_fields)  # + task and method, one table per member
    sections += [family.config for family in families().values()] + list(config.METHODS)
    for model in sections:
        assert (model.__doc__ or "").strip().splitlines()[0] in reference
        for name in model.model_fields:
            assert f"| `{name}` |" in reference
    assert "<class" not in reference and "typing." not in reference
    # A `|` inside a cell is escaped, so every table row has exactly five unescaped separators.
    for line in reference.splitlines():
        if line.startswith("| `"):
            assert line.replace("\\|", "").count("|") == 5, line


def test_demo_config_is_valid_and_sized_for_the_cpu(tmp_path):
    from tunesmith.tasks.classification.demo import demo_config

    cfg = demo_config(tmp_path, fast_bf16=True)
    assert cfg.data.dataset_name == "bundled:rotten_tomatoes" and cfg.method.name == "full"
    assert cfg.data.max_train_samples is None
    assert demo_config(tmp_path, fast_bf16=False).data.max_train_samples == 3000  # fp32 CPUs: a smaller demo
