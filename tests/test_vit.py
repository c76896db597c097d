"""Tests of the ViT backbone: shapes, options, dtypes and positional-embedding interpolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcnc_jax.models import vit
from mlcnc_jax.models.mlcnc import MLCNC
from mlcnc_jax.models.vit import (
    VIT_CONFIGS,
    Attention,
    ViT,
    get_vit,
    interpolate_pos_embedding,
    quick_gelu,
    resize_matrix,
)

# A CLIP-shaped tiny ViT (ln_pre, no patch bias, proj, QuickGELU, eps 1e-5).
TINY_CLIP = {
    "patch_size": 8,
    "width": 32,
    "depth": 1,
    "num_heads": 2,
    "image_size": 32,
    "output_dim": 24,
    "activation": "quick_gelu",
    "ln_eps": 1e-5,
    "ln_pre": True,
    "patch_bias": False,
}


def _abstract(model, size, batch=2):
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _numpy_params(model, size, seed=0):
    # Concrete params of the right tree, filled from numpy: jax's per-parameter random
    # init compiles slowly on CPU, and these tests need values, not the init scheme.
    rng = np.random.default_rng(seed)
    shapes = _abstract(model, size)["params"]
    return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), s.dtype), shapes)


def _images(h, w, batch=2, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, h, w, 3)), jnp.float32)


@pytest.mark.parametrize("name", sorted(VIT_CONFIGS))
def test_every_variant_shapes_and_dtypes(name):
    # Abstract evaluation only (no compilation, no memory), so the big variants stay cheap.
    cfg = VIT_CONFIGS[name]
    size, p, c = cfg["image_size"], cfg["patch_size"], cfg["width"]
    model = get_vit(name, axis_name="batch")
    variables = _abstract(model, size)
    assert set(variables) == {"params"}  # no batch statistics
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    bf16_cls = get_vit(name, dtype=jnp.bfloat16, class_token=True)

    def run(v, x):
        return model.apply(v, x, train=True), bf16_cls.apply(v, x, train=False)

    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    tokens, tokens_cls = jax.eval_shape(run, variables, x)
    assert tokens.shape == (2, (size // p) ** 2, c) and tokens.dtype == jnp.float32
    assert tokens_cls.shape == (2, 1 + (size // p) ** 2, c) and tokens_cls.dtype == jnp.bfloat16


def test_variant_settings():
    for name, cfg in VIT_CONFIGS.items():
        clip = name.startswith(("clip_", "openclip_"))
        assert cfg["ln_eps"] == (1e-5 if clip else 1e-6), name
        assert cfg.get("ln_pre", False) == clip and cfg.get("patch_bias", True) != clip, name
        assert cfg["activation"] == ("quick_gelu" if name.startswith("clip_") else "gelu"), name
        if clip:
            assert cfg["num_heads"] == cfg["width"] // 64, name
    cpu = VIT_CONFIGS["vit_cpu"]
    assert (cpu["image_size"] // cpu["patch_size"]) ** 2 == 64  # 64 tokens at 64 px
    cpu32 = VIT_CONFIGS["vit_cpu32"]
    assert (cpu32["image_size"], (cpu32["image_size"] // cpu32["patch_size"]) ** 2) == (32, 64)
    assert get_vit("clip_vit_l14", image_size=336).image_size == 336
    with pytest.raises(ValueError, match="unknown ViT backbone 'vit_h14'"):
        get_vit("vit_h14")


def test_init_gives_float32_params_of_the_documented_tree():
    model = get_vit("vit_cpu", depth=1, dtype=jnp.bfloat16)  # one block keeps compiling short
    x = jnp.zeros((1, 64, 64, 3))
    params = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)["params"]
    assert set(params) == {
        "conv1",
        "class_embedding",
        "positional_embedding",
        "resblocks_0",
        "ln_post",
    }
    assert params["conv1"]["kernel"].shape == (8, 8, 3, 128)
    assert params["positional_embedding"].shape == (65, 128)
    assert set(params["resblocks_0"]["attn"]) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert params["resblocks_0"]["mlp"]["c_fc"]["kernel"].shape == (128, 512)
    leaves = jax.tree.leaves(params)
    assert all(leaf.dtype == jnp.float32 and np.isfinite(leaf).all() for leaf in leaves)


def test_class_token_pooled_and_projected_tokens_agree():
    base = ViT(**TINY_CLIP)
    params = _numpy_params(base, 32)
    x = _images(32, 32)

    @jax.jit
    def run(params, x):
        v = {"params": params}
        return (
            base.apply(v, x),
            base.clone(class_token=True).apply(v, x),
            base.apply(v, x, pooled=True),
            base.clone(project_tokens=True, class_token=True).apply(v, x),
        )

    tokens, with_cls, pooled, projected = (np.asarray(a) for a in run(params, x))
    assert tokens.shape == (2, 16, 32) and with_cls.shape == (2, 17, 32)
    assert pooled.shape == (2, 24) and projected.shape == (2, 17, 24)
    np.testing.assert_allclose(with_cls[:, 1:], tokens, atol=1e-6)
    proj = np.asarray(params["proj"])
    np.testing.assert_allclose(pooled, with_cls[:, 0] @ proj, atol=1e-5)
    np.testing.assert_allclose(projected, with_cls @ proj, atol=1e-5)
    # ln_post output: every token has (about) the LayerNorm's statistics before its affine.
    scale, bias = (np.asarray(params["ln_post"][k]) for k in ("scale", "bias"))
    normalised = (tokens - bias) / scale
    np.testing.assert_allclose(normalised.mean(-1), 0.0, atol=1e-4)


def test_bfloat16_compute_is_close_to_float32():
    f32 = ViT(**TINY_CLIP)
    bf16 = f32.clone(dtype=jnp.bfloat16)
    params = _numpy_params(f32, 32)
    x = _images(32, 32)
    run = jax.jit(lambda p, x: (f32.apply({"params": p}, x), bf16.apply({"params": p}, x)))
    a, b = run(params, x)
    assert a.dtype == jnp.float32 and b.dtype == jnp.bfloat16
    a, b = np.asarray(a), np.asarray(b, np.float32)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()


def test_activation_switch():
    x = jnp.linspace(-4.0, 4.0, 9)
    np.testing.assert_allclose(quick_gelu(x), x / (1 + np.exp(-1.702 * np.asarray(x))), rtol=1e-6)
    quick = ViT(**TINY_CLIP)
    exact = quick.clone(activation="gelu")
    params = _numpy_params(quick, 32)
    run = jax.jit(lambda p, x: (quick.apply({"params": p}, x), exact.apply({"params": p}, x)))
    a, b = run(params, _images(32, 32))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    with pytest.raises(ValueError, match="unknown activation"):
        _abstract(quick.clone(activation="relu"), 32)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_resize_matrix_is_identity_at_the_native_size(method):
    for n in (1, 2, 7, 14):
        np.testing.assert_allclose(resize_matrix(n, n, method), np.eye(n), atol=1e-12)
    for n_in, n_out in ((4, 6), (14, 24), (7, 3)):
        # Each output is a weighted average: the weights sum to one.
        np.testing.assert_allclose(resize_matrix(n_in, n_out, method).sum(1), 1.0, atol=1e-12)


def test_interpolate_pos_embedding_keeps_class_row_and_native_grid():
    pos = jnp.asarray(np.random.default_rng(0).standard_normal((17, 5)), jnp.float32)
    assert interpolate_pos_embedding(pos, (4, 4)) is pos
    out = np.asarray(interpolate_pos_embedding(pos, (6, 3)))
    assert out.shape == (1 + 18, 5)
    np.testing.assert_array_equal(out[0], np.asarray(pos[0]))
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embedding(pos[:16], (4, 4))


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_interpolation_matches_torch(method):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for g, (h, w) in ((4, (6, 6)), (4, (5, 3)), (7, (14, 10)), (14, (7, 9)), (14, (24, 24))):
        pos = rng.standard_normal((1 + g * g, 3)).astype(np.float32)
        table = torch.from_numpy(pos[1:].reshape(1, g, g, 3)).permute(0, 3, 1, 2)
        ref = torch.nn.functional.interpolate(table, size=(h, w), mode=method, align_corners=False)
        ref = ref.permute(0, 2, 3, 1).reshape(h * w, 3).numpy()
        # The separable matrices reproduce torch to float64 rounding ...
        mine = np.einsum(
            "ih,hwc,jw->ijc",
            resize_matrix(g, h, method),
            pos[1:].reshape(g, g, 3).astype(np.float64),
            resize_matrix(g, w, method),
        )
        np.testing.assert_allclose(mine.reshape(h * w, 3), ref, atol=1e-5)
    # ... and the jax function applies them (one shape: each shape compiles anew).
    got = np.asarray(interpolate_pos_embedding(jnp.asarray(pos), (h, w), method))
    np.testing.assert_allclose(got[1:], ref, atol=1e-5)
    np.testing.assert_array_equal(got[0], pos[0])


def test_jax_cubic_resize_is_not_torchs_bicubic():
    # Why interpolate_pos_embedding keeps its own matrices: jax.image.resize's 'cubic'
    # (Keys a = -0.5, outside taps renormalised) is not torch's bicubic (a = -0.75, clamped).
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(0).standard_normal((14, 14, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(grid).permute(2, 0, 1)[None], size=(24, 24), mode="bicubic"
    )[0].permute(1, 2, 0)
    for antialias in (False, True):
        got = jax.image.resize(jnp.asarray(grid), (24, 24, 3), "cubic", antialias=antialias)
        assert np.abs(np.asarray(got) - ref.numpy())[4:-4, 4:-4].max() > 0.05


def _numpy_attention(x, p, heads, causal):
    # softmax(q k^T / sqrt(d)) v per head, written out in float64.
    b, n, c = x.shape
    dh = c // heads

    def proj(name, y):
        return y @ p[name]["kernel"].astype(np.float64) + p[name]["bias"]

    q, k, v = (proj(f"{s}_proj", x).reshape(b, n, heads, dh) for s in "qkv")
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
    if causal:
        logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, c)
    return proj("out_proj", out)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_a_numpy_reference(causal):
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    attn = Attention(16, 4, causal=causal)
    rng = np.random.default_rng(1)
    shapes = jax.eval_shape(lambda: attn.init(jax.random.key(0), x))["params"]
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.5, shapes)
    got = np.asarray(jax.jit(lambda p, x: attn.apply({"params": p}, x))(params, x))
    np.testing.assert_allclose(got, _numpy_attention(x, params, 4, causal), atol=1e-5)
    if causal:  # the first token sees only itself: later tokens do not change it
        x2 = x.copy()
        x2[:, 1:] += 1.0
        again = np.asarray(jax.jit(lambda p, x: attn.apply({"params": p}, x))(params, x2))
        np.testing.assert_allclose(again[:, 0], got[:, 0], atol=1e-6)


def test_attention_implementation_per_backend(monkeypatch):
    assert vit.attention_implementation(jnp.bfloat16, 64) == "xla"  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert vit.attention_implementation(jnp.bfloat16, 64) == "cudnn"
    assert vit.attention_implementation(jnp.float16, 128) == "cudnn"
    # cuDNN's fused kernel: half precision, head width a multiple of 8 up to 128.
    assert vit.attention_implementation(jnp.float32, 64) == "xla"
    assert vit.attention_implementation(jnp.bfloat16, 36) == "xla"
    assert vit.attention_implementation(jnp.bfloat16, 256) == "xla"


def test_any_resolution_runs():
    model = ViT(**TINY_CLIP)
    params = _numpy_params(model, 32)
    run = jax.jit(lambda p, x: model.apply({"params": p}, x))
    # 48x40 -> 6x5 patches; 37x20 is cropped to whole patches (4x2) as a strided conv does.
    assert run(params, _images(48, 40)).shape == (2, 30, 32)
    assert run(params, _images(37, 20)).shape == (2, 8, 32)


def test_configuration_errors():
    for bad, match in (
        ({"num_heads": 3}, "not divisible by num_heads"),
        ({"pos_interpolation": "nearest"}, "unknown pos_interpolation"),
        ({"output_dim": None, "project_tokens": True}, "project_tokens needs output_dim"),
        ({"image_size": 4}, "smaller than patch_size"),
    ):
        with pytest.raises(ValueError, match=match):
            _abstract(ViT(**{**TINY_CLIP, **bad}), 32)


def test_vit_cpu_under_the_mlcnc_head():
    model = MLCNC(backbone=get_vit("vit_cpu"), num_classes=5, embed_dim=32, proj_dim=4, num_heads=2)
    x = _images(64, 64)
    rng = np.random.default_rng(0)
    shapes = _abstract(model, 64)
    variables = jax.tree.map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes
    )
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert out["logits"].shape == (2, 5)
    assert out["attention"].shape == (2, 5, 64)  # attends over the 8 x 8 patch tokens
    assert np.isfinite(np.asarray(out["logits"])).all()


def test_hybrid_vit_is_the_resnet_stem_then_the_transformer_over_its_map():
    from mlcnc_jax.models import make_backbone
    from mlcnc_jax.models.resnet import ResNet, get_backbone

    hybrid = make_backbone("vit_hybrid_cpu32")
    x = _images(32, 32)
    variables = hybrid.init(jax.random.key(0), x, train=False)
    # The stem is resnet_small's stem and first two stages, parameter for parameter (so the
    # shipped trunk's first stages have the same tree), and the transformer is vit_cpu32's
    # with 2 x 2 patches of the 16 x 16 x 32 map.
    small = jax.eval_shape(
        lambda x: get_backbone("resnet_small").init(jax.random.key(0), x, False), x
    )
    for collection in ("params", "batch_stats"):
        stem = jax.tree.map(lambda a: a.shape, variables[collection]["stem"])
        full = jax.tree.map(lambda a: a.shape, small[collection])
        names = ("conv1", "bn1", "layer1_0", "layer2_0")
        assert stem == {k: full[k] for k in names if k in full}
    assert variables["params"]["vit"]["conv1"]["kernel"].shape == (2, 2, 32, 128)
    assert variables["params"]["vit"]["positional_embedding"].shape == (1 + 64, 128)

    # Its output is exactly the plain ViT applied to the stem's map.
    stem = ResNet((1, 1), widths=(16, 32), stem="small", flatten=False)
    vit = ViT(**{**VIT_CONFIGS["vit_cpu32"], "patch_size": 2, "image_size": 16})
    feature_map = stem.apply({c: variables[c]["stem"] for c in variables}, x, False)
    assert feature_map.shape == (2, 16, 16, 32)
    expected = vit.apply({"params": variables["params"]["vit"]}, feature_map)
    tokens = hybrid.apply(variables, x, train=False)
    assert tokens.shape == (2, 64, 128)
    np.testing.assert_allclose(np.asarray(tokens), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(tokens[0] - tokens[1]).mean()) > 0.1  # depends on the image

    # Training mode updates the stem's batch statistics.
    _, new = hybrid.apply(variables, x, train=True, mutable=["batch_stats"])
    old_mean = variables["batch_stats"]["stem"]["bn1"]["mean"]
    assert not np.allclose(np.asarray(new["batch_stats"]["stem"]["bn1"]["mean"]), old_mean)


def test_resnet_map_output_is_the_unflattened_tokens():
    from mlcnc_jax.models.resnet import ResNet

    x = _images(32, 32)
    flat = ResNet((1, 1), widths=(8, 16), stem="small")
    variables = flat.init(jax.random.key(0), x, False)
    tokens = flat.apply(variables, x, False)
    feature_map = ResNet((1, 1), widths=(8, 16), stem="small", flatten=False).apply(
        variables, x, False
    )
    np.testing.assert_array_equal(np.asarray(feature_map).reshape(tokens.shape), np.asarray(tokens))
