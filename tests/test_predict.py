"""predict.py end to end with checkpoints trained here: one row and one overlay per image, boxes where
the defects are, bad files reported while the run goes on, unusable checkpoints refused at once.

The synthetic checkpoint is VGG16 with random weights at 64 px (its numbers are plumbing checks,
not MVTec results); the real one is pretrained MobileNetV2 on MVTec AD pill (448 px copy in
../shared), skipped when that folder is absent.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from utils import dataloader, helper, inference, parameters
from utils.checkpoint import load_checkpoint
from utils.constants import GOOD_FOLDER
from utils.model import CAMClassifier, normalisation, weights_file
from utils.patchknn import patch_rule_of
from utils.synthetic import generate_synthetic_subset

CPU = torch.device("cpu")
SIZE = 128  # synthetic images are generated at 128 px and scored at 64 px: boxes scale by 2


def train_checkpoint(path: Path, data_dir: Path, subset: str, *, backbone: str, pretrained: bool,
                     image_size: int, lr: float, memory_size: int, seed: int = 0) -> list[dataloader.Sample]:
    """Train as Training.ipynb does (`helper.run_fold` on the published split, a random patch memory
    of the good training images) and save the checkpoint at `path`; returns the held-out test samples."""
    config = parameters.training_config(
        data_dir=str(data_dir), subset_name=subset, download=False, backbone=backbone, pretrained=pretrained,
        image_size=image_size, batch_size=10, epochs=10, lr=lr, class_weight=[1, 3], target_train_accuracy=0.98,
        test_size=0.2, seed=seed, heatmap_thres=0.7, n_cv_folds=0, weights_dir=str(path.parent),
        results_dir="results", device="cpu", precision="fp32", patch_memory_size=memory_size,
        patch_memory_method="random", calibration="holdout", head="published")
    samples = dataloader.index_subset(data_dir, subset)
    train, test = dataloader.split_samples(samples, test_size=0.2, seed=seed)
    images = dataloader.load_images(data_dir, samples, image_size)
    labels = torch.tensor([s.label for s in samples])
    template = helper.new_model(config, None, CPU, "fp32")
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=10, device=CPU,
                                precision="fp32", progress=False)
    fold = helper.run_fold(config, template, frozen, labels, dataloader.positions(samples, train),
                           dataloader.positions(samples, test), device=CPU, precision="fp32", progress=False)
    torch.save(fold.checkpoint(config, [s.path for s in test], n_train=len(train)), path)
    return test


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(checkpoint path, data_dir): VGG16, random weights, 64 px, on a 100-image synthetic subset."""
    tmp = tmp_path_factory.mktemp("predict")
    generate_synthetic_subset(tmp / "data" / "synthetic", seed=0, n_train_good=40, n_test_good=10,
                              n_per_defect=10, image_size=SIZE)
    checkpoint = tmp / "synthetic_vgg16.pt"
    # lr 1e-3: random VGG16 leaves its all-Anomaly start within 10 epochs (1e-4 does not)
    train_checkpoint(checkpoint, tmp / "data", "synthetic", backbone="vgg16", pretrained=False,
                     image_size=64, lr=1e-3, memory_size=2000)
    return checkpoint, tmp / "data"


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png"))


@pytest.fixture(scope="module")
def synthetic_run(synthetic, tmp_path_factory):
    """predict.py with the patch map over the synthetic subset's test folder."""
    checkpoint, data_dir = synthetic
    out = tmp_path_factory.mktemp("out")
    status = predict.main(["--checkpoint", str(checkpoint), "--images", str(data_dir / "synthetic" / "test"),
                           "--out", str(out), "--localizer", "patch_knn", "--batch-size", "7", "--precision", "fp32"])
    return status, out


def test_one_row_and_one_overlay_per_image(synthetic, synthetic_run):
    checkpoint, data_dir = synthetic
    status, out = synthetic_run
    assert status == 0
    rows = read_rows(out)
    files = image_files(data_dir / "synthetic" / "test")
    assert len(files) == 40 and [Path(r["path"]) for r in rows] == files
    for row in rows:
        assert row["error"] == "" and row["label"] in ("Good", "Anomaly")
        assert int(row["n_boxes"]) == len(json.loads(row["boxes"]))
        with Image.open(out / row["overlay"]) as overlay:  # image and map side by side, full size
            assert overlay.size == (2 * SIZE, SIZE) and overlay.format == "PNG"
    # each row holds its own file's numbers: those of one inference.predict pass over the same files,
    # labelled by the checkpoint's decision. Catches: rows paired with another file's result, or
    # images normalised with other statistics than the checkpoint's
    model, ckpt = load_checkpoint(checkpoint)
    mean, std = normalisation("vgg16", False)
    pred = inference.predict(model, torch.stack([dataloader.read_image(f, 64) for f in files]), mean, std,
                             batch_size=7, device=CPU, precision="fp32", patch_memory=ckpt["patch_memory"],
                             patch_rule=patch_rule_of(ckpt["config"]))
    np.testing.assert_allclose([float(r["p_anomaly"]) for r in rows], pred["p_anomaly"], atol=1e-5)
    np.testing.assert_allclose([float(r["image_score"]) for r in rows], pred["patch_score"], rtol=1e-5)
    decided = pred["p_anomaly"] > inference.decision_of(ckpt)["threshold"]
    assert [r["label"] == "Anomaly" for r in rows] == decided.tolist()
    report = json.loads((out / "predictions.json").read_text())
    assert report["checkpoint"]["name"] == checkpoint.name
    assert report["checkpoint"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert report["settings"]["localizer"] == "patch_knn" and report["settings"]["batch_size"] == 7
    assert report["n_images"] == 40 and report["n_failed"] == 0
    assert [p["path"] for p in report["predictions"]] == [r["path"] for r in rows]


def test_boxes_follow_the_label_and_sit_on_the_defect(synthetic_run):
    _, out = synthetic_run
    rows = read_rows(out)
    # every Anomaly row has at least its strongest region, no Good row has a box
    assert all((int(r["n_boxes"]) > 0) == (r["label"] == "Anomaly") for r in rows)
    defective = [r for r in rows if Path(r["path"]).parent.name != GOOD_FOLDER]
    assert np.mean([r["label"] == "Anomaly" for r in defective]) >= 0.9
    # the first (hottest) box covers defect pixels of the 128 px ground-truth mask: boxes are in
    # pixels of the original image, not of the 64 px input
    hits = []
    for row in defective:
        boxes = json.loads(row["boxes"])
        if boxes:
            path = Path(row["path"])
            mask_path = path.parents[2] / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
            mask = np.asarray(Image.open(mask_path)) > 127
            x1, y1, x2, y2 = (int(round(v)) for v in boxes[0][:4])
            hits.append(mask[y1:y2, x1:x2].any())
    assert np.mean(hits) >= 0.8


def test_bad_files_are_reported_and_the_run_goes_on(synthetic, tmp_path, png, capsys):
    checkpoint, data_dir = synthetic
    folder = tmp_path / "line"
    good = np.asarray(Image.open(data_dir / "synthetic" / "test" / "good" / "000.png"))
    png(folder / "rgb.png", array=good)
    png(folder / "nested" / "grey.png", array=good[..., 0])  # grayscale
    Image.fromarray(good).convert("RGBA").save(folder / "rgba.png")
    Image.fromarray(good).resize((200, 90)).save(folder / "other_size.jpg")
    (folder / "truncated.png").write_bytes((folder / "rgb.png").read_bytes()[:300])
    (folder / "not_an_image.png").write_text("this is text")
    (folder / "notes.txt").write_text("ignored: not an image file")
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("an earlier run's file\n")
    status = predict.main(["--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(out)])
    assert status == 1  # some files failed, after all the others were scored
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    assert set(rows) == {"rgb.png", "grey.png", "rgba.png", "other_size.jpg", "truncated.png", "not_an_image.png"}
    for name in ("truncated.png", "not_an_image.png"):
        assert name in rows[name]["error"] and rows[name]["label"] == "" and rows[name]["overlay"] == ""
    for name, size in (("rgb.png", (256, 128)), ("grey.png", (256, 128)), ("rgba.png", (256, 128)),
                       ("other_size.jpg", (400, 90))):
        assert rows[name]["error"] == "" and rows[name]["label"] in ("Good", "Anomaly"), name
        assert Image.open(out / rows[name]["overlay"]).size == size, name
    # an opaque RGBA image becomes the same RGB image under training's conversion: the same score
    assert float(rows["rgba.png"]["p_anomaly"]) == pytest.approx(float(rows["rgb.png"]["p_anomaly"]), abs=1e-4)
    err = capsys.readouterr().err
    assert "truncated.png" in err
    # 40 good training images, 8 held back to calibrate: they promise 1/9, not the stated 5 %
    assert "warning: the calibration cannot promise the stated false_alarm_rate=0.05" in err
    report = json.loads((out / "predictions.json").read_text())
    assert report["n_failed"] == 2 and report["n_images"] == 6
    decision = report["settings"]["decision"]
    assert decision["expected_false_alarms"] == pytest.approx(1 / 9) and decision["meets_rate"] is False
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temporary files behind


def test_unusable_checkpoint_stops_at_once(synthetic, tmp_path, capsys):
    _, data_dir = synthetic
    images = str(data_dir / "synthetic" / "test" / "good")
    missing = tmp_path / "nowhere.pt"
    assert predict.main(["--checkpoint", str(missing), "--images", images, "--out", str(tmp_path / "a")]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(2)}, foreign)
    assert predict.main(["--checkpoint", str(foreign), "--images", images, "--out", str(tmp_path / "b")]) == 2
    assert "not a checkpoint of this repository" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


def test_a_folder_as_checkpoint_or_an_unusable_out_stops_before_scoring(synthetic, tmp_path, capsys, monkeypatch):
    checkpoint, data_dir = synthetic
    images = str(data_dir / "synthetic" / "test" / "good")
    assert predict.main(["--checkpoint", str(checkpoint.parent), "--images", images,
                         "--out", str(tmp_path / "a")]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    scored = []
    monkeypatch.setattr(predict, "score_files", lambda *args: scored.append(args))
    assert predict.main(["--checkpoint", str(checkpoint), "--images", images, "--out", str(blocker / "out")]) == 2
    assert "--out=" in capsys.readouterr().err and not scored  # refused before any image is scored
    assert not (tmp_path / "a").exists() and blocker.read_text() == ""


def _classifier_free_without_calibration(ckpt):
    ckpt["classifier"] = False
    del ckpt["calibration"]


def _classifier_free_without_memory(ckpt):
    ckpt["classifier"] = False
    del ckpt["patch_memory"]


def _memory_of_another_rule(ckpt):
    ckpt["config"]["patch_layers"] = "fine"  # VGG16's stride-8 layer alone: 512 dims, the memory has 1024


@pytest.mark.parametrize("damage, message", [
    (_classifier_free_without_calibration, "no classifier and no calibrated patch map, so nothing decides"),
    (_classifier_free_without_memory, "has no patch memory, but its decision is computed from it"),
    (_memory_of_another_rule, "its patch memory has 1024 dims per row, but its patch rule (patch_layers='fine') "
                              "embeds vgg16 patches in 512"),
])
def test_checkpoint_that_cannot_be_scored_stops_before_anything_is_written(synthetic, tmp_path, capsys, damage,
                                                                          message):
    """predict.py validates everything scoring reads before it scores: exit 2, a message, no output.
    Catches: predict.main without `inference.check_scorable` (the run then fails mid-way with a
    traceback, from the decision or from the memory's width)."""
    checkpoint, data_dir = synthetic
    ckpt = torch.load(checkpoint, weights_only=True)
    damage(ckpt)
    path = tmp_path / "damaged.pt"
    torch.save(ckpt, path)
    out = tmp_path / "out"
    status = predict.main(["--checkpoint", str(path), "--images", str(data_dir / "synthetic" / "test" / "good"),
                           "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and message in err and str(path) in err and "Traceback" not in err
    assert not out.exists()


def _files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_interrupted_run_leaves_nothing_or_the_earlier_complete_set(synthetic, tmp_path, monkeypatch):
    """A run stopped after its first overlays (here: interrupted while writing the third) leaves a new
    OUT absent and an existing OUT exactly as the earlier run left it; a complete run replaces the
    earlier set and leaves no hidden folder. Catches: overlays written straight into OUT before the
    CSV and JSON (the interrupted run then leaves overlays without predictions.csv/json)."""
    checkpoint, data_dir = synthetic
    args = ["--checkpoint", str(checkpoint), "--images", str(data_dir / "synthetic" / "test" / "good"),
            "--batch-size", "2"]
    real_save_png, calls = predict.plots.save_png, []

    def interrupted_at_the_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_save_png(*a, **k)

    before = sorted(tmp_path.iterdir())
    with monkeypatch.context() as m:
        m.setattr(predict.plots, "save_png", interrupted_at_the_third)
        with pytest.raises(KeyboardInterrupt):
            predict.main([*args, "--out", str(tmp_path / "new" / "out")])
    assert sorted(tmp_path.iterdir()) == before  # nothing: no OUT, no parent folder, no hidden folder

    out = tmp_path / "out"
    assert predict.main([*args, "--out", str(out)]) == 0
    earlier = _files_under(out)
    assert len(earlier) == 2 + 10 and not list(out.glob(".predict-*"))  # CSV, JSON, 10 overlays
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(predict.plots, "save_png", interrupted_at_the_third)
        with pytest.raises(KeyboardInterrupt):
            predict.main([*args, "--out", str(out), "--localizer", "patch_knn"])
    assert _files_under(out) == earlier and not list(out.glob(".predict-*"))
    assert predict.main([*args, "--out", str(out), "--localizer", "patch_knn"]) == 0
    assert json.loads((out / "predictions.json").read_text())["settings"]["localizer"] == "patch_knn"
    assert set(_files_under(out)) == set(earlier) and not list(out.glob(".predict-*"))


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_heatmap_thres_outside_0_1_is_refused_before_scoring(synthetic, tmp_path, capsys, value):
    """Catches: inference.box_rule without its range check (predict.py then scores with it, exit 0)."""
    checkpoint, data_dir = synthetic
    out = tmp_path / "out"
    status = predict.main(["--checkpoint", str(checkpoint), "--images", str(data_dir / "synthetic" / "test" / "good"),
                           "--out", str(out), "--heatmap-thres", value, "--box-threshold", "minmax"])
    assert status == 2 and f"heatmap_thres={float(value)} must lie in [0, 1]" in capsys.readouterr().err
    assert not out.exists()


def test_localizer_the_checkpoint_lacks_is_refused(synthetic, tmp_path, capsys):
    checkpoint, data_dir = synthetic
    ckpt = torch.load(checkpoint, weights_only=True)
    del ckpt["patch_memory"]
    bare = tmp_path / "no_memory.pt"
    torch.save(ckpt, bare)
    status = predict.main(["--checkpoint", str(bare), "--images", str(data_dir / "synthetic" / "test"),
                           "--out", str(tmp_path / "out"), "--localizer", "cam_knn"])
    assert status == 2 and "needs the patch memory" in capsys.readouterr().err


def mini_category(source: Path, dest: Path, n_good: int, n_per_type: int, types: tuple[str, ...]) -> Path:
    """A small real category at `dest` in MVTec layout: symbolic links to the first `n_good` images of
    train/good and test/good each and the first `n_per_type` of each defect type, with their masks."""
    picks = [("train/good", n_good), ("test/good", n_good)] + [(f"test/{t}", n_per_type) for t in types]
    for folder, n in picks:
        for image in sorted((source / folder).glob("*.png"))[:n]:
            links = [(image, dest / folder / image.name)]
            if not folder.endswith(GOOD_FOLDER):
                mask = source / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"
                links.append((mask, dest / "ground_truth" / image.parent.name / mask.name))
            for target, link in links:
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(target)
    return dest


@pytest.fixture(scope="module")
def pill(real_mvtec_dir, tmp_path_factory):
    """(checkpoint, data_dir, test samples): pretrained MobileNetV2 at 224 px on 76 real pill images."""
    if not (real_mvtec_dir / "pill").is_dir():
        pytest.skip(f"no pill category in {real_mvtec_dir}")
    if not weights_file("mobilenet_v2").is_file():
        pytest.skip("MobileNetV2's ImageNet weights are not installed: run python -m utils.offline_weights")
    tmp = tmp_path_factory.mktemp("pill")
    mini_category(real_mvtec_dir / "pill", tmp / "data" / "pill", n_good=20, n_per_type=12,
                  types=("color", "contamination", "crack"))
    checkpoint = tmp / "pill_mobilenet_v2.pt"
    test = train_checkpoint(checkpoint, tmp / "data", "pill", backbone="mobilenet_v2", pretrained=True,
                            image_size=224, lr=1e-4, memory_size=2000)
    return checkpoint, tmp / "data", test


def test_real_pill_files_score_as_evaluation_does(pill, tmp_path):
    """On real 448 px PNGs: one row and a full-size overlay per file, and the numbers Evaluation's
    way gives (all images decoded by load_images, one inference.predict pass) for the same files."""
    checkpoint, data_dir, test = pill
    out = tmp_path / "out"
    paths = [str(data_dir / s.path) for s in test]
    status = predict.main(["--checkpoint", str(checkpoint), "--images", *paths, "--out", str(out),
                           "--localizer", "patch_knn", "--precision", "fp32"])
    assert status == 0
    rows = read_rows(out)
    assert [r["path"] for r in rows] == paths
    with Image.open(out / rows[0]["overlay"]) as overlay:
        assert overlay.size == (2 * 448, 448)
    model, ckpt = load_checkpoint(checkpoint)
    mean, std = normalisation("mobilenet_v2", True)
    pred = inference.predict(model, dataloader.load_images(data_dir, test, 224), mean, std, batch_size=10,
                          device=CPU, precision="fp32", patch_memory=ckpt["patch_memory"],
                          patch_rule=patch_rule_of(ckpt["config"]))
    np.testing.assert_allclose([float(r["p_anomaly"]) for r in rows], pred["p_anomaly"], atol=1e-5)
    np.testing.assert_allclose([float(r["image_score"]) for r in rows], pred["patch_score"], rtol=1e-5)
    # the label is the checkpoint's calibrated decision on the Anomaly probability, not the argmax
    decision = inference.decision_of(ckpt)
    assert decision["rule"] == "calibrated"
    assert [r["label"] == "Anomaly" for r in rows] == list(pred["p_anomaly"] > decision["threshold"])
