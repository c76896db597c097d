"""Default config: MLC-NC on the built-in `synthetic_lt` data, sized for a 2-core CPU.

As in the paper, the backbone starts from pre-trained weights: on the built-in data, the
shipped trunk pre-trained on 20 *other* classes (mlcnc_jax/trunks/, made by
configs/pretrain.py; the stand-in for ImageNet), so one command trains and evaluates:

    python run.py --config=configs/default.py --workdir=workdir/default

--config.model.pretrained=none trains from scratch: on ~1,100 long-tailed images every
model here (MLC-NC and the baselines) then memorises the training set and stays near
chance on the test set.

This config is the library's default config as it is. Every field, with its default value
and what it does, is declared in mlcnc_jax/configuration/_schema.py; the other config files
start from this one and change values only (the ConfigDict is locked, so a misspelt key is
an error, on the command line too).
"""

import ml_collections

from mlcnc_jax import configuration


def get_config() -> ml_collections.ConfigDict:
    return configuration.default_config()
