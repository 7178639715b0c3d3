"""Reading a run config: YAML files (duplicate keys, encodings), dotted CLI overrides, Hugging Face names
read as ours, and error messages that name the dotted key and what to write instead.

The sections themselves are in `config.schema`; `parse_config`, `load_config`, `coerce_config` and
`dump_config` turn raw data, files and objects into a validated `RunConfig`.
"""

from __future__ import annotations

import difflib
import logging
import types
import unicodedata
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from tunesmith.config.schema import _SHORTHAND, METHOD_CONFIGS, MethodConfig, RunConfig, task_configs
from tunesmith.errors import ConfigError, shown

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- Hugging Face names

# People arrive with TrainingArguments, pipeline and run_glue.py names. The few with an exact equivalent are
# read as ours before validation (`_apply_aliases`: each with a note); the rest stay unknown keys, and their
# message names the one equivalent (`_FOREIGN_KEYS`). Pipeline task names live on the task classes (`pipeline_tag`).

# Path as written -> our path; the value carries over unchanged.
_RENAMES: dict[str, str] = {
    "output_dir": "output.dir",
    "train.output_dir": "output.dir",
    "output.output_dir": "output.dir",
}

_ALWAYS_EVALUATES = (
    "`tunesmith train` always trains, evaluates on the validation set, and evaluates the best model on the test set "
    "when there is one (data.test_file or data.test_split); remove it"
)

# An unknown key, in whichever section it is written -> our key (no spaces), or what to do instead.
_FOREIGN_KEYS: dict[str, str] = {
    # TrainingArguments
    "batch_size": "train.per_device_train_batch_size",
    "train_batch_size": "train.per_device_train_batch_size",
    "per_gpu_train_batch_size": "train.per_device_train_batch_size",
    "eval_batch_size": "train.per_device_eval_batch_size",
    "per_gpu_eval_batch_size": "train.per_device_eval_batch_size",
    "lr": "train.learning_rate",
    "epochs": "train.num_train_epochs",
    "num_epochs": "train.num_train_epochs",
    "gradient_accumulation": "train.gradient_accumulation_steps",
    "evaluation_strategy": "train.eval_strategy",
    "overwrite_output_dir": "output.overwrite",
    "save_strategy": "checkpoints are written every train.save_steps optimizer steps and after each evaluation and epoch "
    "(train.save_steps=0: only then); remove it",
    "report_to": "metrics are logged to RUN_DIR/log.jsonl (no integrations such as wandb or tensorboard yet); remove it",
    "logging_dir": "logs (log.jsonl) are written into the run directory, output.dir; remove it or set output.dir",
    "logging_strategy": "logs are written every train.logging_steps optimizer steps; remove it (set train.logging_steps)",
    "optim": "the optimizer is always AdamW (no weight decay on biases and norms); remove it",
    "do_train": _ALWAYS_EVALUATES,
    "do_eval": _ALWAYS_EVALUATES,
    "do_predict": _ALWAYS_EVALUATES,
    # run_glue.py / run_ner.py / run_qa.py arguments
    "model_name_or_path": "model.name_or_path",
    "tokenizer_name": "model.tokenizer_name_or_path",
    "max_seq_length": "task.max_length",
    "max_predict_samples": "data.max_eval_samples",
    "pad_to_max_length": "each batch is padded to its longest sequence, never to task.max_length; remove it",
    # run_summarization.py / run_translation.py / Seq2SeqTrainingArguments
    "predict_with_generate": "seq2seq evaluation always generates (settings in the generation section); remove it",
    "generation_max_length": "generation.max_new_tokens",
    "generation_num_beams": "generation.num_beams",
    "summary_column": "task.target_column",
    "val_max_target_length": "validation targets are scored untruncated (task.max_target_length limits training "
    "targets, generation.max_new_tokens the outputs); remove it",
    "ignore_pad_token_for_loss": "labels are always padded with -100, which the loss ignores; remove it",
    "cache_dir": "models and datasets are cached where Hugging Face caches them (the HF_HOME environment variable); remove it",
}


# tunesmith's own keys as they were named before a rename -> (the key now, the schema version that renamed it).
# Read like the Hugging Face names above, with a note: old configs, and the config.yaml of old run directories
# (which `--resume` reads), keep working.
_OLD_NAMES: dict[str, tuple[str, int]] = {
    "train.fast_dropout": ("train.cpu.fast_dropout", 2),
    "train.cpu_attention_upcast": ("train.cpu.attention_upcast", 2),
    "train.first_token_only": ("train.cpu.first_token_only", 2),
    "train.cpu_math_attention_max_length": ("train.cpu.math_attention_max_length", 2),
    "train.skip_unseen_embedding_rows": ("train.cpu.skip_unseen_embedding_rows", 2),
    "train.reuse_freed_memory": ("train.cpu.reuse_freed_memory", 2),
}


def renamed_key(dotted: str) -> str:
    """The key a dotted key written under an earlier schema version is now (itself when it was never renamed)."""
    return _OLD_NAMES[dotted][0] if dotted in _OLD_NAMES else dotted


def pipeline_names() -> dict[str, str]:
    """`text-classification` -> `classification`, from each registered task config's `pipeline_tag`."""
    return {m.pipeline_tag: m.model_fields["name"].default for m in task_configs() if m.pipeline_tag}


def _apply_aliases(raw: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str], list[str]]:
    """Hugging Face names with an exact equivalent, and our own keys' earlier names, read as ours. Returns (the
    rewritten config, notes, problems); the caller's dict and its sections are left as they were."""
    raw = dict(raw)
    notes: list[str] = []
    problems: list[str] = []
    copied: set[tuple[str, ...]] = set()

    def section(*names: str, create: bool = False) -> dict[str, Any] | None:
        # Our own copy of a (nested) section, to edit; None when it is not a mapping (validation reports that).
        holder = raw
        for depth, name in enumerate(names):
            value = holder.get(name)
            if value is None and create:
                value = {}
            if not isinstance(value, dict):
                return None
            if names[: depth + 1] not in copied:
                value = holder[name] = dict(value)
                copied.add(names[: depth + 1])
            holder = value
        return holder

    renames = [(written, ours, "the TrainingArguments name", "the TrainingArguments name for")
               for written, ours in _RENAMES.items()]
    renames += [(written, ours, f"its name before schema version {version}", f"the name before schema version {version} of")
                for written, (ours, version) in _OLD_NAMES.items()]
    for written, ours, why, conflict in renames:
        *parent, key = written.split(".")
        holder = section(*parent)
        if holder is None or key not in holder:
            continue
        *target_names, target_key = ours.split(".")
        target = section(*target_names, create=True)
        if target is None:
            continue
        value = holder.pop(key)
        if target.get(target_key) not in (None, value):
            problems.append(f"{source}: '{written}' ({value!r}) and '{ours}' ({target[target_key]!r}) are both set; "
                            f"'{written}' is {conflict} '{ours}'; keep one")
            continue
        target[target_key] = value
        notes.append(f"{source}: read '{written}' as '{ours}' ({why})")

    train = section("train")
    if train is not None:
        flags = {flag: train.pop(flag) for flag in ("bf16", "fp16") if flag in train}
        on = [flag for flag, value in flags.items() if value is True]
        for flag, value in flags.items():
            if not isinstance(value, bool):
                problems.append(f"{source}: train.{flag}: expected true or false, found {value!r}; "
                                f"better: train.precision: {flag}")
        if len(on) == 2:
            problems.append(f"{source}: train.bf16 and train.fp16 are both true; expected one precision; set train.precision "
                            "to bf16 or fp16 and remove both")
        elif on and train.get("precision", on[0]) != on[0]:
            problems.append(f"{source}: 'train.{on[0]}: true' and 'train.precision: {train['precision']}' disagree; keep one "
                            f"(train.{on[0]}: true is train.precision: {on[0]})")
        elif on:
            train["precision"] = on[0]
            notes.append(f"{source}: read 'train.{on[0]}: true' as 'train.precision: {on[0]}' (the TrainingArguments name)")
        for flag in (flag for flag, value in flags.items() if value is False):
            # TrainingArguments' fp32 default is not ours: `auto` may pick bf16, so say how to get fp32.
            decides = (f"train.precision is '{train['precision']}'" if "precision" in train
                       else "train.precision decides (default 'auto'); set train.precision=fp32 to train in fp32")
            notes.append(f"{source}: ignored 'train.{flag}: false': {decides}")
        if "load_best_model_at_end" in train:
            value = train.pop("load_best_model_at_end")
            if value is True:
                notes.append(f"{source}: ignored 'train.load_best_model_at_end: true': tunesmith always loads the best "
                             "checkpoint at the end")
            else:
                problems.append(
                    f"{source}: train.load_best_model_at_end: {'false' if value is False else repr(value)} is not supported: "
                    "tunesmith always loads the best checkpoint at the end of training; remove the key "
                    "(train.eval_strategy=no trains without evaluation and keeps the final weights)"
                )

    names = pipeline_names()
    task = raw.get("task")
    if isinstance(task, str) and task in names:
        raw["task"] = names[task]
        notes.append(f"{source}: read 'task: {task}' as 'task: {names[task]}' (the pipeline task name)")
    elif isinstance(task, dict) and isinstance(task.get("name"), str) and task["name"] in names:
        task = section("task")
        notes.append(f"{source}: read 'task.name: {task['name']}' as 'task.name: {names[task['name']]}' (the pipeline task name)")
        task["name"] = names[task["name"]]
    return raw, notes, problems


def _section_keys() -> dict[str, list[str]]:
    """Each section's keys (the task's: those of every task), for suggestions across sections."""
    return {
        name: list(dict.fromkeys(key for member in _section_members(field.annotation) for key in member.model_fields))
        for name, field in RunConfig.model_fields.items()
    }


def _unknown_key_hint(parent: list[str], key: str, members: list[type[BaseModel]]) -> str:
    """What to write instead of an unknown key: the Hugging Face name's equivalent, the same key in another
    section, a near-miss; else the valid keys, never a long list of them."""
    foreign = _FOREIGN_KEYS.get(key)
    if foreign:
        return foreign if " " in foreign else f"tunesmith calls it '{foreign}'"
    elsewhere = {name: f"{name}.{key}" for name, keys in _section_keys().items() if key in keys and [name] != parent}
    if elsewhere and len(parent) <= 1:
        plural = "s" if len(elsewhere) > 1 else ""
        return (f"it is a key of the {' and '.join(elsewhere)} section{plural}: did you mean "
                f"{' or '.join(repr(dotted) for dotted in elsewhere.values())}?")
    candidates = list(dict.fromkeys(k for member in members for k in member.model_fields))
    # 0.6, not difflib's usual 0.5 or less: below it the "closest" key is a different setting (fp16 -> fsdp).
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{'.'.join(parent + [close[0]])}'?"
    if parent == ["method"]:
        # A near-miss of another method's key (`lora_rr` under `full`): name the methods it belongs to.
        others = list(dict.fromkeys(k for member in METHOD_CONFIGS.values() for k in member.model_fields))
        close = difflib.get_close_matches(key, others, n=1, cutoff=0.6)
        if close:
            owners = [name for name, member in METHOD_CONFIGS.items() if close[0] in member.model_fields]
            return (f"did you mean 'method.{close[0]}'? (a key of method {', '.join(owners)}; "
                    "set method.name to one of them)")
    if len(candidates) <= 8:
        return f"valid keys: {', '.join(candidates)}"
    return f"see `tunesmith config reference` (docs/config.md) for the {len(candidates)} keys of {'.'.join(parent)}"


def _other_methods_hint(parent: list[str], key: str, members: list[type[BaseModel]]) -> str | None:
    """`method: {name: full, lora_r: 64}`: the key is another method's (peft's per-method configs are the same)."""
    if parent != ["method"] or len(members) != 1 or not issubclass(members[0], MethodConfig):
        return None
    owners = [name for name, member in METHOD_CONFIGS.items() if key in member.model_fields]
    if not owners:
        return None
    name = members[0].model_fields["name"].default
    own = [k for k in members[0].model_fields if k != "name"]
    return (f"not a key of method '{name}' (expected {', '.join(own) if own else 'only name'}); it belongs to "
            f"{', '.join(owners)}; remove it, or set method.name to {' or '.join(owners)}")


# --------------------------------------------------------------------------- loading


def _section_members(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _section_members(arg)]


def _clean_location(loc: tuple) -> tuple[list[str], str, list[type[BaseModel]]]:
    """Field names of an error location without pydantic's union-branch tags (`classification`,
    `literal['none','balanced']`, `list[float]`), list positions as `[i]`. Returns (keys, dotted path, the
    sections the last key was looked up in: the task's own branch for a task key)."""
    keys: list[str] = []
    dotted = ""
    members: list[type[BaseModel]] = [RunConfig]  # sections the next location part may be a key of
    parent_members = members
    for part in loc:
        if isinstance(part, int):
            dotted += f"[{part}]"
            continue
        if not members:
            continue  # below a plain field: the parts name union branches, not keys
        by_tag = [m for m in members if "name" in m.model_fields and m.model_fields["name"].default == part]
        if by_tag and not any(part in m.model_fields for m in members):
            members = by_tag  # the discriminator tag of a task/method union
            continue
        field = next((m.model_fields[part] for m in members if part in m.model_fields), None)
        keys.append(part)
        dotted += ("." if dotted else "") + part
        parent_members = members
        members = _section_members(field.annotation) if field is not None else []
    return keys, dotted or "(root)", parent_members


def _format_validation_error(err: ValidationError, source: str) -> list[str]:
    problems: list[str] = []
    merged: dict[str, int] = {}  # dotted path -> index in problems, to join the branches of a union
    for e in err.errors():
        keys, dotted, parent_members = _clean_location(e["loc"])
        if e["type"] == "extra_forbidden":
            method = _other_methods_hint(keys[:-1], keys[-1], parent_members)
            if method:
                problems.append(f"{source}: {dotted}: {method}")
                continue
            hint = _unknown_key_hint(keys[:-1], keys[-1], parent_members)
            problems.append(f"{source}: unknown key '{dotted}'; {hint}")
            continue
        if e["type"] == "union_tag_invalid":
            ctx = e.get("ctx", {})
            key = ctx.get("discriminator", "name").strip("'")
            tags = [tag.strip().strip("'") for tag in str(ctx.get("expected_tags", "")).split(",")]
            close = difflib.get_close_matches(str(ctx.get("tag")), tags, n=1, cutoff=0.6)
            fix = f"; did you mean '{close[0]}'?" if close else f"; set {dotted}.{key} to one of them"
            problems.append(f"{source}: {dotted}.{key}: expected {ctx.get('expected_tags')}, found '{ctx.get('tag')}'{fix}")
            continue
        message = e["msg"].removeprefix("Value error, ")
        found = e.get("input")
        found_text = "" if isinstance(found, (dict, list)) else f" (found {found!r})"
        if dotted in merged:
            # Another branch of a union type: "should be 'none' or 'balanced'" + "should be a valid list".
            i = merged[dotted]
            head, _, tail = problems[i].rpartition(found_text) if found_text else (problems[i], "", "")
            problems[i] = f"{head} or {message.removeprefix('Input should be ')}{found_text}{tail}"
            continue
        merged[dotted] = len(problems)
        problems.append(f"{source}: {dotted}: {message}{found_text}")
    return problems


def parse_config(raw: dict[str, Any], source: str = "config", notes: list[str] | None = None) -> RunConfig:
    """Validate a raw config. Hugging Face names with an exact equivalent (`output_dir`, `train.bf16`,
    `task: text-classification`) are read as ours: one note each, logged and appended to `notes` if given."""
    found: list[str] = []
    problems: list[str] = []
    if isinstance(raw, dict):
        raw, found, problems = _apply_aliases(raw, source)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(problems + _format_validation_error(err, source)) from None
    if problems:
        raise ConfigError(problems)
    for note in found:
        log.info(note)
    if notes is not None:
        notes.extend(found)
    return cfg


def _parse_value(text: str, item: str) -> Any:
    # YAML scalars: `1e-4` -> float, `true` -> bool, `[a, b]` -> list, `null` -> None.
    try:
        value = _load_yaml(text, f"override '{item}'") if text != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': the value is not valid YAML ({' '.join(str(err).split())}); expected a "
                          "YAML value such as 4, 1e-4, true or [a, b]") from None
    if isinstance(value, str) and _looks_like_float(value):
        return float(value)
    return value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _is_text_field(parts: list[str]) -> bool:
    """Whether the key at this dotted path holds a string (`str` or `str | None`)."""
    members: list[type[BaseModel]] = [RunConfig]
    annotation: Any = None
    for part in parts:
        field = next((m.model_fields[part] for m in members if part in m.model_fields), None)
        if field is None:
            return False
        annotation = field.annotation
        members = _section_members(annotation)
    return annotation is str or (
        get_origin(annotation) in (Union, types.UnionType) and set(get_args(annotation)) == {str, type(None)}
    )


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `train.learning_rate=1e-4` style overrides to a raw config dict.

    Values are YAML scalars, except for string keys, which take the text as written: `model.revision=0123`
    is the revision "0123", not the octal number 83."""
    raw = yaml.safe_load(yaml.safe_dump(raw)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected dotted.key=value, e.g. train.learning_rate=1e-4")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part in _SHORTHAND:
                child = {_SHORTHAND[part]: child}
            if not isinstance(child, dict):
                child = {} if child is None else child
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node[part] = child
            node = child
        if _is_text_field(parts) and text not in {"null", "~"}:
            node[parts[-1]] = text
        else:
            node[parts[-1]] = _parse_value(text, item)
    return raw


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that also records each key written twice in one mapping (SafeLoader keeps the
    last one without a word), with its dotted path and lines; `_load_yaml` reports them."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, list[int]]] = []  # (dotted key, the lines it is written on)
        self._paths: dict[int, str] = {}  # id(node) -> its dotted path
        self._checked: set[int] = set()

    def construct_document(self, node: yaml.Node) -> Any:
        # The constructor sees one mapping at a time; where each one sits comes from a walk of the whole tree.
        self._paths = _node_paths(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        self._check_duplicates(node)
        return super().construct_mapping(node, deep=deep)

    def flatten_mapping(self, node: yaml.Node) -> None:
        # A merge (`<<: *base`) copies base's pairs into this mapping's node, and flattens base (its own merges)
        # first: check each mapping as written, before that, so a key that overrides a merged one is no duplicate.
        self._check_duplicates(node)
        super().flatten_mapping(node)

    def _check_duplicates(self, node: yaml.Node) -> None:
        if not isinstance(node, yaml.MappingNode) or id(node) in self._checked:
            return
        self._checked.add(id(node))
        lines: dict[Any, list[int]] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                lines.setdefault(self.construct_object(key_node), []).append(key_node.start_mark.line + 1)
        path = self._paths.get(id(node), "")
        for key, where in lines.items():
            if len(where) > 1:
                self.duplicates.append((f"{path}.{key}" if path else str(key), where))


def _node_paths(root: yaml.Node) -> dict[int, str]:
    """The dotted path of every node, in document order (an alias keeps its anchor's path)."""
    paths: dict[int, str] = {}
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if id(node) in paths:
            continue
        paths[id(node)] = path
        children: list[tuple[yaml.Node, str]] = []
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:  # merged mappings' keys join this mapping
                    merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                    children += [(m, path) for m in merged]
                elif isinstance(key_node, yaml.ScalarNode):
                    children.append((value_node, f"{path}.{key_node.value}" if path else key_node.value))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        stack.extend(reversed(children))
    return paths


def _load_yaml(text: str, source: str) -> Any:
    """YAML text as Python data; a key written twice is a ConfigError (YAML errors are left to the caller)."""
    loader = _ConfigLoader(text)
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    problems = []
    for dotted, lines in sorted(loader.duplicates, key=lambda item: item[1]):
        if len(set(lines)) == 1:
            where = f"{'twice' if len(lines) == 2 else f'{len(lines)} times'} on line {lines[0]}"
        else:
            where = f"on lines {', '.join(map(str, lines[:-1]))} and {lines[-1]}"
        problems.append(f"{source}: duplicate key '{shown(dotted)}' {where}; the last one would silently win; keep one of them")
    if problems:
        raise ConfigError(problems)
    return data


def _line_at(content: str | bytes, offset: int) -> int:
    return content.count(b"\n" if isinstance(content, bytes) else "\n", 0, offset) + 1


# A config is a few KB: a file this big is another one (a dataset, a model), not worth reading whole.
MAX_CONFIG_BYTES = 10 * 1024 * 1024


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's mapping of sections. A file that is missing, unreadable, binary, not UTF-8, not YAML,
    empty, not a mapping or has a key twice is a ConfigError naming the file, one line per problem."""
    path = Path(path)
    if path.is_dir():
        inside = path / "config.yaml"
        fix = (f"pass the config file inside it: {inside}" if inside.is_file()
               else "pass the path of a .yaml file (create one with `tunesmith config init FILE`)")
        raise ConfigError(f"{path}: is a directory; expected a YAML config file; {fix}")
    if not path.exists():
        raise ConfigError(f"config file '{path}' not found; create one with `tunesmith config init {path}`")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        fix = f"check its permissions (chmod u+r {path})" if isinstance(err, PermissionError) else "check the file and its disk"
        raise ConfigError(f"{path}: cannot read the file ({err.strerror or err}); expected a readable YAML file; {fix}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: more than {MAX_CONFIG_BYTES:,} bytes; expected a YAML config file (a few KB); "
                          "is it the right file?")
    # NUL bytes never occur in UTF-8 text: binary data or UTF-16. Checked before decoding, so that a binary
    # file is not reported as text in the wrong encoding.
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ConfigError(
            f"{path}: line {_line_at(data, nul)}, byte offset {nul}: found a NUL byte: binary data, not YAML "
            "text; expected a YAML config file in UTF-8; pass the config file (UTF-16 text: re-save it as UTF-8)"
        )
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a BOM, as some Windows editors write, is no text
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: line {_line_at(data, err.start)}, byte offset {err.start}: found byte "
            f"0x{data[err.start]:02x}, which is not UTF-8; expected UTF-8 text; re-save it as UTF-8"
        ) from None
    try:
        raw = _load_yaml(text, str(path))
    except yaml.reader.ReaderError as err:  # a character YAML does not allow (PyYAML says "position N")
        char = err.character if isinstance(err.character, str) else chr(err.character)
        kind = "control character" if unicodedata.category(char) == "Cc" else "character"
        raise ConfigError(f"{path}: line {_line_at(text, err.position)}: found the {kind} U+{ord(char):04X}, "
                          "which YAML does not allow; expected YAML text; remove it") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    if raw is None:  # nothing but comments and blank lines: the wrong file, or one emptied by accident
        raise ConfigError(f"{path}: is empty; expected sections {', '.join(RunConfig.model_fields)}; create a starter "
                          f"with `tunesmith config init --force {path}`")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, data, task, ...), found {type(raw).__name__}")
    return raw


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, notes: list[str] | None = None
) -> RunConfig:
    """Read a YAML config (or none: defaults), apply dotted overrides, validate. `notes`: see `parse_config`."""
    raw = read_yaml(path) if path else {}
    if path:
        _resolve_relative_paths(raw, Path(path).parent, str(path))
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path) if path else "config", notes=notes)


def _resolve_relative_paths(raw: dict[str, Any], base: Path, source: str) -> None:
    # Data paths in a config file are relative to the file, like in every other tool that reads configs;
    # fall back to the working directory so `tunesmith train configs/x.yaml` from the repo root works too.
    # A path that exists in both places (two different files) is an error: either choice could train on the
    # wrong data without a word.
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    problems = []
    for key in ("train_file", "validation_file", "test_file"):
        value = data.get(key)
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            continue
        candidate, here = base / value, Path(value)
        if not candidate.exists():
            continue
        if here.exists() and not _same_file(candidate, here):
            problems.append(
                f"{source}: data.{key}: '{shown(value)}' is relative and exists both next to the config file "
                f"('{shown(str(candidate))}') and in the working directory ('{shown(str(here.resolve()))}'); expected "
                "one of them; write the path of the one you mean (absolute, or relative to the config file's folder "
                "and run from another folder)"
            )
        elif not here.exists():
            data[key] = str(candidate)
    if problems:
        raise ConfigError(problems)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def coerce_config(
    config: "RunConfig | dict | str | Path", overrides: list[str] | None = None, notes: list[str] | None = None
) -> RunConfig:
    if isinstance(config, RunConfig):
        if overrides:
            return parse_config(apply_overrides(config.model_dump(mode="json"), overrides), notes=notes)
        # A copy: a run sets keys on its config (output.overwrite, train.fsdp under an FSDP launcher, --resume
        # auto's overwrite), and the caller's object must stay as the caller wrote it.
        return config.model_copy(deep=True)
    if isinstance(config, dict):
        return parse_config(apply_overrides(config, overrides or []), notes=notes)
    return load_config(config, overrides, notes=notes)


def method_config(name: str = "full", **keys: Any) -> MethodConfig:
    """The section of method `name` with these keys (`method_config("lora", lora_r=4)`), validated like a
    config file's `method:` (a key of another method is a ConfigError naming it)."""
    return parse_config({"method": {"name": name, **keys}}, source="method_config").method


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
