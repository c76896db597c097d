"""ImageNet-21k ViT weights (Google .npz, timm naming) against timm's VisionTransformer.

Random weights in a tiny timm VisionTransformer (the reference forward pass); its state dict
is the timm file, and the Google .npz is written from it in the original release's naming
and checked to be what timm's own .npz reader (`_load_weights`) reads back.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_extras

from configs import voc_lt
from mlcnc_jax import backbone_weights, cli
from mlcnc_jax.models import vit_weights
from mlcnc_jax.models.mlcnc import MLCNC
from mlcnc_jax.models.vit import ViT

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

# (image size, patch, width, depth, heads)
CASE = (32, 8, 64, 2, 2)


def _timm_vit(img_size, patch, width, depth, heads, seed=0):
    timm = torch_extras.timm()
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        num_classes=5,
        global_pool="token",
    )
    del timm
    with torch.no_grad():  # every parameter random, O(1) activations
        for name, p in model.named_parameters():
            r = torch.randn_like(p)
            if name.endswith("weight") and p.ndim == 1:
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.2 * r)
            elif name in ("cls_token", "pos_embed"):
                p.copy_(0.5 * r)
            else:
                p.copy_(p[0].numel() ** -0.5 * r)
    return model.eval()


def _google_npz(model, path, heads):
    # The original vision_transformer release's names and shapes (what timm's reader reads).
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    c = sd["cls_token"].shape[-1]
    dh = c // heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = g + "MultiHeadDotProductAttention_1/"
        q, k, v = np.split(sd[b + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd[b + "attn.qkv.bias"], 3)
        for name, w, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[mha + name + "/kernel"] = w.T.reshape(c, heads, dh)
            out[mha + name + "/bias"] = bias.reshape(heads, dh)
        out[mha + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, dh, c)
        out[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for src, dst in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            out[g + dst + "/scale"] = sd[b + src + ".weight"]
            out[g + dst + "/bias"] = sd[b + src + ".bias"]
        for src, dst in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            out[g + "MlpBlock_3/" + dst + "/kernel"] = sd[b + f"mlp.{src}.weight"].T
            out[g + "MlpBlock_3/" + dst + "/bias"] = sd[b + f"mlp.{src}.bias"]
        i += 1
    np.savez(path, **out)
    return out


def _flax(img_size, patch, width, depth, heads, **kw):
    return ViT(
        patch_size=patch,
        width=width,
        depth=depth,
        num_heads=heads,
        image_size=img_size,
        **{"class_token": True, **kw},
    )


def _compare(model, vit, params, size):
    x = np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = model.forward_features(torch.from_numpy(x)).numpy()
    got = jax.jit(lambda p, x: vit.apply({"params": p}, x))(params, x.transpose(0, 2, 3, 1))
    assert np.abs(ref).max() > 0.5
    return float(np.abs(np.asarray(got) - ref).max())


def test_timm_and_google_layouts_match_timms_vit(tmp_path):
    model = _timm_vit(*CASE)
    vit = _flax(*CASE)
    st = tmp_path / "model.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    diff = _compare(model, vit, vit_weights.load_vit_params(str(st), vit), 32)
    print(f"timm layout: max |tokens diff| {diff:.2e}")
    assert diff < 1e-4
    npz = tmp_path / "B_tiny-i21k.npz"
    _google_npz(model, npz, heads=CASE[4])
    # The file is Google's format as timm reads it: timm's reader rebuilds the same model.
    from timm.models.vision_transformer import _load_weights

    again = _timm_vit(*CASE, seed=9)
    _load_weights(again, str(npz))
    for name, p in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name].numpy(), p.numpy(), err_msg=name)
    diff = _compare(model, vit, vit_weights.load_vit_params(str(npz), vit), 32)
    print(f"google .npz: max |tokens diff| {diff:.2e}")
    assert diff < 1e-4
    # The heads show in Google's kernels: a backbone with other heads is refused.
    with pytest.raises(ValueError, match="heads: weights 2 vs backbone 4"):
        vit_weights.load_vit_params(str(npz), _flax(*CASE[:4], 4))


def test_another_image_size_resizes_the_position_embedding_as_timm(tmp_path):
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import _load_weights

    model = _timm_vit(*CASE)
    npz = tmp_path / "vit.npz"
    _google_npz(model, npz, heads=CASE[4])
    # timm's .npz reader resizes bilinearly: a 48 px model (6 x 6 grid) from the 4 x 4 one.
    big = _timm_vit(48, *CASE[1:], seed=3)
    _load_weights(big, str(npz))
    vit = _flax(48, *CASE[1:], pos_interpolation="bilinear")
    diff = _compare(big, vit, vit_weights.load_vit_params(str(npz), vit), 48)
    print(f"google .npz at 48 px (bilinear): max |tokens diff| {diff:.2e}")
    assert diff < 1e-4
    # The default bicubic resize equals timm's (torch's) bicubic, up and down.
    pos = model.pos_embed.detach()
    for size in (48, 24):
        vit = _flax(size, *CASE[1:])
        got = vit_weights.load_vit_params(str(npz), vit)["positional_embedding"]
        g = size // CASE[1]
        want = resample_abs_pos_embed(pos, (g, g), (4, 4), 1, "bicubic", antialias=False)
        np.testing.assert_allclose(np.asarray(got), want[0].numpy(), atol=1e-5)


def test_big_vision_naming_and_stacked_blocks_read_the_same(tmp_path):
    model = _timm_vit(*CASE)
    original = _google_npz(model, tmp_path / "orig.npz", heads=CASE[4])
    renamed = {}
    for key, value in original.items():
        key = key.replace("Transformer/posembed_input/pos_embedding", "pos_embedding")
        key = key.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
        key = key.replace("MlpBlock_3", "MlpBlock_0").replace("LayerNorm_2", "LayerNorm_1")
        renamed[key] = value
    stacked = {}
    for key, value in renamed.items():
        if key.startswith("Transformer/encoderblock_0/"):
            leaf = key.removeprefix("Transformer/encoderblock_0/")
            rows = [renamed[f"Transformer/encoderblock_{i}/{leaf}"] for i in range(CASE[3])]
            stacked[f"params/Transformer/encoderblock/{leaf}"] = np.stack(rows)
        elif not key.startswith("Transformer/encoderblock_"):
            stacked[f"params/{key}"] = value
    np.savez(tmp_path / "bv.npz", **stacked)
    vit = _flax(*CASE)
    a = vit_weights.load_vit_params(str(tmp_path / "orig.npz"), vit)
    b = vit_weights.load_vit_params(str(tmp_path / "bv.npz"), vit)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_load_pretrained_fills_only_the_backbone_and_a_missing_file_stops_first(tmp_path):
    model = _timm_vit(*CASE)
    npz = tmp_path / "vit.npz"
    _google_npz(model, npz, heads=CASE[4])
    vit = _flax(*CASE, class_token=False)
    mlcnc = MLCNC(backbone=vit, num_classes=3, embed_dim=64, proj_dim=4, num_heads=2)
    x = jnp.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(lambda: mlcnc.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)
    loaded = backbone_weights.load_pretrained(dict(variables), str(npz), backbone=vit)
    want = vit_weights.load_vit_params(str(npz), vit)
    jax.tree.map(np.testing.assert_array_equal, loaded["params"]["backbone"], want)
    np.testing.assert_array_equal(
        loaded["params"]["proj_kernel"], variables["params"]["proj_kernel"]
    )

    config = voc_lt.get_config()
    config.model.backbone, config.model.embed_dim = "vit_b16", 768
    missing = tmp_path / "weights" / "B_16-i21k.npz"
    config.model.pretrained = str(missing)
    config.data.root = str(tmp_path / "no_data")  # the weights are checked before the data
    with pytest.raises(FileNotFoundError) as e:
        cli.run(config, str(tmp_path / "work"), "train")
    message = str(e.value)
    assert str(missing) in message and "vit_b16" in message
    assert "gs://vit_models/augreg/B_16-i21k-300ep" in message
    assert "timm/vit_base_patch16_224.augreg_in21k" in message and "never downloaded" in message
