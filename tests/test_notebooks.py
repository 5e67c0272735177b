"""Run Training.ipynb then Evaluation.ipynb with papermill on the synthetic subset, check the files
they promise, then re-execute the executed notebooks with nbval to prove reruns reproduce."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import torch

import predict
from utils import dataloader, helper
from utils.metrics import box_iou_score

ROOT = Path(__file__).resolve().parents[1]

# Small settings: 64 px, random weights (no download), 3 epochs. lr 1e-3 because a randomly
# initialised VGG16 at the published 1e-4 needs more than 3 epochs to leave the all-Anomaly start.
TRAIN_PARAMS = dict(subset_name="synthetic", pretrained=False, image_size=64, epochs=3, lr=0.001,
                    patch_memory_size=2000, calibration="holdout", head="published")

CONTRACT_KEYS = {
    "subset", "backbone", "n_train", "n_test", "n_test_anomalies", "accuracy", "balanced_accuracy",
    "confusion_matrix", "image_auroc", "image_ap", "pixel_auroc", "aupro", "pointing_game", "box_iou",
    "per_defect_type", "images_per_second", "localizer", "localizers", "decision", "box_recall",
    "box_precision", "good_images_with_boxes", "box_threshold", "calibration", "classifier",
}
DECISION_KEYS = {"rule", "false_alarm_rate", "threshold", "expected_false_alarms", "meets_rate", "accuracy", "recall",
                 "false_alarms"}
SHORT_PROMISE = "WARNING: the calibration cannot promise the stated false_alarm_rate=0.05"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Paths of the run: the executed notebooks and the folders they wrote into."""
    tmp = tmp_path_factory.mktemp("notebooks")
    dirs = {"data_dir": str(tmp / "data"), "weights_dir": str(tmp / "weights"),
            "results_dir": str(tmp / "results")}
    pm.execute_notebook(ROOT / "Training.ipynb", tmp / "Training.ipynb", cwd=str(ROOT),
                        parameters={**TRAIN_PARAMS, **dirs}, progress_bar=False)
    pm.execute_notebook(ROOT / "Evaluation.ipynb", tmp / "Evaluation.ipynb", cwd=str(ROOT),
                        parameters={"subset_name": "synthetic", "localizer": "explain", "n_samples": 4,
                                    **dirs},
                        progress_bar=False)
    return tmp


def test_training_writes_checkpoint_and_log(executed):
    ckpt = torch.load(executed / "weights" / "synthetic_vgg16.pt", weights_only=True)
    assert {"state_dict", "config", "class_names", "test_files"} <= set(ckpt)
    assert ckpt["class_names"] == ["Good", "Anomaly"]
    assert ckpt["config"]["image_size"] == 64 and ckpt["config"]["backbone"] == "vgg16"
    assert all(p.startswith("synthetic/") for p in ckpt["test_files"])
    # the decision and box thresholds for every map, calibrated on held-back good training images
    cal = ckpt["calibration"]
    assert set(cal["thresholds"]) == set(cal["floors"]) == {
        "cam", "patch_knn", "cam_knn", "patch_cam", "gradcam", "layercam", "gradcam_s8", "layercam_s8", "gradref",
        "explain"}
    assert cal["min_area"] >= 1 and cal["method"] == "holdout"
    assert cal["decision"]["rule"] == "calibrated" and cal["decision"]["false_alarm_rate"] == 0.05
    # 64 good training images, 13 held back: they promise 1/14, not 5 %, and Training says so
    assert cal["decision"]["n_images"] == 13 and cal["decision"]["meets_rate"] is False
    assert SHORT_PROMISE in _stdout(executed / "Training.ipynb")
    log = json.loads((executed / "results" / "synthetic_vgg16" / "training.json").read_text())
    # the memory holds the patches of the other 51 only (8 x 8 per image at 64 px). Catches: the
    # held-back images fitted too (they would then calibrate against their own patches)
    samples = dataloader.index_subset(executed / "data", "synthetic")
    held_out = set(ckpt["test_files"])
    assert sum(s.label == 0 and s.path not in held_out for s in samples) == 64
    assert log["patch_memory"]["n_patches"] == (64 - 13) * 8 * 8
    assert log["test_decision"]["expected_false_alarms"] == pytest.approx(1 / 14)
    assert len(log["loss"]) == len(log["accuracy"]) == log["epochs_run"] <= 3
    assert {"early_stopped", "seconds"} <= set(log)


def test_evaluation_writes_contract_metrics_and_beats_chance(executed):
    out = executed / "results" / "synthetic_vgg16"
    m = json.loads((out / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(m)
    ckpt = torch.load(executed / "weights" / "synthetic_vgg16.pt", weights_only=True)
    assert m["n_test"] == len(ckpt["test_files"])  # exactly the held-out images
    # Chance is 0.5 for both; the synthetic defects are easy, the margin is wide.
    assert m["balanced_accuracy"] >= 0.75
    assert m["image_auroc"] >= 0.9
    assert set(m["localizers"]) == {"cam", "patch_knn", "cam_knn", "patch_cam", "gradcam", "layercam", "gradcam_s8",
                                    "layercam_s8", "gradref", "explain"}
    assert m["localizer"] == "explain" and m["pixel_auroc"] == m["localizers"]["explain"]["pixel_auroc"]
    assert m["box_threshold"] == "calibrated" and m["calibration"]["thresholds"] == ckpt["calibration"]["thresholds"]
    assert set(m["decision"]) == DECISION_KEYS and m["decision"]["threshold"] == ckpt["calibration"]["decision"]["threshold"]
    # the block says what the calibration promised (1/14), not only the stated 5 %, and Evaluation warns
    promised = ckpt["calibration"]["decision"]
    assert (m["decision"]["expected_false_alarms"], m["decision"]["meets_rate"]) == (
        promised["expected_false_alarms"], promised["meets_rate"]) == (pytest.approx(1 / 14), False)
    assert SHORT_PROMISE in _stdout(executed / "Evaluation.ipynb")
    # boxes agree with the label: every image labelled Anomaly has one, no image labelled Good
    rows = _csv_rows(out / "predictions.csv")
    assert rows and all((r["label"] == "Anomaly") == (int(r["n_boxes"]) > 0) for r in rows)
    for name, loc in m["localizers"].items():
        assert {"box_iou", "box_recall", "box_precision", "good_images_with_boxes"} <= set(loc), name
    for name in ("cam", "patch_knn", "cam_knn", "patch_cam"):
        assert m["localizers"][name]["pixel_auroc"] > 0.5, name  # hotter inside the drawn defects than outside
    for png in ("predictions.png", "confusion_matrix.png", "roc_curve.png"):
        assert (out / png).stat().st_size > 0


def _stdout(notebook: Path) -> str:
    """Everything an executed notebook printed to stdout (not the progress bars of stderr)."""
    return "".join("".join(o.get("text", [])) for c in json.loads(notebook.read_text())["cells"]
                   for o in c.get("outputs", []) if o.get("name") == "stdout")


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_py_equals_evaluation_on_the_test_split(executed, tmp_path):
    """predict.py on the held-out files gives what Evaluation computed for them: the same decoding,
    normalisation, batching, maps and boxes (Evaluation ran with localizer explain, batch 10)."""
    checkpoint = executed / "weights" / "synthetic_vgg16.pt"
    paths = [str(executed / "data" / p) for p in torch.load(checkpoint, weights_only=True)["test_files"]]
    status = predict.main(["--checkpoint", str(checkpoint), "--images", *paths, "--out", str(tmp_path),
                           "--localizer", "explain", "--batch-size", "10"])
    assert status == 0
    ours = _csv_rows(tmp_path / "predictions.csv")
    evaluation = _csv_rows(executed / "results" / "synthetic_vgg16" / "predictions.csv")
    assert [r["path"] for r in ours] == [r["path"] for r in evaluation] == paths
    for a, b in zip(ours, evaluation):
        assert a["label"] == b["label"] and a["boxes"] == b["boxes"], a["path"]
        assert float(a["p_anomaly"]) == pytest.approx(float(b["p_anomaly"]), abs=1e-6)
        assert float(a["image_score"]) == pytest.approx(float(b["image_score"]), rel=1e-6)
    # and the decisions are those behind Evaluation's decision block
    m = json.loads((executed / "results" / "synthetic_vgg16" / "metrics.json").read_text())
    flagged = m["decision"]["recall"] * m["n_test_anomalies"] + m["decision"]["false_alarms"] * (
        m["n_test"] - m["n_test_anomalies"])
    assert sum(r["label"] == "Anomaly" for r in ours) == round(flagged)
    decision = json.loads((tmp_path / "predictions.json").read_text())["settings"]["decision"]
    assert (decision["expected_false_alarms"], decision["meets_rate"]) == (m["decision"]["expected_false_alarms"],
                                                                         False)
    assert any(int(r["n_boxes"]) > 0 for r in ours)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The synthetic subset's official split (train/ holds good images only): Training, then Evaluation
    of the patch map."""
    tmp = tmp_path_factory.mktemp("official")
    dirs = {"data_dir": str(tmp / "data"), "weights_dir": str(tmp / "weights"),
            "results_dir": str(tmp / "results")}
    pm.execute_notebook(ROOT / "Training.ipynb", tmp / "Training.ipynb", cwd=str(ROOT),
                        parameters={**TRAIN_PARAMS, **dirs, "split": "official"}, progress_bar=False)
    pm.execute_notebook(ROOT / "Evaluation.ipynb", tmp / "Evaluation.ipynb", cwd=str(ROOT),
                        parameters={"subset_name": "synthetic", "localizer": "patch_knn", "n_samples": 4, **dirs},
                        progress_bar=False)
    return tmp


def test_official_split_without_anomalies_builds_the_patch_memory_only(official):
    ckpt = torch.load(official / "weights" / "synthetic_vgg16.pt", weights_only=True)
    assert ckpt["classifier"] is False and ckpt["config"]["split"] == "official"
    assert all(k.startswith("frozen.") for k in ckpt["state_dict"]) and len(ckpt["patch_memory"]) == 2000
    assert all(p.startswith("synthetic/test/") for p in ckpt["test_files"])
    assert set(ckpt["calibration"]["thresholds"]) == {"patch_knn"}  # the only map without a classifier
    log = json.loads((official / "results" / "synthetic_vgg16" / "training.json").read_text())
    assert log["classifier"] is False and log["epochs_run"] == 0 and log["test"] is None
    assert "classifier skipped: the training split has no Anomaly images" in _stdout(official / "Training.ipynb")


def test_official_split_evaluation_measures_the_patch_map(official):
    out = official / "results" / "synthetic_vgg16"
    m = json.loads((out / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(m)
    for key in ("accuracy", "balanced_accuracy", "confusion_matrix"):
        assert m[key] is None, key  # no classifier, no argmax
    # the decision is the patch map's image score against its calibrated threshold
    assert m["decision"]["rule"] == "calibrated" and m["per_defect_type"]["good"]["n"] == 20
    assert m["n_test"] == 80 and m["n_test_anomalies"] == 60  # the whole test/ folder
    assert set(m["localizers"]) == {"patch_knn"} and m["localizer"] == "patch_knn"
    patch = m["localizers"]["patch_knn"]
    # Random weights at 64 px: measured pixel AUROC 0.81, image AUROC 1.00; chance is 0.5.
    assert patch["pixel_auroc"] > 0.65 and patch["image_auroc"] >= 0.9
    assert m["pixel_auroc"] == patch["pixel_auroc"]
    # The box metrics measure the boxes a user gets: boxes follow the label, so the good images with
    # boxes are the decision's false alarms, and the box IoU is that of predictions.csv's boxes
    # (original pixels, scaled back to the 64 px input) against the masks. Catches: box metrics of
    # other boxes than the ones written, e.g. boxes drawn on the defective images instead of on those
    # labelled Anomaly, or cut by another rule. (With random weights the boxes are wide: box IoU 0.146.)
    assert patch["good_images_with_boxes"] == m["decision"]["false_alarms"]
    ckpt = torch.load(official / "weights" / "synthetic_vgg16.pt", weights_only=True)
    tested = dataloader.select_samples(official / "data", "synthetic", ckpt["test_files"])
    rows = _csv_rows(out / "predictions.csv")
    assert [r["path"] for r in rows] == [str(official / "data" / s.path) for s in tested]
    boxes = [np.array(json.loads(r["boxes"]), np.float32).reshape(-1, 5)[:, :4] * 64 / float(r["width"])
             for r in rows]
    masks = dataloader.load_masks(official / "data", tested, 64).numpy()
    assert box_iou_score(boxes, masks) == pytest.approx(patch["box_iou"], abs=1e-6)
    # the patch map's image score is the run's decision, so the run's image AUROC/AP are its own
    assert m["image_auroc"] == patch["image_auroc"] and 0.9 <= m["image_ap"] <= 1
    for png in ("predictions.png", "roc_curve.png", "confusion_matrix.png"):
        assert (out / png).stat().st_size > 0


def test_predict_py_labels_by_calibrated_boxes_without_a_classifier(official, tmp_path):
    """A patch-memory-only checkpoint: predict.py defaults to the patch map and labels an image
    Anomaly exactly when its calibrated map has a box; most defects are found, few good images flagged."""
    ckpt = official / "weights" / "synthetic_vgg16.pt"
    test_dir = official / "data" / "synthetic" / "test"
    out = tmp_path / "pred"
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(ckpt),
                             "--images", str(test_dir), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _csv_rows(out / "predictions.csv")
    assert len(rows) == 80 and all(r["error"] == "" and r["p_anomaly"] == "" for r in rows)
    assert all((r["label"] == "Anomaly") == (int(r["n_boxes"]) > 0) for r in rows)
    defective = [r for r in rows if "/good/" not in r["path"]]
    assert sum(r["label"] == "Anomaly" for r in defective) >= 0.5 * len(defective)
    settings = json.loads((out / "predictions.json").read_text())["settings"]
    assert settings["localizer"] == "patch_knn"
    # The decision is the stated rate's threshold over the held-back good train/ images: 12 of them
    # cannot promise 5 %, so it is their highest patch score, and the promise is 1/13. (How many of
    # the 20 good test images exceed it says little: with 12 calibration images the share flagged
    # legitimately ranges up to about half of them.) Catches: the threshold at another quantile, or
    # from other images than the held-back ones.
    decision, held = settings["decision"], _held_back_good_images(official / "data")
    assert decision["n_images"] == len(held) == 12 and decision["expected_false_alarms"] == pytest.approx(1 / 13)
    scored = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(ckpt), "--images",
                             *map(str, held), "--out", str(tmp_path / "held")], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert scored.returncode == 0, scored.stderr[-2000:]
    held_scores = [float(r["image_score"]) for r in _csv_rows(tmp_path / "held" / "predictions.csv")]
    assert max(held_scores) == pytest.approx(decision["threshold"], rel=1e-5)
    refused = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(ckpt),
                              "--images", str(test_dir), "--out", str(tmp_path / "cam"), "--localizer", "cam"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2 and "needs the classifier" in refused.stderr


def _held_back_good_images(data_dir: Path) -> list[Path]:
    """The good train/ images the official run held back to calibrate (`helper.calibration_split`
    with Training's defaults: share 0.2, seed 42)."""
    samples = dataloader.index_subset(data_dir, "synthetic")
    train, _ = dataloader.split_subset(samples, "official", test_size=0.2, seed=42)
    _, held = helper.calibration_split(torch.tensor([s.label for s in train]), 0.2, seed=42)
    return [data_dir / train[i].path for i in held.tolist()]


@pytest.fixture(scope="module")
def evidence_run(tmp_path_factory):
    """Training with head="evidence" (MobileNetV2, random weights, 64 px), then Evaluation with its default map."""
    tmp = tmp_path_factory.mktemp("evidence")
    dirs = {"data_dir": str(tmp / "data"), "weights_dir": str(tmp / "weights"), "results_dir": str(tmp / "results")}
    recipe = {k: v for k, v in TRAIN_PARAMS.items() if k not in ("epochs", "lr")}  # the evidence head takes neither
    params = {**recipe, "backbone": "mobilenet_v2", "head": "evidence", "calibration": "cross_fit", **dirs}
    pm.execute_notebook(ROOT / "Training.ipynb", tmp / "Training.ipynb", cwd=str(ROOT), parameters=params,
                        progress_bar=False)
    pm.execute_notebook(ROOT / "Evaluation.ipynb", tmp / "Evaluation.ipynb", cwd=str(ROOT),
                        parameters={"subset_name": "synthetic", "backbone": "mobilenet_v2", "n_samples": 4,
                                    "grid_maps": ["patch_knn"], **dirs}, progress_bar=False)
    return tmp


def test_evidence_head_notebooks_write_its_checkpoint_and_metrics(evidence_run, tmp_path):
    checkpoint = evidence_run / "weights" / "synthetic_mobilenet_v2.pt"
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["config"]["head"] == "evidence" and ckpt["classifier"] is True
    # its log counts its 40 full-batch steps, not the published head's epochs (which it has no use for)
    logged = re.findall(r"^(\w+) +(\d+)/(\d+)  loss", _stdout(evidence_run / "Training.ipynb"), re.M)
    assert logged == [("step", str(k), "40") for k in range(1, 41)]
    # cross-fit calibration on all 64 good training images keeps the stated 5 %: no warning
    assert ckpt["calibration"]["decision"]["meets_rate"] is True
    assert "WARNING" not in _stdout(evidence_run / "Training.ipynb")
    # the frozen layers the patch features come from, and the evidence head; no untrained published head
    assert all(k.startswith(("frozen.", "evidence_head.")) for k in ckpt["state_dict"])
    assert any(k.startswith("evidence_head.") for k in ckpt["state_dict"])
    assert set(ckpt["calibration"]["thresholds"]) == {"evidence", "patch_knn"}
    # calibration="cross_fit": every one of the 64 good training images calibrates, scored without its group
    assert ckpt["calibration"]["method"] == "cross_fit" and ckpt["calibration"]["decision"]["n_images"] == 64
    m = json.loads((evidence_run / "results" / "synthetic_mobilenet_v2" / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(m) and m["head"] == "evidence"
    assert set(m["localizers"]) == {"evidence", "patch_knn"} and m["localizer"] == "evidence"
    # random weights at 64 px on the synthetic subset: the drawn defects are easy; chance is 0.5
    assert m["image_auroc"] >= 0.9 and m["localizers"]["evidence"]["pixel_auroc"] > 0.6
    paths = [str(evidence_run / "data" / p) for p in ckpt["test_files"]]
    assert predict.main(["--checkpoint", str(checkpoint), "--images", *paths, "--out", str(tmp_path)]) == 0
    ours = _csv_rows(tmp_path / "predictions.csv")
    evaluation = _csv_rows(evidence_run / "results" / "synthetic_mobilenet_v2" / "predictions.csv")
    assert [r["label"] for r in ours] == [r["label"] for r in evaluation]
    for a, b in zip(ours, evaluation):  # the same boxes; their scores (map maxima) to float rounding
        boxes_a, boxes_b = json.loads(a["boxes"]), json.loads(b["boxes"])
        assert [box[:4] for box in boxes_a] == [box[:4] for box in boxes_b]
        assert [box[4] for box in boxes_a] == pytest.approx([box[4] for box in boxes_b], rel=1e-5)
    assert json.loads((tmp_path / "predictions.json").read_text())["settings"]["localizer"] == "evidence"


def test_the_fused_head_notebooks_write_both_heads_and_predict_follows(tmp_path):
    # Training and Evaluation with head="fused" (MobileNetV2, random weights, 64 px, the holdout
    # calibration it needs). Catches a checkpoint without its scale or one of the heads, an
    # Evaluation that cannot score it (its maps are both heads': the CAM and the explanations
    # beside the evidence map), and predict.py labelling otherwise than Evaluation.
    dirs = {"data_dir": str(tmp_path / "data"), "weights_dir": str(tmp_path / "weights"),
            "results_dir": str(tmp_path / "results")}
    pm.execute_notebook(ROOT / "Training.ipynb", tmp_path / "Training.ipynb", cwd=str(ROOT),
                        parameters={**TRAIN_PARAMS, "backbone": "mobilenet_v2", "head": "fused", **dirs},
                        progress_bar=False)
    pm.execute_notebook(ROOT / "Evaluation.ipynb", tmp_path / "Evaluation.ipynb", cwd=str(ROOT),
                        parameters={"subset_name": "synthetic", "backbone": "mobilenet_v2", "n_samples": 4,
                                    "grid_maps": ["evidence"], **dirs}, progress_bar=False)
    checkpoint = tmp_path / "weights" / "synthetic_mobilenet_v2.pt"
    ckpt = torch.load(checkpoint, weights_only=True)
    assert ckpt["config"]["head"] == "fused" and ckpt["classifier"] and tuple(ckpt["fusion"].shape) == (2, 2)
    assert any(k.startswith("evidence_head.") for k in ckpt["state_dict"]) and "fc.weight" in ckpt["state_dict"]
    assert {"evidence", "cam", "patch_cam", "patch_knn"} <= set(ckpt["calibration"]["thresholds"])
    m = json.loads((tmp_path / "results" / "synthetic_mobilenet_v2" / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(m) and m["head"] == "fused" and m["localizer"] == "evidence"
    assert {"evidence", "cam", "patch_cam", "explain"} <= set(m["localizers"])
    assert m["image_auroc"] >= 0.9  # random weights at 64 px on the drawn defects; chance is 0.5
    paths = [str(tmp_path / "data" / p) for p in ckpt["test_files"]]
    assert predict.main(["--checkpoint", str(checkpoint), "--images", *paths, "--out", str(tmp_path / "pred")]) == 0
    ours = _csv_rows(tmp_path / "pred" / "predictions.csv")
    evaluation = _csv_rows(tmp_path / "results" / "synthetic_mobilenet_v2" / "predictions.csv")
    assert [r["label"] for r in ours] == [r["label"] for r in evaluation]
    assert [float(r["p_anomaly"]) for r in ours] == pytest.approx([float(r["p_anomaly"]) for r in evaluation], abs=1e-5)


def test_the_default_head_records_its_choice_in_checkpoint_log_and_metrics(tmp_path):
    # Training and Evaluation with their defaults (head="auto"; small settings). Catches a checkpoint
    # that records "auto" or an open patch rule instead of what was fitted, a choice lost on the way
    # to training.json or metrics.json, and an Evaluation that shows another map than the one chosen.
    dirs = {"data_dir": str(tmp_path / "data"), "weights_dir": str(tmp_path / "weights"),
            "results_dir": str(tmp_path / "results")}
    params = {k: v for k, v in TRAIN_PARAMS.items() if k != "head"}
    pm.execute_notebook(ROOT / "Training.ipynb", tmp_path / "Training.ipynb", cwd=str(ROOT),
                        parameters={**params, "backbone": "mobilenet_v2", **dirs}, progress_bar=False)
    pm.execute_notebook(ROOT / "Evaluation.ipynb", tmp_path / "Evaluation.ipynb", cwd=str(ROOT),
                        parameters={"subset_name": "synthetic", "backbone": "mobilenet_v2", "n_samples": 4, **dirs},
                        progress_bar=False)
    ckpt = torch.load(tmp_path / "weights" / "synthetic_mobilenet_v2.pt", weights_only=True)
    chosen = ckpt["selection"]
    assert chosen["requested"] == "auto" and chosen["decision"] in ("patch_knn", "evidence", "published", "fused")
    assert ckpt["classifier"] == (chosen["decision"] != "patch_knn")
    assert ckpt["config"]["head"] == (chosen["head"] or "auto")
    assert (ckpt["config"]["patch_layers"], ckpt["config"]["patch_map_sigma"]) == (
        chosen["patch_layers"], chosen["patch_map_sigma"]) and chosen["patch_layers"] in ("fine", "both")
    assert chosen["image_auroc"] and chosen["maps"]  # the synthetic defects have masks
    log = json.loads((tmp_path / "results" / "synthetic_mobilenet_v2" / "training.json").read_text())
    assert log["selection"] == json.loads(json.dumps(chosen)) and log["config"]["head"] == "auto"
    m = json.loads((tmp_path / "results" / "synthetic_mobilenet_v2" / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(m) and m["selection"]["decision"] == chosen["decision"]
    assert m["localizer"] == chosen["map"] and m["classifier"] == ckpt["classifier"]
    assert "decision: " in json.dumps(json.loads((tmp_path / "Training.ipynb").read_text()))  # the choice is printed


@pytest.mark.slow  # re-executes both notebooks: run with `pytest -m slow`
def test_nbval_rerun_reproduces(executed):
    """nbval re-executes the executed notebooks; cells marked NBVAL_CHECK_OUTPUT must match."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # nbval starts the kernel in the notebook's folder
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
         str(executed / "Training.ipynb"), str(executed / "Evaluation.ipynb")],
        cwd=executed, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
