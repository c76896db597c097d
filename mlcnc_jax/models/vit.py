"""Pre-LN Vision Transformer backbones (standard ViT and CLIP's image encoder).

The trunk returns the transformer's tokens after the final LayerNorm, [B, N, C],
so the MLC-NC head can attend over the patch tokens exactly as over a ResNet's
last-stage feature map.

Module and parameter names follow OpenAI CLIP's visual tower
(`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`,
`transformer.resblocks.{i}` -> `resblocks_{i}`, `ln_post`, `proj`) so that
`mlcnc_jax.models.clip` converts CLIP weights one to one. The only layout change
is that attention has separate `q_proj`, `k_proj`, `v_proj` projections where
torch packs them into one `in_proj` matrix.

Attention runs through `jax.nn.dot_product_attention`: cuDNN's fused kernel on an NVIDIA
GPU in half precision, XLA's everywhere else (`attention_implementation`).

Positional-embedding interpolation: the positional embedding is stored for the
grid of `image_size // patch_size` patches per side. An input of another size
gets its grid resized on the fly in the forward pass (the class-token row is
kept as is), with the same kernel as
`torch.nn.functional.interpolate(grid, size, mode='bicubic', align_corners=False)`
(Keys cubic convolution, a = -0.75, borders clamped, no antialiasing), or the
matching 'bilinear' mode. Any input resolution therefore works; inputs whose side
is not a multiple of the patch size are cropped at the bottom/right, as a strided
convolution does.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ACTIVATIONS = ("gelu", "quick_gelu")
POS_INTERPOLATIONS = ("bicubic", "bilinear")

# Keys' cubic convolution parameter used by torch (and PIL / OpenCV) bicubic resizing.
_CUBIC_A = -0.75


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's GELU approximation, x * sigmoid(1.702 x), that OpenAI's weights were trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    # Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions t in [0, 1).
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def resize_matrix(in_size: int, out_size: int, method: str = "bicubic") -> np.ndarray:
    """1-D resampling matrix identical to torch's interpolate with align_corners=False.

    Args:
        in_size: input length.
        out_size: output length.
        method: 'bicubic' (a = -0.75, indices clamped at the borders) or 'bilinear'.

    Returns:
        float64 matrix [out_size, in_size]; `matrix @ signal` resamples a signal.

    Raises:
        ValueError: for an unknown method.
    """
    if method not in POS_INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {method!r}; valid: {POS_INTERPOLATIONS}")
    scale = in_size / out_size
    # Pixel centres: output pixel i covers input coordinate scale * (i + 0.5) - 0.5.
    src = scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    if method == "bilinear":
        src = np.maximum(src, 0.0)  # torch clamps negative source coordinates for linear modes
        i0 = np.floor(src).astype(np.int64)
        frac = src - i0
        i1 = np.minimum(i0 + 1, in_size - 1)
        np.add.at(m, (rows, i0), 1.0 - frac)
        np.add.at(m, (rows, i1), frac)
        return m
    i0 = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - i0)
    for tap in range(4):
        idx = np.clip(i0 - 1 + tap, 0, in_size - 1)
        np.add.at(m, (rows, idx), w[:, tap])
    return m


def interpolate_pos_embedding(
    pos_embedding: jax.Array, grid: tuple[int, int], method: str = "bicubic"
) -> jax.Array:
    """Resizes a [1 + g*g, C] positional embedding (class row first) to a new patch grid.

    Args:
        pos_embedding: class-token row followed by the g x g grid in row-major order.
        grid: target (rows, columns) of patches.
        method: 'bicubic' or 'bilinear' (torch's interpolate, align_corners=False).

    Returns:
        [1 + rows * columns, C]: the class row unchanged, then the resized grid. At
        the native grid the input is returned unchanged.

    Raises:
        ValueError: if the embedding's grid is not square.
    """
    n, c = pos_embedding.shape
    g = math.isqrt(n - 1)
    if g * g != n - 1:
        raise ValueError(
            f"positional embedding has {n - 1} patch rows, not a square grid (plus a class row)"
        )
    if tuple(grid) == (g, g):
        return pos_embedding
    cls_row, table = pos_embedding[:1], pos_embedding[1:].reshape(g, g, c)
    # Not jax.image.resize: its 'cubic' is Keys' kernel with a = -0.5 and it renormalises the
    # taps that fall outside the grid, where torch's bicubic (which CLIP, timm and open_clip
    # resize their position embeddings with) uses a = -0.75 and clamps the indices. On a
    # 14 -> 24 grid of unit-scale values the two differ by up to 0.27, also away from the
    # borders; `resize_matrix` reproduces torch to float32 rounding (tests/test_vit.py).
    # Shapes are static, so the separable resampling matrices are constants of the trace.
    mh = jnp.asarray(resize_matrix(g, grid[0], method), jnp.float32)
    mw = jnp.asarray(resize_matrix(g, grid[1], method), jnp.float32)
    table = jnp.einsum(
        "ih,hwc,jw->ijc", mh, table.astype(jnp.float32), mw, precision=jax.lax.Precision.HIGHEST
    )
    return jnp.concatenate(
        [cls_row, table.reshape(grid[0] * grid[1], c).astype(pos_embedding.dtype)], axis=0
    )


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.truncated_normal(0.02),
        bias_init=nn.initializers.zeros,
        name=name,
    )


def attention_implementation(dtype: Any, head_dim: int) -> str:
    """The `jax.nn.dot_product_attention` implementation for this backend, dtype and head width.

    cuDNN's fused (flash) attention runs on NVIDIA GPUs in half precision with a head width
    that is a multiple of 8 up to 128 (ViT-B/16 and CLIP: 64); everything else (CPU, TPU,
    float32, other widths) uses XLA's, which XLA fuses on its own.

    Args:
        dtype: the computation dtype of q, k and v.
        head_dim: the width of one head.

    Returns:
        'cudnn' or 'xla'.
    """
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if jax.default_backend() == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "xla"


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (no dropout).

    Attributes:
        width: token width.
        num_heads: heads (width must be divisible by it).
        causal: each token attends only to itself and the tokens before it (CLIP's text
            tower); otherwise to every token.
        dtype: computation dtype.
        implementation: 'xla', 'cudnn' or None to choose per backend
            (`attention_implementation`).
    """

    width: int
    num_heads: int
    dtype: Any = jnp.float32
    causal: bool = False
    implementation: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        h = self.num_heads
        dh = self.width // h
        q = _dense(self.width, self.dtype, "q_proj")(x).reshape(b, n, h, dh)
        k = _dense(self.width, self.dtype, "k_proj")(x).reshape(b, n, h, dh)
        v = _dense(self.width, self.dtype, "v_proj")(x).reshape(b, n, h, dh)
        impl = self.implementation or attention_implementation(q.dtype, dh)
        # The library's attention: XLA's computes the logits and the softmax in float32 even
        # for bfloat16 inputs (so the attention's tail is not lost), cuDNN's is fused.
        try:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal, implementation=impl)
        except (NotImplementedError, RuntimeError, ValueError):
            if impl != "cudnn" or self.implementation == "cudnn":
                raise
            # A GPU whose cuDNN (version, compute capability) lacks the fused kernel.
            out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal, implementation="xla")
        return _dense(self.width, self.dtype, "out_proj")(out.reshape(b, n, self.width))


class MLP(nn.Module):
    """CLIP's `c_fc` -> activation -> `c_proj` feed-forward block."""

    width: int
    hidden: int
    activation: str = "gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _dense(self.hidden, self.dtype, "c_fc")(x)
        # torch's nn.GELU default is the exact (erf) form, as timm's ViT and open_clip use.
        x = quick_gelu(x) if self.activation == "quick_gelu" else nn.gelu(x, approximate=False)
        return _dense(self.width, self.dtype, "c_proj")(x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (causal: CLIP's text)."""

    width: int
    num_heads: int
    mlp_dim: int
    activation: str = "gelu"
    ln_eps: float = 1e-6
    dtype: Any = jnp.float32
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def ln(name):
            return nn.LayerNorm(
                epsilon=self.ln_eps, dtype=self.dtype, param_dtype=jnp.float32, name=name
            )

        attn = Attention(self.width, self.num_heads, self.dtype, self.causal, name="attn")
        x = x + attn(ln("ln_1")(x))
        mlp = MLP(self.width, self.mlp_dim, self.activation, self.dtype, name="mlp")
        return x + mlp(ln("ln_2")(x))


class ViT(nn.Module):
    """Pre-LN Vision Transformer trunk returning tokens [B, N, C].

    Attributes:
        patch_size: side of the square patches (stride of the patch convolution).
        width: C, token width.
        depth: number of transformer blocks.
        num_heads: attention heads (width must be divisible by it; CLIP uses width / 64).
        mlp_dim: hidden width of the MLP; None for 4 * width.
        image_size: resolution the positional embedding is stored for (its grid is
            image_size // patch_size per side). Inputs of any other size work: the
            grid is interpolated on the fly (see `pos_interpolation`).
        output_dim: width of `proj`, the projection of the pooled embedding (CLIP's
            joint image-text space); None for no projection (standard ViT).
        activation: 'gelu' (exact erf form) or 'quick_gelu' (x * sigmoid(1.702 x),
            OpenAI CLIP).
        ln_eps: LayerNorm epsilon: 1e-6 for standard ViT, 1e-5 for CLIP.
        ln_pre: apply CLIP's `ln_pre` LayerNorm to the embedded tokens before the blocks.
        patch_bias: give the patch convolution a bias (standard ViT; CLIP has none).
        class_token: prepend the class token to the returned tokens (N = 1 + patches);
            without it only the patch tokens are returned.
        project_tokens: also apply `proj` to every returned token (dense features in
            the joint image-text space; needs output_dim).
        pos_interpolation: 'bicubic' or 'bilinear' resizing of the positional grid,
            identical to torch's interpolate(..., align_corners=False).
        dtype: computation dtype; parameters stay float32.
        axis_name: accepted for the backbone interface, unused (no batch statistics).
    """

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int | None = None
    image_size: int = 224
    output_dim: int | None = None
    activation: str = "gelu"
    ln_eps: float = 1e-6
    ln_pre: bool = False
    patch_bias: bool = True
    class_token: bool = False
    project_tokens: bool = False
    pos_interpolation: str = "bicubic"
    dtype: Any = jnp.float32
    axis_name: str | None = None

    def _check(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; valid: {ACTIVATIONS}")
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(
                f"unknown pos_interpolation {self.pos_interpolation!r}; valid: {POS_INTERPOLATIONS}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.image_size < self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is smaller than patch_size {self.patch_size}"
            )
        if self.project_tokens and self.output_dim is None:
            raise ValueError("project_tokens needs output_dim (a `proj` to apply)")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, pooled: bool = False) -> jax.Array:
        """Runs the trunk.

        Args:
            images: [B, H, W, 3] normalised images, any H, W >= patch_size.
            train: accepted for the backbone interface; the trunk has no dropout or
                batch statistics, so train and eval are the same computation.
            pooled: return the pooled image embedding instead of the tokens: the class
                token after `ln_post`, times `proj` when output_dim is set (CLIP's
                image embedding, before any L2 normalisation).

        Returns:
            tokens [B, N, C] in `dtype` after `ln_post` (N = (H // p) * (W // p), plus
            one leading class token when `class_token`; C becomes output_dim with
            `project_tokens`), or with `pooled` the embedding [B, output_dim or C].
        """
        del train
        self._check()
        p, c = self.patch_size, self.width
        grid0 = self.image_size // p

        def ln(name):
            return nn.LayerNorm(
                epsilon=self.ln_eps, dtype=self.dtype, param_dtype=jnp.float32, name=name
            )

        x = nn.Conv(
            c,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=self.patch_bias,
            kernel_init=nn.initializers.lecun_normal(),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="conv1",
        )(images.astype(self.dtype))
        b, gh, gw, _ = x.shape
        x = x.reshape(b, gh * gw, c)

        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c,), jnp.float32)
        pos = self.param(
            "positional_embedding",
            nn.initializers.normal(0.02),
            (1 + grid0 * grid0, c),
            jnp.float32,
        )
        pos = interpolate_pos_embedding(pos, (gh, gw), self.pos_interpolation)
        cls_tok = jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c))
        x = jnp.concatenate([cls_tok, x], axis=1) + pos.astype(self.dtype)
        if self.ln_pre:
            x = ln("ln_pre")(x)
        for i in range(self.depth):
            x = ResidualAttentionBlock(
                c,
                self.num_heads,
                self.mlp_dim or 4 * c,
                self.activation,
                self.ln_eps,
                self.dtype,
                name=f"resblocks_{i}",
            )(x)
        # ln_post is per token, so applying it to every token gives CLIP's pooled input
        # for the class token and normalised patch tokens for the head.
        x = ln("ln_post")(x)

        proj = None
        if self.output_dim is not None:
            proj = self.param(
                "proj", nn.initializers.normal(c**-0.5), (c, self.output_dim), jnp.float32
            )
        if pooled:
            out = x[:, 0]
            return out if proj is None else out @ proj.astype(self.dtype)
        if not self.class_token:
            x = x[:, 1:]
        if self.project_tokens:
            x = x @ proj.astype(self.dtype)
        return x


def _clip(patch: int, width: int, layers: int, output_dim: int, activation: str) -> dict:
    return {
        "patch_size": patch,
        "width": width,
        "depth": layers,
        "num_heads": width // 64,
        "image_size": 224,
        "output_dim": output_dim,
        "activation": activation,
        "ln_eps": 1e-5,
        "ln_pre": True,
        "patch_bias": False,
    }


def _std(patch: int, width: int, depth: int, heads: int, image_size: int = 224) -> dict:
    return {
        "patch_size": patch,
        "width": width,
        "depth": depth,
        "num_heads": heads,
        "image_size": image_size,
        "activation": "gelu",
        "ln_eps": 1e-6,
    }


VIT_CONFIGS: dict[str, dict[str, Any]] = {
    # Standard ViT (timm / Dosovitskiy et al. sizes), GELU, eps 1e-6, no ln_pre.
    "vit_ti16": _std(16, 192, 12, 3),
    "vit_s16": _std(16, 384, 12, 6),
    "vit_b16": _std(16, 768, 12, 12),
    "vit_b32": _std(32, 768, 12, 12),
    "vit_l14": _std(14, 1024, 24, 16),
    # CPU-sized, for the built-in 64 px data: 8 x 8 = 64 tokens of 128 channels,
    # the token count and width of resnet_small.
    "vit_cpu": _std(8, 128, 4, 4, image_size=64),
    # The same at the built-in 32 px (configs/default.py): 4-px patches, 8 x 8 = 64 tokens.
    "vit_cpu32": _std(4, 128, 4, 4, image_size=32),
    # CLIP image encoders (OpenAI weights: QuickGELU).
    "clip_vit_b16": _clip(16, 768, 12, 512, "quick_gelu"),
    "clip_vit_b32": _clip(32, 768, 12, 512, "quick_gelu"),
    "clip_vit_l14": _clip(14, 1024, 24, 768, "quick_gelu"),
    # open_clip's own trainings of the same architectures (e.g. LAION-2B) use plain GELU;
    # open_clip's '-quickgelu' models load into the clip_* variants above.
    "openclip_vit_b16": _clip(16, 768, 12, 512, "gelu"),
    "openclip_vit_b32": _clip(32, 768, 12, 512, "gelu"),
    "openclip_vit_l14": _clip(14, 1024, 24, 768, "gelu"),
}

VIT_BACKBONES = tuple(VIT_CONFIGS)


def get_vit(
    name: str, dtype: Any = jnp.float32, axis_name: str | None = None, **overrides: Any
) -> ViT:
    """Returns a ViT backbone by name.

    Args:
        name: a key of `VIT_CONFIGS`.
        dtype: computation dtype (parameters stay float32).
        axis_name: accepted for the backbone interface; unused by ViT.
        **overrides: `ViT` attributes that replace the variant's (e.g. class_token=True,
            image_size=336 for CLIP's 336 px L/14 weights).

    Returns:
        A `ViT` module mapping images [B, H, W, 3] to tokens [B, N, C].

    Raises:
        ValueError: for an unknown name.
    """
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown ViT backbone {name!r}; valid: {', '.join(VIT_BACKBONES)}")
    return ViT(**{**VIT_CONFIGS[name], **overrides}, dtype=dtype, axis_name=axis_name)


class HybridViT(nn.Module):
    """A ViT over a small ResNet's feature map (the 'hybrid' of Dosovitskiy et al., 2021).

    The convolutional stem gives the transformer the locality a plain ViT has to learn
    from data; on the built-in 32 px data a plain `vit_cpu32` pre-trained as the ResNet
    trunk was learns nothing (benchmarks/results/quality.md), while this one does. The
    transformer's patch embedding (`vit.conv1`) then embeds patches of the stem's map
    rather than of pixels.

    Attributes:
        stem: a `resnet.ResNet` with flatten=False (images -> [B, H', W', C']).
        vit: the `ViT` over that map (its image_size is the map's side).
        axis_name: accepted for the backbone interface (the stem has its own).
    """

    stem: nn.Module
    vit: nn.Module
    axis_name: str | None = None

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, pooled: bool = False) -> jax.Array:
        """Tokens [B, N, C] (or with `pooled` the pooled embedding), as `ViT.__call__`."""
        return self.vit(self.stem(images, train), train, pooled)


# CPU-sized hybrid for the built-in 32 px data: resnet_small's stem and first two stages
# (16 x 16 x 32 at 32 px), then vit_cpu32's transformer over 2 x 2 patches of that map
# (8 x 8 = 64 tokens of 128 channels, as vit_cpu32).
HYBRID_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_hybrid_cpu32": {
        "stem": {"stage_sizes": (1, 1), "widths": (16, 32), "stem": "small"},
        "vit": {**VIT_CONFIGS["vit_cpu32"], "patch_size": 2, "image_size": 16},
    },
}


def get_hybrid_vit(name: str, dtype: Any = jnp.float32, axis_name: str | None = None) -> HybridViT:
    """Returns a hybrid ViT backbone by name (a key of `HYBRID_CONFIGS`).

    Raises:
        ValueError: for an unknown name.
    """
    from mlcnc_jax.models.resnet import ResNet  # noqa: PLC0415 (resnet does not import vit)

    if name not in HYBRID_CONFIGS:
        raise ValueError(f"unknown hybrid ViT {name!r}; valid: {', '.join(HYBRID_CONFIGS)}")
    cfg = HYBRID_CONFIGS[name]
    stem = ResNet(**cfg["stem"], dtype=dtype, axis_name=axis_name, flatten=False, name="stem")
    return HybridViT(stem, ViT(**cfg["vit"], dtype=dtype, name="vit"), axis_name=axis_name)
