"""benchmarks.quality: its statistics against scipy, its verdicts, cache keys and run configs."""

import numpy as np
import pytest
from scipy import stats

from benchmarks import quality


@pytest.mark.parametrize("df", [1, 2, 3.5, 4, 7.3, 12, 29.5, 30, 45.0, 200.0])
def test_t_quantile_matches_scipy(df):
    assert quality.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-4)


@pytest.mark.parametrize(
    "a, b",
    [
        ([73.1, 72.4, 74.0, 73.5, 72.9], [71.0, 72.2, 70.5, 71.9, 71.1]),
        ([60.0, 61.5, 59.2], [63.0, 58.0, 66.1, 61.2, 60.3]),
        ([1.0, 2.0], [1.5, 1.7, 1.6]),
    ],
)
def test_welch_interval_matches_scipy(a, b):
    got = quality.welch_interval(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert got["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert got["low"] == pytest.approx(ref.low, rel=1e-4)
    assert got["high"] == pytest.approx(ref.high, rel=1e-4)


def test_welch_interval_of_one_seed_has_no_bounds():
    got = quality.welch_interval([70.0], [68.0, 69.0])
    assert got["diff"] == pytest.approx(1.5) and np.isnan(got["low"]) and np.isnan(got["high"])


def test_verdict_says_whether_the_interval_excludes_zero():
    assert "**yes**" in quality.verdict({"diff": 2.0, "low": 0.5, "high": 3.5}, "x")
    assert "opposite" in quality.verdict({"diff": -2.0, "low": -3.5, "high": -0.5}, "x")
    assert "not shown" in quality.verdict({"diff": 0.4, "low": -0.5, "high": 1.3}, "x")
    assert "too few seeds" in quality.verdict({"diff": 0.4, "low": np.nan, "high": np.nan}, "x")


def _result(total, tail):
    return {"map": {"total": total, "head": 80.0, "medium": 70.0, "tail": tail}}


def test_verdicts_compare_mlcnc_with_the_sampler_matched_baseline():
    runs = {
        "long": {
            "mlcnc": [_result(73 + d, 61 + d) for d in (0.0, 0.3, -0.2)],
            "bce_aware": [_result(70 + d, 64 + d) for d in (0.0, 0.4, -0.3)],
            "bce_uniform": [_result(69 + d, 50 + d) for d in (0.0, 0.2, -0.1)],
        }
    }
    lines = quality.verdicts(runs, {"long": "bce_aware"}, quality.Protocol())
    tail_vs_aware, total_vs_aware, tail_vs_uniform = lines
    assert "`bce_aware`" in tail_vs_aware and "opposite" in tail_vs_aware
    assert "**yes**" in total_vs_aware and "**yes**" in tail_vs_uniform


def test_budget_check_says_whether_twice_the_steps_still_help():
    long = [_result(76 + d, 64) for d in (0.0, 0.5, -0.5, 0.2, -0.2)]
    plateau = {
        "long": {"bce_aware": long},
        "double": {"bce_aware": [_result(76 + d, 64) for d in (0.1, 0.6, -0.4)]},
    }
    climbing = {
        "long": {"bce_aware": long},
        "double": {"bce_aware": [_result(79 + d, 64) for d in (0.1, 0.3, -0.2)]},
    }
    (flat,) = quality.verdicts(plateau, {}, quality.Protocol())
    (up,) = quality.verdicts(climbing, {}, quality.Protocol())
    assert "720 minus 360 steps" in flat and "**not shown**" in flat and "+0.1 points" in flat
    assert "**yes**" in up and "+3.1 points" in up


def _config(name, steps, **changes):
    args = {"data_root": "/d", "lr": 1e-3, "logit_scale": 8.0, "seed": 0, "validation": False}
    return quality.run_config(name, steps, quality.Protocol(), **{**args, **changes})


def test_run_configs_start_from_the_default_and_change_only_their_row():
    c = _config("bce_uniform", 120, lr=3e-3, logit_scale=16.0, seed=2, validation=True)
    assert (c.model.name, c.data.sampling, c.loss.bce, c.loss.two_way) == (
        "baseline",
        "uniform",
        1.0,
        0.0,
    )
    assert c.train.num_epochs * c.train.steps_per_epoch == 120
    assert (c.train.learning_rate, c.seed, c.data.val_fraction) == (3e-3, 2, 0.25)
    assert c.model.pretrained.endswith(".safetensors")  # the shipped trunk
    second = _config("mlcnc", 360, second_split=True)
    assert (second.data.synthetic_seed, second.data.synthetic_train_split) == (1, "dbloss")
    assert second.model.logit_scale_init == 8.0 and second.data.val_fraction == 0.0
    vit = _config("bce_aware", 360, vit_trunk="/trunk")
    assert (vit.model.backbone, vit.model.pretrained) == (quality.VIT_BACKBONE, "/trunk")
    assert (vit.data.synthetic_seed, vit.data.synthetic_train_split) == (0, "planned")
    trunk = quality.vit_pretrain_job("/d", quality.Protocol())
    assert trunk.keep_workdir and trunk.config.model.backbone == quality.VIT_BACKBONE
    assert trunk.config.data.synthetic_classes == "pretrain" and trunk.config.model.pretrained == ""


def test_cache_key_ignores_a_later_field_at_its_old_value():
    c = _config("mlcnc", 120, validation=True)
    key = quality.config_hash(c)
    # The key as it was before data.synthetic_train_split and eval.max_images existed.
    old = c.to_dict()
    del old["data"]["synthetic_train_split"], old["eval"]["max_images"]
    old["data"]["root"], old["model"]["pretrained"] = "<data root>", "<shipped trunk>"
    import hashlib
    import json

    text = json.dumps(old, sort_keys=True) + json.dumps(quality._SALT, sort_keys=True)
    assert key == hashlib.sha256(text.encode()).hexdigest()[:10]
    # Where the data and the checkout are does not count; which weights start the run does.
    assert quality.config_hash(_config("mlcnc", 120, validation=True, data_root="/e")) == key
    c.model.pretrained = "/elsewhere/trunk"
    assert quality.config_hash(c) != key
    c.model.pretrained = _config("mlcnc", 120).model.pretrained
    c.data.synthetic_train_split = "dbloss"
    assert quality.config_hash(c) != key
    c.data.synthetic_train_split = "planned"
    c.train.learning_rate = 3e-3
    assert quality.config_hash(c) != key


def test_a_trunk_that_learned_too_little_gets_no_rows():
    def trunk(raw, ema):
        return {"map": {"total": raw}, "map_ema": {"total": ema}}

    full = quality.Protocol()
    assert full.min_trunk_map == 50.0
    assert quality.weak_trunk(trunk(96.0, 97.0), full) == []
    assert quality.weak_trunk(trunk(11.4, 60.0), full) == []  # the better of raw and EMA
    (why,) = quality.weak_trunk(trunk(11.4, 11.3), full)
    assert "only 11.4 mAP" in why and "below 50" in why
    assert quality.weak_trunk(trunk(None, None), full)  # no score: no rows
    assert quality.weak_trunk(trunk(8.0, 8.0), quality.QUICK) == []  # the smoke test runs them


def test_seed_cache_fills_the_cache_from_a_results_file(tmp_path, capsys):
    import dataclasses
    import json

    protocol, root = quality.Protocol(), "/d"
    sel = {"lr": 1e-3, "logit_scale": 8.0, "val_map": {"total": 63.1}}
    sel["grid"] = [{"lr": 1e-3, "logit_scale": 8.0, "val_map": {"total": 63.1}, "seconds": 5.0}]
    (final,) = quality.final_jobs("mlcnc", sel, protocol.long_steps, [0], protocol, root, "long")
    # The file's own hash may come from an older version of the script: the tag is the key.
    record = {"tag": final.tag, "config_hash": "0123456789", "seconds": 9.0}
    record.update(_result(75.0, 61.0))
    payload = {
        "protocol": dataclasses.asdict(protocol),
        "runs": {"long": {"mlcnc": [record]}},
        "selection": {"mlcnc": sel},
        "vit_trunk": {"seconds": 60.0, "test_map": 11.4, "test_map_ema": 11.3},
    }
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(payload))
    cache = str(tmp_path / "cache")
    assert quality.seed_cache(str(path), cache, protocol, root) == 3
    assert quality.seed_cache(str(path), cache, protocol, root) == 0  # cached ones stay

    # The runner finds all three without running anything: the final run, the selection
    # run (keyed again from its config) and the ViT trunk (no checkpoints, yet cached).
    val = quality.val_job("mlcnc", 1e-3, 8.0, protocol, root)
    trunk = quality.vit_pretrain_job(root, protocol)
    runner = quality.Runner(cache, workers=1, deadline=1.0)  # past: a missing run is skipped
    got_final, got_val, got_trunk = runner.run_all([final, val, trunk])
    assert "3 runs: 3 cached, 0 to run" in capsys.readouterr().out
    assert got_final["map"]["total"] == 75.0 and got_val["map"] == {"total": 63.1}
    assert got_trunk["map"]["total"] == 11.4 and got_trunk["workdir"] is None
    assert quality.weak_trunk(got_trunk, protocol)

    # A file of another protocol gives nothing.
    payload["protocol"]["long_steps"] = 720
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="follows another protocol"):
        quality.seed_cache(str(path), str(tmp_path / "other"), protocol, root)
    assert not (tmp_path / "other" / "runs").exists()
