"""MLC-NC on the user's own multi-label data (COCO-format annotation files or CSV files).

COCO format (data.name = 'coco_json'): one annotation file for training and one for testing,
each with the folder its images' `file_name`s are relative to ('' = the annotation file's
folder). The classes are the training
file's categories (ids ascending); head/medium/tail groups come from the training counts.

CSV (data.name = 'csv'): one row per image, `image path,space-separated class names`, e.g.

    image,labels
    img/0001.jpg,cat dog
    img/0002.jpg,person

Fields follow the CSV quoting rules. For class names with spaces, separate them with another
character and say which: `img/0003.jpg,teddy bear;dining table` with
`--config.data.label_separator=";"`.

A long-tailed subset of your training images (python -m mlcnc_jax.data.lt_builder
--labels=train.csv --max_count=800 --output=lt.json) trains with
`--config.data.train_split_file=lt.json`.

Set it up with
    --config.data.name=csv
    --config.data.train_annotations=/data/mine/train.csv
    --config.data.train_images=/data/mine      # relative paths start here ('' = the CSV's folder)
    --config.data.test_annotations=/data/mine/test.csv
    --config.data.test_images=/data/mine
The classes are the class names of the training CSV, sorted.

Inspect the split first:
    python run.py --config=configs/custom.py --mode=data_stats --workdir=/tmp/mine
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.name = "coco_json"  # or 'csv' (see above)
    c.data.train_annotations = "/path/to/train_annotations.json"  # or /path/to/train.csv
    # Folders the annotation files' image paths are relative to ('' = the annotation file's own).
    c.data.train_images = ""
    c.data.test_annotations = "/path/to/test_annotations.json"  # or /path/to/test.csv
    c.data.test_images = ""
    # Backbone weights: e.g. torchvision's ImageNet ResNet-50 (with model.backbone='resnet50'
    # and data.image_size=224, as configs/voc_lt.py); the built-in trunk knows only glyphs.
    c.model.pretrained = "none"
    # Hold out part of the training images for model selection instead of the test split:
    # c.data.val_fraction = 0.1
    return c
