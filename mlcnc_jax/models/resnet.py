"""ResNet backbones in torchvision's layout, returning the last stage as tokens.

Module names mirror torchvision's state-dict keys (`layer1.0.conv1` becomes
`layer1_0/conv1`, `downsample.0` becomes `downsample_0`) so that
`mlcnc_jax.models.pretrained` can convert ImageNet weights one to one.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out", relu).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _batch_norm(train: bool, dtype: Any, axis_name: str | None, name: str) -> nn.BatchNorm:
    # momentum 0.9 / eps 1e-5 are torch's defaults (torch's momentum=0.1 is 1 - 0.9).
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        axis_name=axis_name,
        name=name,
    )


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=_conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    axis_name: str | None = None

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out = _conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
        out = _batch_norm(train, self.dtype, self.axis_name, "bn1")(out)
        out = nn.relu(out)
        out = _conv(self.features, 3, 1, self.dtype, "conv2")(out)
        out = _batch_norm(train, self.dtype, self.axis_name, "bn2")(out)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _conv(self.features, 1, self.stride, self.dtype, "downsample_0")(x)
            x = _batch_norm(train, self.dtype, self.axis_name, "downsample_1")(x)
        return nn.relu(out + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided, as torchvision's ResNet v1.5) -> 1x1 with expansion 4."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    axis_name: str | None = None

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_features = self.features * self.expansion
        out = _conv(self.features, 1, 1, self.dtype, "conv1")(x)
        out = _batch_norm(train, self.dtype, self.axis_name, "bn1")(out)
        out = nn.relu(out)
        out = _conv(self.features, 3, self.stride, self.dtype, "conv2")(out)
        out = _batch_norm(train, self.dtype, self.axis_name, "bn2")(out)
        out = nn.relu(out)
        out = _conv(out_features, 1, 1, self.dtype, "conv3")(out)
        out = _batch_norm(train, self.dtype, self.axis_name, "bn3")(out)
        if self.stride != 1 or x.shape[-1] != out_features:
            x = _conv(out_features, 1, self.stride, self.dtype, "downsample_0")(x)
            x = _batch_norm(train, self.dtype, self.axis_name, "downsample_1")(x)
        return nn.relu(out + x)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
# The CPU stems: one 3x3 conv (with batch norm and ReLU) of this stride, no pool.
SMALL_STEM_STRIDES = {"small": 1, "small_s2": 2}


class ResNet(nn.Module):
    """ResNet trunk without pooling or classifier.

    Attributes:
        stage_sizes: number of blocks in each stage (torchvision's `layers`).
        block: 'basic' or 'bottleneck'.
        widths: base width of each stage; the stem has widths[0] channels.
        stem: 'imagenet' (7x7 stride-2 conv + 3x3 stride-2 max-pool, overall stride 32)
            or 'small' (3x3 stride-1 conv, no pool, overall stride 8 with 4 stages) or
            'small_s2' (the same conv with stride 2: overall stride 16).
        dtype: computation dtype; parameters and batch statistics stay float32.
        axis_name: device axis over which BatchNorm averages its batch statistics
            (for jax.pmap); None for single-program (jit) training.
        flatten: return tokens [B, H' * W', C]; False returns the map [B, H', W', C]
            (the convolutional stem of a hybrid ViT).
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    widths: Sequence[int] = (64, 128, 256, 512)
    stem: str = "imagenet"
    dtype: Any = jnp.float32
    axis_name: str | None = None
    flatten: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Runs the trunk.

        Args:
            x: images [B, H, W, 3].
            train: use batch statistics (and update the running ones) when True.

        Returns:
            tokens [B, H' * W', C] of the last stage, in `dtype` (with `flatten` False, the
            map [B, H', W', C]).
        """
        if self.block not in _BLOCKS:
            raise ValueError(f"unknown block {self.block!r}; valid: {sorted(_BLOCKS)}")
        if len(self.widths) != len(self.stage_sizes):
            raise ValueError(
                f"widths {tuple(self.widths)} and stage_sizes {tuple(self.stage_sizes)} "
                "must have the same length"
            )
        block_cls = _BLOCKS[self.block]
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = _conv(self.widths[0], 7, 2, self.dtype, "conv1")(x)
            x = _batch_norm(train, self.dtype, self.axis_name, "bn1")(x)
            x = nn.relu(x)
            # max_pool pads with -inf, as torch's MaxPool2d(3, 2, padding=1).
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        elif self.stem in SMALL_STEM_STRIDES:
            x = _conv(self.widths[0], 3, SMALL_STEM_STRIDES[self.stem], self.dtype, "conv1")(x)
            x = _batch_norm(train, self.dtype, self.axis_name, "bn1")(x)
            x = nn.relu(x)
        else:
            raise ValueError(
                f"unknown stem {self.stem!r}; valid: {['imagenet', *SMALL_STEM_STRIDES]}"
            )
        for i, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for j in range(num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = block_cls(
                    width,
                    stride=stride,
                    dtype=self.dtype,
                    axis_name=self.axis_name,
                    name=f"layer{i + 1}_{j}",
                )(x, train)
        if not self.flatten:
            return x
        b, h, w, c = x.shape
        return x.reshape(b, h * w, c)


_CONFIGS: dict[str, dict[str, Any]] = {
    "resnet18": {"stage_sizes": (2, 2, 2, 2), "block": "basic"},
    "resnet34": {"stage_sizes": (3, 4, 6, 3), "block": "basic"},
    "resnet50": {"stage_sizes": (3, 4, 6, 3), "block": "bottleneck"},
    "resnet101": {"stage_sizes": (3, 4, 23, 3), "block": "bottleneck"},
    # CPU-sized: 64 px images give 8x8 = 64 tokens of 128 channels.
    "resnet_small": {
        "stage_sizes": (1, 1, 1, 1),
        "block": "basic",
        "widths": (16, 32, 64, 128),
        "stem": "small",
    },
    # The same network behind a stride-2 stem: 64 px images cost what 32 px cost above.
    "resnet_small_s2": {
        "stage_sizes": (1, 1, 1, 1),
        "block": "basic",
        "widths": (16, 32, 64, 128),
        "stem": "small_s2",
    },
}

BACKBONES = tuple(_CONFIGS)


def get_backbone(name: str, dtype: Any = jnp.float32, axis_name: str | None = None) -> nn.Module:
    """Returns a backbone by name.

    Args:
        name: one of resnet18, resnet34, resnet50, resnet101, resnet_small, resnet_small_s2.
        dtype: computation dtype (parameters stay float32).
        axis_name: device axis for BatchNorm statistics under jax.pmap, or None.

    Returns:
        A `ResNet` module mapping images [B, H, W, 3] to tokens [B, N, C].

    Raises:
        ValueError: for an unknown name.
    """
    if name not in _CONFIGS:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}")
    return ResNet(**_CONFIGS[name], dtype=dtype, axis_name=axis_name)
