"""The built-in pre-trained trunk: the stand-in for ImageNet weights on the built-in data.

`SYNTHETIC_PRETRAIN` is a small ResNet (plus the linear classifier it was trained with)
pre-trained on the balanced 'pretrain' classes of `synthetic_lt` (letters and shapes, never
the 20 target classes), shipped with the package so that the default config fine-tunes from
it with no set-up. It is remade, bit for bit on the same machine type, by:

    python run.py --config=configs/pretrain.py --workdir=workdir/pretrain
    python -m mlcnc_jax.trunks --workdir=workdir/pretrain \
        --output=mlcnc_jax/trunks/synthetic_pretrain_resnet_small_32.safetensors

This module only names files (importing it loads neither JAX nor TensorFlow), so config
files can refer to it.
"""

import pathlib

DIRECTORY = pathlib.Path(__file__).resolve().parent
SYNTHETIC_PRETRAIN = str(DIRECTORY / "synthetic_pretrain_resnet_small_32.safetensors")
# Checked by tests/test_trunk.py: a remade trunk updates this line.
SYNTHETIC_PRETRAIN_SHA256 = "8a8c0df76406cb7f70c8b4b0f19c178860f7851d158ef5447d3e58f5d5ebd45c"
