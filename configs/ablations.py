"""Baselines and MLC-NC ablations, as `--config=configs/ablations.py:VARIANT[,BASE]`.

VARIANT is one of the names in VARIANTS; BASE (default 'default') is the config
file to start from: 'default' (built-in synthetic_lt), 'voc_lt', 'coco_lt', or their
CLIP ViT-B/16 versions 'voc_lt_clip' and 'coco_lt_clip'.
Example: --config=configs/ablations.py:bce_uniform,voc_lt or
--config=configs/ablations.py:no_fpc,voc_lt_clip
"""

import importlib

# name -> overrides. Baselines use the plain model (backbone, global pooling, linear classifier).
_BASELINE = {
    "model.name": "baseline",
    "loss.two_way": 0.0,
    "loss.fla": 0.0,
    "loss.fpc": 0.0,
    "loss.warmup_epochs": 0,
}
VARIANTS = {
    "mlcnc": {},
    # Plain model with each classification loss, with class-aware or uniform sampling.
    **{
        f"{loss}_{sampling}": {
            **_BASELINE,
            f"loss.{loss}": 1.0,
            "data.sampling": sampling.replace("aware", "class_aware"),
        }
        for loss in ("bce", "focal", "asl", "db", "two_way")
        for sampling in ("aware", "uniform")
    },
    # MLC-NC ablations.
    "no_fla": {"loss.fla": 0.0, "loss.warmup_epochs": 0},
    "no_fpc": {"loss.fpc": 0.0},
    "linear_classifier": {"model.classifier": "linear"},
    "trainable_etf": {"model.classifier": "etf_trainable"},
    "cumulative_prototypes": {"loss.prototypes": "cumulative"},
    "cosine_attention": {"model.attention": "cosine"},
    # The reference code's loss weights.
    "reference_weights": {"loss.fpc": 0.1},
}


def get_config(arg: str = "mlcnc"):
    variant, _, base = arg.partition(",")
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    c = importlib.import_module(f"configs.{base or 'default'}").get_config()
    for key, value in VARIANTS[variant].items():
        section, field = key.split(".")
        setattr(c[section], field, value)
    return c
