"""notebooks/colab_quickstart.ipynb runs top to bottom (with MLCNC_NOTEBOOK_TINY=1, on CPU)."""

import json
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_quickstart.ipynb"


def outputs_of(cell) -> tuple[str, int]:
    """(all text the cell printed, number of PNG images it displayed)."""
    text, images = [], 0
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            text.append(out["text"])
        data = out.get("data", {})
        text.append(data.get("text/plain", ""))
        images += "image/png" in data
    return "".join(text), images


def test_quickstart_notebook_runs(tmp_path, monkeypatch, data_root):
    monkeypatch.setenv("MLCNC_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("MLCNC_NOTEBOOK_WORKDIR", str(tmp_path / "workdir"))
    monkeypatch.setenv("MLCNC_NOTEBOOK_DATA", data_root)  # the session's generated data
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    try:
        client.execute()
    except Exception as e:  # show which cell failed and why, not the kernel protocol
        pytest.fail(f"The notebook failed: {e}")

    cells = [c for c in nb.cells if c.cell_type == "code"]
    printed = {i: outputs_of(c) for i, c in enumerate(cells)}
    by_source = {
        key: next(i for i, c in enumerate(cells) if key in c.source)
        for key in (
            "find_spec",
            "ap_vs_freq",
            "neural_collapse_",
            "attention_maps = True",
            "coco_lt.get_config",
            "default.get_config",
        )
    }
    # The package was importable (the checkout), so nothing was pip-installed.
    assert "mlcnc_jax is installed" in printed[by_source["find_spec"]][0]
    # The per-class AP plot and table, from the run's own report.
    workdir = tmp_path / "workdir"
    (report_path,) = workdir.glob("eval_*.json")
    report = json.loads(report_path.read_text())
    text, images = printed[by_source["ap_vs_freq"]]
    assert images == 1
    assert all(c["class"] in text for c in report["per_class"])
    # The neural-collapse measures shown are those of the report.
    text, _ = printed[by_source["neural_collapse_"]]
    nc1 = report["neural_collapse_raw"]["nc1"]
    assert f"nc1 {nc1:.3f}" in text
    # One attention map per test image written out, each displayed.
    text, images = printed[by_source["attention_maps = True"]]
    maps = sorted((workdir / "attention").glob("*.png"))
    assert len(maps) == images == 4
    assert all(m.stat().st_size > 1000 for m in maps)
    # It follows the quick start: the default config, fine-tuned from the shipped trunk.
    from mlcnc_jax import trunks

    assert trunks.SYNTHETIC_PRETRAIN in printed[by_source["default.get_config"]][0]
    # The COCO section builds the coco_lt config without running it.
    assert printed[by_source["coco_lt.get_config"]][0].startswith("coco_lt ")


def test_quickstart_notebook_follows_the_default_config():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "64 px" not in text and "OWNER" not in text
    assert 'REPO_URL = os.environ.get("MLCNC_REPO_URL", "")' in code  # the user sets it
    # The default config keeps its shipped trunk (only the COCO section names other weights).
    assert "config.model.pretrained =" not in code.split("coco_config")[0]
    # Outside the test's TINY block, neither config is changed but for its paths.
    outside_tiny = code.split("if TINY:")[0] + code.split("# Every device")[1]
    assert "config.train.num_epochs =" not in outside_tiny
    assert "100 * c['ap_raw']" in code  # AP in percent, as mAP
