"""The budget on paper (mlcnc_jax/budget.py) and its lines in --mode=plan."""

from __future__ import annotations

import io
import json
import math

import jax
import numpy as np
import pytest
from PIL import Image

from configs import coco_lt, default, voc_lt
from mlcnc_jax import budget, cli, optim, plan
from mlcnc_jax.models import create_model
from mlcnc_jax.state import initial_train_state


def test_budget_is_flops_over_sustained_rate_plus_writes_over_bandwidth():
    b = budget.budget(
        train_step_flops=2e12,
        total_steps=1000,
        eval_step_flops=5e11,
        eval_batches_per_pass=10,
        eval_passes=4,
        state_bytes=4e8,
        checkpoints=5,
        mfu=0.1,
        peak_flops=1e15,
        disk_bytes_per_s=1e9,
    )
    # By hand: 1e14 FLOP/s sustained; 2e15 FLOP of training = 20 s; 2e13 FLOP of
    # evaluation = 0.2 s; 2 GB written at 1 GB/s = 2 s.
    assert b["train_hours"] == pytest.approx(20.0 / 3600)
    assert b["eval_hours"] == pytest.approx(0.2 / 3600)
    assert b["checkpoint_hours"] == pytest.approx(2.0 / 3600)
    assert b["hours"] == pytest.approx(22.2 / 3600)


def test_reference_mfu_is_what_the_published_throughputs_imply():
    # 4.1 G multiply-accumulates forward = 8.2 GFLOP; training 3x = 24.6 GFLOP an image.
    assert budget.reference_mfu("H100") == pytest.approx(3000 * 24.6e9 / 989e12)  # 7.46 %
    assert budget.reference_mfu("A100") == pytest.approx(2500 * 24.6e9 / 312e12)  # 19.7 %
    # The default budget runs at the H100's figure against its dense bfloat16 peak.
    b = budget.budget(
        train_step_flops=24.6e9 * 3000,  # one second of images at the published rate
        total_steps=3600,
        eval_step_flops=0.0,
        eval_batches_per_pass=0,
        eval_passes=0,
        state_bytes=0.0,
        checkpoints=0,
    )
    assert b["hours"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs", [{"mfu": 0.0}, {"mfu": 1.5}, {"peak_flops": 0.0}, {"disk_bytes_per_s": -1.0}]
)
def test_budget_rejects_impossible_rates(kwargs):
    args = dict(
        train_step_flops=1.0,
        total_steps=1,
        eval_step_flops=1.0,
        eval_batches_per_pass=1,
        eval_passes=1,
        state_bytes=1.0,
        checkpoints=1,
    )
    with pytest.raises(ValueError, match="budget: mfu must be in"):
        budget.budget(**args, **kwargs)


def _class_aware_labels(k: int, counts: list[int]) -> np.ndarray:
    """Image i of class c (one label each): class-aware epoch = max count x K."""
    rows = [c for c, n in enumerate(counts) for _ in range(n)]
    labels = np.zeros((len(rows), k), np.uint8)
    labels[np.arange(len(rows)), rows] = 1
    return labels


def test_reference_configs_have_stored_flop_counts():
    # --mode=plan prints the budget for the shipped recipes: their keys must be stored.
    stored = budget.load_step_flops()
    for module, k in ((coco_lt, 80), (voc_lt, 20)):
        for recipe in ("reference", "paper"):
            entry = stored.get(budget.model_key(module.get_config(recipe), k))
            assert entry is not None, (module.__name__, recipe)
            # ResNet-50 + head at 224 px: about 25 GFLOP a training image, 8.4 an eval one.
            assert 23e9 < entry["train_step_flops"] / entry["batch_size"] < 27e9
            assert 7.5e9 < entry["eval_step_flops"] / entry["eval_batch_size"] < 9.5e9


def test_plan_budget_of_coco_lt_equals_a_hand_computation():
    config = coco_lt.get_config()
    counts = [30] + [2] * 79
    p = plan.make_plan(config, _class_aware_labels(80, counts), num_test=200)
    entry = budget.load_step_flops()[budget.model_key(config, 80)]
    steps = 100 * math.ceil(30 * 80 / 64)  # 100 class-aware epochs of 2,400 samples
    sustained = 3000 * 24.6e9  # FLOP/s: the published H100 throughput's
    hours = {
        "train_hours": entry["train_step_flops"] * steps / sustained / 3600,
        # every epoch two passes (raw, EMA) of ceil(200 / 64) = 4 padded batches
        "eval_hours": entry["eval_step_flops"] * 4 * 200 / sustained / 3600,
        "checkpoint_hours": entry["state_bytes"] * math.ceil(steps / 1000) / 1e9 / 3600,
    }
    assert p["total_steps"] == steps
    for key, value in hours.items():
        assert p["budget"][key] == pytest.approx(value, rel=1e-9), key
    assert p["budget"]["hours"] == pytest.approx(sum(hours.values()), rel=1e-9)


def test_plan_without_a_stored_count_says_how_to_measure_it():
    config = coco_lt.get_config()
    config.data.image_size = 320  # no stored count at this size
    p = plan.make_plan(config, _class_aware_labels(80, [3] * 80), num_test=10)
    assert p["budget"] is None
    text = plan.format_plan(p)
    assert "no XLA FLOP count stored" in text and "320px" in text
    assert "python -m benchmarks.step_flops --config=CONFIG" in text


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _coco_tree(root, k=80):
    """A COCO-LT tree of 2k training and 5 test images (k categories, ids not contiguous)."""
    names = [f"thing{i}" for i in range(k)]
    train = {1 + i: sorted({i % k, (i + 1) % k}) for i in range(2 * k)}
    test = {9000 + i: [i % k] for i in range(5)}
    for split_name, images in (("train2017", train), ("val2017", test)):
        (root / split_name).mkdir(parents=True)
        entries, anns = [], []
        for j, (image_id, classes) in enumerate(images.items()):
            file_name = f"{image_id:012d}.jpg"
            (root / split_name / file_name).write_bytes(_jpeg(j))
            entries.append({"id": image_id, "file_name": file_name, "width": 24, "height": 24})
            for c in classes:
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1 + 2 * c})
        cats = [{"id": 1 + 2 * c, "name": n} for c, n in enumerate(names)]
        ann = root / "annotations" / f"instances_{split_name}.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(json.dumps({"images": entries, "annotations": anns, "categories": cats}))
    freq = np.zeros(k, int)
    for classes in train.values():
        freq[classes] += 1
    split = {
        "num_classes": k,
        "class_names": names,
        "train_image_ids": list(train),
        "train_labels": list(train.values()),
        "class_freq": freq.tolist(),
        "class_split": {"head": [], "medium": [], "tail": list(range(k))},
    }
    (root / "lt_splits").mkdir()
    (root / "lt_splits" / "coco_lt.json").write_text(json.dumps(split))


def test_plan_mode_on_coco_lt_prints_the_hours_line(tmp_path, capsys):
    _coco_tree(tmp_path / "coco")
    config = coco_lt.get_config()
    config.data.root = str(tmp_path / "coco")
    result = cli.run(config, str(tmp_path / "work"), "plan")
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("budget on paper, one H100:"))
    b = result["budget"]
    assert f"{b['hours']:.2f} hours" in line
    assert b["hours"] == pytest.approx(b["train_hours"] + b["eval_hours"] + b["checkpoint_hours"])
    assert json.loads(out.strip().splitlines()[-1])["budget"] == pytest.approx(b)


def test_measured_state_bytes_are_the_real_states(tmp_path):
    # The abstract state's bytes against a real one built the way training builds it.
    config = default.get_config()
    config.model.pretrained = ""
    measured = budget.measure_step_flops(config, num_classes=6)
    model = create_model(config, 6)
    tx, _ = optim.create_optimizer(config, total_steps=100)
    state = initial_train_state(config, model, tx, 6)
    assert measured["state_bytes"] == sum(x.nbytes for x in jax.tree.leaves(state))
    assert measured["key"] == budget.model_key(config, 6)
    # Training an image costs about 3x scoring it (forward + two backward products).
    per_image = measured["train_step_flops"] / config.train.batch_size
    assert 2.5 < per_image / (measured["eval_step_flops"] / config.eval.batch_size) < 3.5


def test_step_flops_settings_change_the_key_and_bad_ones_say_how():
    from benchmarks import step_flops

    config = step_flops.apply_settings(
        step_flops.load_config("coco_lt:paper"), ["data.image_size=448", "dtype=float32"]
    )
    assert config.model.classifier == "etf"  # the recipe argument was applied
    assert budget.model_key(config, 80).startswith("mlcnc/resnet50/448px/float32/K80/")
    with pytest.raises(ValueError, match="write FIELD=VALUE"):
        step_flops.apply_settings(config, ["data.image_size"])
