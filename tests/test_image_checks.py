"""Images are checked with the decoder training uses: what it cannot read fails at load time."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from configs import default
from mlcnc_jax.data import sources


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(buf, fmt)
    return buf.getvalue()


def test_decode_error_names_the_reason(tmp_path):
    good, tiff, cut = tmp_path / "a.png", tmp_path / "b.tif", tmp_path / "c.png"
    good.write_bytes(_encoded("PNG"))
    tiff.write_bytes(_encoded("TIFF"))  # Pillow reads it; TensorFlow's decoder does not
    cut.write_bytes(_encoded("PNG")[:40])
    assert sources.decode_error(str(good)) is None
    assert sources.decode_error(str(tiff)) == (
        "InvalidArgumentError: Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, BMP, "
        "WebP required."
    )
    assert sources.decode_error(str(cut)).startswith("InvalidArgumentError: ")
    assert "{{" not in sources.decode_error(str(cut))


def _config(tmp_path, skip):
    for i, fmt in enumerate(("PNG", "JPEG", "TIFF")):
        (tmp_path / f"{i}.img").write_bytes(_encoded(fmt))
    (tmp_path / "train.csv").write_text("0.img,cat\n1.img,cat dog\n2.img,dog\n")
    (tmp_path / "test.csv").write_text("0.img,cat\n")
    c = default.get_config()
    c.data.name = "csv"
    c.data.train_annotations = str(tmp_path / "train.csv")
    c.data.test_annotations = str(tmp_path / "test.csv")
    c.data.skip_corrupt = skip
    return c


def test_tiff_fails_at_load_time_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"e.g. \S*2.img \(InvalidArgumentError: Unknown image"):
        sources.load_dataset(_config(tmp_path, skip=False))


def test_skip_corrupt_covers_what_the_decoder_refuses(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        ds = sources.load_dataset(_config(tmp_path, skip=True))
    assert [p.rsplit("/", 1)[-1] for p in ds.train.images] == ["0.img", "1.img"]
    assert "skipped 1 of 3 images" in caplog.text and "2.img" in caplog.text


def test_decode_errors_goes_on_past_bad_files(tmp_path):
    (tmp_path / "a.png").write_bytes(_encoded("PNG"))
    (tmp_path / "b.tif").write_bytes(_encoded("TIFF"))
    paths = [str(tmp_path / n) for n in ("a.png", "b.tif", "gone.png")]
    errors = sources.decode_errors(paths)
    assert errors[0] is None and "Unknown image file format" in errors[1]
    assert errors[2] == "not found"
