"""MLC-NC on the user's own multi-label data (COCO-format annotation files or CSV files).

COCO format (data.name = 'coco_json'): one annotation file for training and one for testing,
each with the folder its images' `file_name`s are relative to. The classes are the training
file's categories (ids ascending); head/medium/tail groups come from the training counts.

CSV (data.name = 'csv'): one row per image, `image path,space-separated class names`, e.g.

    image,labels
    img/0001.jpg,cat dog
    img/0002.jpg,person

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
    c.data.train_images = "/path/to/train_images"
    c.data.test_annotations = "/path/to/test_annotations.json"  # or /path/to/test.csv
    c.data.test_images = "/path/to/test_images"
    # Hold out part of the training images for model selection instead of the test split:
    # c.data.val_fraction = 0.1
    return c
