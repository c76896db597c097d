"""MLC-NC on VOC-LT: ResNet-50 from ImageNet, 224 px, 100 class-aware epochs (docs/method.md §3).

Training recipe, by the config argument (mlcnc_jax/configuration/_recipes.py says what each
sets):
    --config=configs/voc_lt.py              'reference': the authors' code as it runs
    --config=configs/voc_lt.py:paper        'paper': the paper's text (frozen ETF classifier,
                                            FPC 0.2, previous-epoch prototypes)

Data: --config.data.root=DIR where DIR is the VOCdevkit folder holding
VOC2012/ (trainval: JPEGImages/, Annotations/) and VOC2007/ (test). The
long-tailed split files go in DIR/lt_splits/ (or --config.data.split_dir).
Weights: torchvision ResNet-50 ImageNet weights as .safetensors (or .pth with
torch installed) at --config.model.pretrained.
"""

from configs import default
from mlcnc_jax import configuration


def get_config(recipe: str = "reference"):
    c = default.get_config()
    c.data.name = "voc_lt"
    c.data.root = "~/data/VOCdevkit"
    c.data.image_size = 224
    c.data.resize_size = 256
    c.data.crop_min_area = 0.08  # torchvision's RandomResizedCrop, as the reference code
    c.data.crop_padding = 0  # no extra shift: the random resized crop is the reference's only one
    c.data.sampling = "class_aware"
    c.model.backbone = "resnet50"
    c.model.pretrained = "~/.cache/mlcnc_jax/weights/resnet50_imagenet.safetensors"
    c.model.embed_dim = 768
    c.dtype = "bfloat16"  # mixed precision: bfloat16 compute, float32 parameters
    c.train.batch_size = 64
    c.train.num_epochs = 100
    c.train.steps_per_epoch = -1  # class-aware epoch: max_c n_c * K = 15,500 samples
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 1000
    c.eval.batch_size = 64
    return configuration.apply_recipe(c, recipe)
