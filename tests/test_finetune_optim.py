"""Fine-tuning a pre-trained backbone: AdamW, the backbone's lr multiplier and ViT layer decay.

References: torch.optim.AdamW with one parameter group per leaf (its own lr and weight
decay) under torch's OneCycleLR, hand-written layer-decay tables, and the legacy Adam
chain for bit-identity. A coupled decay in 'adamw', a decay that ignores a group's lr,
an off-by-one layer exponent, a frozen backbone that still moves or keeps Adam moments,
or an 'adam' chain that changed each fail one of these tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default, voc_lt
from mlcnc_jax import configuration, models, objective, optim, step
from mlcnc_jax.models.families import get_family
from mlcnc_jax.models.vit import ViT
from mlcnc_jax.state import initial_train_state

torch = pytest.importorskip("torch")

# A ViT-shaped backbone of 2 blocks beside a head: every kind of leaf the rules distinguish.
SHAPES = {
    "backbone": {
        "conv1": {"kernel": (2, 2, 3, 4)},
        "class_embedding": (4,),
        "positional_embedding": (5, 4),
        "ln_pre": {"scale": (4,), "bias": (4,)},
        "resblocks_0": {
            "attn": {"q_proj": {"kernel": (4, 4), "bias": (4,)}},
            "ln_1": {"scale": (4,)},
        },
        "resblocks_1": {"mlp": {"c_fc": {"kernel": (4, 8), "bias": (8,)}}},
        "ln_post": {"scale": (4,), "bias": (4,)},
        "proj": (4, 3),
    },
    "token_embed": {"kernel": (4, 6), "bias": (6,)},
    "proj_bias": (2, 3),
    "logit_scale": (),
}


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def _tree(rng):
    return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), SHAPES, is_leaf=_is_shape)


def _flat(tree):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _config(optimizer="adamw", lr=1e-2, wd=0.5, backbone=0.3, layer_decay=0.5, scale=100.0):
    c = voc_lt.get_config()  # the recipe: one-cycle lr and beta1, 2-D bias decayed
    c.train.optimizer = optimizer
    c.train.learning_rate = lr
    c.train.weight_decay = wd
    c.train.backbone_lr_multiplier = backbone
    c.train.layer_decay = layer_decay
    c.train.logit_scale_lr_multiplier = scale
    return c


def test_layer_decay_multipliers_of_a_vit_tree():
    params = _tree(np.random.default_rng(0))
    got = _flat(optim.lr_multipliers(params, backbone_lr_multiplier=0.3, layer_decay=0.5))
    b = 0.3
    want = {
        "['backbone']['conv1']['kernel']": b * 0.5**3,  # embeddings: layer_decay ** (L + 1)
        "['backbone']['class_embedding']": b * 0.5**3,
        "['backbone']['positional_embedding']": b * 0.5**3,
        "['backbone']['ln_pre']['scale']": b * 0.5**3,
        "['backbone']['ln_pre']['bias']": b * 0.5**3,
        "['backbone']['resblocks_0']['attn']['q_proj']['kernel']": b * 0.5**2,  # L - 0
        "['backbone']['resblocks_0']['attn']['q_proj']['bias']": b * 0.5**2,
        "['backbone']['resblocks_0']['ln_1']['scale']": b * 0.5**2,
        "['backbone']['resblocks_1']['mlp']['c_fc']['kernel']": b * 0.5,  # L - 1
        "['backbone']['resblocks_1']['mlp']['c_fc']['bias']": b * 0.5,
        "['backbone']['ln_post']['scale']": b,  # the top: the backbone's lr
        "['backbone']['ln_post']['bias']": b,
        "['backbone']['proj']": b,
        "['token_embed']['kernel']": 1.0,  # the head: the schedule's lr
        "['token_embed']['bias']": 1.0,
        "['proj_bias']": 1.0,
        "['logit_scale']": 1.0,
    }
    assert got == pytest.approx(want, rel=1e-12)
    # The 12-block ViT-B/16 of the CLIP configs: 0.75 ** (12 - i), embeddings 0.75 ** 13.
    vit = models.make_backbone("clip_vit_b16")
    shapes = jax.eval_shape(lambda: vit.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    exps = optim.layer_decay_exponents(shapes["params"])
    assert exps["resblocks_0"] == 12 and exps["resblocks_11"] == 1
    assert exps["conv1"] == exps["positional_embedding"] == exps["ln_pre"] == 13
    assert exps["ln_post"] == exps["proj"] == 0


def test_layer_decay_needs_transformer_blocks():
    c = default.get_config()  # resnet_small
    c.train.layer_decay = 0.7
    found = configuration.problems(c)
    assert len(found) == 1 and "a ResNet has none" in found[0]
    # A backbone the config check cannot know (registered, no blocks): the optimizer says so.
    tx, _ = optim.create_optimizer(c, total_steps=10)
    params = {"backbone": {"Conv_0": {"kernel": jnp.zeros((3, 3, 3, 4))}}, "head": jnp.zeros(2)}
    with pytest.raises(ValueError, match=r"backbone has no blocks.*Conv_0.*layer_decay=1\.0"):
        tx.init(params)
    c.train.layer_decay = 1.0
    c.train.backbone_lr_multiplier = 0.5
    optim.create_optimizer(c, total_steps=10)[0].init(params)  # a multiplier alone is fine
    for field, value, words in (
        ("layer_decay", 0.0, "(0, 1]"),
        ("layer_decay", 1.5, "(0, 1]"),
        ("backbone_lr_multiplier", -0.1, ">= 0"),
    ):
        bad = default.get_config()
        bad.train[field] = value
        assert any(
            f"config.train.{field} = " in p and words in p for p in configuration.problems(bad)
        )


def _torch_groups(init, multipliers, decayed, lr, wd):
    params, groups = {}, []
    for key, value in init.items():
        p = torch.nn.Parameter(
            torch.tensor(value).reshape(-1) if value.ndim == 0 else torch.tensor(value)
        )
        params[key] = p
        groups.append(
            {
                "params": [p],
                "weight_decay": wd if decayed[key] else 0.0,
                "max": lr * multipliers[key],
            }
        )
    return params, groups


def _run_both(config, init, total, seed=1):
    """Our optimizer and torch's AdamW / Adam, one group per leaf, on the same gradients."""
    rng = np.random.default_rng(seed)
    grads = [
        jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), init)
        for _ in range(total)
    ]
    flat_init = _flat(init)
    mult = _flat(
        optim.lr_multipliers(init, config.train.backbone_lr_multiplier, config.train.layer_decay)
    )
    mult["['logit_scale']"] *= config.train.logit_scale_lr_multiplier
    decayed = _flat(optim.decay_mask(init, decay_2d_bias=True))
    tp, groups = _torch_groups(
        flat_init, mult, decayed, config.train.learning_rate, config.train.weight_decay
    )
    opt_cls = torch.optim.AdamW if config.train.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls([{k: v for k, v in g.items() if k != "max"} for g in groups], lr=1.0, eps=1e-8)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["max"] for g in groups], total_steps=total, pct_start=0.2
    )
    tx, _ = optim.create_optimizer(config, total)
    params = jax.tree.map(jnp.asarray, init)
    state = tx.init(params)
    for g in grads:
        for k, v in _flat(g).items():
            tp[k].grad = torch.tensor(v).reshape(tp[k].shape)
        opt.step()
        sched.step()
        u, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = optax.apply_updates(params, u)
    theirs = {k: p.detach().numpy().reshape(flat_init[k].shape) for k, p in tp.items()}
    # float32 rounding grows with the distance a leaf can travel (gamma: ~1 per step here).
    atol = {k: max(2e-6, 2e-5 * config.train.learning_rate * mult[k] * total) for k in mult}
    return _flat(params), theirs, atol


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_optimizer_with_multipliers_matches_torch_parameter_groups(optimizer):
    """AdamW (decoupled decay, scaled by the group's lr) or Adam (coupled L2), with the
    one-cycle lr and beta1, the backbone multiplier, layer decay and gamma's multiplier."""
    init = _tree(np.random.default_rng(0))
    ours, theirs, atol = _run_both(_config(optimizer), init, total=20)
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=2e-5, atol=atol[key], err_msg=key)
    # The decay did act (so a dropped or unscaled decay cannot pass): without it torch lands
    # elsewhere on a decayed backbone leaf.
    no_decay_ours, _, _ = _run_both(_config(optimizer, wd=0.0), init, total=20)
    key = "['backbone']['positional_embedding']"
    assert np.abs(no_decay_ours[key] - ours[key]).max() > 1e-4


def test_adamw_step_by_hand():
    """One AdamW step at a constant lr, written out: w - lr * m * (g / (|g| + eps) + wd * w)."""
    c = _config(backbone=0.5, layer_decay=1.0, scale=1.0)
    c.train.schedule, c.train.cycle_beta1 = "constant", False
    params = {"backbone": {"w": jnp.asarray([[2.0, -1.0]])}, "head": jnp.asarray([[3.0, 4.0]])}
    grads = {"backbone": {"w": jnp.asarray([[0.5, 0.25]])}, "head": jnp.asarray([[-1.0, 2.0]])}
    tx, _ = optim.create_optimizer(c, total_steps=5)
    u, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, u)
    lr, wd, eps = 1e-2, 0.5, 1e-8
    for path, m in ((("backbone", "w"), 0.5), (("head",), 1.0)):
        w, g = params, grads
        for p in path:
            w, g = w[p], g[p]
        w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
        # First step: m_hat = g, v_hat = g^2, so Adam's direction is g / (|g| + eps).
        want = w - lr * m * (g / (np.abs(g) + eps) + wd * w)
        got = new
        for p in path:
            got = got[p]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, err_msg=str(path))


def _legacy_adam(config, total_steps):
    # The chain as it was before AdamW and the multipliers existed.
    t = config.train
    parts = [
        optax.add_decayed_weights(
            t.weight_decay,
            mask=functools.partial(optim.decay_mask, decay_2d_bias=t.decay_2d_bias),
        ),
        optim.scale_by_torch_adam(optim.beta1_schedule(config, total_steps)),
        optax.scale_by_learning_rate(optim.lr_schedule(config, total_steps)),
    ]
    if t.logit_scale_lr_multiplier != 1.0:
        parts.append(
            optax.masked(optax.scale(t.logit_scale_lr_multiplier), optim._logit_scale_mask)
        )
    return optax.chain(*parts)


@pytest.mark.parametrize("recipe", ["reference", "paper"])
def test_adam_without_multipliers_is_bit_identical_to_the_legacy_chain(recipe):
    config = voc_lt.get_config(recipe)
    assert config.train.optimizer == "adam"
    assert (config.train.backbone_lr_multiplier, config.train.layer_decay) == (1.0, 1.0)
    config.train.learning_rate = 1e-2
    init = jax.tree.map(jnp.asarray, _tree(np.random.default_rng(3)))
    rng = np.random.default_rng(4)
    ours, legacy = optim.create_optimizer(config, 12)[0], _legacy_adam(config, 12)
    p_ours, p_legacy = init, init
    s_ours, s_legacy = ours.init(init), legacy.init(init)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_legacy)
    update = jax.jit(lambda tx, g, s, p: tx.update(g, s, p), static_argnums=0)
    for _ in range(12):
        g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), init)
        u, s_ours = update(ours, g, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_legacy = update(legacy, g, s_legacy, p_legacy)
        p_legacy = optax.apply_updates(p_legacy, u)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_legacy)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ a frozen backbone

K = 3


def _tiny_vit_config(optimizer="adamw"):
    c = default.get_config()
    c.model.pretrained = "none"
    c.model.embed_dim, c.model.proj_dim, c.model.num_heads = 8, 4, 2
    c.model.attention_dropout = 0.0
    c.data.image_size = 16
    c.train.optimizer = optimizer
    c.train.weight_decay = 0.05
    c.train.backbone_lr_multiplier = 0.0
    c.loss.warmup_epochs = 0
    return c


def _tiny_vit():
    return ViT(
        patch_size=8,
        width=16,
        depth=2,
        num_heads=2,
        image_size=16,
        output_dim=8,
        activation="quick_gelu",
        ln_eps=1e-5,
        ln_pre=True,
        patch_bias=False,
    )


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_a_frozen_backbone_stays_put_while_the_head_trains(optimizer):
    c = _tiny_vit_config(optimizer)
    model = models.create_model(c, K, backbone=_tiny_vit())
    tx, lr = optim.create_optimizer(c, total_steps=20)
    state = initial_train_state(c, model, tx, K)
    before = jax.tree.map(np.asarray, state.params)
    loss_fn = objective.make_objective(c.loss, objective.ClassStats(np.array([4, 3, 2]), 6))
    train_step = step.compile_train_step(
        model, tx, loss_fn, lr, family=get_family("mlcnc"), steps_per_epoch=5, ema_decay=0.9
    )
    r = np.random.default_rng(0)
    for _ in range(3):
        labels = np.eye(K, dtype=np.float32)[np.arange(6) % K]
        batch = {
            "image": jnp.asarray(r.standard_normal((6, 16, 16, 3)), jnp.float32),
            "labels": labels,
        }
        state, _ = train_step(state, batch)
    after = jax.tree.map(np.asarray, state.params)
    for a, b in zip(jax.tree.leaves(before["backbone"]), jax.tree.leaves(after["backbone"])):
        np.testing.assert_array_equal(a, b)
    moved = [
        not np.array_equal(before[name], after[name])
        for name in ("proj_kernel", "proj_bias", "logit_scale")
    ]
    assert all(moved)
    assert not np.array_equal(before["token_embed"]["kernel"], after["token_embed"]["kernel"])
    # No Adam moments for the frozen backbone: its leaves are masked out of the state.
    moments = [
        jax.tree_util.keystr(k)
        for k, v in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if "backbone" in jax.tree_util.keystr(k)
    ]
    assert moments == []
