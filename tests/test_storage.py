"""Run outputs go to local paths and bucket URLs through one small module."""

import os

from mlcnc_jax import storage


def test_resolve_keeps_urls_and_absolutises_local_paths(monkeypatch, tmp_path):
    assert storage.resolve("gs://bucket/runs/a") == "gs://bucket/runs/a"
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("runs/a") == str(tmp_path / "runs" / "a")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.resolve("~/x") == str(tmp_path / "x")
    assert storage.join("gs://bucket/runs", "eval_3.json") == "gs://bucket/runs/eval_3.json"


def test_text_and_figures_are_written(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = storage.join(str(tmp_path), "deep", "dir")
    storage.makedirs(target)
    storage.write_text(storage.join(target, "a.json"), '{"x": 1}')
    assert (tmp_path / "deep" / "dir" / "a.json").read_text() == '{"x": 1}'
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    storage.save_figure(fig, storage.join(target, "p.png"))
    with open(os.path.join(target, "p.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
