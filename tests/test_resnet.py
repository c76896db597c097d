"""Tests of the ResNet backbones: sizes, token shapes, dtypes, BatchNorm over devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcnc_jax.models.resnet import BACKBONES, ResNet, get_backbone


def _abstract_variables(model, size):
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    ("name", "expected"),
    # torchvision's parameter counts minus the fc layer (C * 1000 + 1000).
    [
        ("resnet18", 11_689_512 - 513_000),
        ("resnet34", 21_797_672 - 513_000),
        ("resnet50", 23_508_032),
        ("resnet101", 44_549_160 - 2_049_000),
    ],
)
def test_parameter_counts_match_torchvision(name, expected):
    variables = _abstract_variables(get_backbone(name), 64)
    assert _count(variables["params"]) == expected


@pytest.mark.parametrize(
    ("name", "size", "tokens", "channels"),
    [
        ("resnet18", 224, 49, 512),
        ("resnet50", 224, 49, 2048),
        ("resnet50", 64, 4, 2048),
        ("resnet_small", 64, 64, 128),
        ("resnet_small", 32, 16, 128),
        ("resnet_small_s2", 64, 16, 128),
    ],
)
def test_token_shapes(name, size, tokens, channels):
    model = get_backbone(name)
    variables = _abstract_variables(model, size)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.shape == (2, tokens, channels)
    assert out.dtype == jnp.float32


def test_tokens_are_the_feature_map_in_row_major_order():
    # Token n = h * W + w: compare with the same network's stage output read directly.
    model = get_backbone("resnet_small")
    x = jax.random.normal(jax.random.key(1), (1, 16, 16, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    tokens = model.apply(variables, x, train=False)
    feature_map = model.apply(
        variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
    )[1]["intermediates"]["layer4_0"]["__call__"][0]
    assert feature_map.shape == (1, 2, 2, 128)
    np.testing.assert_array_equal(tokens[0, 1], feature_map[0, 0, 1])
    np.testing.assert_array_equal(tokens[0, 2], feature_map[0, 1, 0])


def test_stride_2_stem_is_the_stride_1_stem_subsampled():
    # resnet_small_s2 has resnet_small's parameters; its stem conv (3x3, padding 1, stride 2)
    # equals resnet_small's stride-1 stem conv read at the even rows and columns.
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    small, s2 = get_backbone("resnet_small"), get_backbone("resnet_small_s2")
    variables = small.init(jax.random.key(0), x, train=False)
    assert jax.tree.structure(variables) == jax.tree.structure(
        s2.init(jax.random.key(0), x, train=False)
    )

    def stem(model):
        inter = model.apply(
            variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )[1]["intermediates"]
        return inter["conv1"]["__call__"][0]

    full, strided = stem(small), stem(s2)
    assert strided.shape == (2, 8, 8, 16)
    np.testing.assert_allclose(strided, full[:, ::2, ::2], rtol=1e-5, atol=1e-5)
    assert s2.apply(variables, x, train=False).shape == (2, 1, 128)


def test_bfloat16_compute_keeps_float32_params():
    model = get_backbone("resnet_small", dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32
    out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.dtype == jnp.bfloat16
    assert out.shape == (2, 4, 128)
    for leaf in jax.tree.leaves(updates["batch_stats"]):
        assert leaf.dtype == jnp.float32
    # Close to the float32 network on the same parameters.
    ref = get_backbone("resnet_small").apply(variables, x, train=False)
    got = model.apply(variables, x, train=False).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(got - ref))) < 0.1 * float(jnp.max(jnp.abs(ref)))


def test_train_mode_updates_running_statistics_with_torch_momentum():
    model = ResNet(stage_sizes=(1,), widths=(4,), stem="small")
    x = 3.0 + jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    # Stem BN sees the stem convolution output; running mean = 0.9 * 0 + 0.1 * batch mean.
    conv = np.asarray(
        jax.lax.conv_general_dilated(
            x,
            variables["params"]["conv1"]["kernel"],
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    )
    np.testing.assert_allclose(
        updates["batch_stats"]["bn1"]["mean"],
        0.1 * conv.mean(axis=(0, 1, 2)),
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        updates["batch_stats"]["bn1"]["var"],
        0.9 + 0.1 * conv.var(axis=(0, 1, 2)),
        rtol=1e-4,
    )


def test_pmap_axis_name_averages_batch_statistics_over_devices():
    n = jax.local_device_count()
    assert n == 8, "conftest sets 8 fake CPU devices"
    x = (
        jax.random.normal(jax.random.key(1), (n * 2, 8, 8, 3))
        * jnp.arange(1, n * 2 + 1)[:, None, None, None]
    )
    single = get_backbone("resnet_small")
    variables = single.init(jax.random.key(0), x[:2], train=False)
    _, ref = single.apply(variables, x, train=True, mutable=["batch_stats"])

    sharded = get_backbone("resnet_small", axis_name="batch")
    step = jax.pmap(
        lambda v, xb: sharded.apply(v, xb, train=True, mutable=["batch_stats"])[1],
        axis_name="batch",
    )
    replicated = jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), variables)
    got = step(replicated, x.reshape(n, 2, 8, 8, 3))
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got), strict=True):
        # Every device holds the statistics of the global batch.
        np.testing.assert_allclose(g, np.broadcast_to(r, g.shape), rtol=1e-4, atol=1e-5)


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="resnet50") as err:
        get_backbone("resnet51")
    for name in BACKBONES:
        assert name in str(err.value)
