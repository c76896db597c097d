"""CLIP ViT -> Flax conversion, checked against an independent PyTorch forward pass."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcnc_jax.models.clip import (
    ClipVisionArch,
    convert_clip_visual,
    infer_clip_architecture,
    load_clip_backbone,
    load_clip_params,
    load_clip_state_dict,
)
from mlcnc_jax.models.mlcnc import MLCNC
from mlcnc_jax.models.vit import ViT, get_vit

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional
safetensors_torch = pytest.importorskip("safetensors.torch")


# --- Reference: CLIP's ViT image encoder written from the architecture ------------------------


class TorchQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class TorchBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = nn.MultiheadAttention(width, heads)  # packed in_proj, as in CLIP's files
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = nn.Sequential(
            collections.OrderedDict(
                c_fc=nn.Linear(width, 4 * width),
                gelu=TorchQuickGELU(),
                c_proj=nn.Linear(4 * width, width),
            )
        )

    def forward(self, x):  # x: [L, B, C], sequence first as nn.MultiheadAttention expects
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TorchTransformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[TorchBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class TorchClipVisual(nn.Module):
    """Patch conv, class token, positional embedding, ln_pre, blocks, ln_post, proj."""

    def __init__(self, resolution, patch, width, layers, heads, output_dim):
        super().__init__()
        self.patch = patch
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        grid = self.grid = resolution // patch
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=1e-5)
        self.transformer = TorchTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width, eps=1e-5)
        self.proj = nn.Parameter(torch.randn(width, output_dim))

    def pos_embedding(self, gh: int, gw: int):
        pos = self.positional_embedding
        g = self.grid
        if (gh, gw) == (g, g):
            return pos
        table = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, C, g, g]
        table = F.interpolate(table, size=(gh, gw), mode="bicubic", align_corners=False)
        table = table.permute(0, 2, 3, 1).reshape(gh * gw, -1)
        return torch.cat([pos[:1], table], dim=0)

    def forward(self, images):  # images [B, 3, H, W]
        x = self.conv1(images)  # [B, C, gh, gw]
        b, c, gh, gw = x.shape
        x = x.reshape(b, c, gh * gw).permute(0, 2, 1)  # [B, N, C]
        cls = self.class_embedding.reshape(1, 1, c).expand(b, 1, c)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding(gh, gw)
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_post(x)  # per token; CLIP pools the class token of this
        return x, x[:, 0] @ self.proj


def _random_clip(resolution, patch, width, layers, heads, output_dim, seed):
    torch.manual_seed(seed)
    model = TorchClipVisual(resolution, patch, width, layers, heads, output_dim)
    with torch.no_grad():
        # Random everything (LayerNorm affine and biases too), so that a swapped or
        # dropped parameter changes the output; scales keep activations O(1).
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 1:  # LayerNorm scale
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            elif name in ("class_embedding", "positional_embedding"):
                p.copy_(0.5 * torch.randn_like(p))
            elif name == "proj":
                p.copy_(width**-0.5 * torch.randn_like(p))
            else:  # conv and linear weights
                fan_in = p[0].numel()
                p.copy_(fan_in**-0.5 * torch.randn_like(p))
    return model.eval()


def _full_clip_state(visual):
    # A full CLIP model: visual tower under 'visual.', plus text-tower keys whose names
    # ('transformer.resblocks.*') collide with the visual ones and must be ignored.
    state = {f"visual.{k}": v.detach().clone().contiguous() for k, v in visual.state_dict().items()}
    state["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(3 * 16, 16)
    state["token_embedding.weight"] = torch.randn(10, 16)
    state["logit_scale"] = torch.tensor(4.6)
    return state


def _flax_vit(resolution, patch, width, layers, heads, output_dim, **kw):
    return ViT(
        patch_size=patch,
        width=width,
        depth=layers,
        num_heads=heads,
        image_size=resolution,
        output_dim=output_dim,
        activation="quick_gelu",
        ln_eps=1e-5,
        ln_pre=True,
        patch_bias=False,
        **kw,
    )


@functools.partial(jax.jit, static_argnums=0)
def _both(vit, params, images):
    # One compiled program per (module, input shape) for both outputs; op-by-op dispatch
    # and a fresh jit per call would compile far more.
    return vit.apply({"params": params}, images), vit.apply({"params": params}, images, pooled=True)


def _apply_both(vit, params, images):
    return (np.asarray(a) for a in _both(vit, params, images))


def _compare(torch_model, vit, params, hw):
    x = np.random.default_rng(1).standard_normal((2, 3, *hw)).astype(np.float32)
    with torch.no_grad():
        ref_tokens, ref_pooled = (t.numpy() for t in torch_model(torch.from_numpy(x)))
    tokens, pooled = _apply_both(vit, params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert tokens.shape == (2, ref_tokens.shape[1] - 1, ref_tokens.shape[2])
    assert np.abs(ref_tokens).max() > 0.5  # not a comparison of near-zero outputs
    token_diff = float(np.abs(tokens - ref_tokens[:, 1:]).max())
    pooled_diff = float(np.abs(pooled - ref_pooled).max())
    return token_diff, pooled_diff


# (resolution, patch, width, layers, heads, output_dim): heads != width/64 in the first,
# CLIP's heads = width / 64 in the second.
CASES = [(32, 8, 64, 2, 4, 32), (32, 8, 128, 2, 2, 48)]
# Native 32 px (4x4 grid); 48 px (6x6, upsampled); 40x24 (5x3: up one axis, down the other).
SIZES = {"heads4": [(32, 32), (40, 24)], "clip_heads": [(32, 32), (48, 48), (40, 24)]}


@pytest.mark.parametrize("case_id", ["heads4", "clip_heads"])
def test_tokens_and_pooled_match_torch_native_and_interpolated(case_id, tmp_path):
    case = CASES[0] if case_id == "heads4" else CASES[1]
    torch_model = _random_clip(*case, seed=0)
    path = tmp_path / "clip.safetensors"
    safetensors_torch.save_file(_full_clip_state(torch_model), str(path))
    params = jax.tree.map(jnp.asarray, convert_clip_visual(load_clip_state_dict(str(path))))
    vit = _flax_vit(*case)
    for hw in SIZES[case_id]:
        token_diff, pooled_diff = _compare(torch_model, vit, params, hw)
        print(f"{case_id} {hw}: max |tokens diff| {token_diff:.2e}, pooled {pooled_diff:.2e}")
        assert token_diff < 1e-4, (hw, token_diff)
        assert pooled_diff < 1e-4, (hw, pooled_diff)


def test_load_clip_params_checks_heads_and_reads_pt_and_torchscript(tmp_path):
    case = CASES[1]
    torch_model = _random_clip(*case, seed=1)
    vit = _flax_vit(*case)

    # A pickled visual-only state dict in half precision, as released weights are.
    half = {k: v.half() for k, v in torch_model.state_dict().items()}
    pth = tmp_path / "visual.pth"
    torch.save(half, str(pth))
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            p.copy_(half[name].float())
    token_diff, pooled_diff = _compare(torch_model, vit, load_clip_params(str(pth), vit), (32, 32))
    assert token_diff < 1e-4 and pooled_diff < 1e-4

    # A TorchScript archive of the full model (the format of OpenAI's .pt files).
    class Wrapper(nn.Module):
        def __init__(self, visual):
            super().__init__()
            self.visual = visual
            self.logit_scale = nn.Parameter(torch.tensor(4.6))

        def forward(self, x):
            return self.visual(x)[1] * self.logit_scale

    scripted = torch.jit.trace(Wrapper(torch_model), torch.zeros(1, 3, 32, 32))
    pt = tmp_path / "ViT-tiny.pt"
    torch.jit.save(scripted, str(pt))
    token_diff, pooled_diff = _compare(torch_model, vit, load_clip_params(str(pt), vit), (32, 32))
    assert token_diff < 1e-4 and pooled_diff < 1e-4

    # Same shapes, different head count: only the module check can see it.
    wrong_heads = _flax_vit(*case[:4], 4, case[5])
    with pytest.raises(ValueError, match="heads: weights 2 vs backbone 4"):
        load_clip_params(str(pth), wrong_heads)


def test_bfloat16_safetensors_are_read_as_float32(tmp_path):
    path = tmp_path / "bf16.safetensors"
    state = {"conv1.weight": torch.randn(8, 3, 4, 4), "positional_embedding": torch.randn(5, 8)}
    safetensors_torch.save_file({k: v.bfloat16() for k, v in state.items()}, str(path))
    loaded = load_clip_state_dict(str(path))
    assert loaded["conv1.weight"].dtype == np.float32
    np.testing.assert_array_equal(
        loaded["positional_embedding"], state["positional_embedding"].bfloat16().float().numpy()
    )


def _shape_only_state(width, layers, patch, resolution, output_dim):
    # Zero-strided views: the full-size key layout of a CLIP ViT without its memory.
    def z(*shape):
        return np.broadcast_to(np.zeros((), np.float32), shape)

    g = resolution // patch
    state = {
        "conv1.weight": z(width, 3, patch, patch),
        "class_embedding": z(width),
        "positional_embedding": z(g * g + 1, width),
        "ln_pre.weight": z(width),
        "ln_pre.bias": z(width),
        "ln_post.weight": z(width),
        "ln_post.bias": z(width),
        "proj": z(width, output_dim),
    }
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        state.update(
            {
                b + "ln_1.weight": z(width),
                b + "ln_1.bias": z(width),
                b + "attn.in_proj_weight": z(3 * width, width),
                b + "attn.in_proj_bias": z(3 * width),
                b + "attn.out_proj.weight": z(width, width),
                b + "attn.out_proj.bias": z(width),
                b + "ln_2.weight": z(width),
                b + "ln_2.bias": z(width),
                b + "mlp.c_fc.weight": z(4 * width, width),
                b + "mlp.c_fc.bias": z(4 * width),
                b + "mlp.c_proj.weight": z(width, 4 * width),
                b + "mlp.c_proj.bias": z(width),
            }
        )
    return state


@pytest.mark.parametrize(
    "name,arch",
    [
        ("clip_vit_b16", (768, 12, 16, 224, 512)),
        ("clip_vit_b32", (768, 12, 32, 224, 512)),
        ("clip_vit_l14", (1024, 24, 14, 224, 768)),
    ],
)
def test_full_size_layouts_convert_to_the_variant_param_tree(name, arch):
    state = _shape_only_state(*arch)
    width, layers, patch, resolution, output_dim = arch
    assert infer_clip_architecture(state) == ClipVisionArch(
        width, layers, patch, resolution, width // 64, 4 * width, output_dim
    )
    converted = convert_clip_visual(state)
    vit = get_vit(name)
    shapes = jax.eval_shape(
        lambda: vit.init(jax.random.key(0), jnp.zeros((1, resolution, resolution, 3)))
    )["params"]
    want = {
        jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(shapes)
    }
    got = {
        jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(converted)
    }
    assert got == want


def _numpy_init(model, x, seed=0):
    # Variables of the right tree and shapes, filled from numpy: jax's per-parameter
    # random init compiles slowly on CPU, and the values do not matter here.
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), shapes)


def _tiny_mlcnc(backbone):
    return MLCNC(backbone=backbone, num_classes=3, embed_dim=16, proj_dim=4, num_heads=2)


def test_load_clip_backbone_replaces_only_the_backbone(tmp_path):
    case = (32, 8, 64, 1, 1, 32)  # one block: the model init is compiled, keep it small
    torch_model = _random_clip(*case, seed=2)
    path = tmp_path / "clip.safetensors"
    safetensors_torch.save_file(_full_clip_state(torch_model), str(path))
    vit = _flax_vit(*case)
    model = _tiny_mlcnc(vit)
    x = jnp.zeros((1, 32, 32, 3))
    variables = _numpy_init(model, x)
    sd = torch_model.state_dict()
    for kwargs in ({}, {"backbone": vit}):
        loaded = load_clip_backbone(str(path), variables, **kwargs)
        np.testing.assert_array_equal(
            loaded["params"]["backbone"]["resblocks_0"]["attn"]["k_proj"]["kernel"],
            sd["transformer.resblocks.0.attn.in_proj_weight"].numpy()[64:128].T,
        )
        for name in ("token_embed", "proj_kernel", "logit_scale"):
            np.testing.assert_array_equal(loaded["params"][name], variables["params"][name])
        np.testing.assert_array_equal(
            loaded["etf"]["label_embedding"], variables["etf"]["label_embedding"]
        )
    # The input is not modified, and the result is usable as is.
    assert not np.array_equal(variables["params"]["backbone"]["proj"], sd["proj"].numpy())
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(loaded, x)
    assert np.isfinite(np.asarray(out["logits"])).all()


def test_missing_file_says_what_to_put_where(tmp_path):
    missing = tmp_path / "weights" / "ViT-B-16.pt"
    variables = jax.eval_shape(
        lambda: _tiny_mlcnc(get_vit("clip_vit_b16")).init(
            jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False
        )
    )
    with pytest.raises(FileNotFoundError) as err:
        load_clip_backbone(str(missing), variables)
    message = str(err.value)
    assert str(missing) in message
    assert "ViT-B-16.pt" in message and "never downloaded" in message
    assert "width 768, 12 layers, patch 16, 224 px" in message


def test_wrong_architecture_names_the_mismatch(tmp_path):
    torch_model = _random_clip(32, 8, 64, 2, 1, 32, seed=3)
    path = tmp_path / "clip.safetensors"
    safetensors_torch.save_file(_full_clip_state(torch_model), str(path))
    other = _flax_vit(32, 4, 64, 3, 1, 32)  # patch 4 and 3 layers instead of 8 and 2
    variables = jax.eval_shape(
        lambda: _tiny_mlcnc(other).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    for kwargs in ({}, {"backbone": other}):
        with pytest.raises(ValueError) as err:
            load_clip_backbone(str(path), variables, **kwargs)
        message = str(err.value)
        assert str(path) in message
        assert "patch_size: weights 8 vs backbone 4" in message
        assert "layers: weights 2 vs backbone 3" in message
        assert "width" not in message.split("the weights are")[0]  # only real differences
    with pytest.raises(ValueError, match="ln_pre"):
        load_clip_params(str(path), _flax_vit(32, 8, 64, 2, 1, 32).clone(ln_pre=False))


def test_unsupported_files_are_named(tmp_path):
    resnet = tmp_path / "rn50.safetensors"
    safetensors_torch.save_file(
        {
            "visual.conv1.weight": torch.zeros(4, 3, 3, 3),
            "visual.layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1),
        },
        str(resnet),
    )
    with pytest.raises(ValueError, match="ModifiedResNet"):
        load_clip_state_dict(str(resnet))
    onnx = tmp_path / "clip.onnx"
    onnx.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported CLIP weights file"):
        load_clip_state_dict(str(onnx))
    # open_clip's layer scale has no counterpart in the ViT: refuse rather than drop it.
    state = _shape_only_state(64, 1, 8, 32, 32)
    state["transformer.resblocks.0.ls_1.gamma"] = np.ones(64, np.float32)
    with pytest.raises(ValueError, match=r"ls_1\.gamma"):
        convert_clip_visual(state)
