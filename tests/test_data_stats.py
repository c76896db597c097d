"""Split inspection: table, groups, histogram, and the last-line JSON."""

import json

import numpy as np
from PIL import Image

from mlcnc_jax.data import stats
from mlcnc_jax.data.dataset import MultiLabelDataset, Split


def _dataset():
    rng = np.random.default_rng(0)
    counts = np.array([150, 5, 40, 100, 19, 20, 0])  # around the 100 / 20 thresholds
    n = 400
    train = np.zeros((n, len(counts)), np.uint8)
    for c, m in enumerate(counts):
        train[rng.choice(n, m, replace=False), c] = 1
    test = (rng.random((30, len(counts))) < 0.3).astype(np.uint8)
    names = [f"class{c}" for c in range(len(counts))]
    return (
        MultiLabelDataset(
            "toy",
            names,
            Split([f"{i}.jpg" for i in range(n)], train, list(range(n))),
            Split([f"t{i}.jpg" for i in range(30)], test, list(range(30))),
        ),
        counts,
        test,
    )


def test_data_stats_prints_table_groups_histogram_and_json(tmp_path, capsys):
    ds, counts, test = _dataset()
    result = stats.data_stats(ds, str(tmp_path / "work"))
    lines = capsys.readouterr().out.strip().splitlines()
    last = json.loads(lines[-1])
    assert last == json.loads(json.dumps(result))
    assert last["num_train_images"] == 400 and last["num_test_images"] == 30
    assert last["class_freq"] == counts.tolist()
    assert last["test_class_freq"] == test.sum(axis=0).tolist()
    assert last["head"] == [0, 3] and last["medium"] == [2, 5] and last["tail"] == [1, 4, 6]
    # Table: one row per class, most frequent first, with its group.
    table = [ln.split() for ln in lines if ln.split() and ln.split()[0].isdigit()]
    assert [int(r[0]) for r in table] == np.argsort(-counts, kind="stable").tolist()
    assert {r[1]: (r[2], int(r[3])) for r in table}["class4"] == ("tail", 19)
    assert any(ln.startswith("head (2): class0, class3") for ln in lines)
    png = tmp_path / "work" / "class_histogram.png"
    assert last["histogram"] == str(png)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_histogram_bars_sorted_and_coloured(tmp_path, monkeypatch):
    import matplotlib.axes

    seen = {}
    original = matplotlib.axes.Axes.bar

    def spy(self, x, height, *args, **kwargs):
        seen["height"], seen["color"] = list(height), list(kwargs["color"])
        return original(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", spy)
    freq = [3, 120, 50]
    split = {"head": [1], "medium": [2], "tail": [0]}
    stats.plot_class_histogram(["a", "b", "c"], freq, split, str(tmp_path / "h.png"))
    assert seen["height"] == [120, 50, 3]
    colours = stats.GROUP_COLOURS
    assert seen["color"] == [colours["head"], colours["medium"], colours["tail"]]
