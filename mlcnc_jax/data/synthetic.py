"""The built-in `synthetic_lt` dataset: a long-tailed multi-label benchmark that needs no download.

A tensorflow-datasets builder stores small RGB images holding 1-4 objects over
cluttered backgrounds, generated on first use; `load` reads them into memory.
The dataset is made in three parts:

* synthetic_labels.py: the class sets ('target', the long-tailed benchmark, and
  'pretrain', 20 other classes to pre-train a CPU backbone) and the label plan of
  every split (numpy only).
* synthetic_render.py: the pixels of every image (numpy and PIL).
* this module: the tfds builder that stores them, loading (with a lock so that
  processes started together generate each dataset once) and a preview sheet.

Everything is deterministic from the builder config's seed: the per-class counts,
which classes are head/medium/tail, the label of every image and every pixel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import pathlib
import time
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont

from mlcnc_jax.data import dataset as dataset_lib
from mlcnc_jax.data.synthetic_labels import CLASS_SETS, SYNTHETIC_TRAIN_SPLITS, split_labels
from mlcnc_jax.data.synthetic_render import generate
from mlcnc_jax.errors import UserError

# Keep TensorFlow off the accelerators: JAX owns them.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # devices already initialised elsewhere; nothing to undo
    pass

# ----------------------------------------------------------------------------- tfds builder


@dataclasses.dataclass(eq=False)
class SyntheticLtConfig(tfds.core.BuilderConfig):
    """Builder config of `synthetic_lt`.

    Attributes:
      classes: 'target' (the long-tailed benchmark) or 'pretrain' (20 other classes).
      image_size: side of the square images, pixels.
      seed: generation seed.
      train_split: 'planned' (the hand-made long tail) or 'dbloss' (lt_builder's, 'target').
    """

    classes: str = "target"
    image_size: int = 64
    seed: int = 0
    train_split: str = "planned"


def make_config(
    classes: str = "target", image_size: int = 64, seed: int = 0, train_split: str = "planned"
) -> SyntheticLtConfig:
    """The builder config for a class set, image size, seed and train split (registered reused).

    Args:
      classes: 'target' or 'pretrain'.
      image_size: image side in pixels (>= 16).
      seed: generation seed.
      train_split: 'planned' or 'dbloss' (the 'target' classes only).

    Returns:
      A `SyntheticLtConfig` named '<classes>_<size>' (seed 0) or '<classes>_<size>_seed<seed>',
      with '_dbloss' appended for that train split.
    """
    if classes not in CLASS_SETS:
        raise UserError(
            f"synthetic_lt classes must be one of {sorted(CLASS_SETS)}, got {classes!r}"
        )
    if int(image_size) < 16:
        raise UserError(f"synthetic_lt image_size must be >= 16 pixels, got {image_size}")
    if train_split not in SYNTHETIC_TRAIN_SPLITS or (
        train_split != "planned" and classes != "target"
    ):
        raise UserError(
            f"synthetic_lt train_split must be one of {SYNTHETIC_TRAIN_SPLITS} ('dbloss' for the "
            f"'target' classes only), got {train_split!r} for {classes!r}"
        )
    name = f"{classes}_{int(image_size)}" + (f"_seed{int(seed)}" if int(seed) else "")
    name += "" if train_split == "planned" else f"_{train_split}"
    for config in SyntheticLt.BUILDER_CONFIGS:
        if config.name == name:
            return config
    return SyntheticLtConfig(
        name=name,
        classes=classes,
        image_size=int(image_size),
        seed=int(seed),
        train_split=train_split,
        description=f"{classes} classes, {image_size} px, seed {seed}, {train_split} train split",
    )


class SyntheticLt(tfds.core.GeneratorBasedBuilder):
    """Long-tailed multi-label images of digits and shapes over clutter (no download)."""

    VERSION = tfds.core.Version("2.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release.",
        "1.1.0": "Larger objects, fewer distractors: learnable from scratch on a CPU budget.",
        "2.0.0": "Every labelled object wholly visible: inside the image, little overlap, no "
        "occluding strokes; object size by object count; object-centric pretrain images; "
        "digits in the letters' font (1.x: MNIST handwriting).",
        "2.1.0": "Target shapes that stay apart at 32 px: delta (hollow triangle), hash, "
        "bullseye and dots replace triangle, star, arrow and chevron (which the small trunk "
        "confused with each other and with the bowtie); target objects somewhat larger. The "
        "'pretrain' images are unchanged.",
    }
    BUILDER_CONFIGS = [
        SyntheticLtConfig(
            name="target_64",
            classes="target",
            image_size=64,
            seed=0,
            description="benchmark, 64 px",
        ),
        SyntheticLtConfig(
            name="pretrain_64",
            classes="pretrain",
            image_size=64,
            seed=0,
            description="pre-training, 64 px",
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        k = len(CLASS_SETS[cfg.classes])
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(cfg.image_size, cfg.image_size, 3), encoding_format="png"
                    ),
                    "labels": tfds.features.Tensor(shape=(k,), dtype=np.uint8),
                    "id": tfds.features.Text(),
                }
            ),
            metadata=tfds.core.MetadataDict(class_names=list(CLASS_SETS[cfg.classes])),
            supervised_keys=("image", "labels"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
        from mlcnc_jax import console

        cfg = self.builder_config
        images = generate(cfg.classes, cfg.image_size, cfg.seed, split, train_split=cfg.train_split)
        total = len(split_labels(cfg.classes, cfg.seed, split, cfg.train_split))
        with console.bar(total, f"generating {cfg.name} {split}", unit="image") as live:
            for key, png, labels in images:
                yield key, {"image": io.BytesIO(png), "labels": labels, "id": key}
                live.update(1)


# ----------------------------------------------------------------------------- loading


def builder(
    classes: str,
    image_size: int,
    seed: int,
    data_dir: str | os.PathLike,
    train_split: str = "planned",
) -> SyntheticLt:
    """The `synthetic_lt` builder for these parameters, storing under data_dir."""
    return SyntheticLt(
        config=make_config(classes, image_size, seed, train_split), data_dir=os.fspath(data_dir)
    )


def _read_split(ds_builder: SyntheticLt, split: str) -> dataset_lib.Split:
    try:
        ds = ds_builder.as_dataset(
            split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
        )
        examples = sorted(
            ((ex["id"].decode(), ex["image"], ex["labels"]) for ex in tfds.as_numpy(ds)),
            key=lambda e: e[0],
        )
    except (tf.errors.OpError, OSError, AssertionError) as e:
        # A truncated or deleted record file (a full disk or a kill while it was copied):
        # the data is generated, so deleting the folder regenerates it whole.
        # TensorFlow's messages start with "{{function_node ...}}": what follows is the point.
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reason = text.rsplit("}} ", 1)[-1].split(" [Op:")[0][:200] or type(e).__name__
        folder = ds_builder.data_dir
        raise UserError(
            f"the cached synthetic_lt data in {folder} is damaged ({split} split: "
            f"{type(e).__name__}: {reason}): delete {folder} and run again to regenerate it"
        ) from None
    if len(examples) != ds_builder.info.splits[split].num_examples:
        folder = ds_builder.data_dir
        raise UserError(
            f"the cached synthetic_lt data in {folder} is damaged ({split} split: "
            f"{len(examples)} of {ds_builder.info.splits[split].num_examples} images): delete "
            f"{folder} and run again to regenerate it"
        )
    ids = [e[0] for e in examples]
    k = len(CLASS_SETS[ds_builder.builder_config.classes])
    labels = np.stack([e[2] for e in examples]) if examples else np.zeros((0, k), np.uint8)
    return dataset_lib.Split(images=[bytes(e[1]) for e in examples], labels=labels, ids=ids)


@contextlib.contextmanager
def generation_lock(root: pathlib.Path, name: str) -> Iterator[None]:
    """Holds `<root>/.synthetic_lt_<name>.lock` exclusively while one process generates.

    Runs that start together on one machine (the quality benchmark's workers, a parallel
    test session) then generate each dataset once: the others wait, then read it. Where
    there is no `fcntl` (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".synthetic_lt_{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load(config) -> dataset_lib.MultiLabelDataset:
    """Loads `synthetic_lt`, generating it first into config.data.root if needed.

    Images stay PNG-encoded in memory; the input pipeline decodes them.

    Args:
      config: the project ConfigDict; reads data.root, data.image_size,
        data.synthetic_seed, data.synthetic_classes, data.synthetic_train_split,
        data.head_min, data.tail_max.

    Returns:
      The dataset with 'train' and 'test' splits; class_split from the training counts.
    """
    classes = config.data.synthetic_classes
    if classes not in CLASS_SETS:
        raise UserError(
            f"config.data.synthetic_classes must be 'target' or 'pretrain', got {classes!r}"
        )
    root = pathlib.Path(os.path.expanduser(config.data.root))

    def make_builder() -> SyntheticLt:
        return builder(
            classes,
            config.data.image_size,
            config.data.synthetic_seed,
            root,
            config.data.synthetic_train_split,
        )

    ds_builder = make_builder()
    if not ds_builder.is_prepared():
        name = ds_builder.builder_config.name
        with generation_lock(root, name):
            # Another process may have generated it while this one waited for the lock.
            ds_builder = make_builder()
            if not ds_builder.is_prepared():
                print(f"Generating synthetic_lt/{name} into {ds_builder.data_dir} ...", flush=True)
                start = time.perf_counter()
                # tfds announces "Downloading and preparing dataset Unknown size": nothing is
                # downloaded here, the lines above say what happens.
                with contextlib.redirect_stdout(io.StringIO()):
                    ds_builder.download_and_prepare()
                print(
                    f"Generated synthetic_lt/{name} in {time.perf_counter() - start:.1f} s",
                    flush=True,
                )
    train = _read_split(ds_builder, "train")
    test = _read_split(ds_builder, "test")
    return dataset_lib.MultiLabelDataset(
        name="synthetic_lt" if classes == "target" else "synthetic_lt_pretrain",
        class_names=list(CLASS_SETS[classes]),
        train=train,
        test=test,
        class_split=dataset_lib.class_groups(
            train.class_freq, config.data.head_min, config.data.tail_max
        ),
    )


def preview(dataset: dataset_lib.MultiLabelDataset, path: str | os.PathLike, n: int = 16) -> None:
    """Writes a PNG grid of the first n training images with their class names.

    Args:
      dataset: any MultiLabelDataset (encoded bytes or image paths).
      path: output PNG file.
      n: number of images.
    """
    split = dataset.train
    n = min(n, len(split))
    if n == 0:
        raise UserError(f"dataset {dataset.name!r} has no training images to preview")
    cell, text_h = 128, 30
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=10)
    for i in range(n):
        src = split.images[i]
        img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src).convert("RGB")
        scale = cell / max(img.size)
        img = img.resize(
            (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.NEAREST
        )
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        sheet.paste(img, (x, y))
        names = [dataset.class_names[c] for c in np.flatnonzero(split.labels[i])]
        lines = [", ".join(names[:2]), ", ".join(names[2:])]
        draw.multiline_text(
            (x + 2, y + cell + 2),
            "\n".join(line for line in lines if line),
            fill="black",
            font=font,
        )
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
