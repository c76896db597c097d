"""The official long-tailed splits COCO-LT and VOC-LT (Distribution-Balanced Loss protocol).

Two forms of the same split are accepted in `split_dir`:

- JSON: `coco_lt.json` / `voc_lt.json` with `train_image_ids`, `train_labels` (class-index
  lists), `class_freq`, `class_split` and `class_names`.
- The original files of the Distribution-Balanced Loss repository
  (github.com/wutong16/DistributionBalancedLoss, `appendix/`): `img_id.pkl` (COCO, plain text
  despite its name) or `img_id.txt` (VOC), `class_freq.pkl` and `class_split.pkl`. They may sit
  directly in `split_dir`, in `split_dir/coco/` and `split_dir/voc/`, or in the repository's own
  layout `split_dir/coco/longtail2017/` and `split_dir/VOCdevkit/longtail2012/`.

The `.pkl` files are Python pickles. Plain `pickle.load` runs whatever code a pickle names, so
they are read through `restricted_load`, which admits only dicts, sets, lists and numpy arrays.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import urllib.request
from collections.abc import Sequence

import numpy as np

from mlcnc_jax.errors import UserError

# The two benchmarks: files of the original repository, pinned to the commits whose content
# has these sha256 values (docs/method.md §4).
_REPO = "https://raw.githubusercontent.com/wutong16/DistributionBalancedLoss"
_COMMIT = "8f913268682508bdc8b3e051cd31b7e70a8631d5"
_VOC_IMG_ID_COMMIT = "38ef08934efafa23a7263f0006a15c07367d6c3b"


@dataclasses.dataclass(frozen=True)
class _OfficialFile:
    name: str  # file name inside the split directory
    repo_path: str  # path inside the original repository
    commit: str
    sha256: str

    @property
    def url(self) -> str:
        return f"{_REPO}/{self.commit}/{self.repo_path}"


OFFICIAL_FILES: dict[str, tuple[_OfficialFile, ...]] = {
    "coco_lt": (
        _OfficialFile(
            "img_id.pkl",
            "appendix/coco/longtail2017/img_id.pkl",
            _COMMIT,
            "f31e853d2c7b69512c62b65ff1db067a49b3ab86a62f685c7da86b7c3dd04768",
        ),
        _OfficialFile(
            "class_split.pkl",
            "appendix/coco/longtail2017/class_split.pkl",
            _COMMIT,
            "923d001a2d117e250caf48833f7082dc090aa405a1769489bf66137c8a2c5560",
        ),
        _OfficialFile(
            "class_freq.pkl",
            "appendix/coco/longtail2017/class_freq.pkl",
            _COMMIT,
            "7edbc381296400727d1fd8afa01af51403de8d0e892230e16312b2ae7f6a469c",
        ),
    ),
    "voc_lt": (
        _OfficialFile(
            "img_id.txt",
            "appendix/VOCdevkit/longtail2012/img_id.txt",
            _VOC_IMG_ID_COMMIT,
            "6e49185d5421236718f7393e952f5790e5c0cfeb1694892b1b971f59725d5ebc",
        ),
        _OfficialFile(
            "class_split.pkl",
            "appendix/VOCdevkit/longtail2012/class_split.pkl",
            _COMMIT,
            "4400870c72d66673dd58f46f9102633579c0c70d6c1c33a0496edb4008cb04bc",
        ),
        _OfficialFile(
            "class_freq.pkl",
            "appendix/VOCdevkit/longtail2012/class_freq.pkl",
            _COMMIT,
            "cc7c8c401a2ffb8b47a5b0c2eca55a3b485cfa6658581c33e27ccbd27b145c5d",
        ),
    ),
}

# Sub-directories of split_dir searched for the original files, in order.
_SUBDIRS = {
    "coco_lt": ("", "coco", os.path.join("coco", "longtail2017")),
    "voc_lt": ("", "voc", os.path.join("VOCdevkit", "longtail2012")),
}
# Where a download puts the files (and what the error message recommends).
_DOWNLOAD_SUBDIR = {"coco_lt": "coco", "voc_lt": "voc"}


@dataclasses.dataclass
class LongTailSplit:
    """The training split of a long-tailed benchmark.

    Attributes:
      name: 'coco_lt' or 'voc_lt'.
      image_ids: [N] COCO image ids (int) or VOC2012 ids (str such as '2008_000023').
      labels: [N, K] uint8 multi-hot labels of the split files.
      class_split: {'head', 'medium', 'tail'} sorted class index lists.
      class_names: [K] names when the files carry them (JSON form), else None.
      source: the file(s) the split was read from.
    """

    name: str
    image_ids: list
    labels: np.ndarray
    class_split: dict[str, list[int]]
    class_names: list[str] | None
    source: str

    @property
    def class_freq(self) -> np.ndarray:
        """[K] int64 images per class."""
        return self.labels.astype(np.int64).sum(axis=0)


class SplitFileError(UserError):
    """A split file is missing, corrupt or inconsistent."""


# --------------------------------------------------------------------------- restricted pickle


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python-2 pickles of numpy arrays store raw bytes as latin-1 text; only that decoding
    # is needed, so no other codec is reachable from a pickle.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_multiarray():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray


def _allowed_globals() -> dict[tuple[str, str], object]:
    multiarray = _numpy_multiarray()
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    numeric = getattr(np, "_core", None)
    if numeric is not None and hasattr(numeric.numeric, "_frombuffer"):  # protocol-5 arrays
        for module in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(module, "_frombuffer")] = numeric.numeric._frombuffer
    for module in ("builtins", "__builtin__"):
        for name, obj in (("set", set), ("frozenset", frozenset), ("dict", dict), ("list", list)):
            allowed[(module, name)] = obj
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        obj = _allowed_globals().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: split pickles may only hold dicts, sets, "
                "lists and numpy arrays"
            )
        return obj


def restricted_load(data: bytes):
    """Unpickles `data`, admitting only dicts, sets, lists and numpy arrays.

    Args:
      data: the pickle's bytes.

    Returns:
      The unpickled object.

    Raises:
      pickle.UnpicklingError: the pickle names any other global (e.g. `os.system`).
    """
    return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


# --------------------------------------------------------------------------- download


def sha256_of(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def _fetch_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def download_official(name: str, split_dir: str) -> str:
    """Downloads the original split files of `name` into `split_dir/<coco|voc>/`.

    Each file is checked against its pinned sha256 before it is written, so a failed or
    tampered download never leaves a file behind.

    Args:
      name: 'coco_lt' or 'voc_lt'.
      split_dir: directory of the split files.

    Returns:
      The directory the files were written to.

    Raises:
      SplitFileError: a download failed or its sha256 does not match.
    """
    target = os.path.join(os.path.expanduser(split_dir), _DOWNLOAD_SUBDIR[name])
    os.makedirs(target, exist_ok=True)
    for f in OFFICIAL_FILES[name]:
        try:
            data = _fetch_url(f.url)
        except OSError as e:
            raise SplitFileError(
                f"could not download {f.url} ({e}). Without internet, put the files by hand: "
                f"{_where_to_put(name, split_dir)}"
            ) from e
        digest = sha256_of(data)
        if digest != f.sha256:
            raise SplitFileError(
                f"{f.url} has sha256 {digest}, expected {f.sha256}: refusing the file. Download "
                f"it again or put the original by hand: {_where_to_put(name, split_dir)}"
            )
        with open(os.path.join(target, f.name), "wb") as fh:
            fh.write(data)
    return target


def _where_to_put(name: str, split_dir: str) -> str:
    sub = os.path.join(split_dir, _DOWNLOAD_SUBDIR[name])
    listing = "; ".join(f"{f.url} -> {os.path.join(sub, f.name)}" for f in OFFICIAL_FILES[name])
    return (
        f"either {os.path.join(split_dir, name + '.json')} (JSON form) or the original files: "
        f"{listing} (or run with --config.data.download_splits=True where there is internet)"
    )


# --------------------------------------------------------------------------- loading


def _check_consistent(split: LongTailSplit, class_freq: Sequence[int] | None) -> LongTailSplit:
    if len(split.image_ids) != len(split.labels):
        raise SplitFileError(
            f"{split.source}: {len(split.image_ids)} image ids but {len(split.labels)} label rows"
        )
    if len(set(split.image_ids)) != len(split.image_ids):
        raise SplitFileError(f"{split.source}: duplicate image ids")
    if class_freq is not None and not np.array_equal(np.asarray(class_freq), split.class_freq):
        raise SplitFileError(
            f"{split.source}: class_freq does not match the labels (files corrupt or mixed)"
        )
    k = split.labels.shape[1]
    groups = [i for g in ("head", "medium", "tail") for i in split.class_split[g]]
    if sorted(groups) != list(range(k)):
        raise SplitFileError(f"{split.source}: class_split is not a partition of the {k} classes")
    return split


def _load_json(name: str, path: str) -> LongTailSplit:
    with open(path) as f:
        d = json.load(f)
    ids = list(d["train_image_ids"])
    k = int(d.get("num_classes") or len(d["class_freq"]))
    labels = np.zeros((len(ids), k), np.uint8)
    for row, classes in enumerate(d["train_labels"]):
        labels[row, classes] = 1
    split = LongTailSplit(
        name=name,
        image_ids=ids if name == "voc_lt" else [int(i) for i in ids],
        labels=labels,
        class_split={
            g: sorted(int(i) for i in d["class_split"][g]) for g in ("head", "medium", "tail")
        },
        class_names=list(d["class_names"]) if d.get("class_names") else None,
        source=path,
    )
    return _check_consistent(split, d.get("class_freq"))


def _original_files_in(name: str, directory: str) -> dict[str, str] | None:
    paths = {f.name: os.path.join(directory, f.name) for f in OFFICIAL_FILES[name]}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    return None


def _load_original(name: str, paths: dict[str, str]) -> LongTailSplit:
    id_file = paths["img_id.pkl" if name == "coco_lt" else "img_id.txt"]
    with open(id_file) as f:  # plain text, one id a line, in the order of gt_labels
        ids = [line.strip() for line in f if line.strip()]
    if name == "coco_lt":
        ids = [int(i) for i in ids]
    try:
        with open(paths["class_freq.pkl"], "rb") as f:
            freq = restricted_load(f.read())
        with open(paths["class_split.pkl"], "rb") as f:
            groups = restricted_load(f.read())
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise SplitFileError(
            f"cannot read the split pickles in {os.path.dirname(id_file)}: {e}"
        ) from e
    labels = np.asarray(np.stack(freq["gt_labels"]), np.uint8)
    split = LongTailSplit(
        name=name,
        image_ids=ids,
        labels=labels,
        # The originals call the medium group 'middle'.
        class_split={
            g: sorted(int(i) for i in groups[key])
            for g, key in (("head", "head"), ("medium", "middle"), ("tail", "tail"))
        },
        class_names=None,
        source=os.path.dirname(id_file),
    )
    return _check_consistent(split, freq.get("class_freq"))


def default_split_dir(root: str) -> str:
    """Where split files are looked for when config.data.split_dir is empty: `<root>/lt_splits`."""
    return os.path.join(os.path.expanduser(root), "lt_splits")


def load_long_tail_split(name: str, split_dir: str, download: bool = False) -> LongTailSplit:
    """Reads the official training split of COCO-LT or VOC-LT.

    Looks for `<split_dir>/<name>.json` first, then for the original files (see the module
    docstring). With `download`, missing files are fetched from the original repository and
    checked against their sha256.

    Args:
      name: 'coco_lt' or 'voc_lt'.
      split_dir: directory holding the split files.
      download: fetch the original files when none are found.

    Returns:
      The split.

    Raises:
      FileNotFoundError: no split files and `download` is False; the message lists which
        files to put where.
      SplitFileError: the files are inconsistent or a download failed verification.
    """
    if name not in OFFICIAL_FILES:
        raise UserError(
            f"unknown long-tailed split {name!r}; expected one of {list(OFFICIAL_FILES)}"
        )
    split_dir = os.path.expanduser(split_dir)
    json_path = os.path.join(split_dir, name + ".json")
    if os.path.isfile(json_path):
        return _load_json(name, json_path)
    for sub in _SUBDIRS[name]:
        paths = _original_files_in(name, os.path.join(split_dir, sub))
        if paths:
            return _load_original(name, paths)
    if download:
        target = download_official(name, split_dir)
        return _load_original(name, _original_files_in(name, target))
    raise FileNotFoundError(
        f"no {name} split files in {split_dir}. Put {_where_to_put(name, split_dir)}. "
        "Set the directory with --config.data.split_dir."
    )
