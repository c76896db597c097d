"""Checks of a whole config before anything is built, and readable errors for misspelt keys.

`validate(config)` runs before any data is loaded or model built and raises one `ValueError`
that names every bad field with its allowed range, so a value that would crash later
(`train.log_every_steps=0` divides by zero after step 1) or silently lose data
(`train.keep_checkpoints=0` deletes the final checkpoint) or train nonsense
(`train.learning_rate=-1e-3`) stops the run at once.

`format_config_error(exc)` turns the exception that ml_collections' config flags raise for a
misspelt command-line override (`--config.train.bach_size=8`) into one line with the closest
declared key.

This module imports nothing heavy (no JAX, Flax or TensorFlow). The names that a registry
owns (datasets, backbones, loss terms and so their weights) are asked of the registry when a
config is checked, so a new registration is checked like a built-in one; the backbone and
loss registries import JAX then, never at import. The allowed values of the other enumerated
fields are declared here once, and a test keeps them equal to the tuples of the modules that
consume them.
"""

from __future__ import annotations

import difflib
import numbers
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections

from mlcnc_jax.configuration._schema import default_config
from mlcnc_jax.data.synthetic_labels import SYNTHETIC_CLASSES, SYNTHETIC_TRAIN_SPLITS
from mlcnc_jax.errors import UserError

# Allowed values of the enumerated string fields (tests/test_config_checks.py checks that they
# match the modules that use them).
IMAGE_SOURCES = ("files", "tfds")
SAMPLINGS = ("class_aware", "uniform")
ATTENTIONS = ("mha", "cosine")
CLASSIFIERS = ("etf", "etf_trainable", "linear", "text")
DTYPES = ("float32", "bfloat16")
PARALLEL = ("jit", "pmap")
PROTOTYPES = ("previous_epoch", "cumulative")
SCHEDULES = ("one_cycle", "constant")
OPTIMIZERS = ("adam", "adamw")

# Where the schema is declared, for the messages.
SCHEMA_FILE = "mlcnc_jax/configuration/_schema.py"


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int_at_least(lo: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= lo), f"an integer >= {lo}"


def _real(test: Callable[[float], bool], text: str) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_real(v) and test(float(v))), text


def _one_of(values: Sequence[str]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in values), "one of " + ", ".join(repr(x) for x in values)


class _Registered:
    """The names a registry holds when a config is checked (registrations may come later).

    The registry is asked only when a value is checked, so this module stays light even
    where the registry's module imports JAX.
    """

    def __init__(self, names: Callable[[], Sequence[str]], adds: str):
        self.names, self.adds = names, adds

    def __call__(self, value: Any) -> bool:
        return value in self.names()

    def __str__(self) -> str:
        return "one of " + ", ".join(repr(x) for x in self.names()) + f" ({self.adds} adds one)"


def _dataset_names() -> tuple[str, ...]:
    from mlcnc_jax.data import sources  # light: no JAX, no TensorFlow

    return sources.dataset_names()


def _backbone_names() -> tuple[str, ...]:
    from mlcnc_jax import models  # imports JAX and Flax: only when a config is checked

    return models.backbone_names()


def _family_names() -> tuple[str, ...]:
    from mlcnc_jax.models import families  # imports JAX and Flax: only when a config is checked

    return families.family_names()


def _uses_warmup(name: str) -> bool:
    # A family without the FLA-only warm-up ignores loss.warmup_epochs (an unknown name is
    # the model.name rule's to report).
    from mlcnc_jax.models import families

    return name in families.family_names() and families.get_family(name).uses_warmup


def _resnet_backbones() -> tuple[str, ...]:
    # The built-in backbones without transformer blocks, which train.layer_decay cannot
    # apply to (models/resnet.py registers them).
    from mlcnc_jax.models import resnet  # imports JAX and Flax: only when layer decay is on

    return resnet.BACKBONES


def loss_weight_names() -> tuple[str, ...]:
    """The registered loss terms, in registration order: each one's weight is `config.loss.<name>`.

    Asks the loss registry (`objective.register_loss`), which imports JAX on the first call.
    """
    from mlcnc_jax import objective

    return tuple(objective.TERMS)


_DATASETS = _Registered(_dataset_names, "data.sources.register_dataset")
_BACKBONES = _Registered(_backbone_names, "models.register_backbone")
_FAMILIES = _Registered(_family_names, "models.register_family")

# Stands for one rule per registered loss term, on its weight `loss.<name>` (see `_rules`): a
# weight of 0 switches its term off.
_LOSS_WEIGHT = "loss.<registered loss term>"


# field -> (test, allowed range in words). Fields not listed here (paths, seeds, booleans)
# take any value of their declared type, which the locked ConfigDict already enforces.
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "dtype": _one_of(DTYPES),
    "parallel": _one_of(PARALLEL),
    "data.name": (_DATASETS, _DATASETS),
    "data.image_source": _one_of(IMAGE_SOURCES),
    "data.sampling": _one_of(SAMPLINGS),
    "data.synthetic_classes": _one_of(SYNTHETIC_CLASSES),
    "data.synthetic_train_split": _one_of(SYNTHETIC_TRAIN_SPLITS),
    "data.head_min": _int_at_least(1),
    "data.tail_max": _int_at_least(1),
    "data.val_fraction": _real(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "data.image_size": _int_at_least(1),
    "data.resize_size": _int_at_least(1),
    "data.crop_padding": _int_at_least(0),
    "data.crop_min_area": _real(lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    "model.name": (_FAMILIES, _FAMILIES),
    "model.attention": _one_of(ATTENTIONS),
    "model.classifier": _one_of(CLASSIFIERS),
    "model.backbone": (_BACKBONES, _BACKBONES),
    "model.embed_dim": _int_at_least(1),
    "model.proj_dim": _int_at_least(1),
    "model.num_heads": _int_at_least(1),
    "model.attention_dropout": _real(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "model.alpha": _real(lambda v: v > 0, "a number > 0"),
    "model.logit_scale_init": _real(lambda v: v > 0, "a number > 0"),
    _LOSS_WEIGHT: _real(lambda v: v >= 0, "a number >= 0"),
    "loss.two_way_tp": _real(lambda v: v > 0, "a number > 0 (a temperature)"),
    "loss.two_way_tn": _real(lambda v: v > 0, "a number > 0 (a temperature)"),
    "loss.fpc_tau": _real(lambda v: v > 0, "a number > 0 (a temperature)"),
    "loss.warmup_epochs": _int_at_least(0),
    "loss.warmup_fla": _real(lambda v: v >= 0, "a number >= 0"),
    "loss.prototypes": _one_of(PROTOTYPES),
    "train.batch_size": _int_at_least(1),
    "train.num_epochs": _int_at_least(1),
    "train.steps_per_epoch": (
        lambda v: _is_int(v) and (v == -1 or v >= 1),
        "-1 (an epoch of the sampler) or an integer >= 1",
    ),
    "train.optimizer": _one_of(OPTIMIZERS),
    "train.learning_rate": _real(lambda v: v > 0, "a number > 0"),
    "train.weight_decay": _real(lambda v: v >= 0, "a number >= 0"),
    "train.backbone_lr_multiplier": _real(lambda v: v >= 0, "a number >= 0 (0 freezes it)"),
    "train.layer_decay": _real(lambda v: 0.0 < v <= 1.0, "a number in (0, 1] (1: off)"),
    "train.schedule": _one_of(SCHEDULES),
    "train.warmup_fraction": _real(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "train.ema_decay": _real(lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "train.log_every_steps": _int_at_least(1),
    "train.eval_every_epochs": _int_at_least(1),
    "train.checkpoint_every_steps": _int_at_least(1),
    "train.prefetch_batches": _int_at_least(1),
    "train.keep_checkpoints": _int_at_least(1),
    "eval.batch_size": _int_at_least(1),
    "eval.max_images": _int_at_least(0),
    "predict.threshold": _real(lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
}


def _rules() -> Iterator[tuple[str, tuple[Callable[[Any], bool], Any]]]:
    """(field, rule) of `_RULES`, the loss-weight rule once per registered loss term."""
    for key, rule in _RULES.items():
        if key == _LOSS_WEIGHT:
            yield from ((f"loss.{name}", rule) for name in loss_weight_names())
        else:
            yield key, rule


def flatten_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """The dotted names of every leaf field of `config`, e.g. 'train.batch_size'.

    Args:
      config: a config.
      prefix: prepended to every name (used for the recursion).

    Returns:
      The names, in declaration order.
    """
    keys = []
    for name, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flatten_keys(value, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _has(config: ml_collections.ConfigDict, key: str) -> bool:
    try:
        _get(config, key)
    except (KeyError, AttributeError):
        return False
    return True


def problems(config: ml_collections.ConfigDict, num_devices: int | None = None) -> list[str]:
    """Every problem of `config`, one sentence each (none: an empty list); see `validate`.

    Args:
      config: the experiment config (schema: `default_config`).
      num_devices: the number of devices of the run (jax.device_count(), all hosts), to check
        that the batches divide among them; None skips that check.

    Returns:
      One line per bad field: its name, its value and its allowed range.
    """
    found, bad = [], set()
    for key, (test, allowed) in _rules():
        if not _has(config, key):  # a config of another schema version: nothing to check
            continue
        value = _get(config, key)
        if not test(value):
            found.append(f"config.{key} = {value!r}: must be {allowed}")
            bad.add(key)

    def check(
        keys: Sequence[str],
        ok: Callable[..., bool],
        message: str,
        extra: Callable[..., tuple] | None = None,
    ) -> None:
        # Relations between fields, checked only when each field alone is valid.
        if all(_has(config, k) for k in keys):
            values = [_get(config, k) for k in keys]
            if not bad.intersection(keys) and not ok(*values):
                found.append(message.format(*values, *(extra(*values) if extra else ())))

    check(
        ("data.tail_max", "data.head_min"),
        lambda tail, head: tail <= head,
        "config.data.tail_max = {0!r} and config.data.head_min = {1!r}: tail_max must be "
        "<= head_min (a class cannot be both tail and head)",
    )
    check(
        ("data.resize_size", "data.image_size"),
        lambda resize, size: resize >= size,
        "config.data.resize_size = {0!r} and config.data.image_size = {1!r}: resize_size must "
        "be >= image_size (evaluation resizes the shorter side, then centre-crops image_size)",
    )
    check(
        ("data.mean",),
        lambda mean: len(mean) == 3 and all(_is_real(v) for v in mean),
        "config.data.mean = {0!r}: must be 3 numbers (R, G, B)",
    )
    check(
        ("data.std",),
        lambda std: len(std) == 3 and all(_is_real(v) and v > 0 for v in std),
        "config.data.std = {0!r}: must be 3 numbers > 0 (R, G, B)",
    )
    check(
        ("model.attention", "model.embed_dim", "model.num_heads"),
        lambda attention, d, h: attention != "mha" or d % h == 0,
        "config.model.embed_dim = {1!r} and config.model.num_heads = {2!r}: with attention "
        "'mha', embed_dim must be divisible by num_heads",
    )
    check(
        ("model.classifier", "model.text_embeddings", "model.class_prompts"),
        lambda classifier, path, prompts: (
            classifier != "text" or bool(str(path).strip()) or bool(prompts)
        ),
        "config.model.classifier = {0!r} needs config.model.text_embeddings = a .npy file of "
        "the class text embeddings [K, d], or config.model.class_prompts = templates such as "
        "\"('a photo of a {{}}.',)\" for the class names (see docs/clip.md)",
    )
    check(
        ("model.class_prompts",),
        lambda prompts: all(isinstance(t, str) and t.count("{}") == 1 for t in prompts),
        "config.model.class_prompts = {0!r}: each template needs exactly one '{{}}' where the "
        "class name goes, e.g. \"('a photo of a {{}}.',)\"",
    )
    check(
        ("train.layer_decay", "model.backbone"),
        lambda decay, backbone: decay == 1.0 or backbone not in _resnet_backbones(),
        "config.train.layer_decay = {0!r} with config.model.backbone = {1!r}: layer decay "
        "scales the lr per transformer block, and a ResNet has none (use a ViT / CLIP "
        "backbone or train.layer_decay=1.0)",
    )
    check(
        ("train.schedule", "train.warmup_fraction"),
        lambda schedule, fraction: schedule != "one_cycle" or fraction > 0,
        "config.train.warmup_fraction = {1!r}: must be in (0, 1) with schedule 'one_cycle'",
    )
    check(
        ("data.label_separator",),
        lambda sep: isinstance(sep, str) and sep != "",
        "config.data.label_separator = {0!r}: must be a non-empty string (' ', ';', '|', ',')",
    )
    check(
        ("data.train_split_file", "data.name"),
        lambda split_file, name: not split_file or name in ("coco_json", "csv"),
        "config.data.train_split_file = {0!r}: only coco_json and csv data take a split file, "
        "not data.name {1!r}",
    )
    check(
        ("data.name", "data.image_size"),
        lambda name, size: name != "synthetic_lt" or size >= 16,
        "config.data.image_size = {1!r}: the built-in synthetic_lt data is drawn at 16 pixels "
        "or more; use image_size >= 16",
    )
    check(
        ("model.name", "loss.warmup_epochs", "train.num_epochs"),
        lambda name, warmup, epochs: warmup < epochs or not _uses_warmup(name),
        "config.loss.warmup_epochs = {1!r} and config.train.num_epochs = {2!r}: the FLA "
        "warm-up would fill the whole run (no step would train the full objective); use "
        "loss.warmup_epochs < train.num_epochs (0: no warm-up)",
    )
    memory = _host_memory_bytes()
    for key in ("train.batch_size", "eval.batch_size"):
        check(
            (key, "data.image_size"),
            lambda batch, size: memory is None or batch_bytes(batch, size) <= memory,
            f"config.{key} = {{0!r}}: one batch of {{1}} px images alone needs "
            f"{{2:.1f}} GB as float32, more than this machine's {(memory or 0) / 1e9:.1f} GB of "
            "memory; use a smaller batch",
            extra=lambda batch, size: (batch_bytes(batch, size) / 1e9,),
        )
    if num_devices is not None:
        for key in ("train.batch_size", "eval.batch_size"):
            check(
                (key,),
                lambda batch: batch % num_devices == 0,
                f"config.{key} = {{0!r}}: must be a multiple of the {num_devices} devices (every "
                "device gets an equal share of each batch)",
            )
    # The declared weights of the registered terms (a term without one is refused, naming the
    # fix, when the objective is built).
    weights = [f"loss.{w}" for w in loss_weight_names() if _has(config, f"loss.{w}")]
    if weights:
        check(
            weights,
            lambda *w: any(v > 0 for v in w),
            "config.loss weights are all 0: set at least one of " + ", ".join(weights) + " above 0",
        )
    return found


def batch_bytes(batch_size: int, image_size: int) -> int:
    """The bytes of one batch of float32 [batch, size, size, 3] images: a floor of its memory."""
    return int(batch_size) * int(image_size) ** 2 * 3 * 4


def _host_memory_bytes() -> int | None:
    # The machine's physical memory (None where the OS does not say).
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


class InvalidConfigError(UserError):
    """Config values out of their allowed ranges (every one named in the message)."""


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks every field of `config` at once, before any data is loaded.

    Args:
      config: the experiment config (schema: `default_config`).
      num_devices: the number of devices of the run (all hosts), to check that the batches
        divide among them; None skips that check.

    Raises:
      InvalidConfigError: naming every bad field, its value and its allowed range, one per
        line.
    """
    found = problems(config, num_devices)
    if found:
        raise InvalidConfigError(
            f"{len(found)} invalid config value{'s' if len(found) > 1 else ''}; fix "
            + ("it" if len(found) == 1 else "them")
            + " on the command line (--config.FIELD=VALUE) or in the config file:\n  "
            + "\n  ".join(found)
        )


def suggest_key(bad_key: str, config: ml_collections.ConfigDict) -> str:
    """The declared key closest to a misspelt one.

    Args:
      bad_key: a dotted key, with or without a leading 'config.', e.g. 'train.bach_size'.
      config: the config whose keys are valid.

    Returns:
      The closest dotted key (e.g. 'train.batch_size'), or '' when none is close.
    """
    key = bad_key.removeprefix("config.")
    keys = flatten_keys(config)
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if match:
        return match[0]
    # A right leaf under a misspelt (or wrong) section: 'trian.batch_size', 'data.batch_size'.
    leaf = key.rsplit(".", 1)[-1]
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}
    match = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.8)
    return leaves[match[0]] if match else ""


def unknown_overrides(
    argv: Sequence[str], config: ml_collections.ConfigDict, flag: str = "config"
) -> list[str]:
    """The keys of `--config.KEY=VALUE` arguments that `config` does not declare.

    Args:
      argv: the command line.
      config: the config whose keys are valid.
      flag: the name of the config flag.

    Returns:
      The unknown dotted keys, in command-line order.
    """
    unknown = []
    for arg in argv:
        for dashes in ("--", "-"):
            prefix = f"{dashes}{flag}."
            if arg.startswith(prefix):
                key = arg[len(prefix) :].split("=", 1)[0]
                # A whole section may be overridden too; only unknown names are errors.
                if key and not _has(config, key):
                    unknown.append(key)
                break
    return unknown


def format_config_error(
    exc: BaseException,
    config: ml_collections.ConfigDict | None = None,
    argv: Sequence[str] | None = None,
) -> str | None:
    """One line for the error of a misspelt `--config.KEY=VALUE` override, or None.

    ml_collections' config flags raise `AttributeError` (misspelt field, e.g.
    `--config.train.bach_size=8`) or `KeyError` (misspelt section, e.g.
    `--config.trian.batch_size=8`) from inside flag parsing, which ends in a traceback. Catch
    either around the flag parsing and print this line instead.

    Args:
      exc: the exception raised while parsing the flags.
      config: the config whose keys are valid (default: `default_config()`, which declares
        every field).
      argv: the command line (default: sys.argv).

    Returns:
      E.g. "unknown config field 'train.bach_size' (--config.train.bach_size=8): did you mean
      --config.train.batch_size? Every field is declared in
      mlcnc_jax/configuration/_schema.py.", or None when
      `exc` is not about an unknown config key (re-raise it then).
    """
    if not isinstance(exc, KeyError | AttributeError):
        return None
    if config is None:
        config = default_config()
    argv = list(sys.argv if argv is None else argv)
    unknown = unknown_overrides(argv, config)
    if not unknown:
        return None
    parts = []
    for key in unknown:
        arg = next(a for a in argv if a.lstrip("-").startswith(f"config.{key}"))
        suggestion = suggest_key(key, config)
        hint = (
            f"did you mean --config.{suggestion}?" if suggestion else "no declared field is close."
        )
        parts.append(f"unknown config field {key!r} ({arg}): {hint}")
    return " ".join(parts) + f" Every field is declared in {SCHEMA_FILE}."
