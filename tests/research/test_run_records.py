"""Committed run records: round trip, loss windows, the tables rendered from them, and the study tool's wiring."""
import importlib.util
import json
import os

import pytest

from research.detection_report import detection_report, final_table
from research.paper_setting_report import paper_setting_table
from research.run_records import load_records, loss_windows, record_from_run, write_record

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _record(variant, seed, box, mask, **extra):
    record = {"study": "detection_study", "variant": variant, "seed": seed, "description": "d",
              "curve": {"2": {"bbox/AP": box / 2, "segm/AP": mask / 2},
                        "4": {"bbox/AP": box, "bbox/AP50": box + 10, "segm/AP": mask, "segm/AP50": mask + 10}},
              "loss_windows": {"edges": [0, 2, 4], "total_loss": [2.0, 1.0]}, "commit": "abc1234",
              "wall_minutes": 1.5, "config_opts": ["X", "1"], "source": "test"}
    record.update(extra)
    return record


def test_records_round_trip_with_integer_iterations(tmp_path):
    path = write_record(str(tmp_path), _record("BN", 1, 40.0, 38.0))
    assert os.path.basename(path) == "BN_seed1.json"
    (loaded,) = load_records(str(tmp_path))
    assert sorted(loaded["curve"]) == [2, 4] and loaded["curve"][4]["bbox/AP"] == 40.0
    with pytest.raises(ValueError, match="empty evaluation curve"):
        write_record(str(tmp_path), _record("GN", 0, 1.0, 1.0, curve={}))
    (tmp_path / "GN_seed0.json").write_text("{not json")
    with pytest.raises(ValueError, match="GN_seed0.json: not a JSON run record"):
        load_records(str(tmp_path))


def test_loss_windows_average_total_loss_between_edges(tmp_path):
    lines = [{"iteration": i, "total_loss": float(i)} for i in range(6)] + [{"iteration": 5, "bbox/AP": 1.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert loss_windows(str(tmp_path / "metrics.json"), [0, 2, 6, 9]) == {
        "edges": [0, 2, 6, 9], "total_loss": [0.5, 3.5, None]}
    assert loss_windows(str(tmp_path / "absent.json"), [0, 1]) is None
    (tmp_path / "code_commit.txt").write_text("0123456789abcdef\n")
    (tmp_path / "wall_time.txt").write_text("60\n30\n")
    record = record_from_run(str(tmp_path), "s", "BN", 0, "d", {5: {"bbox/AP": 1.0, "segm/AP": 2.0}}, [0, 6], [])
    assert record["commit"] == "0123456" and record["wall_minutes"] == 1.5
    assert record["loss_windows"]["total_loss"] == [2.5]


def test_final_table_computes_mean_and_std_and_keeps_a_published_summary_for_its_seeds():
    records = [_record("BN", 0, 40.0, 38.0), _record("BN", 1, 44.0, 40.0)]
    table = final_table(records)
    assert "| BN | 0, 1 | 42.0 ± 2.8 | 52.0 ± 2.8 | 39.0 ± 1.4 | 49.0 ± 1.4 | 40.0 / 38.0; 44.0 / 40.0 |" in table
    summary = {"seeds": [0, 1], "bbox/AP": "42.1 ± 2.9", "bbox/AP50": "51.0 ± 1.0", "segm/AP": "39.0 ± 1.4",
               "segm/AP50": "48.0 ± 2.0"}
    restored = [_record("BN", 0, 40.0, 38.0, published_summary=summary), _record("BN", 1, 44.0, 40.0)]
    assert "| BN | 0, 1 | 42.1 ± 2.9 | 51.0 ± 1.0 |" in final_table(restored)
    # a third seed makes the published summary stale: recomputed where every seed has the metric
    restored.append(_record("BN", 2, 42.0, 39.0))
    assert "| BN | 0, 1, 2 | 42.0 ± 2.0 | 52.0 ± 2.0 |" in final_table(restored)
    partial = _record("GN", 0, 30.0, 29.0)
    del partial["curve"]["4"]["bbox/AP50"]
    assert "| GN | 0 | 30.0 | – | 29.0 | 39.0 |" in final_table([partial])


def test_detection_report_holds_every_run():
    report = detection_report([_record("BN", 0, 40.0, 38.0), _record("MABN", 0, 30.0, 31.0)])
    assert "| BN (seed 0) | 20.0 / 19.0 | 40.0 / 38.0 |" in report
    assert "| MABN (seed 0) | 2.000 | 1.000 |" in report
    assert "| MABN_seed0 | 1.5 | abc1234 | test |" in report
    with pytest.raises(ValueError, match="no detection run records"):
        detection_report([])


def test_paper_setting_table_has_a_row_per_arm_with_seeds_and_chi2():
    lag = {"17-30": {"all layers": [0.12, 0.02]}}
    records = [_record("BN2", 0, 7.0, 5.0), _record("BN2", 1, 9.0, 6.0),
               _record("MABN_per_gpu", 0, 8.0, 6.0, chi2_lag=lag)]
    table = paper_setting_table(records)
    assert ("| BN2 | 0, 1 | 8.0 ± 1.4 / 5.5 ± 0.7 | 7.0 / 5.0; 9.0 / 6.0 | seed 0 2: 3.5 / 2.5; seed 1 2: 4.5 / 3.0 "
            "| 1.000 (steps 2-4) | – |") in table
    assert "| MABN_per_gpu | 0 | 8.0 / 6.0 | 8.0 / 6.0 | 2: 4.0 / 3.0 |" in table and "17-30: 0.12 (+0.02)" in table


def _tool():
    spec = importlib.util.spec_from_file_location("detection_study_tool",
                                                  os.path.join(REPO_ROOT, "tools", "detection_study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_virtual_gpus_runs_the_paper_setting_and_writes_its_records(tmp_path, monkeypatch):
    tool = _tool()
    calls = {}
    run_dir = tmp_path / "out" / "BN2_seed3"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("SOLVER:\n  MAX_ITER: 4\n")
    (run_dir / "metrics.json").write_text(
        "\n".join(json.dumps(r) for r in [{"iteration": i, "total_loss": 1.0} for i in range(4)]
                  + [{"iteration": 3, "bbox/AP": 5.0, "bbox/AP50": 9.0, "segm/AP": 4.0, "segm/AP50": 8.0}]) + "\n")

    def fake_run_study(output_dir, arms, seeds, **kwargs):
        calls.update(output_dir=output_dir, arms=arms, seeds=seeds, **kwargs)
        return {"BN2": {3: str(run_dir)}}

    monkeypatch.setattr(tool, "run_study", fake_run_study)
    report = tool.main(["--virtual-gpus", "8", "--variants", "BN2", "--seeds", "3", "--steps", "4",
                        "--eval-period", "2", "--output-dir", str(tmp_path / "out"),
                        "--records-dir", str(tmp_path / "records")])
    assert calls["arms"] == ["BN2"] and calls["seeds"] == [3] and calls["virtual_gpus"] == 8
    assert calls["steps"] == 4 and calls["eval_period"] == 2 and calls["recipe"] == "official"
    (record,) = load_records(str(tmp_path / "records"))
    assert record["variant"] == "BN2" and record["seed"] == 3 and record["curve"][4]["bbox/AP"] == 5.0
    assert "8 virtual GPUs x 2 images, SGD batch 16" in record["setting"] and "recipe official" in record["setting"]
    assert (record["recipe"], record["steps"], record["jitter"]) == ("official", 4, 0.0)
    assert "SOLVER.BIAS_LR_FACTOR" in record["config_opts"]
    assert "| BN2 | 3 | 5.0 / 4.0 |" in report
    with pytest.raises(SystemExit, match="unknown arms"):
        tool.main(["--virtual-gpus", "8", "--variants", "MABN_paper_warmups"])


def test_a_run_resumed_on_newer_code_names_every_commit_it_trained_at(tmp_path, monkeypatch):
    from research import detection_study

    heads = iter(["a0e7379\n", "a0e7379\n", "dea88a1\n"])

    class _Result:
        returncode = 0

        def __init__(self):
            self.stdout = next(heads)

    monkeypatch.setattr(detection_study.subprocess, "run", lambda *a, **k: _Result())
    for _ in range(3):  # started, resumed at the same commit, resumed at a newer one
        detection_study._record_commit(str(tmp_path), ".")
    assert (tmp_path / "code_commit.txt").read_text().split() == ["a0e7379", "dea88a1"]
    record = record_from_run(str(tmp_path), "s", "BN", 0, "d", {5: {"bbox/AP": 1.0, "segm/AP": 2.0}}, [0, 6], [])
    assert record["commit"] == "a0e7379+dea88a1"
