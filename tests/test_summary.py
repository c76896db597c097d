"""summary.json: the final evaluation and the best one on the test split, labelled."""

import json

import numpy as np
import pytest

from mlcnc_jax import reports


def _report(step, raw, ema):
    return {
        "step": step,
        "map_raw": {"total": raw, "tail": None},
        "map_ema": {"total": ema, "tail": None},
    }


def test_final_and_best_are_both_reported():
    evals = [_report(30, 61.0, 50.0), _report(10, 40.0, 52.0), _report(20, 63.5, 45.0)]
    s = reports.summarize_evaluations(evals, total_steps=30)
    assert s["final"] == {
        "step": 30,
        "map_raw": evals[0]["map_raw"],
        "map_ema": evals[0]["map_ema"],
    }
    assert s["complete"] is True and s["num_evaluations"] == 3
    assert s["best_raw_on_test"]["step"] == 20 and s["best_raw_on_test"]["map_raw"]["total"] == 63.5
    assert s["best_ema_on_test"]["step"] == 10
    for kind in ("raw", "ema"):
        assert (
            "selected on the test split, as the authors' code does"
            in (s[f"best_{kind}_on_test"]["selection"])
        )
    assert [e["step"] for e in s["evaluations"]] == [10, 20, 30]


def test_ties_go_to_the_earlier_step_and_missing_scores_never_win():
    evals = [_report(2, None, None), _report(4, 50.0, 50.0), _report(6, 50.0, 49.0)]
    s = reports.summarize_evaluations(evals, total_steps=8)
    assert s["best_raw_on_test"]["step"] == 4 and s["best_ema_on_test"]["step"] == 4
    assert s["complete"] is False and s["final"]["step"] == 6
    assert reports.summarize_evaluations(evals)["complete"] is None
    with pytest.raises(ValueError, match="No evaluation"):
        reports.summarize_evaluations([])


def test_summary_is_read_from_the_workdir_reports(tmp_path):
    for r in (_report(5, 10.0, 11.0), _report(10, 12.0, 9.0)):
        (tmp_path / f"eval_{r['step']}.json").write_text(json.dumps(r))
    (tmp_path / "eval_notes.json").write_text("not a report")  # not eval_<step>.json: ignored
    written = reports.write_run_summary(str(tmp_path), total_steps=10)
    assert json.loads((tmp_path / reports.SUMMARY).read_text()) == written
    assert reports.read_summary(str(tmp_path)) == written
    assert written["best_raw_on_test"]["step"] == 10 and written["best_ema_on_test"]["step"] == 5
    assert reports.read_summary(str(tmp_path / "elsewhere")) is None


def test_the_run_result_prints_the_final_scores_and_the_best_only_when_chosen():
    import json
    import math

    from mlcnc_jax.results import Evaluation, GroupMAP, RunResult, Scores

    scores = Scores(
        map=GroupMAP(total=60.0, head=70.0, medium=65.0, tail=math.nan),
        ap=np.array([0.5, 0.7]),
        neural_collapse={"nc1": 1.5},
    )
    final = Evaluation(step=8, raw=scores, ema=scores, num_images_scored=2, num_images_expected=2)
    best = {"step": 4, "map_raw": {"total": 61.0, "head": 1.0, "medium": 2.0, "tail": None}}
    summary = {"num_evaluations": 2, "best_raw_on_test": best}
    result = RunResult.from_summary(final, summary)
    assert result.best_raw_on_test.step == 4 and result.best_raw_on_test.map_raw.total == 61.0
    line = json.loads(result.summary_line())
    assert line["step"] == 8 and line["map_raw"]["tail"] is None  # strict JSON: NaN -> null
    assert list(line["map_raw"]) == ["total", "head", "medium", "tail"]
    assert line["best_raw_on_test"] == best and line["neural_collapse"] == {"nc1": 1.5}
    # One evaluation, or a best without a score: nothing to choose between.
    assert RunResult.from_summary(final, {**summary, "num_evaluations": 1}).best_raw_on_test is None
    unscored = {
        "num_evaluations": 3,
        "best_raw_on_test": {**best, "map_raw": {**best["map_raw"], "total": None}},
    }
    assert RunResult.from_summary(final, unscored).best_raw_on_test is None
    assert "best_raw_on_test" not in json.loads(RunResult.from_summary(final, None).summary_line())
