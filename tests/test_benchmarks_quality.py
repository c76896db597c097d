"""benchmarks.quality: its report lines, run configs, cache keys and run cache.

The statistics are tested in test_benchmarks_quality_stats.py.
"""

import dataclasses
import hashlib
import json
import pathlib
import re

import numpy as np
import pytest

from benchmarks import quality_protocol as protocol_lib
from benchmarks import quality_report as report
from benchmarks import quality_runs as runs_lib

SALT = runs_lib.Salt(synthetic_lt="2.1.0", trunk="0" * 64)


def _sweep(root="/d", protocol=None, salt=SALT):
    return runs_lib.Sweep(protocol or protocol_lib.Protocol(), root, salt)


def test_interval_line_says_whether_the_interval_excludes_zero():
    above = report.interval_line({"diff": 2.0, "low": 0.5, "high": 3.5}, "x")
    assert above == "x: +2.0 points (95 % interval +0.5 to +3.5), **above 0**."
    assert "**below 0**" in report.interval_line({"diff": -2.0, "low": -3.5, "high": -0.5}, "x")
    assert "includes 0" in report.interval_line({"diff": 0.4, "low": -0.5, "high": 1.3}, "x")
    few = report.interval_line({"diff": 0.4, "low": np.nan, "high": np.nan}, "x")
    assert "too few seeds" in few


def _result(total, tail):
    return {"map": {"total": total, "head": 80.0, "medium": 70.0, "tail": tail}}


def test_claim_lines_compare_mlcnc_with_the_sampler_matched_baseline():
    runs = {
        "long": {
            "mlcnc": [_result(73 + d, 61 + d) for d in (0.0, 0.3, -0.2)],
            "bce_aware": [_result(70 + d, 64 + d) for d in (0.0, 0.4, -0.3)],
            "bce_uniform": [_result(69 + d, 50 + d) for d in (0.0, 0.2, -0.1)],
        }
    }
    lines = report.claim_lines(runs, {"long": "bce_aware"}, protocol_lib.Protocol())
    tail_vs_aware, total_vs_aware, tail_vs_uniform = lines
    assert "`bce_aware`" in tail_vs_aware and "**below 0**" in tail_vs_aware
    assert "**above 0**" in total_vs_aware and "**above 0**" in tail_vs_uniform
    # Numbers only: what they mean for the paper is written by hand in the findings file.
    assert not any(word in "".join(lines) for word in ("yes", "opposite", "not shown"))


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
    (flat,) = report.claim_lines(plateau, {}, protocol_lib.Protocol())
    (up,) = report.claim_lines(climbing, {}, protocol_lib.Protocol())
    assert "720 minus 360 steps" in flat and "includes 0" in flat and "+0.1 points" in flat
    assert "**above 0**" in up and "+3.1 points" in up


def _config(name, steps, **changes):
    args = {"data_root": "/d", "lr": 1e-3, "logit_scale": 8.0, "seed": 0, "validation": False}
    return protocol_lib.experiment_config(
        name, steps, protocol_lib.Protocol(), **{**args, **changes}
    )


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
    assert (vit.model.backbone, vit.model.pretrained) == (protocol_lib.VIT_BACKBONE, "/trunk")
    assert (vit.data.synthetic_seed, vit.data.synthetic_train_split) == (0, "planned")
    trunk = runs_lib.vit_pretrain_job(_sweep())
    assert trunk.keep_workdir and trunk.config.model.backbone == protocol_lib.VIT_BACKBONE
    assert trunk.config.data.synthetic_classes == "pretrain" and trunk.config.model.pretrained == ""


def test_cache_key_is_the_config_and_the_salt_given():
    c = _config("mlcnc", 120, validation=True)
    key = runs_lib.config_hash(c, SALT)
    fields = c.to_dict()
    fields["data"]["root"], fields["model"]["pretrained"] = "<data root>", "<shipped trunk>"
    text = json.dumps(fields, sort_keys=True) + json.dumps(
        {"synthetic_lt": "2.1.0", "trunk": "0" * 64}, sort_keys=True
    )
    assert key == hashlib.sha256(text.encode()).hexdigest()[:10]
    # Where the data and the checkout are does not count; which weights start the run does,
    # and so do another version of the generated data and another shipped trunk.
    assert runs_lib.config_hash(_config("mlcnc", 120, validation=True, data_root="/e"), SALT) == key
    assert runs_lib.config_hash(c, dataclasses.replace(SALT, synthetic_lt="2.2.0")) != key
    assert runs_lib.config_hash(c, dataclasses.replace(SALT, trunk="1" * 64)) != key
    c.model.pretrained = "/elsewhere/trunk"
    assert runs_lib.config_hash(c, SALT) != key
    c.model.pretrained = _config("mlcnc", 120).model.pretrained
    c.data.synthetic_train_split = "dbloss"
    assert runs_lib.config_hash(c, SALT) != key
    c.data.synthetic_train_split = "planned"
    c.train.learning_rate = 3e-3
    assert runs_lib.config_hash(c, SALT) != key
    c.train.learning_rate = 1e-3
    assert runs_lib.config_hash(c, SALT) == key
    job = runs_lib.val_job("mlcnc", 1e-3, 16.0, _sweep())
    assert job.key == f"val_mlcnc_lr0.001_g16_{job.config_hash}"


def test_the_salt_of_the_library_names_its_data_version_and_trunk():
    from mlcnc_jax import trunks
    from mlcnc_jax.data import synthetic

    salt = runs_lib.Salt.of_library()
    assert salt == runs_lib.Salt(
        str(synthetic.SyntheticLt.VERSION), trunks.SYNTHETIC_PRETRAIN_SHA256
    )


def test_a_trunk_that_learned_too_little_gets_no_rows():
    def trunk(raw, ema):
        return {"map": {"total": raw}, "map_ema": {"total": ema}}

    full = protocol_lib.Protocol()
    assert full.min_trunk_map == 50.0
    assert protocol_lib.weak_trunk(trunk(96.0, 97.0), full) == []
    assert protocol_lib.weak_trunk(trunk(11.4, 60.0), full) == []  # the better of raw and EMA
    (why,) = protocol_lib.weak_trunk(trunk(11.4, 11.3), full)
    assert "only 11.4 mAP" in why and "below 50" in why
    assert protocol_lib.weak_trunk(trunk(None, None), full)  # no score: no rows
    assert (
        protocol_lib.weak_trunk(trunk(8.0, 8.0), protocol_lib.QUICK) == []
    )  # the smoke test runs them


def test_seed_cache_fills_the_cache_from_a_results_file(tmp_path, capsys):
    sweep = _sweep()
    protocol = sweep.protocol
    sel = {"lr": 1e-3, "logit_scale": 8.0, "val_map": {"total": 63.1}}
    sel["grid"] = [{"lr": 1e-3, "logit_scale": 8.0, "val_map": {"total": 63.1}, "seconds": 5.0}]
    (final,) = runs_lib.final_jobs("mlcnc", sel, protocol.long_steps, [0], sweep, "long")
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
    assert runs_lib.seed_cache(str(path), cache, sweep) == 3
    assert runs_lib.seed_cache(str(path), cache, sweep) == 0  # cached ones stay

    # The runner finds all three without running anything: the final run, the selection
    # run (keyed again from its config) and the ViT trunk (no checkpoints, yet cached).
    val = runs_lib.val_job("mlcnc", 1e-3, 8.0, sweep)
    trunk = runs_lib.vit_pretrain_job(sweep)
    runner = runs_lib.Runner(cache, workers=1, deadline=1.0)  # past: a missing run is skipped
    got_final, got_val, got_trunk = runner.run_all([final, val, trunk])
    assert "3 runs: 3 cached, 0 to run" in capsys.readouterr().out
    assert got_final["map"]["total"] == 75.0 and got_val["map"] == {"total": 63.1}
    assert got_trunk["map"]["total"] == 11.4 and got_trunk["workdir"] is None
    assert protocol_lib.weak_trunk(got_trunk, protocol)

    # A file of another protocol gives nothing.
    payload["protocol"]["long_steps"] = 720
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="follows another protocol"):
        runs_lib.seed_cache(str(path), str(tmp_path / "other"), sweep)
    assert not (tmp_path / "other" / "runs").exists()


def test_the_plan_of_every_part():
    p = protocol_lib.Protocol()
    parts = protocol_lib.PARTS
    names = protocol_lib.selection_rows(parts)
    assert names[:3] == ["mlcnc", "bce_aware", "bce_uniform"] and len(names) == 17
    assert protocol_lib.selection_rows(["ablations"])[:2] == ["mlcnc", "no_fla"]
    rows = protocol_lib.final_rows(parts, names, "two_way_aware", p)
    by = {(budget, name): (steps, seeds) for budget, name, steps, seeds in rows}
    assert len(by) == len(rows)
    # The main rows (and the best other baseline) get 5 seeds at both budgets ...
    for name in ("mlcnc", "bce_aware", "bce_uniform", "two_way_aware"):
        assert by["long", name] == (360, (0, 1, 2, 3, 4)) and by["short", name][0] == 120
    # ... the others 3 at the long one; the budget ladder only the class-aware rows.
    assert by["long", "focal_uniform"] == (360, (0, 1, 2)) and ("short", "no_fla") not in by
    assert {n for b, n in by if b == "second"} == {"mlcnc", "bce_aware", "bce_uniform"}
    assert {n for b, n in by if b == "quadruple"} == {"mlcnc", "bce_aware", "two_way_aware"}
    assert [n for b, n in by if b == "octuple"] == ["bce_aware"] and by["octuple", "bce_aware"][0]
    assert len(rows) == 4 * 2 + 13 + 3 + 3 * 2 + 1
    # Without part 'main' its rows run only where another part needs them.
    only_budget = protocol_lib.final_rows(["budget"], ["mlcnc", "bce_aware"], None, p)
    assert {b for b, *_ in only_budget} == {"double", "quadruple", "octuple"}
    # Seed-major: every budget's seed 0 before any seed 1.
    order = protocol_lib.run_order([("short", 1), ("long", 1), ("double", 0), ("long", 0)])
    assert order == [3, 2, 1, 0]


def test_the_report_states_numbers_and_links_to_the_findings(tmp_path):
    runs = {
        "mlcnc": [
            {**_result(73.0 + d, 61.0 + d), "neural_collapse": _nc(), "seconds": 9.0}
            for d in (0.0, 0.5, -0.5)
        ],
        "bce_aware": [
            {**_result(70.0 + d, 64.0 + d), "neural_collapse": _nc(), "seconds": 8.0}
            for d in (0.0, 0.4, -0.4)
        ],
    }
    point = {"lr": 1e-3, "logit_scale": None, "seconds": 5.0}
    chosen = {
        "mlcnc": {"lr": 1e-3, "logit_scale": 8.0, "val_map": {"total": 60.0}, "grid": []},
        "bce_aware": {
            "lr": 1e-3,
            "logit_scale": None,
            "val_map": {"total": 55.0},
            "grid": [{**point, "val_map": {"total": 55.0, "head": 1, "medium": 2, "tail": 3}}],
        },
    }
    protocol = protocol_lib.Protocol()
    all_runs = {b: {} for b in protocol_lib.BUDGET_TITLES} | {"long": runs}
    analysis = report.analyse(all_runs, chosen, None, protocol)
    assert analysis["best_sampler_matched"] == {"long": "bce_aware"}
    assert list(analysis["differences"]) == ["mlcnc − bce_aware, long"]
    assert analysis["tables"]["long"]["mlcnc"]["total"]["mean"] == pytest.approx(73.0)
    payload = {
        "machine": "m",
        "load_before": 0.0,
        "load_after": 0.0,
        "run_seconds": 60.0,
        "n_runs": 7,
        "workers": 1,
        "wall_seconds": 60.0,
        "not_run": "",
        "selection": chosen,
        "vit_trunk": None,
        **analysis,
        "runs": all_runs,
    }
    out = tmp_path / "results"
    out.mkdir()
    # A hand-written block in an earlier report is not carried over: findings have their file.
    (out / "quality.md").write_text("## Findings\n\nhand-written\n")
    report.write_report(str(out), payload, protocol, "python -m benchmarks.quality")
    text = (out / "quality.md").read_text()
    assert "hand-written" not in text and "## Findings" not in text
    (link,) = re.findall(r"\]\(([^)]*quality-findings\.md)\)", text)
    assert (out / link).resolve() == pathlib.Path(report.FINDINGS).resolve()
    assert pathlib.Path(report.FINDINGS).is_file()
    assert "Tail, MLC-NC minus the best sampler-matched baseline (`bce_aware`" in text
    assert "**below 0**" in text and "| mlcnc | 0.001 | 8 | 73.0 ± 0.5 |" in text
    saved = json.loads((out / "quality.json").read_text())
    assert saved["verdicts"] == analysis["verdicts"] and (out / "quality.png").is_file()


def _nc():
    return {"nc1": 3.0, "nc2": 0.1, "mean_angle": 92.0}
