"""MLC-NC on COCO-LT with a CLIP ViT-B/16 image encoder: configs/voc_lt_clip.py on COCO 2017.

Everything but the data is as in configs/voc_lt_clip.py (its docstring gives the
backbone, the optimizer and its defaults, which are this project's choices and not yet
measured, the weights file and the text classifier); the data as in configs/coco_lt.py
(--config.data.root=DIR with annotations/, train2017/, val2017/). Recipes:
`--config=configs/coco_lt_clip.py` ('reference') or `--config=configs/coco_lt_clip.py:paper`.
The text classifier embeds COCO's 80 class names ('a photo of a {}.') with the same
CLIP file's text tower at start; --mode=eval --config.model.zero_shot=True scores zero-shot
CLIP (docs/clip.md).
"""

from configs import coco_lt, voc_lt_clip


def get_config(recipe: str = "reference"):
    return voc_lt_clip.apply_clip(coco_lt.get_config(recipe), "coco_lt")
