"""The config a workdir was trained with: saved, checked on resume, used by eval and predict.

A run writes `<workdir>/config.json` when it starts. On resume, `check_resume` compares the
saved config with the current one over every field that changes the numbers and stops with
the list of differences, unless each is allowed explicitly (`--allow_config_change=
train.num_epochs` to extend a run); allowed changes are appended to
`<workdir>/config_changes.jsonl` and config.json then holds the new config. Eval and predict
start from the saved config (`config_for_eval`), so they need none of the training overrides;
a command-line override that contradicts it is an error.

Fields that do not change the numbers of a resumed run are not compared (`NOT_COMPARED`, each
with the reason). Path fields are compared as the absolute paths they named when saved, so
`~/data` and `/home/me/data` are the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from mlcnc_jax import storage
from mlcnc_jax.configuration._checks import flatten_keys, suggest_key
from mlcnc_jax.configuration._schema import default_config
from mlcnc_jax.errors import UserError

CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
ALLOW_FLAG = "--allow_config_change"

# Fields that name files or folders: compared as absolute paths.
PATH_FIELDS = (
    "data.root",
    "data.split_dir",
    "data.tfds_data_dir",
    "data.train_annotations",
    "data.train_images",
    "data.test_annotations",
    "data.test_images",
    "data.train_split_file",
    "model.text_embeddings",
)

# Fields (or whole sections, ending in '.') a resumed run may change freely: why each leaves
# the training numbers as they are.
NOT_COMPARED = {
    "train.log_every_steps": "how often metrics are written",
    "train.checkpoint_every_steps": "where a run can resume; a resume continues exactly",
    "train.keep_checkpoints": "how many checkpoints are kept on disk",
    "train.keep_best": "whether the best checkpoint is kept on disk",
    "train.prefetch_batches": "how many batches wait on the devices (not the numbers)",
    "train.eval_every_epochs": "evaluation reads the state, it never changes it",
    "eval.batch_size": "evaluation pads batches with a mask: every image is scored once",
    "eval.max_images": "how much of the test split evaluation scores; training is untouched",
    "data.download_splits": "whether missing split files are fetched",
    "model.pretrained": "read at step 0 only; a resume restores the weights of the checkpoint",
    "parallel": "the jit and pmap paths compute the same numbers",
    "predict.": "prediction settings",
}

# Fields eval and predict may set to other values than the saved config's: where the data is,
# how evaluation is batched and reported, and what prediction does.
EVAL_SETTABLE = (*PATH_FIELDS, *NOT_COMPARED, "eval.", "data.coco_test_all", "data.skip_corrupt")


@dataclasses.dataclass(frozen=True)
class ResumeOptions:
    """How a run may start or resume in a workdir that has checkpoints (command-line flags).

    Attributes:
      allow_config_change: config fields (or sections ending in '.') that may differ from
        the saved config.json (--allow_config_change).
      restore_step: resume from this checkpoint step instead of the latest sound one; the
        newer checkpoints are kept, renamed `<step>.set_aside` (--restore_step).
      force_unlock: take the workdir's lock whoever holds it (--force_unlock).
    """

    allow_config_change: tuple[str, ...] = ()
    restore_step: int | None = None
    force_unlock: bool = False


# Resume from the latest sound checkpoint, with the saved config, if nothing else is asked.
DEFAULT_RESUME = ResumeOptions()


class ConfigChangedError(UserError):
    """A resume with a config that differs from the saved one in fields that change numbers."""


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _jsonable(config: ml_collections.ConfigDict) -> dict:
    # A JSON round trip makes tuples lists, as in the saved file, so values compare equal.
    return json.loads(json.dumps(config.to_dict()))


def _absolute(path: str) -> str:
    if not path or storage.is_url(path):
        return path
    return os.path.realpath(os.path.expanduser(path))


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _record(config: ml_collections.ConfigDict) -> dict:
    flat = _flatten(_jsonable(config))
    return {
        "config": _jsonable(config),
        # What the path fields named when saved (relative paths depend on the directory the
        # run was started from).
        "absolute_paths": {k: _absolute(flat[k]) for k in PATH_FIELDS if k in flat},
        "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_config(workdir: str, config: ml_collections.ConfigDict, process_index: int = 0) -> str:
    """Writes `config` to `<workdir>/config.json` (process 0 only).

    Args:
      workdir: the run's directory (a local path or a bucket URL).
      config: the experiment config.
      process_index: this process's index (jax.process_index()); others write nothing.

    Returns:
      The file's path.
    """
    path = storage.join(workdir, CONFIG_FILE)
    if process_index == 0:
        storage.makedirs(workdir)
        # Atomic: a run killed meanwhile (or a full disk) leaves the old file whole.
        storage.write_text(path, json.dumps(_record(config), indent=2, sort_keys=True) + "\n")
    return path


def load_saved(workdir: str) -> dict | None:
    """The record `save_config` wrote in `workdir`, or None when there is none."""
    path = epath.Path(storage.join(workdir, CONFIG_FILE))
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(
            f"{path} is not valid JSON ({e}): restore it, or delete it to resume without the "
            "config check"
        ) from e
    if "config" not in record:
        raise UserError(f"{path} lacks the 'config' entry: it was not written by save_config")
    return record


def compare_for_resume(
    saved: Mapping, current: ml_collections.ConfigDict, allow: Sequence[str] = ()
) -> list[tuple[str, Any, Any]]:
    """The fields that change the numbers and differ between a saved and the current config.

    Args:
      saved: the record of `load_saved` (or a `save_config`-style record).
      current: the config of this run.
      allow: fields (or sections, ending in '.') whose differences are allowed.

    Returns:
      [(field, saved value, current value)], sorted by field; a field the saved config lacks
      counts with its default value (`default_config`), one the schema lacks as '<absent>'.
      Fields of `NOT_COMPARED` and of `allow` are left out.
    """
    old = _flatten(saved["config"])
    new = _flatten(_jsonable(current))
    old_paths = saved.get("absolute_paths", {})
    # A field added to the schema after the config was saved ran with its default value.
    defaults = _flatten(_jsonable(default_config()))
    diffs = []
    for key in sorted(set(old) | set(new)):
        if _matches(key, NOT_COMPARED) or _matches(key, allow):
            continue
        a = old.get(key, defaults.get(key, "<absent>"))
        b = new.get(key, "<absent>")
        if key in PATH_FIELDS and key in old and key in new:
            same = old_paths.get(key, _absolute(a)) == _absolute(b)
        else:
            same = a == b
        if not same:
            diffs.append((key, a, b))
    return diffs


def _check_allow(allow: Sequence[str], current: ml_collections.ConfigDict) -> None:
    keys = flatten_keys(current)
    for field in allow:
        if field.endswith(".") and any(k.startswith(field) for k in keys):
            continue
        if field not in keys:
            hint = suggest_key(field, current)
            raise UserError(
                f"{ALLOW_FLAG}: {field!r} is not a config field"
                + (f"; did you mean {hint!r}?" if hint else "")
            )


def _describe(diffs: Sequence[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {k}: {a!r} (saved) -> {b!r} (now)" for k, a, b in diffs)


def check_resume(
    workdir: str,
    config: ml_collections.ConfigDict,
    allow_changes: Sequence[str] = (),
    *,
    step: int | None = None,
    process_index: int = 0,
) -> list[tuple[str, Any, Any]]:
    """Stops a resume whose config differs from the saved one, unless the change is allowed.

    Call it before restoring a checkpoint. With no saved config (a workdir of an older
    version) it warns and saves the current config. Allowed differences are appended to
    `<workdir>/config_changes.jsonl` and config.json is rewritten with the current config,
    so the next resume compares with what actually ran last.

    Args:
      workdir: the run's directory.
      config: the config of this run.
      allow_changes: fields (or sections ending in '.') that may differ, e.g.
        ('train.num_epochs',): the value of --allow_config_change, split at commas.
      step: the step being resumed, recorded with allowed changes.
      process_index: this process's index; only process 0 writes.

    Returns:
      The allowed differences [(field, saved, current)].

    Raises:
      ConfigChangedError: fields that change the numbers differ and are not allowed; the
        message lists them and the flag that allows them.
      ValueError: an entry of `allow_changes` is not a config field.
    """
    allow = [a.strip() for a in allow_changes if a.strip()]
    _check_allow(allow, config)
    saved = load_saved(workdir)
    if saved is None:
        logging.warning(
            "%s has no %s (written by an older version): the resumed config cannot be "
            "checked; saving the current one",
            workdir,
            CONFIG_FILE,
        )
        save_config(workdir, config, process_index)
        return []
    differences = compare_for_resume(saved, config)
    refused = [d for d in differences if not _matches(d[0], allow)]
    allowed = [d for d in differences if _matches(d[0], allow)]
    if refused:
        fields = ",".join(k for k, _, _ in refused)
        raise ConfigChangedError(
            f"the config differs from the one {workdir} was trained with "
            f"({storage.join(workdir, CONFIG_FILE)}) in {len(refused)} field(s) that change "
            f"the results:\n{_describe(refused)}\n"
            f"Resume with the saved values, start in another --workdir, or, to continue this "
            f"run with the change on purpose (e.g. more epochs), pass {ALLOW_FLAG}={fields}"
        )
    if allowed and process_index == 0:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "step": step,
            "changes": {k: {"saved": a, "now": b} for k, a, b in allowed},
        }
        # Appended atomically: a write error leaves the earlier history whole.
        storage.append_text(
            storage.join(workdir, CHANGES_FILE), json.dumps(entry, sort_keys=True) + "\n"
        )
        save_config(workdir, config, process_index)
        logging.warning("resuming with allowed config changes:\n%s", _describe(allowed))
    return allowed


def config_from_record(record: Mapping) -> ml_collections.ConfigDict:
    """A locked config of the full schema (`default_config`) with the saved values.

    Args:
      record: the record of `load_saved`.

    Returns:
      The config; saved fields the schema no longer declares are dropped with a warning.
    """
    config = default_config()
    for key, value in _flatten(record["config"]).items():
        section, _, leaf = key.rpartition(".")
        holder = config
        try:
            for part in section.split(".") if section else ():
                holder = holder[part]
            if leaf not in holder:
                raise KeyError(leaf)
            holder[leaf] = value
        except (KeyError, AttributeError):
            logging.warning("saved config field %s is not in the schema any more: ignored", key)
    return config


def command_line_overrides(argv: Sequence[str], flag: str = "config") -> list[str]:
    """The fields set on the command line as `--config.FIELD=VALUE` (or `--config.FIELD VALUE`).

    Args:
      argv: the command line.
      flag: the name of the config flag.

    Returns:
      The dotted field names, in command-line order.
    """
    fields = []
    for arg in argv:
        for prefix in (f"--{flag}.", f"-{flag}."):
            if arg.startswith(prefix):
                fields.append(arg[len(prefix) :].split("=", 1)[0])
                break
    return fields


def config_for_eval(
    workdir: str, config: ml_collections.ConfigDict, overrides: Sequence[str] | None = None
) -> ml_collections.ConfigDict:
    """The config eval and predict should use: the saved one, plus the overrides that may differ.

    Args:
      workdir: the trained run's directory.
      config: the config from the command line (the --config file with its overrides).
      overrides: the fields set on the command line (see `command_line_overrides`); None
        (a call from Python) counts every field where `config` differs from the saved one
        as set.

    Returns:
      The saved config with the command-line values of the `EVAL_SETTABLE` fields in
      `overrides`; `config` itself (with a warning) when the workdir has no saved config.

    Raises:
      ValueError: an override sets a field that changes the model or its numbers to another
        value than the saved one; the message names the field, both values and the fix.
    """
    saved = load_saved(workdir)
    if saved is None:
        logging.warning(
            "%s has no %s: using the command-line config, which must repeat every training "
            "override",
            workdir,
            CONFIG_FILE,
        )
        return config
    result = config_from_record(saved)
    old = _flatten(_jsonable(result))
    new = _flatten(_jsonable(config))
    if overrides is None:
        overrides = [k for k in new if new[k] != old.get(k)]
    contradictions = []
    for key in overrides:
        if key not in new:
            continue  # a whole section or an unknown key: the flag parser has judged it
        if _matches(key, EVAL_SETTABLE):
            section, _, leaf = key.rpartition(".")
            (result[section] if section else result)[leaf] = new[key]
        elif new[key] != old.get(key):
            contradictions.append((key, old.get(key), new[key]))
    if contradictions:
        raise UserError(
            f"{len(contradictions)} command-line override(s) contradict the config "
            f"{workdir} was trained with ({storage.join(workdir, CONFIG_FILE)}):\n"
            + "\n".join(f"  --config.{k}={b!r}, trained with {a!r}" for k, a, b in contradictions)
            + "\nDrop them: eval and predict use the saved config (only data locations, "
            "eval.* and predict.* fields may be set)."
        )
    ignored = [k for k in new if k not in overrides and new[k] != old.get(k)]
    if ignored:
        logging.info(
            "using the config saved in %s; the --config file differs in %s (not used)",
            workdir,
            ", ".join(ignored),
        )
    return result
