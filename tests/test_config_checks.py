"""Config validation before anything is built, and the one-line error for misspelt keys."""

import ast
import pathlib
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import ablations, coco_lt, coco_lt_clip, custom, default, pretrain, voc_lt, voc_lt_clip
from mlcnc_jax import configuration
from mlcnc_jax.configuration import _checks


def test_shipped_configs_are_valid():
    for module in (default, coco_lt, voc_lt, custom, pretrain, voc_lt_clip, coco_lt_clip):
        configuration.validate(module.get_config())
    for name in ablations.VARIANTS:
        configuration.validate(ablations.get_config(name))
        configuration.validate(ablations.get_config(f"{name},voc_lt_clip"))


def test_one_error_names_every_bad_field_and_its_range():
    c = default.get_config()
    c.train.keep_checkpoints = 0
    c.train.checkpoint_every_steps = 0
    c.train.log_every_steps = 0
    c.train.learning_rate = -1e-3
    c.train.ema_decay = 1.0
    c.data.crop_min_area = 0.0
    c.data.val_fraction = 1.0
    c.model.attention = "dot"
    c.loss.fpc = -0.1
    with pytest.raises(ValueError) as e:
        configuration.validate(c)
    text = str(e.value)
    for line in (
        "config.train.keep_checkpoints = 0: must be an integer >= 1",
        "config.train.checkpoint_every_steps = 0: must be an integer >= 1",
        "config.train.log_every_steps = 0: must be an integer >= 1",
        "config.train.learning_rate = -0.001: must be a number > 0",
        "config.train.ema_decay = 1.0: must be a number in [0, 1)",
        "config.data.crop_min_area = 0.0: must be a number in (0, 1]",
        "config.data.val_fraction = 1.0: must be a number in [0, 1)",
        "config.model.attention = 'dot': must be one of 'mha', 'cosine'",
        "config.loss.fpc = -0.1: must be a number >= 0",
    ):
        assert line in text
    assert text.startswith("9 invalid config values")


@pytest.mark.parametrize(
    "key,value,words",
    [
        ("data.name", "cocolt", "'coco_lt'"),
        ("data.sampling", "balanced", "'class_aware'"),
        ("model.name", "vit", "'baseline'"),
        ("model.classifier", "cosine", "'etf_trainable'"),
        ("dtype", "float16", "'bfloat16'"),
        ("parallel", "pjit", "'pmap'"),
        ("loss.prototypes", "ema", "'cumulative'"),
        ("train.schedule", "cosine", "'one_cycle'"),
        ("train.optimizer", "sgd", "'adam', 'adamw'"),
        ("train.layer_decay", 0.0, "(0, 1]"),
        ("train.backbone_lr_multiplier", -1.0, ">= 0"),
        ("train.batch_size", 0, ">= 1"),
        ("eval.batch_size", 0, ">= 1"),
        ("eval.max_images", -1, ">= 0"),
        ("train.num_epochs", 0, ">= 1"),
        ("train.eval_every_epochs", 0, ">= 1"),
        ("train.weight_decay", -1.0, ">= 0"),
        ("train.steps_per_epoch", 0, "-1"),
        ("data.image_size", 0, ">= 1"),
    ],
)
def test_each_rule(key, value, words):
    c = default.get_config()
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value
    with pytest.raises(ValueError, match=f"config.{key} = ") as e:
        configuration.validate(c)
    assert words in str(e.value)


def test_relations_between_fields():
    c = default.get_config()
    c.data.resize_size = 16  # image_size 32
    c.model.num_heads = 7  # embed_dim 128
    c.data.tail_max = 200  # head_min 100
    for w in ("two_way", "bce", "focal", "asl", "db", "fla", "fpc"):
        c.loss[w] = 0.0
    found = configuration.problems(c)
    assert len(found) == 4
    assert any("resize_size must be >= image_size" in f for f in found)
    assert any("divisible by num_heads" in f for f in found)
    assert any("tail_max must be <= head_min" in f for f in found)
    assert (
        "config.loss weights are all 0: set at least one of loss.two_way, loss.bce, loss.focal, "
        "loss.asl, loss.db, loss.fla, loss.fpc above 0"
    ) in found


def test_allowed_values_match_the_modules_that_use_them():
    from mlcnc_jax import models, optim, prototypes
    from mlcnc_jax.data import pipeline
    from mlcnc_jax.models import mlcnc

    assert configuration.SAMPLINGS == pipeline.SAMPLINGS
    assert configuration.DTYPES == tuple(models.DTYPES)
    assert configuration.ATTENTIONS == mlcnc.ATTENTIONS
    assert configuration.CLASSIFIERS == mlcnc.CLASSIFIERS
    assert configuration.PROTOTYPES == prototypes.MODES
    assert configuration.OPTIMIZERS == optim.OPTIMIZERS
    assert configuration.SCHEDULES == optim.SCHEDULES
    # Every rule (one per registered loss term's weight) names a declared field.
    keys = set(configuration.flatten_keys(default.get_config()))
    assert {k for k, _ in _checks._rules()} <= keys
    assert {f"loss.{name}" for name in configuration.loss_weight_names()} <= keys


@pytest.fixture
def new_loss():
    """A loss term registered after the built-in ones, with its weight declared."""
    from mlcnc_jax import objective

    objective.register_loss("new_term")(lambda inputs: 0.0)
    c = default.get_config()
    with c.unlocked():
        c.loss.new_term = 0.0
    yield c
    objective.TERMS.pop("new_term")


def test_a_newly_registered_loss_gets_its_weight_checked(new_loss):
    c = new_loss
    c.loss.new_term = -0.5
    assert configuration.problems(c) == ["config.loss.new_term = -0.5: must be a number >= 0"]
    c.loss.new_term = 0.5
    assert configuration.problems(c) == []


def test_a_newly_registered_loss_counts_among_the_weights(new_loss):
    c = new_loss
    for w in ("two_way", "fla", "fpc"):  # the default's non-zero weights
        c.loss[w] = 0.0
    c.loss.new_term = 1.0
    assert configuration.problems(c) == []  # its term alone is a whole objective
    c.loss.new_term = 0.0
    (found,) = configuration.problems(c)
    assert found.startswith("config.loss weights are all 0") and "loss.new_term" in found


def test_the_backbone_is_one_of_the_registered_ones():
    from mlcnc_jax import models

    c = default.get_config()
    c.model.backbone = "my_net"
    (found,) = configuration.problems(c)
    assert found.startswith("config.model.backbone = 'my_net': must be one of 'resnet18'")
    assert found.endswith("(models.register_backbone adds one)")
    models.register_backbone("my_net", lambda dtype, axis_name: None)
    try:
        assert configuration.problems(c) == []
        c.train.layer_decay = 0.8  # not a ResNet: the layer-decay check lets it through
        assert configuration.problems(c) == []
        c.model.backbone = "resnet18"
        (found,) = configuration.problems(c)
        assert "a ResNet has none" in found
    finally:
        models._BACKBONES.pop("my_net")


def test_the_config_layer_imports_neither_jax_nor_tensorflow():
    # Checks and config files run before JAX starts (a misspelt key, a multi-host start).
    code = (
        "import sys\n"
        "from mlcnc_jax import configuration\n"
        "from configs import ablations, coco_lt_clip, custom, pretrain\n"
        "c = ablations.get_config('bce_uniform,coco_lt_clip')\n"
        "configuration.resolve_config('default')\n"
        "configuration.format_config_error(KeyError('x'), argv=['x', '--config.trian.x=1'])\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('jax', 'jaxlib', 'flax', 'tensorflow', 'tensorflow_datasets', 'torch')]\n"
        "assert not heavy, heavy\n"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_library_does_not_import_the_configs_package():
    # configs/ holds the user's experiment files; the library's schema is its own.
    root = pathlib.Path(__file__).resolve().parents[1]
    importers = []
    for path in (root / "mlcnc_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n == "configs" or n.startswith("configs.") for n in names):
                importers.append(str(path.relative_to(root)))
    assert importers == []


def test_suggest_key():
    c = default.get_config()
    assert configuration.suggest_key("train.bach_size", c) == "train.batch_size"
    assert configuration.suggest_key("config.trian.batch_size", c) == "train.batch_size"
    assert configuration.suggest_key("model.atention", c) == "model.attention"
    assert configuration.suggest_key("zzz.qqqq", c) == ""


def _parse(argv, monkeypatch):
    # The real flag parsing of the command line, in a flag registry of its own.
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values, lock_config=True)
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
    values(argv)
    return values


@pytest.mark.parametrize(
    "override,bad,good",
    [
        ("--config.train.bach_size=8", "train.bach_size", "train.batch_size"),
        ("--config.trian.batch_size=8", "trian.batch_size", "train.batch_size"),
    ],
)
def test_format_config_error_of_a_misspelt_override(override, bad, good, monkeypatch):
    argv = ["run.py", "--config=configs/default.py", override]
    with pytest.raises((KeyError, AttributeError)) as e:
        _parse(argv, monkeypatch)
    line = configuration.format_config_error(e.value, argv=argv)
    assert line == (
        f"unknown config field {bad!r} ({override}): did you mean --config.{good}? "
        "Every field is declared in mlcnc_jax/configuration/_schema.py."
    )
    assert "\n" not in line


def test_format_config_error_leaves_other_errors_alone(monkeypatch):
    argv = ["run.py", "--config=configs/default.py", "--config.train.batch_size=8"]
    assert _parse(argv, monkeypatch).config.train.batch_size == 8
    assert configuration.format_config_error(ValueError("x"), argv=argv) is None
    assert configuration.format_config_error(KeyError("x"), argv=argv) is None


def test_batches_must_divide_among_the_devices():
    c = default.get_config()
    c.train.batch_size = 12
    assert configuration.problems(c, num_devices=4) == []
    found = configuration.problems(c, num_devices=8)
    assert found == [
        "config.train.batch_size = 12: must be a multiple of the 8 devices (every device gets "
        "an equal share of each batch)"
    ]


def test_the_data_package_does_not_import_the_config_layer():
    # The names flow one way: the config checks take the built-in data's allowed values from
    # data/synthetic_labels.py, so data/ never imports mlcnc_jax.configuration.
    import ast
    import pathlib

    from mlcnc_jax.data import synthetic_labels

    assert configuration.SYNTHETIC_CLASSES == tuple(synthetic_labels.CLASS_SETS)
    assert configuration.SYNTHETIC_TRAIN_SPLITS == synthetic_labels.SYNTHETIC_TRAIN_SPLITS
    data_dir = pathlib.Path(synthetic_labels.__file__).parent
    importers = []
    for path in sorted(data_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            if any(n.startswith("mlcnc_jax.configuration") for n in names):
                importers.append(path.name)
    assert not importers, f"data/ modules importing the config layer: {importers}"


def test_model_names_come_from_the_family_registry_and_so_does_the_warm_up_rule():
    from mlcnc_jax.models import families

    class Probe(families.ModelFamily):
        name = "probe"

    c = default.get_config()
    c.model.name = "probe"
    assert any("model.name" in p and "register_family" in p for p in configuration.problems(c))
    families.register_family(Probe())
    try:
        assert not any("model.name" in p for p in configuration.problems(c))
        # Its family has no FLA warm-up: a warm-up as long as the run is not refused ...
        c.loss.warmup_epochs = c.train.num_epochs
        assert not any("warmup_epochs" in p for p in configuration.problems(c))
    finally:
        families._FAMILIES.pop("probe")
    # ... while MLC-NC's is.
    c.model.name = "mlcnc"
    assert any("warmup_epochs" in p for p in configuration.problems(c))
