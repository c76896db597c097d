"""Tests of the MLC-NC model, the baseline and `create_model`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.default import get_config
from mlcnc_jax.etf import simplex_etf
from mlcnc_jax.models import create_model
from mlcnc_jax.models.mlcnc import COSINE_TEMPERATURE, MLCNC, Baseline
from mlcnc_jax.models.resnet import ResNet

K, D, P, HEADS = 5, 16, 3, 4
B, SIZE = 3, 6  # tiny stride-1 backbone: 36 tokens of 8 channels


def _backbone(dtype=jnp.float32):
    return ResNet(stage_sizes=(1,), widths=(8,), stem="small", dtype=dtype)


def _model(**kw):
    args = {
        "backbone": _backbone(kw.pop("dtype", jnp.float32)),
        "num_classes": K,
        "embed_dim": D,
        "proj_dim": P,
        "num_heads": HEADS,
        "etf_seed": 3,
    }
    args.update(kw)
    return MLCNC(**args)


def _images(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, SIZE, SIZE, 3))


def _init(model, x):
    return model.init(jax.random.key(0), x, train=False)


def _tokens(model, variables, x):
    """Embedded tokens (after the ReLU) of the model, for numpy references."""
    _, state = model.apply(
        variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    pre = state["intermediates"]["token_embed"]["__call__"][0]
    return np.maximum(np.asarray(pre, np.float64), 0.0)


def _normalize(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("attention", ["mha", "cosine"])
@pytest.mark.parametrize("classifier", ["etf", "etf_trainable", "linear"])
def test_output_shapes_dtypes_and_logits(attention, classifier):
    model = _model(attention=attention, classifier=classifier, logit_scale_init=2.5)
    x = _images()
    variables = _init(model, x)
    out = model.apply(variables, x, train=False)
    expected = {
        "logits": (B, K),
        "class_features": (B, K, D),
        "projected": (B, K, P),
        "attention": (B, K, SIZE * SIZE),
        "label_embedding": (K, D),
    }
    assert {k: v.shape for k, v in out.items()} == expected
    for v in out.values():
        assert v.dtype == jnp.float32
    attn = np.asarray(out["attention"])
    assert (attn >= 0).all()
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)

    # projected = normalize(F_c W_c + b_c), recomputed in numpy from the returned F.
    params = variables["params"]
    feats = np.asarray(out["class_features"], np.float64)
    z = np.einsum("bkd,kdp->bkp", feats, params["proj_kernel"]) + np.asarray(params["proj_bias"])
    np.testing.assert_allclose(out["projected"], _normalize(z), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["projected"], axis=-1), 1.0, atol=1e-5)

    mu = np.asarray(out["projected"], np.float64).reshape(B, K * P)  # concat over classes
    gamma = float(params["logit_scale"])
    assert gamma == 2.5
    if classifier == "etf":
        v = np.asarray(variables["etf"]["classifier"])
        np.testing.assert_array_equal(v, simplex_etf(K, K * P, seed=3))
        assert "classifier" not in params
        ref = gamma * mu @ v
    elif classifier == "etf_trainable":
        v = np.asarray(params["classifier"])
        np.testing.assert_array_equal(v, simplex_etf(K, K * P, seed=3))
        assert "classifier" not in variables["etf"]
        ref = gamma * mu @ v
    else:
        assert "classifier" not in variables["etf"]
        proj = np.asarray(out["projected"], np.float64)
        ref = gamma * (
            np.einsum("bkp,kp->bk", proj, params["classifier_kernel"])
            + np.asarray(params["classifier_bias"])
        )
    np.testing.assert_allclose(out["logits"], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["label_embedding"], simplex_etf(K, D, seed=3).T)
    np.testing.assert_array_equal(variables["etf"]["label_embedding"], out["label_embedding"])


def test_cosine_attention_matches_numpy():
    alpha = 1.7  # features are convex mixes of ReLU tokens, so all scaled
    model = _model(attention="cosine", alpha=alpha)
    x = _images(1)
    variables = _init(model, x)
    out = model.apply(variables, x, train=False)
    tokens = _tokens(model, variables, x)  # [B, N, D]
    label = simplex_etf(K, D, seed=3).T.astype(np.float64)
    cos = np.einsum("kd,bnd->bkn", _normalize(label), _normalize(tokens))
    weights = _softmax(cos / COSINE_TEMPERATURE)
    feats = np.einsum("bkn,bnd->bkd", weights, tokens)
    feats = np.where(feats > 0, alpha * feats, feats)
    np.testing.assert_allclose(out["attention"], weights, atol=1e-5)
    np.testing.assert_allclose(out["class_features"], feats, rtol=1e-4, atol=1e-5)
    assert not any(k in variables["params"] for k in ("query", "key", "value", "out"))


def test_mha_matches_numpy_in_eval_mode():
    alpha = 0.6  # MHA features have both signs: only the positive ones are scaled
    model = _model(attention="mha", alpha=alpha)
    x = _images(2)
    variables = _init(model, x)
    out = model.apply(variables, x, train=False)
    tokens = _tokens(model, variables, x)
    prm = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    label = simplex_etf(K, D, seed=3).T.astype(np.float64)
    dh = D // HEADS

    def lin(name, a):
        return a @ prm[name]["kernel"] + prm[name]["bias"]

    q = lin("query", label).reshape(K, HEADS, dh)
    k = lin("key", tokens).reshape(B, -1, HEADS, dh)
    v = lin("value", tokens).reshape(B, -1, HEADS, dh)
    heads, maps = [], []
    for h in range(HEADS):
        w = _softmax(np.einsum("kd,bnd->bkn", q[:, h], k[:, :, h]) / np.sqrt(dh))
        maps.append(w)
        heads.append(np.einsum("bkn,bnd->bkd", w, v[:, :, h]))
    feats = lin("out", np.concatenate(heads, axis=-1))
    assert (feats < 0).any() and (feats > 0).any()
    feats = np.where(feats > 0, alpha * feats, feats)
    np.testing.assert_allclose(out["class_features"], feats, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["attention"], np.mean(maps, axis=0), atol=1e-6)


def test_attention_dropout_only_in_training():
    model = _model(attention="mha", attention_dropout=0.5)
    x = _images()
    variables = _init(model, x)
    a = model.apply(variables, x, train=False)["class_features"]
    b = model.apply(variables, x, train=False)["class_features"]
    np.testing.assert_array_equal(a, b)

    def train(seed):
        return model.apply(
            variables,
            x,
            train=True,
            rngs={"dropout": jax.random.key(seed)},
            mutable=["batch_stats"],
        )[0]["class_features"]

    np.testing.assert_array_equal(train(1), train(1))
    assert np.abs(train(1) - train(2)).max() > 1e-4
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, x, train=True, mutable=["batch_stats"])


def _train_steps(model, variables, steps=3):
    """A few Adam steps on a loss of the outputs; gradients w.r.t. params only."""
    x = _images(4)
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 2, (B, K)), jnp.float32)
    tx = optax.adam(1e-2)
    params = variables["params"]
    frozen = {k: v for k, v in variables.items() if k != "params"}
    opt_state = tx.init(params)

    def loss_fn(params, frozen, rng):
        out, updates = model.apply(
            {"params": params, **frozen},
            x,
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        cos = jnp.sum(out["class_features"] * out["label_embedding"], -1) / jnp.linalg.norm(
            out["class_features"], axis=-1
        ).clip(1e-6)
        loss = optax.sigmoid_binary_cross_entropy(out["logits"], labels).mean() - cos.mean()
        return loss, updates

    @jax.jit
    def step(params, frozen, opt_state, rng):
        grads, updates = jax.grad(loss_fn, has_aux=True)(params, frozen, rng)
        upd, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), {**frozen, **updates}, opt_state

    for i in range(steps):
        params, frozen, opt_state = step(params, frozen, opt_state, jax.random.key(i))
    return {"params": params, **frozen}, opt_state


def test_frozen_etf_is_untouched_by_training_and_absent_from_optimizer():
    model = _model(classifier="etf")
    variables = _init(model, _images())
    before = jax.tree.map(np.array, variables["etf"])
    trained, opt_state = _train_steps(model, variables)

    for name in ("label_embedding", "classifier"):
        assert trained["etf"][name].tobytes() == before[name].tobytes()
    # Training did happen.
    assert not np.array_equal(trained["params"]["proj_kernel"], variables["params"]["proj_kernel"])
    assert not np.array_equal(trained["params"]["logit_scale"], variables["params"]["logit_scale"])

    frozen_shapes = {(K, D), (K * P, K)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state):
        key = jax.tree_util.keystr(path)
        assert "label_embedding" not in key and "classifier" not in key, key
        assert tuple(np.shape(leaf)) not in frozen_shapes, key


def test_trainable_etf_classifier_is_a_param_and_trains():
    model = _model(classifier="etf_trainable")
    variables = _init(model, _images())
    assert set(variables["etf"]) == {"label_embedding"}
    trained, opt_state = _train_steps(model, variables)
    assert not np.array_equal(trained["params"]["classifier"], variables["params"]["classifier"])
    np.testing.assert_array_equal(
        trained["etf"]["label_embedding"], variables["etf"]["label_embedding"]
    )
    # The optimizer now tracks the classifier (Adam's two moments).
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(opt_state)]
    assert sum("'classifier'" in p for p in paths) == 2


def test_bfloat16_compute_gives_float32_outputs_and_params():
    model = _model(dtype=jnp.bfloat16)
    x = _images()
    variables = _init(model, x)
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32
    out = model.apply(variables, x, train=False)
    for v in out.values():
        assert v.dtype == jnp.float32
    ref = _model().apply(variables, x, train=False)
    np.testing.assert_allclose(out["projected"], ref["projected"], atol=0.1)


def test_baseline_pools_tokens_and_classifies():
    model = Baseline(backbone=_backbone(), num_classes=K)
    x = _images()
    variables = _init(model, x)
    out = model.apply(variables, x, train=False)
    tokens = np.asarray(
        _backbone().apply(
            {
                "params": variables["params"]["backbone"],
                "batch_stats": variables["batch_stats"]["backbone"],
            },
            x,
            train=False,
        )
    )
    feats = tokens.mean(axis=1)
    np.testing.assert_allclose(out["features"], feats, rtol=1e-5, atol=1e-6)
    w = variables["params"]["classifier"]
    np.testing.assert_allclose(out["logits"], feats @ w["kernel"] + w["bias"], rtol=1e-5, atol=1e-5)
    assert out["logits"].shape == (B, K) and out["logits"].dtype == jnp.float32


def test_create_model_reads_the_config():
    config = get_config()
    config.model.embed_dim = 96
    model = create_model(config, num_classes=20, axis_name="batch")
    assert isinstance(model, MLCNC)
    assert model.num_classes == 20 and model.embed_dim == 96 and model.proj_dim == 20
    assert model.attention == "mha" and model.classifier == "etf" and model.num_heads == 8
    assert model.backbone.axis_name == "batch"
    assert model.backbone.widths == (16, 32, 64, 128)

    config.dtype = "bfloat16"
    config.model.name = "baseline"
    config.model.backbone = "resnet18"
    model = create_model(config, num_classes=7)
    assert isinstance(model, Baseline)
    assert model.dtype == jnp.bfloat16 and model.backbone.dtype == jnp.bfloat16
    assert model.backbone.axis_name is None


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [
        ("dtype", "float16", "bfloat16"),
        ("model.name", "vit", "baseline"),
        ("model.backbone", "resnet152", "resnet_small"),
        ("model.attention", "linear", "cosine"),
        ("model.classifier", "mlp", "etf_trainable"),
    ],
)
def test_create_model_rejects_unknown_values(field, value, valid):
    config = get_config()
    if field == "dtype":
        config.dtype = value
    else:
        setattr(config.model, field.split(".")[1], value)
    with pytest.raises(ValueError, match=valid) as err:
        create_model(config, num_classes=4)
    assert repr(value) in str(err.value)


def test_heads_must_divide_embed_dim():
    model = _model(num_heads=5)
    with pytest.raises(ValueError, match="divisible"):
        _init(model, _images())
