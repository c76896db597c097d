"""The library's config layer: the schema, its checks, config files, and a run's saved config.

The experiment files a user runs and copies live in `configs/`; this package is what the
library knows about configs, and these names are its public surface:

- the schema (`_schema.py`): `default_config()` returns every field with its default value
  (each field's meaning is the comment beside it there);
- the recipes of the real benchmarks (`_recipes.py`): `RECIPES`, `apply_recipe`,
  `recipe_settings`, `recipe_differences`;
- the checks (`_checks.py`): `validate(config)` before anything is built (one
  `InvalidConfigError` naming every bad field), and `format_config_error` for a misspelt
  `--config.KEY`;
- where `--config` finds its file (`_files.py`): `resolve_config`, `builtin_configs`;
- the config a workdir was trained with (`_saved.py`): `save_config`, `check_resume`,
  `config_for_eval`, `ResumeOptions`.

    from mlcnc_jax import configuration

    config = configuration.default_config()
    config.train.batch_size = 32
    configuration.validate(config)

Importing it imports neither JAX nor TensorFlow: the checks run before JAX starts. The
registries the checks ask (datasets, backbones, loss terms) are imported when a config is
checked, not before.
"""

from mlcnc_jax.configuration._checks import (
    ATTENTIONS,
    CLASSIFIERS,
    DTYPES,
    IMAGE_SOURCES,
    OPTIMIZERS,
    PARALLEL,
    PROTOTYPES,
    SAMPLINGS,
    SCHEDULES,
    SCHEMA_FILE,
    SYNTHETIC_CLASSES,
    SYNTHETIC_TRAIN_SPLITS,
    InvalidConfigError,
    batch_bytes,
    flatten_keys,
    format_config_error,
    loss_weight_names,
    problems,
    suggest_key,
    unknown_overrides,
    validate,
)
from mlcnc_jax.configuration._files import (
    builtin_config_dir,
    builtin_configs,
    resolve_config,
    resolve_config_argv,
)
from mlcnc_jax.configuration._recipes import RECIPES
from mlcnc_jax.configuration._recipes import apply as apply_recipe
from mlcnc_jax.configuration._recipes import differences as recipe_differences
from mlcnc_jax.configuration._recipes import settings as recipe_settings
from mlcnc_jax.configuration._saved import (
    ALLOW_FLAG,
    CHANGES_FILE,
    CONFIG_FILE,
    DEFAULT_RESUME,
    EVAL_SETTABLE,
    NOT_COMPARED,
    PATH_FIELDS,
    ConfigChangedError,
    ResumeOptions,
    check_resume,
    command_line_overrides,
    compare_for_resume,
    config_for_eval,
    config_from_record,
    load_saved,
    save_config,
)
from mlcnc_jax.configuration._schema import default_config

__all__ = [
    "ALLOW_FLAG",
    "ATTENTIONS",
    "CHANGES_FILE",
    "CLASSIFIERS",
    "CONFIG_FILE",
    "DEFAULT_RESUME",
    "DTYPES",
    "EVAL_SETTABLE",
    "IMAGE_SOURCES",
    "NOT_COMPARED",
    "OPTIMIZERS",
    "PARALLEL",
    "PATH_FIELDS",
    "PROTOTYPES",
    "RECIPES",
    "SAMPLINGS",
    "SCHEDULES",
    "SCHEMA_FILE",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_TRAIN_SPLITS",
    "ConfigChangedError",
    "InvalidConfigError",
    "ResumeOptions",
    "apply_recipe",
    "batch_bytes",
    "builtin_config_dir",
    "builtin_configs",
    "check_resume",
    "command_line_overrides",
    "compare_for_resume",
    "config_for_eval",
    "config_from_record",
    "default_config",
    "flatten_keys",
    "format_config_error",
    "load_saved",
    "loss_weight_names",
    "problems",
    "recipe_differences",
    "recipe_settings",
    "resolve_config",
    "resolve_config_argv",
    "save_config",
    "suggest_key",
    "unknown_overrides",
    "validate",
]
