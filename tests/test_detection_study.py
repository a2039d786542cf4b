"""The detection-level study runs, reads detectron2's metrics back, and skips finished runs."""
import subprocess

import pytest

from mabn_d2.detection_study import final_metrics, results_table, run_detection_study

from .conftest import REPO_ROOT
from .test_engine import TINY


def test_final_metrics_reads_the_last_evaluation(tmp_path):
    assert final_metrics(str(tmp_path)) is None
    (tmp_path / "metrics.json").write_text(
        '{"iteration": 1, "total_loss": 3.0}\n'
        '{"iteration": 2, "bbox/AP": 1.0, "bbox/AP50": 2.0, "segm/AP": 3.0, "segm/AP50": 4.0}\n'
        '{"iteration": 3, "bbox/AP": 5.0, "bbox/AP50": 6.0, "segm/AP": 7.0, "segm/AP50": 8.0}\n'
    )
    assert final_metrics(str(tmp_path)) == {"bbox/AP": 5.0, "bbox/AP50": 6.0, "segm/AP": 7.0, "segm/AP50": 8.0}


def test_results_table_reports_mean_and_std():
    table = results_table({"MABN": {0: dict.fromkeys(["bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50"], 10.0),
                                    1: dict.fromkeys(["bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50"], 20.0)}})
    assert "| MABN | 0, 1 | 15.0 ± 7.1 |" in table
    single = results_table({"BN": {0: dict.fromkeys(["bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50"], 10.0)}})
    assert "| BN | 0 | 10.0 | 10.0 |" in single  # no spread from one seed


@pytest.mark.slow
def test_study_runs_then_skips_finished_runs(demo_datasets_dir, tmp_path, monkeypatch):
    opts = TINY + ["SOLVER.MAX_ITER", "2"]
    results = run_detection_study(str(tmp_path), ["MABN"], [0], opts, repo_root=REPO_ROOT)
    assert set(results["MABN"][0]) == {"bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50"}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(subprocess, "run", no_training)
    assert run_detection_study(str(tmp_path), ["MABN"], [0], opts, repo_root=REPO_ROOT) == results
