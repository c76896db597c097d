"""The objective, the train step, the optimizer's decay mask and prediction, each on its own.

Small models and hand-written references: a skipped FLA-only warm-up, prototypes
that never close an epoch, a frozen EMA or a decay mask that reaches biases
each fail one of these tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import default
from mlcnc_jax import losses, objective, optim, prototypes, step
from mlcnc_jax.models.families import get_family
from mlcnc_jax.state import initial_train_state

K, D, P, B = 3, 8, 4, 6


def small_config():
    c = default.get_config()
    c.model.embed_dim = D
    c.model.proj_dim = P
    c.model.num_heads = 2
    c.model.attention_dropout = 0.0
    c.data.image_size = 4
    c.model.pretrained = "none"  # a tiny stand-in backbone, not the shipped trunk's
    c.loss.warmup_fla = 0.7
    c.train.ema_decay = 0.9
    return c


def random_outputs(seed=0):
    r = np.random.default_rng(seed)
    labels = (r.random((B, K)) < 0.5).astype(np.float32)
    labels[np.arange(B), np.arange(B) % K] = 1.0
    outputs = {
        "logits": jnp.asarray(r.standard_normal((B, K)), jnp.float32),
        "class_features": jnp.asarray(r.standard_normal((B, K, D)), jnp.float32),
        "label_embedding": jnp.asarray(r.standard_normal((K, D)), jnp.float32),
        "projected": jnp.asarray(r.standard_normal((B, K, P)), jnp.float32),
    }
    return outputs, jnp.asarray(labels)


def valid_prototypes(seed=1):
    r = np.random.default_rng(seed)
    state = prototypes.init_prototypes(K, P)
    return state.replace(
        prototypes=jnp.asarray(r.standard_normal((K, P)), jnp.float32),
        valid=jnp.ones((K,), bool),
    )


def test_warmup_total_is_warmup_fla_times_fla_then_the_weighted_sum():
    c = small_config()
    stats = objective.ClassStats(np.array([5, 3, 1]), num_train=8)
    loss_fn = objective.make_objective(c.loss, stats, warmup_steps=4)
    outputs, labels = random_outputs()
    protos = valid_prototypes()
    fla = losses.alignment_loss(outputs["class_features"], outputs["label_embedding"], labels)
    two_way = losses.two_way_loss(outputs["logits"], labels, tp=4.0, tn=1.0)
    fpc = losses.calibration_loss(
        outputs["projected"], protos.prototypes, labels, tau=0.5, valid=protos.valid
    )
    for s in (0, 3):
        total, terms = loss_fn(outputs, labels, prototypes=protos, step=jnp.int32(s))
        np.testing.assert_allclose(total, 0.7 * fla, rtol=1e-6)
    total, terms = loss_fn(outputs, labels, prototypes=protos, step=jnp.int32(4))
    assert set(terms) == {"two_way", "fla", "fpc"}
    np.testing.assert_allclose(total, two_way + 0.5 * fla + 0.2 * fpc, rtol=1e-6)


def test_a_term_with_weight_zero_is_not_computed_and_fla_only_for_the_warmup():
    c = small_config()
    c.loss.fla = 0.0
    stats = objective.ClassStats(np.array([5, 3, 1]), num_train=8)
    outputs, labels = random_outputs()
    _, terms = objective.make_objective(c.loss, stats, warmup_steps=0)(
        outputs, labels, prototypes=valid_prototypes()
    )
    assert set(terms) == {"two_way", "fpc"}
    _, terms = objective.make_objective(c.loss, stats, warmup_steps=2)(
        outputs, labels, prototypes=valid_prototypes()
    )
    assert set(terms) == {"two_way", "fla", "fpc"}


class Pixels(nn.Module):
    """A trivial backbone: the pixels of a [B, H, W, 3] image as H*W tokens, after a BatchNorm."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train)(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


def tiny_model_and_state(c, warmup_steps=0):
    from mlcnc_jax.models import create_model

    model = create_model(c, K, backbone=Pixels())
    tx, lr = optim.create_optimizer(c, total_steps=100)
    state = initial_train_state(c, model, tx, K)
    loss_fn = objective.make_objective(
        c.loss, objective.ClassStats(np.array([5, 3, 1]), 8), warmup_steps=warmup_steps
    )
    return model, tx, lr, loss_fn, state


def batch(seed):
    r = np.random.default_rng(seed)
    labels = (r.random((B, K)) < 0.5).astype(np.float32)
    labels[np.arange(B), np.arange(B) % K] = 1.0
    return {"image": jnp.asarray(r.standard_normal((B, 4, 4, 3)), jnp.float32), "labels": labels}


def test_prototypes_become_valid_exactly_at_the_end_of_an_epoch():
    c = small_config()
    model, tx, lr, loss_fn, state = tiny_model_and_state(c)
    train_step = step.compile_train_step(
        model, tx, loss_fn, lr, family=get_family("mlcnc"), steps_per_epoch=3, ema_decay=0.9
    )
    valid = []
    for s in range(4):
        state, _ = train_step(state, batch(s))
        valid.append(np.asarray(state.prototypes.valid).tolist())
    assert valid[0] == valid[1] == [False] * K  # mid-epoch: statistics only
    assert valid[2] == valid[3] == [True] * K  # the epoch closed after its 3rd step
    np.testing.assert_array_equal(state.prototypes.epoch_count > 0, [True] * K)


def test_one_ema_step_follows_its_formula():
    c = small_config()
    model, tx, lr, loss_fn, state = tiny_model_and_state(c)
    before = jax.tree.map(np.asarray, state.ema)
    train_step = step.compile_train_step(
        model, tx, loss_fn, lr, family=get_family("mlcnc"), steps_per_epoch=3, ema_decay=0.9
    )
    state, _ = train_step(state, batch(0))
    after = {"params": state.params, "batch_stats": state.batch_stats}
    want = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * np.asarray(p), before, after)
    moved = 0
    for got, w, e in zip(
        jax.tree.leaves(state.ema), jax.tree.leaves(want), jax.tree.leaves(before)
    ):
        np.testing.assert_allclose(np.asarray(got), w, rtol=1e-6, atol=1e-7)
        moved += not np.allclose(w, e)
    assert moved > 0  # the weights did move, so a frozen EMA cannot pass


def test_train_step_warmup_uses_fla_alone_then_the_weighted_sum():
    c = small_config()
    model, tx, lr, loss_fn, state = tiny_model_and_state(c, warmup_steps=2)
    train_step = step.compile_train_step(
        model, tx, loss_fn, lr, family=get_family("mlcnc"), steps_per_epoch=2, ema_decay=0.9
    )
    for s in range(4):
        state, m = train_step(state, batch(s))
        m = {k: float(v) for k, v in m.items()}
        if s < 2:
            assert m["loss"] == pytest.approx(0.7 * m["loss_fla"], rel=1e-6)
        else:
            want = m["loss_two_way"] + 0.5 * m["loss_fla"] + 0.2 * m["loss_fpc"]
            assert m["loss"] == pytest.approx(want, rel=1e-5)
            assert m["loss_fpc"] > 0  # the prototypes of the first epoch are in use


def test_weight_decay_reaches_exactly_the_weight_matrices_and_kernels():
    c = small_config()
    c.train.schedule = "constant"
    c.train.weight_decay = 0.1
    params = {
        "embed": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))},
        "conv": {"kernel": jnp.ones((3, 3, 2, 2))},
        "projection": {"kernel": jnp.ones((K, 2, P)), "bias": jnp.ones((K, P))},
        "norm": {"scale": jnp.ones((2,))},
        "logit_scale": jnp.ones(()),
    }
    tx, _ = optim.create_optimizer(c, total_steps=10)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    decayed = {
        jax.tree_util.keystr(path)
        for path, u in jax.tree_util.tree_leaves_with_path(updates)
        if np.any(np.asarray(u) != 0)
    }
    assert decayed == {"['embed']['kernel']", "['conv']['kernel']", "['projection']['kernel']"}
    # With only the decay as gradient, each decayed weight moves against itself.
    assert float(optax.global_norm(updates)) > 0
    # The reference recipe also decays the 2-D per-class bias (its name lacks '.bias' in torch).
    c.train.decay_2d_bias = True
    tx, _ = optim.create_optimizer(c, total_steps=10)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert {
        jax.tree_util.keystr(path)
        for path, u in jax.tree_util.tree_leaves_with_path(updates)
        if np.any(np.asarray(u) != 0)
    } == decayed | {"['projection']['bias']"}


def test_dropout_masks_do_not_depend_on_how_the_batch_is_split():
    drop = nn.Dropout(0.5, deterministic=False)
    x = jnp.ones((8, 3, 5))
    key = jax.random.key(0)

    def apply(part, first):
        with nn.intercept_methods(step.example_dropout(first)):
            return drop.apply({}, part, rngs={"dropout": key})

    whole = apply(x, 0)
    halves = jnp.concatenate([apply(x[:4], 0), apply(x[4:], 4)])
    np.testing.assert_array_equal(whole, halves)
    assert 0.3 < float(jnp.mean(whole == 0)) < 0.7  # it does drop
    assert set(np.unique(np.asarray(whole)).tolist()) == {0.0, 2.0}
    np.testing.assert_array_equal(  # examples differ from each other
        np.asarray(whole[0] == whole[1]).all(), False
    )
