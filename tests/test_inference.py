"""utils.inference on hand-made inputs: finding image files, box scaling, box rules, rows, the overlay picture;
score_image on one image from any source with training's preprocessing."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from utils.checkpoint import CONFIG_KEYS, load_checkpoint, save_checkpoint
from utils import dataloader, inference, plots
from utils.model import normalisation
from utils.postprocess import calibrated_boxes, heatmap_to_boxes

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
    inference.check_localizer("layercam_s8", CHECKPOINT)
    with pytest.raises(ValueError, match="gradref.*explanation reference.*old.pt.*train again"):
        inference.check_localizer("gradref", CHECKPOINT, where="old.pt")
    with_reference = {**CHECKPOINT, "explain_reference": torch.zeros(512, 4, 4)}
    inference.check_localizer("gradref", with_reference)


def test_checkpoint_round_trip_keeps_the_explanation_reference(tmp_path, make_model):
    net = make_model("mobilenet_v2")
    reference = torch.rand(96, 4, 4)
    config = {"backbone": "mobilenet_v2", "pretrained": False, "image_size": 64, "subset_name": "s"}
    config.update({k: None for k in CONFIG_KEYS if k not in config})
    save_checkpoint(tmp_path / "m.pt", net, config, [], extra={"explain_reference": reference})
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(loaded.explain_reference, reference)
    save_checkpoint(tmp_path / "old.pt", net, config, [])  # written before the reference existed
    assert load_checkpoint(tmp_path / "old.pt")[0].explain_reference is None
    save_checkpoint(tmp_path / "bad.pt", net, config, [], extra={"explain_reference": torch.full((96,), float("nan"))})
    with pytest.raises(ValueError, match="bad.pt.*explain_reference"):
        load_checkpoint(tmp_path / "bad.pt")


ARGMAX = {"rule": "argmax", "false_alarm_rate": None, "threshold": 0.5}


def test_minmax_boxes_only_on_anomaly_decisions():
    cam = np.zeros((2, 8, 8), np.float32)
    cam[:, 2:4, 5:7] = 1.0  # the same hot square in both images
    pred = {"p_anomaly": np.array([0.9, 0.1], np.float32), "cam": cam}
    rule = inference.box_rule(CHECKPOINT, "cam", "minmax")
    anomaly, good = inference.results_from_predictions(pred, "cam", rule, ARGMAX)
    assert anomaly["label"] == "Anomaly" and good["label"] == "Good"
    np.testing.assert_array_equal(anomaly["boxes"], [[5, 2, 7, 4]])
    assert good["boxes"].shape == (0, 4) and good["box_scores"].shape == (0,)
    assert anomaly["image_score"] == pytest.approx(0.9)  # the CAM's image score is the probability


def test_calibrated_decision_labels_and_boxes_agree():
    """Hand-built scores: the label is "score above the calibrated threshold"; an image labelled Good
    gets no box even where its map passes the box threshold, and an image labelled Anomaly gets at
    least its strongest region even where no pixel passes it."""
    cam = np.zeros((3, 8, 8), np.float32)
    cam[:, 2:4, 5:7] = 1.0
    cam[2, 6, 1] = 0.5  # image 2 also has a weaker second spot
    pred = {"p_anomaly": np.array([0.35, 0.25, 0.95], np.float32), "cam": cam}
    decision = {"rule": "calibrated", "false_alarm_rate": 0.05, "threshold": 0.3}
    checkpoint = {**CHECKPOINT, "calibration": {"thresholds": {"cam": 0.5}, "min_area": 1, "floors": {"cam": 0.0}}}
    rule = inference.box_rule(checkpoint, "cam", "calibrated")
    weak, good, strong = inference.results_from_predictions(pred, "cam", rule, decision)
    assert [r["label"] for r in (weak, good, strong)] == ["Anomaly", "Good", "Anomaly"]
    # image 0: its cam map peaks at 0.35, below the box threshold 0.5: its strongest region is boxed
    np.testing.assert_array_equal(weak["boxes"], [[5, 2, 7, 4]])
    assert weak["box_scores"][0] == pytest.approx(0.35)
    assert good["boxes"].shape == (0, 4)  # 0.25 > 0.3 fails: Good, whatever its map
    np.testing.assert_array_equal(strong["boxes"], [[5, 2, 7, 4]])  # 0.95 x 0.5 = 0.475: the spot stays below
    # the overlay scale: the floor is cold, the box threshold at DISPLAY_LEVEL, the same for every image
    assert strong["heatmap"].max() == 1.0 and strong["heatmap"].min() == 0.0
    assert weak["heatmap"].max() == pytest.approx(0.35 / 0.5 * inference.postprocess.DISPLAY_LEVEL)


def test_decision_of_older_checkpoints():
    assert inference.decision_of(CHECKPOINT) == {**ARGMAX, "expected_false_alarms": None, "meets_rate": None}
    patch_only = {**CHECKPOINT, "classifier": False, "calibration": {"thresholds": {"patch_knn": 2.5}}}
    assert inference.decision_of(patch_only)["threshold"] == 2.5
    with pytest.raises(ValueError, match="nothing decides"):
        inference.decision_of({**CHECKPOINT, "classifier": False})


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


# --- score_image ------------------------------------------------------------------------

CPU = torch.device("cpu")
CONFIG = CHECKPOINT["config"]


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (100, 80, 3), dtype=np.uint8)  # not square: resized like training
    path = tmp_path / "part.png"
    Image.fromarray(array).save(path)
    return path, array


def _set_bias(model, good: float, anomaly: float):
    with torch.no_grad():
        model.fc.bias.copy_(torch.tensor([good, anomaly]))
        model.fc.weight.mul_(1e-3)  # the bias decides the label; the CAM keeps its shape
    return model


def test_path_pil_and_array_give_the_same_result(image_file, make_model):
    path, array = image_file
    model = _set_bias(make_model("vgg16"), -10.0, 10.0).eval()
    results = [inference.score_image(x, model, {"config": CONFIG}, box_threshold="minmax")
               for x in (path, Image.open(path), array)]
    for r in results[1:]:
        assert r["label"] == results[0]["label"] == "Anomaly"
        np.testing.assert_array_equal(r["heatmap"], results[0]["heatmap"])
        np.testing.assert_array_equal(r["boxes"], results[0]["boxes"])
    # the same preprocessing as training's decode-once loader
    decoded = dataloader.read_image(path, 64)[None]
    mean, std = normalisation("vgg16", False)
    cam = inference.predict(model, decoded, mean, std, batch_size=1, device=CPU, precision="fp32")["cam"][0]
    expected = (cam - cam.min()) / (cam.max() - cam.min())
    np.testing.assert_allclose(results[0]["heatmap"], expected, atol=1e-6)
    # an Anomaly gets the boxes of its heatmap at the configuration's threshold
    np.testing.assert_array_equal(results[0]["boxes"], heatmap_to_boxes(expected, 0.7)[0])


def test_score_batch_refuses_images_of_another_size(image_file, make_model):
    """Images at another size than the checkpoint's would be scored against thresholds and a top-k
    share calibrated at its size. Catches: score_batch without `check_image_batch` (128 px images
    of a 64 px checkpoint are then scored silently)."""
    path, _ = image_file
    model = _set_bias(make_model("vgg16"), -10.0, 10.0).eval()
    checkpoint = {"config": CONFIG}
    assert len(inference.score_batch(dataloader.read_image(path, 64)[None], model, checkpoint,
                                     box_threshold="minmax")) == 1
    for images in (dataloader.read_image(path, 128)[None], dataloader.read_image(path, 64)):
        with pytest.raises(ValueError, match=r"trained and calibrated on \(N, 3, 64, 64\) images"):
            inference.score_batch(images, model, checkpoint, box_threshold="minmax")


def test_good_label_gets_no_box_and_grayscale_works(image_file, make_model):
    _, array = image_file
    model = _set_bias(make_model("vgg16"), 10.0, -10.0).eval()
    result = inference.score_image(array[..., 0], model, {"config": CONFIG}, box_threshold="minmax")  # (H, W) grayscale array
    assert result["label"] == "Good" and result["p_anomaly"] < 0.01
    assert result["boxes"].shape == (0, 4)


def test_calibrated_boxes_of_score_image_follow_the_checkpoint_threshold(image_file, make_model):
    path, _ = image_file
    model = _set_bias(make_model("vgg16"), -10.0, 10.0).eval()  # p_anomaly ~ 1: the "cam" map is the heatmap
    low = {"thresholds": {"cam": 0.5}, "min_area": 1}
    result = inference.score_image(path, model, {"config": CONFIG, "calibration": low})
    heatmap = result["heatmap"] * result["p_anomaly"]
    np.testing.assert_array_equal(result["boxes"], calibrated_boxes(heatmap, 0.5, 1)[0])
    assert len(result["boxes"]) >= 1
    # a threshold above the whole map (as calibrated on good parts hotter than this one): the image is
    # labelled Anomaly, so it still shows its strongest region, and only that
    high = {"thresholds": {"cam": 1.0}, "min_area": 1}
    strongest = inference.score_image(path, model, {"config": CONFIG, "calibration": high})
    assert strongest["boxes"].shape == (1, 4) and strongest["box_scores"][0] == pytest.approx(heatmap.max())
    # calibrated by default; without a calibration the published rule is used, and said so
    fallback = inference.score_image(path, model, {"config": CONFIG})
    assert fallback["box_threshold"] == "minmax" and "no calibrated threshold" in fallback["box_note"]
