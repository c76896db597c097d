"""Adding a loss, a backbone and a dataset takes only the steps docs/extending.md gives."""

import ast
import io
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import default
from mlcnc_jax import build, cli, models, objective, optim, step
from mlcnc_jax.data import sources
from mlcnc_jax.data.dataset import MultiLabelDataset, Split

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTENDING = ROOT / "docs" / "extending.md"


@pytest.fixture
def registered():
    """Registers a trivial loss and backbone the documented way; removes them afterwards."""

    # Step 1 for a loss: one function, registered under a name.
    @objective.register_loss("mean_logit")
    def mean_logit(inputs: objective.LossInputs):
        return jnp.mean(inputs.outputs["logits"] ** 2)

    # Step 1 for a backbone: a factory(dtype, axis_name) -> module(images, train) -> tokens.
    class Patches(nn.Module):
        dtype: object = jnp.float32

        @nn.compact
        def __call__(self, images, train: bool):
            x = nn.Conv(16, (2, 2), strides=(2, 2), dtype=self.dtype)(images)
            return x.reshape(x.shape[0], -1, x.shape[-1])

    models.register_backbone("patches", lambda dtype, axis_name: Patches(dtype=dtype))
    yield
    objective.TERMS.pop("mean_logit")
    models._BACKBONES.pop("patches")


def test_a_new_loss_and_backbone_train_through_the_config(registered):
    c = default.get_config()
    # Step 2 for a loss: its weight, declared in configuration/_schema.py (here: in the test).
    with c.unlocked():
        c.loss.mean_logit = 0.0
    c.loss.mean_logit = 0.5
    c.model.backbone = "patches"
    c.model.pretrained = "none"
    c.model.embed_dim, c.model.proj_dim, c.model.num_heads = 8, 4, 2
    c.data.image_size = 8
    k = 3
    model = models.create_model(c, k)
    tx, lr = optim.create_optimizer(c, total_steps=10)
    state = build.initial_train_state(c, model, tx, k)
    loss_fn = objective.make_objective(c.loss, objective.ClassStats(np.ones(k), 4))
    train_step = step.compile_train_step(model, tx, loss_fn, lr, steps_per_epoch=5, ema_decay=0.9)
    r = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(r.standard_normal((4, 8, 8, 3)), jnp.float32),
        "labels": jnp.asarray(np.eye(k, dtype=np.float32)[[0, 1, 2, 0]]),
    }
    state, metrics = train_step(state, batch)
    assert "Conv_0" in state.params["backbone"]
    assert float(metrics["loss_mean_logit"]) > 0
    others = float(metrics["loss_two_way"]) + 0.5 * float(metrics["loss_fla"])
    expected = others + 0.5 * float(metrics["loss_mean_logit"]) + 0.2 * float(metrics["loss_fpc"])
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert jax.tree.leaves(state.params)


def test_a_loss_without_a_config_weight_is_refused_naming_the_fix(registered):
    c = default.get_config()
    with pytest.raises(ValueError, match=r"c\.loss\.mean_logit = 0\.0.*configuration/_schema\.py"):
        objective.make_objective(c.loss, objective.ClassStats(np.ones(3), 4))


def test_an_unknown_backbone_names_the_registered_ones():
    c = default.get_config()
    c.model.backbone = "resnet51"
    with pytest.raises(ValueError, match="resnet50.*register_backbone"):
        models.create_model(c, 3)


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def load_my_set(config) -> MultiLabelDataset:
    """Step 1 for a dataset: a loader from the config to a MultiLabelDataset (here: made up
    images, class c brightening channel c)."""
    rng = np.random.default_rng(config.seed)

    def split(n):
        labels = np.eye(3, dtype=np.uint8)[np.arange(n) % 3]
        images = [_png((rng.random((32, 32, 3)) * 60 + 180 * y).astype(np.uint8)) for y in labels]
        return Split(images=images, labels=labels, ids=list(range(n)))

    return MultiLabelDataset(
        name="my_set", class_names=["red", "green", "blue"], train=split(24), test=split(12)
    )


def test_a_new_dataset_trains_and_evaluates_through_the_config(tmp_path):
    c = default.get_config()
    c.data.name = "my_set"
    with pytest.raises(ValueError, match="my_set.*register_dataset"):  # not yet registered
        cli.run(c, str(tmp_path / "refused"), "train")
    # Step 2 for a dataset: one registration.
    sources.register_dataset("my_set", load_my_set)
    try:
        c.model.pretrained = "none"
        c.model.embed_dim, c.model.proj_dim, c.model.num_heads = 16, 4, 2
        c.data.image_size, c.data.resize_size = 32, 32
        c.train.batch_size, c.eval.batch_size = 8, 16
        c.train.steps_per_epoch, c.train.num_epochs, c.loss.warmup_epochs = 2, 2, 0
        results = cli.run(c, str(tmp_path / "run"), "train")
    finally:
        sources._LOADERS.pop("my_set")
    assert results["step"] == 4 and results["num_images_scored"] == 12
    assert set(results["raw"]["map"]) >= {"total", "head", "medium", "tail"}


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
