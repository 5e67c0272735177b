"""score_image (one image from any source, training's preprocessing) and cross_validate."""

import numpy as np
import pytest
import torch
from PIL import Image

from utils import dataloader, helper
from utils.model import normalisation
from utils.postprocess import calibrated_boxes, heatmap_to_boxes
from utils.synthetic import generate_synthetic_subset

CPU = torch.device("cpu")
CONFIG = {"backbone": "vgg16", "pretrained": False, "image_size": 64, "heatmap_thres": 0.7}


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
    results = [helper.score_image(x, model, CONFIG, box_threshold="minmax") for x in (path, Image.open(path), array)]
    for r in results[1:]:
        assert r["label"] == results[0]["label"] == "Anomaly"
        np.testing.assert_array_equal(r["heatmap"], results[0]["heatmap"])
        np.testing.assert_array_equal(r["boxes"], results[0]["boxes"])
    # the same preprocessing as training's decode-once loader
    decoded = dataloader.read_image(path, 64)[None]
    mean, std = normalisation("vgg16", False)
    cam = helper.predict(model, decoded, mean, std, batch_size=1, device=CPU, precision="fp32")["cam"][0]
    expected = (cam - cam.min()) / (cam.max() - cam.min())
    np.testing.assert_allclose(results[0]["heatmap"], expected, atol=1e-6)
    # an Anomaly gets the boxes of its heatmap at the configuration's threshold
    np.testing.assert_array_equal(results[0]["boxes"], heatmap_to_boxes(expected, 0.7)[0])


def test_good_label_gets_no_box_and_grayscale_works(image_file, make_model):
    _, array = image_file
    model = _set_bias(make_model("vgg16"), 10.0, -10.0).eval()
    result = helper.score_image(array[..., 0], model, CONFIG, box_threshold="minmax")  # (H, W) grayscale array
    assert result["label"] == "Good" and result["p_anomaly"] < 0.01
    assert result["boxes"].shape == (0, 4)


def test_calibrated_boxes_of_score_image_follow_the_checkpoint_threshold(image_file, make_model):
    path, _ = image_file
    model = _set_bias(make_model("vgg16"), -10.0, 10.0).eval()  # p_anomaly ~ 1: the "cam" map is the heatmap
    low = {"thresholds": {"cam": 0.5}, "min_area": 1}
    result = helper.score_image(path, model, CONFIG, calibration=low)
    heatmap = result["heatmap"] * result["p_anomaly"]
    np.testing.assert_array_equal(result["boxes"], calibrated_boxes(heatmap, 0.5, 1)[0])
    assert len(result["boxes"]) >= 1
    # a threshold above the whole map (as calibrated on good parts hotter than this one): no box
    high = {"thresholds": {"cam": 1.0}, "min_area": 1}
    assert helper.score_image(path, model, CONFIG, calibration=high)["boxes"].shape == (0, 4)
    # calibrated by default; without a calibration the published rule is used, and said so
    fallback = helper.score_image(path, model, CONFIG)
    assert fallback["box_threshold"] == "minmax" and "no calibrated threshold" in fallback["box_note"]


def test_cross_validation_holds_out_every_image_once(tmp_path):
    generate_synthetic_subset(tmp_path / "synthetic", seed=0, n_train_good=6, n_test_good=2,
                              n_per_defect=3, image_size=64)
    samples = dataloader.index_subset(tmp_path, "synthetic")
    images = dataloader.load_images(tmp_path, samples, 64)
    seen = []
    results = helper.cross_validate(
        samples, images, n_folds=3, backbone="vgg16", pretrained=False, seed=0, device=CPU,
        precision="fp32", on_fold_end=lambda fold, m: seen.append(fold), epochs=1, lr=1e-3,
        class_weight=[1, 3], batch_size=5, target_train_accuracy=None,
    )
    assert seen == [1, 2, 3] and len(results) == 3
    counted = sum(sum(r["confusion_matrix"].values()) for r in results)
    anomalies = sum(r["confusion_matrix"]["TP"] + r["confusion_matrix"]["FN"] for r in results)
    assert counted == len(samples) == 17 and anomalies == 9
