"""A backbone: non-overlapping 2 x 2 patches, one convolution (registered as 'patches')."""

import jax.numpy as jnp
from flax import linen as nn


class Patches(nn.Module):
    """Images [B, H, W, 3] -> tokens [B, H/2 * W/2, 16]."""

    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool):
        x = nn.Conv(16, (2, 2), strides=(2, 2), dtype=self.dtype)(images)
        return x.reshape(x.shape[0], -1, x.shape[-1])


def patches(dtype, axis_name):
    """The factory the backbone registry calls: (dtype, pmap axis) -> module."""
    return Patches(dtype=dtype)
