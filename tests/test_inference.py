"""utils.inference on hand-made inputs: finding image files, box scaling, box rules, rows; the overlay picture."""

import json

import numpy as np
import pytest
import torch

from utils import inference, plots

CHECKPOINT = {"config": {"backbone": "vgg16", "pretrained": False, "image_size": 64, "heatmap_thres": 0.7}}


def test_find_images_recursive_image_files_only(tmp_path, png):
    png(tmp_path / "a" / "0.png")
    png(tmp_path / "a" / "deep" / "1.JPG")  # extensions are case-insensitive
    png(tmp_path / "a" / ".hidden.png")
    png(tmp_path / "a" / ".cache" / "2.png")  # inside a hidden folder
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    found = inference.find_images([tmp_path / "a"])
    assert [name for _, name in found] == ["0.png", "deep/1.JPG"]
    # a glob pattern, ** recursive; names relative to the pattern's fixed folder
    found = inference.find_images([str(tmp_path / "a" / "**" / "*.JPG")])
    assert [name for _, name in found] == ["deep/1.JPG"]
    # a file named explicitly is kept even when it is not an image (it is reported, not skipped)
    found = inference.find_images([tmp_path / "a" / "notes.txt", tmp_path / "a"])
    assert [name for _, name in found] == ["notes.txt", "0.png", "deep/1.JPG"]


def test_find_images_names_stay_unique_and_files_are_not_repeated(tmp_path, png):
    png(tmp_path / "x" / "0.png")
    png(tmp_path / "y" / "0.png")
    found = inference.find_images([tmp_path / "x", tmp_path / "y", tmp_path / "x" / "0.png"])
    assert [name for _, name in found] == ["0.png", "0.png~2"]


def test_find_images_names_what_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        inference.find_images([tmp_path / "missing_folder"])


def test_scale_boxes_to_the_original_image():
    # a 64 px input of a 256 x 128 (W x H) image: x scales by 4, y by 2
    boxes = np.array([[8, 8, 16, 32]], np.float32)
    np.testing.assert_array_equal(inference.scale_boxes(boxes, 64, 256, 128), [[32, 16, 64, 64]])
    assert inference.scale_boxes(np.zeros((0, 4)), 64, 256, 128).shape == (0, 4)


def test_box_rule_falls_back_to_minmax_with_a_note():
    rule = inference.box_rule(CHECKPOINT, "cam", "calibrated")
    assert rule.name == "minmax" and rule.threshold == 0.7 and "no calibrated threshold" in rule.note
    assert inference.box_rule(CHECKPOINT, "cam", "minmax", heatmap_thres=0.5).threshold == 0.5
    with pytest.raises(ValueError, match="box_threshold='otsu'"):
        inference.box_rule(CHECKPOINT, "cam", "otsu")


def test_localizer_needs_what_the_checkpoint_holds():
    inference.check_localizer("cam", CHECKPOINT)
    with pytest.raises(ValueError, match="patch_knn.*needs the patch memory.*my.pt"):
        inference.check_localizer("patch_knn", CHECKPOINT, where="my.pt")
    inference.check_localizer("patch_knn", {**CHECKPOINT, "patch_memory": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="'heat'"):
        inference.check_localizer("heat", CHECKPOINT)


def test_gradref_needs_the_checkpoints_explanation_reference():
    # a checkpoint from before the reference existed offers every other map, and asking for
    # "gradref" names what is missing and what to use instead
    assert "gradref" not in inference.available_localizers(CHECKPOINT)
    assert "layercam_s8" in inference.available_localizers(CHECKPOINT)
    with pytest.raises(ValueError, match="gradref.*explanation reference.*old.pt.*train again"):
        inference.check_localizer("gradref", CHECKPOINT, where="old.pt")
    with_reference = {**CHECKPOINT, "explain_reference": torch.zeros(512, 4, 4)}
    inference.check_localizer("gradref", with_reference)
    assert "gradref" in inference.available_localizers(with_reference)


def test_checkpoint_round_trip_keeps_the_explanation_reference(tmp_path, make_model):
    from utils import helper
    net = make_model("mobilenet_v2")
    reference = torch.rand(96, 4, 4)
    config = {"backbone": "mobilenet_v2", "pretrained": False, "image_size": 64, "subset_name": "s"}
    config.update({k: None for k in helper.CONFIG_KEYS if k not in config})
    helper.save_checkpoint(tmp_path / "m.pt", net, config, [], extra={"explain_reference": reference})
    loaded, ckpt = helper.load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(loaded.explain_reference, reference)
    helper.save_checkpoint(tmp_path / "old.pt", net, config, [])  # written before the reference existed
    assert helper.load_checkpoint(tmp_path / "old.pt")[0].explain_reference is None
    helper.save_checkpoint(tmp_path / "bad.pt", net, config, [], extra={"explain_reference": torch.full((96,), float("nan"))})
    with pytest.raises(ValueError, match="bad.pt.*explain_reference"):
        helper.load_checkpoint(tmp_path / "bad.pt")


def test_minmax_boxes_only_on_anomaly_decisions():
    cam = np.zeros((2, 8, 8), np.float32)
    cam[:, 2:4, 5:7] = 1.0  # the same hot square in both images
    pred = {"p_anomaly": np.array([0.9, 0.1], np.float32), "cam": cam}
    rule = inference.box_rule(CHECKPOINT, "cam", "minmax")
    anomaly, good = inference.results_from_predictions(pred, "cam", rule)
    assert anomaly["label"] == "Anomaly" and good["label"] == "Good"
    np.testing.assert_array_equal(anomaly["boxes"], [[5, 2, 7, 4]])
    assert good["boxes"].shape == (0, 4) and good["box_scores"].shape == (0,)
    assert anomaly["image_score"] == pytest.approx(0.9)  # the CAM's image score is the probability


def test_prediction_row_and_csv():
    result = {"label": "Anomaly", "p_anomaly": 0.75, "image_score": 0.75,
              "boxes": np.array([[8, 8, 16, 32]], np.float32), "box_scores": np.array([0.5], np.float32)}
    row = inference.prediction_row("a.png", result, 256, 128, 64)
    assert row["boxes"] == [[32.0, 16.0, 64.0, 64.0, 0.5]] and row["n_boxes"] == 1 and row["error"] == ""
    failed = inference.prediction_row("b.png", None, error="ValueError: Cannot read image b.png")
    text = inference.predictions_csv([row, failed]).splitlines()
    assert text[0].split(",") == list(inference.PREDICTION_COLUMNS)
    assert json.loads(text[1].split('"')[1]) == [[32.0, 16.0, 64.0, 64.0, 0.5]]
    assert text[2].startswith("b.png,,,,,[],,,,ValueError")


def test_overlay_shows_image_and_map_with_boxes():
    image = np.full((40, 60, 3), 100, np.uint8)  # H=40, W=60
    heat = np.zeros((8, 8), np.float32)
    out = plots.overlay_image(image, heat, np.array([[10, 5, 30, 25]]), alpha=0.5)
    assert out.shape == (40, 120, 3) and out.dtype == np.uint8
    left, right = out[:, :60], out[:, 60:]
    red = (255, 0, 0)
    # exclusive x2, y2: the outline runs on x = 10 and x = 29, y = 5 and y = 24
    assert tuple(left[15, 10]) == red and tuple(left[15, 29]) == red and tuple(left[5, 20]) == red
    assert tuple(left[24, 20]) == red and tuple(left[25, 20]) == (100, 100, 100)
    assert tuple(left[15, 20]) == (100, 100, 100)  # inside the box: the image untouched
    # the right panel blends jet's colour of 0 (dark blue) into the image, and has the box too
    assert right[15, 20, 2] > right[15, 20, 0] and tuple(right[15, 10]) == red


def test_calibrated_rule_uses_the_checkpoints_threshold_in_map_units(monkeypatch):
    """With `calibration` in the checkpoint, boxes come from postprocess.calibrated_boxes at that
    map's threshold and minimum area, whatever the label (the threshold itself decides)."""
    calls = []

    def calibrated_boxes(map_hw, threshold, min_area):
        calls.append((map_hw.shape, threshold, min_area))
        hot = map_hw > threshold
        if not hot.any():
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
        ys, xs = np.nonzero(hot)
        return np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32), np.array([map_hw.max()], np.float32)

    monkeypatch.setattr(inference.postprocess, "calibrated_boxes", calibrated_boxes, raising=False)
    checkpoint = {**CHECKPOINT, "calibration": {"thresholds": {"cam": 0.3}, "min_area": 4, "rule": "test"}}
    rule = inference.box_rule(checkpoint, "cam", "calibrated")
    assert (rule.name, rule.threshold, rule.min_area, rule.note) == ("calibrated", 0.3, 4, "")
    cam = np.zeros((2, 8, 8), np.float32)
    cam[:, 2:4, 5:7] = 1.0
    pred = {"p_anomaly": np.array([0.9, 0.2], np.float32), "cam": cam}
    anomaly, good = inference.results_from_predictions(pred, "cam", rule)
    # the cam map is the min-max CAM times the probability: 0.9 passes 0.3 inside the square, 0.2 does not
    np.testing.assert_array_equal(anomaly["boxes"], [[5, 2, 7, 4]])
    assert anomaly["box_scores"][0] == pytest.approx(0.9) and good["boxes"].shape == (0, 4)
    assert calls == [((8, 8), 0.3, 4), ((8, 8), 0.3, 4)]
    # a map without a calibrated threshold falls back to min-max, with a note
    assert inference.box_rule(checkpoint, "patch_knn", "calibrated").name == "minmax"
