"""The run config: sections (`schema`), reading and messages (`loading`), the reference (`reference`).

The public names are re-exported here; task families' sections live in `tunesmith.tasks.<family>.config`.
"""

from tunesmith.config.schema import (
    DEFAULT_MODEL,
    LEGACY_METHOD_DEFAULTS,
    METHOD_CONFIGS,
    METHODS,
    SCHEMA_VERSION,
    AdapterMethodConfig,
    CpuConfig,
    DataConfig,
    DoraMethodConfig,
    FrozenMethodConfig,
    FullMethodConfig,
    GenerationSection,
    IA3MethodConfig,
    LastNMethodConfig,
    LoraMethodConfig,
    MethodConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    Section,
    TrainConfig,
    is_legacy_method_default,
    task_configs,
)
from tunesmith.config.task_base import TaskConfigBase
from tunesmith.config.loading import (
    MAX_CONFIG_BYTES,
    apply_overrides,
    coerce_config,
    dump_config,
    load_config,
    method_config,
    parse_config,
    pipeline_names,
    read_yaml,
    renamed_key,
)
from tunesmith.config.reference import config_reference

__all__ = [
    "DEFAULT_MODEL", "LEGACY_METHOD_DEFAULTS", "MAX_CONFIG_BYTES", "METHOD_CONFIGS", "METHODS", "SCHEMA_VERSION",
    "AdapterMethodConfig", "CpuConfig", "DataConfig", "DoraMethodConfig", "FrozenMethodConfig", "FullMethodConfig", "GenerationSection", "IA3MethodConfig",
    "LastNMethodConfig", "LoraMethodConfig", "MethodConfig", "ModelConfig", "OutputConfig", "RunConfig", "Section",
    "TaskConfigBase", "TrainConfig", "apply_overrides", "coerce_config", "config_reference", "dump_config",
    "is_legacy_method_default", "load_config", "method_config", "parse_config", "pipeline_names", "read_yaml", "renamed_key",
    "task_configs",
]
