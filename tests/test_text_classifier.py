"""The text classifier (model.classifier='text'): the class text embeddings' geometry in the
ETF classifier's place, frozen, and the errors for a missing or misshapen file.

References: the Gram matrix of the normalised embeddings (numpy), the classifier's
formula logit = gamma <mu, v_c> written out, and the optimizer state. A classifier that
lost the text geometry, drifted during training, sat in the trained params or accepted
a wrong file each fail one of these tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import default
from mlcnc_jax import configuration, models, objective, optim, step
from mlcnc_jax.etf import gram_frame, simplex_etf
from mlcnc_jax.models.families import get_family
from mlcnc_jax.models.vit import ViT
from mlcnc_jax.state import initial_train_state

K, P, B = 4, 3, 6


def _unit_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(
    "k,d,dim",
    [(5, 16, 15), (20, 512, 400), (6, 3, 12), (4, 4, 4)],  # d > K*p (VOC, p=20), d < K, square
)
def test_gram_frame_keeps_every_inner_product(k, d, dim):
    t = _unit_rows(np.random.default_rng(k + d).standard_normal((k, d)))
    v = gram_frame(t, dim, seed=2)
    assert v.shape == (dim, k) and v.dtype == np.float32
    np.testing.assert_allclose(v.T @ v, t @ t.T, atol=2e-6)
    np.testing.assert_array_equal(v, gram_frame(t, dim, seed=2))  # deterministic
    assert not np.allclose(v, gram_frame(t, dim, seed=3))  # the seed places it
    with pytest.raises(ValueError, match="dim >= min"):
        gram_frame(t, min(k, d) - 1)


def test_gram_frame_of_the_etf_is_an_etf():
    # The ETF's own vectors give back the ETF's geometry: the two classifiers differ only
    # in the Gram matrix they are built from.
    m = simplex_etf(6, 30, seed=1)
    v = gram_frame(m.T, 30, seed=1)
    np.testing.assert_allclose(v.T @ v, m.T @ m, atol=2e-6)


class Pixels(nn.Module):
    """A trivial backbone: the pixels of a [B, H, W, 3] image as H*W tokens of 3 channels."""

    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(8)(x).reshape(x.shape[0], -1, 8)


def _config(path):
    c = default.get_config()
    c.model.pretrained = "none"
    c.model.embed_dim, c.model.proj_dim, c.model.num_heads = 8, P, 2
    c.model.attention_dropout = 0.0
    c.model.classifier = "text"
    c.model.text_embeddings = str(path)
    c.data.image_size = 4
    c.loss.warmup_epochs = 0
    return c


def _write(tmp_path, array, name="text.npy"):
    path = tmp_path / name
    np.save(path, array)
    return path


def test_text_classifier_has_the_text_geometry_and_stays_frozen(tmp_path):
    raw = np.random.default_rng(0).standard_normal((K, 10)).astype(np.float32) * 3.0
    c = _config(_write(tmp_path, raw))
    model = models.create_model(c, K, backbone=Pixels())
    tx, lr = optim.create_optimizer(c, total_steps=10)
    state = initial_train_state(c, model, tx, K)
    assert "classifier" in state.etf and "classifier" not in state.params
    v = np.asarray(state.etf["classifier"])
    assert v.shape == (K * P, K)
    t = _unit_rows(raw.astype(np.float64))
    np.testing.assert_allclose(v.T @ v, t @ t.T, atol=2e-6)  # the text cosines, not -1/(K-1)
    # The optimizer never sees it.
    assert all(leaf.shape != (K * P, K) for leaf in jax.tree.leaves(state.opt_state))

    loss_fn = objective.make_objective(c.loss, objective.ClassStats(np.array([4, 3, 2, 1]), 6))
    train_step = step.compile_train_step(
        model, tx, loss_fn, lr, family=get_family("mlcnc"), steps_per_epoch=5, ema_decay=0.9
    )
    r = np.random.default_rng(1)
    before = np.asarray(state.params["proj_kernel"])
    for _ in range(2):
        labels = np.eye(K, dtype=np.float32)[np.arange(B) % K]
        images = jnp.asarray(r.standard_normal((B, 4, 4, 3)), jnp.float32)
        state, _ = train_step(state, {"image": images, "labels": labels})
    np.testing.assert_array_equal(np.asarray(state.etf["classifier"]), v)
    assert not np.array_equal(np.asarray(state.params["proj_kernel"]), before)

    # logit_c = gamma <mu_b, v_c>, mu_b the concatenated unit projections.
    out = model.apply(state.variables(), images, train=False)
    mu = np.asarray(out["projected"], np.float64).reshape(B, K * P)
    gamma = float(state.params["logit_scale"])
    np.testing.assert_allclose(np.asarray(out["logits"]), gamma * mu @ v, rtol=1e-5, atol=1e-5)


def _tiny_clip():
    return ViT(
        patch_size=4,
        width=16,
        depth=1,
        num_heads=1,
        image_size=8,
        output_dim=12,
        activation="quick_gelu",
        ln_eps=1e-5,
        ln_pre=True,
        patch_bias=False,
    )


def test_wrong_text_embeddings_are_refused(tmp_path):
    missing = tmp_path / "nowhere" / "voc_lt_text.npy"
    c = _config(missing)
    c.data.name = "voc_lt"
    with pytest.raises(FileNotFoundError) as e:
        models.create_model(c, K, backbone=Pixels())
    message = str(e.value)
    assert str(missing) in message and f"[{K}, d]" in message
    assert "a photo of a" in message and "class order" in message

    c.model.text_embeddings = str(_write(tmp_path, np.ones((K + 1, 10), np.float32)))
    with pytest.raises(ValueError, match=rf"5 rows, but the dataset of voc_lt has K = {K} classes"):
        models.create_model(c, K, backbone=Pixels())

    # A CLIP backbone: the embeddings must live in its image-text space (proj's width, 12).
    c.model.text_embeddings = str(_write(tmp_path, np.ones((K, 10), np.float32)))
    with pytest.raises(ValueError, match="10-dimensional.*12-dimensional.*same CLIP"):
        models.create_model(c, K, backbone=_tiny_clip())
    c.model.text_embeddings = str(_write(tmp_path, np.ones((K, 12), np.float32)))
    assert models.create_model(c, K, backbone=_tiny_clip()).classifier == "text"

    for bad, words in (
        (np.ones(K, np.float32), r"shape \(4,\)"),
        (np.ones((K, 3), np.int64), "dtype int64"),
        (np.eye(K, 5, dtype=np.float32) * [[1], [0], [1], [1]], r"rows \[1\] are zero"),
        (np.full((K, 5), np.nan, np.float32), "not finite"),
    ):
        c.model.text_embeddings = str(_write(tmp_path, bad, "bad.npy"))
        with pytest.raises(ValueError, match=words):
            models.create_model(c, K, backbone=Pixels())

    # Without a path, the config check says so before anything is built.
    c.model.text_embeddings = ""
    assert any("needs config.model.text_embeddings" in p for p in configuration.problems(c))
