"""MLC-NC on VOC-LT with a CLIP ViT-B/16 image encoder (OpenAI weights), 224 px.

The MLC-NC head, losses, schedules and sampling are those of configs/voc_lt.py and its
recipe (mlcnc_jax/configuration/_recipes.py): `--config=configs/voc_lt_clip.py`
('reference', the authors' code) or `--config=configs/voc_lt_clip.py:paper` (the paper's
text). What changes is the backbone and how it is fine-tuned:

- backbone `clip_vit_b16` (models/vit.py): 196 patch tokens of width 768 (the class token
  is not passed to the head), so model.embed_dim = 768, the token width, as for ResNet-50;
- CLIP's own normalisation constants (the statistics its weights were trained with);
- AdamW (decoupled decay 0.05) instead of Adam with coupled L2 1e-4: with Adam's coupled
  L2 a pre-trained weight whose gradient is small is pulled to 0 at ~lr per step (the
  reference code's warm-up does this to the head on purpose, docs/method.md §6), which would
  erode the CLIP weights; AdamW's decay is a gentle lr * 0.05 per step;
- the head at the recipe's learning rate (1e-4 peak, one-cycle), the backbone at 0.1 of
  it, and layer-wise lr decay 0.75 inside the backbone: block i of 12 at 0.75^(12 - i)
  (the last block 0.075 of the head's lr, the first 0.0032), the embeddings at 0.75^13;
  lower layers, the most general features, move least.

These optimizer values (AdamW, weight decay 0.05, backbone multiplier 0.1, layer decay
0.75) are this project's choices, following common practice for fine-tuning CLIP and
ViTs (decoupled decay ~0.05, layer decay 0.65-0.75, a backbone lr well below the new
head's); they have not been tuned or measured on VOC-LT / COCO-LT yet. Each is one field
(train.optimizer, train.weight_decay, train.backbone_lr_multiplier, train.layer_decay);
--config.train.backbone_lr_multiplier=0 trains the head on a frozen CLIP.
`--mode=plan` lists them as changes from the recipe.

Weights: CLIP's image encoder (or the whole CLIP model) as .safetensors at
config.model.pretrained (default ~/.cache/mlcnc_jax/weights/clip_vit_b16_openai.safetensors);
OpenAI's released ViT-B-16.pt works too when torch is installed. A missing file stops the
run at once with the command that makes the .safetensors; nothing is downloaded.

Text classifier (ETF geometry against language geometry, one field):
--config.model.classifier=text takes the class names from the dataset, puts each in the
template of config.model.class_prompts ('a photo of a {}.'; several templates are
averaged) and embeds them once at start with the text tower of the same CLIP file
(config.model.pretrained, or config.model.text_weights); the [20, 512] array is stored
in the workdir, so eval and predict do not need the text tower. A .npy made elsewhere
still works: --config.model.text_embeddings=FILE.npy. The classifier is frozen, so
compare it with the frozen ETF: `:paper` against `:paper` plus
--config.model.classifier=text.

Zero-shot CLIP (no training): --mode=eval --config.model.zero_shot=True in a fresh
workdir scores the test split by the cosine of the image and class text embeddings
(docs/clip.md).

Data: as configs/voc_lt.py (--config.data.root=VOCdevkit).
"""

from configs import voc_lt

CLIP_WEIGHTS = "~/.cache/mlcnc_jax/weights/clip_vit_b16_openai.safetensors"
# The normalisation of CLIP's preprocessing (OpenAI's clip.py).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# CLIP's prompt for a class name (its paper's default template).
CLASS_PROMPTS = ("a photo of a {}.",)

# What the CLIP configs change in a VOC-LT / COCO-LT config ('section.field': value).
CLIP = {
    "model.backbone": "clip_vit_b16",
    "model.pretrained": CLIP_WEIGHTS,
    "model.embed_dim": 768,  # the token width of ViT-B/16
    "data.image_size": 224,
    "data.mean": CLIP_MEAN,
    "data.std": CLIP_STD,
    "train.optimizer": "adamw",
    "train.weight_decay": 0.05,
    "train.backbone_lr_multiplier": 0.1,
    "train.layer_decay": 0.75,
}


def apply_clip(config, dataset: str):
    """Sets the CLIP fields in a VOC-LT / COCO-LT config (in place) and returns it."""
    for key, value in CLIP.items():
        section, field = key.split(".")
        setattr(config[section], field, value)
    del dataset  # the class names come from the data
    config.model.text_embeddings = ""
    config.model.class_prompts = CLASS_PROMPTS
    return config


def get_config(recipe: str = "reference"):
    return apply_clip(voc_lt.get_config(recipe), "voc_lt")
