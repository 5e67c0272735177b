"""The sweep tabulates every run's metrics.json and reports a failing subset without stopping."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

import sweep


def _metrics(pixel_auroc):
    loc = {"pixel_auroc": pixel_auroc, "aupro": 0.5, "pointing_game": None, "box_iou": 0.25, "image_auroc": 1.0}
    return {"n_train": 40, "n_test": 10, "accuracy": 0.9, "balanced_accuracy": 0.875,
            "image_auroc": 0.95, "image_ap": 0.97, "localizers": {"cam": loc},
            "decision": {"rule": "calibrated", "false_alarm_rate": 0.05, "false_alarms": 0.25, "recall": 1.0}}


def test_parse_assignments_reads_json_values():
    assert sweep.parse_assignments(["epochs=3", "pretrained=false", "localizer=patch_knn", "lr=1e-3"]) == {
        "epochs": 3, "pretrained": False, "localizer": "patch_knn", "lr": 0.001}


def test_markdown_table_formats_numbers_and_missing_values():
    rows = [sweep.summary_row("toothbrush", "mobilenet_v2", _metrics(0.9123), None)]
    table = sweep.markdown_table(rows).splitlines()
    assert table[0].startswith("| subset | backbone | n_train |") and table[0].endswith("| error |")
    assert "| toothbrush | mobilenet_v2 | 40 | 10 | 0.900 | 0.875 | 0.950 | 0.970 | – | 0.050 | 0.250 | 1.000 | 0.912 | 0.500 | – | 0.250 |  |" == table[2]
    # head="auto" runs say what decided (metrics.json's selection)
    chosen = sweep.summary_row("pill", "vgg16", {**_metrics(0.9), "selection": {"decision": "evidence"}}, None)
    assert chosen["decided_by"] == "evidence" and "| evidence |" in sweep.markdown_table([chosen])


def test_failed_subset_is_reported_and_the_sweep_goes_on(tmp_path, monkeypatch):
    results = tmp_path / "results"

    def fake_run(subset, backbone, common, train, evaluate, runs_dir):
        if subset == "broken":
            return "PapermillExecutionError: FileNotFoundError: Subset folder data/broken does not exist."
        out = results / f"{subset}_{backbone}"
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(_metrics(0.8)))
        return None

    monkeypatch.setattr(sweep, "run_one", fake_run)
    rows = sweep.main(["--subsets", "broken", "toothbrush", "--backbones", "vgg16",
                       "--results-dir", str(results), "--runs-dir", str(tmp_path / "runs")])
    assert [r["subset"] for r in rows] == ["broken", "toothbrush"]
    table = (results / "summary.md").read_text()
    assert "Subset folder data/broken does not exist" in table and "| toothbrush | vgg16 | 40 |" in table
    with open(results / "summary.csv") as f:
        parsed = list(csv.DictReader(f))
    assert parsed[1]["cam_pixel_auroc"] == "0.8" and parsed[0]["accuracy"] == ""


def test_a_real_failing_run_is_caught(tmp_path):
    """A subset that does not exist makes Training.ipynb raise; run_one returns the error."""
    error = sweep.run_one("no_such_subset", "vgg16",
                          {"data_dir": str(tmp_path), "results_dir": str(tmp_path / "r"),
                           "weights_dir": str(tmp_path / "w"), "device": "cpu"},
                          {"download": False, "pretrained": False}, {}, tmp_path / "runs")
    assert error is not None and "no_such_subset" in error


def test_backbone_weights_flag_reaches_training(tmp_path, monkeypatch):
    seen = []

    def fake_run(subset, backbone, common, train, evaluate, runs_dir):
        seen.append(train)
        return "not run"

    monkeypatch.setattr(sweep, "run_one", fake_run)
    sweep.main(["--subsets", "pill", "--backbone-weights", "/w/vgg16.pth", "--train", "epochs=2",
                "--results-dir", str(tmp_path / "r"), "--runs-dir", str(tmp_path / "runs")])
    assert seen == [{"epochs": 2, "backbone_weights": "/w/vgg16.pth"}]


# Where a user's run writes with the default parameters: sweep.py's summary, the notebooks' weights,
# results and executed copies, the benchmark's JSON, the generated synthetic subset.
DEFAULT_OUTPUTS = (
    "results/summary.csv", "results/summary.md", "results/toothbrush_mobilenet_v2/metrics.json",
    "results/toothbrush_mobilenet_v2/training.json", "results/toothbrush_mobilenet_v2/predictions.png",
    "results/toothbrush_mobilenet_v2/predictions.csv", "results/benchmark.json",
    "weights/toothbrush_mobilenet_v2.pt", "runs/toothbrush_mobilenet_v2/Training.ipynb",
    "data/mvtec_anomaly_detection/synthetic/train/good/000.png",
)


def test_a_run_writes_no_tracked_file():
    """The README's commands leave `git status` clean: every default output path is ignored by git
    and none is a tracked file (the README's reference results live in results/reference/)."""
    root = Path(sweep.__file__).resolve().parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    assert git("ls-files", "--", *DEFAULT_OUTPUTS).stdout.split() == []
    assert git("check-ignore", "--no-index", *DEFAULT_OUTPUTS).stdout.split() == list(DEFAULT_OUTPUTS)
