"""Adding a loss, a backbone, a dataset and a model family takes the steps docs/extending.md
gives: one new file each (tests/extensions/) and one registration."""

import ast
import pathlib
import re

import numpy as np
import pytest
from extensions import my_backbone, my_family, my_loss, my_set

from configs import default
from mlcnc_jax import cli, experiment, models, objective
from mlcnc_jax.data import sources
from mlcnc_jax.data.dataset import MultiLabelDataset, Split
from mlcnc_jax.models import families

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTENDING = ROOT / "docs" / "extending.md"


@pytest.fixture
def registered():
    """The one registration of each new file; undone afterwards."""
    objective.register_loss("mean_logit")(my_loss.mean_logit)
    models.register_backbone("patches", my_backbone.patches)
    sources.register_dataset("my_set", my_set.load_my_set)
    families.register_family(my_family.MaxPoolFamily())
    yield
    objective.TERMS.pop("mean_logit")
    models._BACKBONES.pop("patches")
    sources._LOADERS.pop("my_set")
    families._FAMILIES.pop("max_pool")


def _tiny(c):
    c.model.pretrained = "none"
    c.model.embed_dim, c.model.proj_dim, c.model.num_heads = 16, 4, 2
    c.data.image_size, c.data.resize_size = 32, 32
    c.train.batch_size, c.eval.batch_size = 8, 16
    c.train.steps_per_epoch, c.train.num_epochs, c.loss.warmup_epochs = 2, 2, 0
    return c


def test_a_new_loss_and_backbone_train_through_the_config(registered, tmp_path):
    c = _tiny(default.get_config())
    # The loss's weight, declared in configuration/_schema.py (here: in the test).
    with c.unlocked():
        c.loss.mean_logit = 0.0
    c.loss.mean_logit = 0.5
    c.model.backbone, c.data.name = "patches", "my_set"
    run = experiment.build(c, str(tmp_path), reports=False)
    state = run.placement.place(run.initial_state())
    batch = next(run.batches(0))
    state, metrics = run.trainer.train_step(state, run.placement.shard(batch))
    assert "Conv_0" in state.params["backbone"]
    # The new term is computed, weighted by its config weight, and in the total.
    assert float(metrics["loss_mean_logit"]) > 0
    others = float(metrics["loss_two_way"]) + c.loss.fla * float(metrics["loss_fla"])
    others += c.loss.fpc * float(metrics["loss_fpc"])
    expected = others + 0.5 * float(metrics["loss_mean_logit"])
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)


def test_a_loss_without_a_config_weight_is_refused_naming_the_fix(registered):
    c = default.get_config()
    with pytest.raises(ValueError, match=r"c\.loss\.mean_logit = 0\.0.*configuration/_schema\.py"):
        objective.make_objective(c.loss, objective.ClassStats(np.ones(3), 4))


def test_an_unknown_backbone_names_the_registered_ones():
    c = default.get_config()
    c.model.backbone = "resnet51"
    with pytest.raises(ValueError, match="resnet50.*register_backbone"):
        models.create_model(c, 3)


def test_a_new_dataset_trains_and_evaluates_through_the_config(tmp_path):
    c = _tiny(default.get_config())
    c.data.name = "my_set"
    with pytest.raises(ValueError, match="my_set.*register_dataset"):  # not yet registered
        cli.run(c, str(tmp_path / "refused"), "train")
    sources.register_dataset("my_set", my_set.load_my_set)  # the one registration
    try:
        results = cli.run(c, str(tmp_path / "run"), "train")
    finally:
        sources._LOADERS.pop("my_set")
    assert results.final.step == 4 and results.final.num_images_scored == 12
    assert 0 < results.final.raw.map.total <= 100


def test_a_new_model_family_trains_on_the_new_backbone_and_dataset(registered, tmp_path):
    c = _tiny(default.get_config())
    with c.unlocked():
        c.loss.mean_logit = 0.0  # the registered loss's weight (off here)
    c.model.name, c.model.backbone, c.data.name = "max_pool", "patches", "my_set"
    c.loss.two_way, c.loss.fla, c.loss.fpc, c.loss.bce = 0.0, 0.0, 0.0, 1.0
    run = experiment.build(c, str(tmp_path / "run"), reports=False)
    assert run.family.name == "max_pool" and run.steps.warmup_steps == 0
    result = run.train()
    state = run.initial_state()
    assert state.prototypes is None  # the family keeps none
    assert set(state.params) == {"backbone", "Dense_0"}
    # The neural-collapse measures read the family's 'pooled' features: [N, 16] per image.
    assert result.final.step == 4 and np.isfinite(result.final.raw.neural_collapse["nc1"])


def test_a_run_takes_pixels_held_in_memory_without_a_loader(tmp_path):
    # The data seam: a MultiLabelDataset of decoded pixels goes straight to the run.
    r = np.random.default_rng(0)

    def split(n):
        labels = np.eye(3, dtype=np.uint8)[np.arange(n) % 3]
        pixels = (r.random((n, 32, 32, 3)) * 60 + 180 * labels[:, None, None, :]).astype(np.uint8)
        return Split(images=pixels, labels=labels, ids=list(range(n)))

    data = MultiLabelDataset(
        name="mine", class_names=["r", "g", "b"], train=split(24), test=split(12)
    )
    c = _tiny(default.get_config())
    seen = []

    def batches(start_step):
        # The caller's own batches (here: the first 8 images, always), from any step.
        while True:
            seen.append(start_step)
            yield {
                "image": data.train.images[:8],
                "labels": data.train.labels[:8].astype(np.float32),
            }

    result = experiment.build(c, str(tmp_path), dataset=data, train_batches=batches).train()
    assert seen and seen[0] == 0
    assert result.final.num_images_scored == 12 and 0 < result.final.raw.map.total <= 100
    assert (tmp_path / "eval_4.json").exists()  # the reports of any run
    # Pixels of the wrong size are refused, naming the expected shape.
    c.data.image_size = 16
    with pytest.raises(ValueError, match=r"\[N, 16, 16, 3\]"):
        experiment.build(c, str(tmp_path / "small"), dataset=data, reports=False).train()


def _top_level_names(path: pathlib.Path) -> set[str]:
    """Functions, classes and assigned names defined at the top of a module."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_the_guide_gives_the_steps_these_tests_take():
    text = EXTENDING.read_text()
    # The loss and backbone steps exercised above are the ones the guide shows.
    for step_text in (
        '@objective.register_loss("my_loss")',
        "c.loss.my_loss = 0.0",
        'models.register_backbone("my_net", lambda dtype, axis_name: MyNet(dtype=dtype))',
        "models.create_model(config, k, backbone=MyNet())",
        'sources.register_dataset("my_set", load_my_set)',
        "families.register_family(MyFamily())",
        "experiment.build(config, ",
    ):
        assert step_text in text, step_text


def test_every_code_place_the_guide_names_exists():
    # `path.py: name` references: the module must exist and define the name at top level.
    refs = re.findall(r"`((?:mlcnc_jax/)?[\w/]+\.py): (\w+)`", EXTENDING.read_text())
    assert len(refs) >= 8
    for path, name in refs:
        module = ROOT / (path if path.startswith("mlcnc_jax/") else f"mlcnc_jax/{path}")
        assert module.is_file(), path
        assert name in _top_level_names(module), f"{path}: {name}"
