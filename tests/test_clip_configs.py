"""The CLIP ViT-B/16 configs (configs/voc_lt_clip.py, configs/coco_lt_clip.py): their fields,
the missing-weights message, CLIP weights reaching the backbone, and both configs end to
end on the fake VOC / COCO trees of test_recipes.py with a random-weight CLIP file in
OpenAI's key layout (the backbone shrunk to a tiny CLIP-layout ViT registered here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_recipes import _tree

from configs import ablations, coco_lt, coco_lt_clip, voc_lt, voc_lt_clip
from mlcnc_jax import backbone_weights, checkpoint, cli, configuration, models, optim
from mlcnc_jax.models import clip, vit
from mlcnc_jax.state import initial_train_state

safetensors_numpy = pytest.importorskip("safetensors.numpy")

# A CLIP-layout ViT (ln_pre, bias-free patch conv, QuickGELU, eps 1e-5, heads = width / 64
# as CLIP files imply) small enough for a CPU test: 32 px, 4 x 4 patches of width 64.
TINY = {
    "patch_size": 8,
    "width": 64,
    "depth": 2,
    "num_heads": 1,
    "image_size": 32,
    "output_dim": 16,
    "activation": "quick_gelu",
    "ln_eps": 1e-5,
    "ln_pre": True,
    "patch_bias": False,
}
TINY_NAME = "clip_vit_tiny_test"


@pytest.fixture
def tiny_clip():
    models.register_backbone(TINY_NAME, lambda dtype, axis_name: vit.ViT(**TINY, dtype=dtype))
    yield
    models._BACKBONES.pop(TINY_NAME)


def _clip_file(path, seed=0):
    """A full CLIP state dict (visual tower under 'visual.', plus text-tower keys) of TINY."""
    rng = np.random.default_rng(seed)
    w, p, out = TINY["width"], TINY["patch_size"], TINY["output_dim"]
    g = TINY["image_size"] // p

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def ln(prefix):
        return {
            f"{prefix}.weight": 1 + normal(w, scale=0.1),
            f"{prefix}.bias": normal(w, scale=0.1),
        }

    visual = {
        "conv1.weight": normal(w, 3, p, p, scale=(3 * p * p) ** -0.5),
        "class_embedding": normal(w, scale=0.5),
        "positional_embedding": normal(g * g + 1, w, scale=0.5),
        **ln("ln_pre"),
        **ln("ln_post"),
        "proj": normal(w, out, scale=w**-0.5),
    }
    for i in range(TINY["depth"]):
        b = f"transformer.resblocks.{i}."
        visual.update({b + k: v for k, v in ln("ln_1").items()})
        visual.update({b + k: v for k, v in ln("ln_2").items()})
        visual.update(
            {
                b + "attn.in_proj_weight": normal(3 * w, w, scale=w**-0.5),
                b + "attn.in_proj_bias": normal(3 * w, scale=0.1),
                b + "attn.out_proj.weight": normal(w, w, scale=w**-0.5),
                b + "attn.out_proj.bias": normal(w, scale=0.1),
                b + "mlp.c_fc.weight": normal(4 * w, w, scale=w**-0.5),
                b + "mlp.c_fc.bias": normal(4 * w, scale=0.1),
                b + "mlp.c_proj.weight": normal(w, 4 * w, scale=(4 * w) ** -0.5),
                b + "mlp.c_proj.bias": normal(w, scale=0.1),
            }
        )
    state = {f"visual.{k}": v for k, v in visual.items()}
    # The text tower's keys share names with the visual ones and must be ignored.
    state.update(_text_tower(rng, TINY["output_dim"]))
    state["logit_scale"] = np.asarray(4.6, np.float32)
    safetensors_numpy.save_file(state, str(path))
    return clip.convert_clip_visual(visual)


def _text_tower(rng, output_dim, width=32, layers=1):
    """A random CLIP text tower in OpenAI's layout: CLIP's vocabulary and context, tiny width."""

    def normal(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    w = width
    text = {
        "token_embedding.weight": normal(49408, w, scale=0.5),
        "positional_embedding": normal(77, w, scale=0.1),
        "ln_final.weight": 1 + normal(w, scale=0.1),
        "ln_final.bias": normal(w, scale=0.1),
        "text_projection": normal(w, output_dim, scale=w**-0.5),
    }
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        text.update(
            {
                b + "ln_1.weight": 1 + normal(w, scale=0.1),
                b + "ln_1.bias": normal(w, scale=0.1),
                b + "ln_2.weight": 1 + normal(w, scale=0.1),
                b + "ln_2.bias": normal(w, scale=0.1),
                b + "attn.in_proj_weight": normal(3 * w, w, scale=w**-0.5),
                b + "attn.in_proj_bias": normal(3 * w, scale=0.1),
                b + "attn.out_proj.weight": normal(w, w, scale=w**-0.5),
                b + "attn.out_proj.bias": normal(w, scale=0.1),
                b + "mlp.c_fc.weight": normal(4 * w, w, scale=w**-0.5),
                b + "mlp.c_fc.bias": normal(4 * w, scale=0.1),
                b + "mlp.c_proj.weight": normal(w, 4 * w, scale=(4 * w) ** -0.5),
                b + "mlp.c_proj.bias": normal(w, scale=0.1),
            }
        )
    return text


def _tiny(config, root, weights):
    """The CLIP config unchanged except the scale: the tiny CLIP, 32 px, 2 short epochs."""
    config.data.root = str(root)
    config.data.image_size, config.data.resize_size = 32, 36
    config.model.backbone, config.model.pretrained = TINY_NAME, str(weights)
    config.model.embed_dim = TINY["width"]  # the token width, as 768 for ViT-B/16
    config.model.proj_dim, config.model.num_heads = 4, 2
    config.dtype = "float32"
    config.train.batch_size = config.eval.batch_size = 16
    config.train.steps_per_epoch, config.train.num_epochs = 2, 2
    config.loss.warmup_epochs = 1
    config.train.log_every_steps, config.train.checkpoint_every_steps = 2, 4
    return config


def _flat(tree):
    import jax

    return {
        jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def _fields(config):
    return {
        f"{s}.{f}": config[s][f] for s in config if hasattr(config[s], "items") for f in config[s]
    }


# ------------------------------------------------------------------ the configs


@pytest.mark.parametrize("recipe", configuration.RECIPES)
@pytest.mark.parametrize(
    "module,base,name", [(voc_lt_clip, voc_lt, "voc_lt"), (coco_lt_clip, coco_lt, "coco_lt")]
)
def test_clip_configs_change_only_the_backbone_and_its_optimizer(module, base, name, recipe):
    c, ref = module.get_config(recipe), base.get_config(recipe)
    configuration.validate(c)
    changed = {k for k, v in _fields(c).items() if v != _fields(ref)[k]}
    assert changed <= set(voc_lt_clip.CLIP) | {"model.class_prompts"}
    assert {k: _fields(c)[k] for k in voc_lt_clip.CLIP} == voc_lt_clip.CLIP
    # The recipe's head and losses; the optimizer is the one announced departure from it.
    assert c.recipe == recipe and c.data.name == name
    assert configuration.recipe_differences(c) == {
        "train.optimizer": ("adam", "adamw"),
        "train.weight_decay": (1e-4, 0.05),
    }
    assert c.model.backbone == "clip_vit_b16" and c.data.image_size == 224
    assert c.model.embed_dim == models.make_backbone(c.model.backbone).width == 768
    assert tuple(c.data.mean) == (0.48145466, 0.4578275, 0.40821073)
    assert tuple(c.data.std) == (0.26862954, 0.26130258, 0.27577711)
    assert (c.train.backbone_lr_multiplier, c.train.layer_decay) == (0.1, 0.75)
    assert c.model.pretrained.endswith("clip_vit_b16_openai.safetensors")
    # The text classifier from the dataset's class names, embedded by the same CLIP file.
    assert (c.model.text_embeddings, c.model.text_weights) == ("", "")
    assert c.model.class_prompts == ("a photo of a {}.",)
    c.model.classifier = "text"  # the language geometry instead of the ETF's: one field
    configuration.validate(c)


def test_ablations_take_a_clip_base():
    c = ablations.get_config("no_fpc,voc_lt_clip")
    assert (c.model.backbone, c.loss.fpc, c.train.optimizer) == ("clip_vit_b16", 0.0, "adamw")
    b = ablations.get_config("bce_uniform,coco_lt_clip")
    assert (b.model.name, b.data.name, b.model.backbone) == ("baseline", "coco_lt", "clip_vit_b16")
    configuration.validate(b)


def test_the_clip_optimizer_builds_on_vit_b16_with_its_head():
    import jax
    import jax.numpy as jnp

    c = voc_lt_clip.get_config()
    model = models.create_model(c, 20)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )["params"]
    tx, _ = optim.create_optimizer(c, total_steps=100)
    jax.eval_shape(tx.init, shapes)  # layer decay accepts every ViT-B/16 parameter
    m = _flat(optim.lr_multipliers(shapes, 0.1, 0.75))
    assert m["['backbone']['resblocks_0']['attn']['q_proj']['kernel']"] == pytest.approx(
        0.1 * 0.75**12
    )
    assert m["['backbone']['resblocks_11']['mlp']['c_fc']['bias']"] == pytest.approx(0.075)
    assert m["['backbone']['positional_embedding']"] == pytest.approx(0.1 * 0.75**13)
    assert m["['backbone']['ln_post']['scale']"] == pytest.approx(0.1)
    assert m["['token_embed']['kernel']"] == m["['proj_kernel']"] == 1.0


# ------------------------------------------------------------------ weights


def test_missing_clip_weights_stop_the_run_saying_what_to_put_where(tmp_path):
    missing = tmp_path / "weights" / "clip_vit_b16_openai.safetensors"
    c = voc_lt_clip.get_config()
    c.model.pretrained = str(missing)
    c.data.root = str(tmp_path / "no_data")  # the weights are checked before the data
    with pytest.raises(FileNotFoundError) as e:
        cli.run(c, str(tmp_path / "work"), "train")
    message = str(e.value)
    assert str(missing) in message
    assert "ViT-B-16.pt" in message and "openaipublic.azureedge.net/clip/models/5806e77c" in message
    assert "width 768, 12 layers, patch 16, 224 px" in message and "clip_vit_b16" in message
    assert "s.save_file(" in message and f"'{missing}'" in message  # how to make it
    assert "never downloaded" in message and "pretrained=none" in message
    # A ResNet config keeps its own message.
    r = voc_lt.get_config()
    r.model.pretrained = str(missing)
    with pytest.raises(FileNotFoundError, match="torchvision's ImageNet weights for resnet50"):
        backbone_weights.check_pretrained_path(r)


def test_clip_weights_reach_the_backbone_and_nothing_else(tmp_path, tiny_clip):
    weights = tmp_path / "clip.safetensors"
    converted = _clip_file(weights)
    root, freq = _tree(tmp_path, "voc_lt")
    c = _tiny(voc_lt_clip.get_config(), root, weights)
    model = models.create_model(c, len(freq))
    tx, _ = optim.create_optimizer(c, total_steps=8)
    state = initial_train_state(c, model, tx, len(freq))
    got, want = _flat(state.params["backbone"]), _flat(converted)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # The configured module's architecture is checked (heads: what shapes cannot show).
    wrong = models.create_model(c, len(freq), backbone=vit.ViT(**{**TINY, "num_heads": 2}))
    with pytest.raises(ValueError, match="heads: weights 1 vs backbone 2"):
        initial_train_state(c, wrong, tx, len(freq))


# ------------------------------------------------------------------ end to end


def _assert_trained(results, work, test_images):
    final = results.final
    assert final.step == 4
    assert final.num_images_scored == final.num_images_expected == test_images
    for scores in (final.raw, final.ema):
        assert 0 < scores.map.total <= 100
    assert sorted(p.name for p in work.glob("eval_*.json")) == ["eval_2.json", "eval_4.json"]


def test_voc_lt_clip_trains_end_to_end_and_its_workdir_is_a_pretrained_backbone(
    tmp_path, tiny_clip
):
    import jax
    import jax.numpy as jnp

    weights = tmp_path / "clip.safetensors"
    converted = _flat(_clip_file(weights))
    root, freq = _tree(tmp_path, "voc_lt")
    config = _tiny(voc_lt_clip.get_config(), root, weights)  # AdamW, 0.1, layer decay 0.75
    work = tmp_path / "work"
    _assert_trained(cli.run(config, str(work), "train"), work, test_images=6)
    saved = checkpoint.Checkpointer(str(work), {}).restore_variables(check=False)
    trained = _flat(saved["params"]["backbone"])
    # Fine-tuned from the file: moved, but by the backbone's small steps only.
    drift = max(float(np.abs(trained[k] - converted[k]).max()) for k in converted)
    assert 0 < drift < 1e-3
    # This workdir as config.model.pretrained of another run: a ViT has no batch_stats.
    model = models.create_model(config, len(freq))
    fresh = jax.eval_shape(
        lambda: model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    assert "batch_stats" not in fresh
    loaded = backbone_weights.load_pretrained(dict(fresh), str(work))
    for key, value in _flat(loaded["params"]["backbone"]).items():
        np.testing.assert_array_equal(value, trained[key])
    config.model.backbone = "resnet_small"
    resnet = models.create_model(config, len(freq))
    other = jax.eval_shape(
        lambda: resnet.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    with pytest.raises(ValueError, match="does not match config.model.backbone"):
        backbone_weights.load_pretrained(dict(other), str(work))


def test_coco_lt_clip_trains_end_to_end_frozen_with_the_text_classifier_from_class_names(
    tmp_path, tiny_clip
):
    from mlcnc_jax.models import clip_text

    weights = tmp_path / "clip.safetensors"
    converted = _flat(_clip_file(weights, seed=1))
    # The text tower from another file (model.text_weights), removed after training.
    text_weights = tmp_path / "text.safetensors"
    safetensors_numpy.save_file(
        _text_tower(np.random.default_rng(5), TINY["output_dim"]), str(text_weights)
    )
    root, freq = _tree(tmp_path, "coco_lt")
    config = _tiny(coco_lt_clip.get_config("paper"), root, weights)
    config.train.backbone_lr_multiplier = 0.0  # a frozen CLIP
    config.model.classifier = "text"  # the class names: nothing else is given
    config.model.text_weights = str(text_weights)
    configuration.validate(config)
    work = tmp_path / "work"
    _assert_trained(cli.run(config, str(work), "train"), work, test_images=5)
    saved = checkpoint.Checkpointer(str(work), {}).restore_variables(check=False)
    for key, value in _flat(saved["params"]["backbone"]).items():
        np.testing.assert_array_equal(value, converted[key], err_msg=key)
    # The stored embeddings are the text tower's of the class names, and the classifier
    # has their geometry.
    stored = np.load(work / "class_text_embeddings.npy")
    names = json.loads((work / "class_text_embeddings.json").read_text())["class_names"]
    assert len(names) == len(freq) == stored.shape[0]
    want = clip_text.class_embeddings(str(text_weights), names, ("a photo of a {}.",), "quick_gelu")
    np.testing.assert_allclose(stored, want, atol=1e-6)
    v = np.asarray(saved["etf"]["classifier"])
    np.testing.assert_allclose(v.T @ v, want @ want.T, atol=2e-6)
    saved_config = json.loads((work / "config.json").read_text())
    assert saved_config["config"]["model"]["text_embeddings"] == str(
        work / "class_text_embeddings.npy"
    )
    # Evaluation reads the stored embeddings: the text tower is no longer needed.
    text_weights.unlink()
    # (As `mlcnc --mode=eval --workdir=...` with no overrides: the saved config is used.)
    fresh = _tiny(coco_lt_clip.get_config("paper"), root, weights)
    again = cli.run(fresh, str(work), "eval", overrides=[])
    assert again.final.step == 4 and again.final.num_images_scored == 5
    # ... and so does prediction.
    fresh.predict.inputs = str(next(iter(sorted(root.rglob("*.jpg")))))
    out = cli.run(fresh, str(work), "predict", overrides=["predict.inputs"])
    assert len(json.loads(open(out).read())["predictions"]) == 1


def test_voc_lt_clip_trains_with_the_text_classifier_from_the_same_clip_file(tmp_path, tiny_clip):
    from mlcnc_jax.data.voc import VOC_CLASSES
    from mlcnc_jax.models import clip_text

    weights = tmp_path / "clip.safetensors"  # the whole CLIP: both towers in one file
    _clip_file(weights, seed=4)
    root, freq = _tree(tmp_path, "voc_lt")
    config = _tiny(voc_lt_clip.get_config(), root, weights)
    config.model.classifier = "text"  # the class names and the default template only
    work = tmp_path / "work"
    _assert_trained(cli.run(config, str(work), "train"), work, test_images=6)
    want = clip_text.class_embeddings(
        str(weights), VOC_CLASSES, ("a photo of a {}.",), "quick_gelu"
    )
    np.testing.assert_allclose(np.load(work / "class_text_embeddings.npy"), want, atol=1e-6)
    saved = checkpoint.Checkpointer(str(work), {}).restore_variables(check=False)
    v = np.asarray(saved["etf"]["classifier"])
    np.testing.assert_allclose(v.T @ v, want @ want.T, atol=2e-6)
