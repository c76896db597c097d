"""MLC-NC on COCO-LT: as configs/voc_lt.py (same recipes) on COCO 2017.

Training recipe: --config=configs/coco_lt.py ('reference', the authors' code) or
--config=configs/coco_lt.py:paper (the paper's text); see
mlcnc_jax/configuration/_recipes.py.

Data: --config.data.root=DIR where DIR holds annotations/instances_{train,val}2017.json,
train2017/ and val2017/. The long-tailed split files go in DIR/lt_splits/ (or
--config.data.split_dir). Weights: torchvision ResNet-50 ImageNet weights as
.safetensors (or .pth with torch installed) at --config.model.pretrained.
"""

from configs import voc_lt


def get_config(recipe: str = "reference"):
    c = voc_lt.get_config(recipe)
    c.data.name = "coco_lt"
    c.data.root = "~/data/coco"
    c.data.coco_test_all = False  # val2017: the 4,952 images with annotations
    # class-aware epoch: max_c n_c * K = 90,240 samples
    return c
