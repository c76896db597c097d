"""Where --config finds its file: a path, or the name of a built-in config.

The built-in configs are the files of the `configs` package (the checkout's, or the
installed one), so `mlcnc --config=coco_lt` works from any directory. They are found as
files (`importlib.util.find_spec` imports nothing); the library never imports them.
"""

from __future__ import annotations

import importlib.util
import os


def builtin_config_dir() -> str | None:
    """The directory of the `configs` package (the checkout's, or the installed one)."""
    spec = importlib.util.find_spec("configs")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(location, "default.py")):
            return location
    return None


def builtin_configs() -> list[str]:
    """Names of the built-in configs (files of the `configs` package)."""
    directory = builtin_config_dir()
    if directory is None:
        return []
    return sorted(
        name[:-3]
        for name in os.listdir(directory)
        if name.endswith(".py") and not name.startswith("_")
    )


def resolve_config(value: str) -> str:
    """Turns a --config value into the config file path that config_flags loads.

    An existing file is used as given. Otherwise 'NAME', 'NAME.py' or
    'configs/NAME.py' (each optionally followed by ':ARGUMENT') name the
    built-in config NAME, so the installed `mlcnc` command finds the configs
    from any directory.

    Args:
      value: the --config value, e.g. 'configs/default.py', 'coco_lt' or
        'ablations.py:bce_uniform'.

    Returns:
      A config file path, with the ':ARGUMENT' suffix kept.

    Raises:
      FileNotFoundError: no such file and no built-in config of that name.
    """
    if os.path.isfile(value):
        return value
    path, sep, argument = value.partition(":")
    if os.path.isfile(path):
        return value
    head, name = os.path.split(path)
    if name.endswith(".py"):
        name = name[:-3]
    directory = builtin_config_dir()
    if head in ("", "configs") and directory and name in builtin_configs():
        return os.path.join(directory, name + ".py") + sep + argument
    raise FileNotFoundError(
        f"--config={value}: there is no file {path!r}"
        + (f" and no built-in config named {name!r}" if head in ("", "configs") else "")
        + f". Pass a config file, or one of the built-in configs: {', '.join(builtin_configs())}."
    )


def resolve_config_argv(argv: list[str]) -> list[str]:
    """`argv` with the value of --config (either '--config=X' or '--config X') resolved."""
    out = list(argv)
    for i, arg in enumerate(out):
        for prefix in ("--config=", "-config="):
            if arg.startswith(prefix):
                out[i] = prefix + resolve_config(arg[len(prefix) :])
        if arg in ("--config", "-config") and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
    return out
