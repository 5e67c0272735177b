"""The fold pipeline (utils.helper): one frozen pass serves every fold, what a fold trains and scores, cross-validation."""

import numpy as np
import pytest
import torch

from utils import dataloader, helper, inference, parameters
from utils.constants import GOOD
from utils.synthetic import generate_synthetic_subset

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """17 synthetic images at 64 px: samples, decoded images (N, 3, 64, 64) uint8, labels (N,)."""
    root = tmp_path_factory.mktemp("data")
    generate_synthetic_subset(root / "synthetic", seed=0, n_train_good=6, n_test_good=2, n_per_defect=3, image_size=64)
    samples = dataloader.index_subset(root, "synthetic")
    return samples, dataloader.load_images(root, samples, 64), torch.tensor([s.label for s in samples])


def _config(tmp_path, **overrides):
    return parameters.training_config(**{
        "data_dir": str(tmp_path), "subset_name": "synthetic", "download": False, "backbone": "mobilenet_v2",
        "pretrained": False, "image_size": 64, "batch_size": 5, "epochs": 2, "lr": 1e-3, "class_weight": [1, 3],
        "target_train_accuracy": None, "test_size": 0.2, "seed": 0, "heatmap_thres": 0.7, "n_cv_folds": 0,
        "weights_dir": str(tmp_path), "results_dir": str(tmp_path), "device": "cpu", "precision": "fp32",
        "patch_memory_size": 150, "patch_memory_method": "random", **overrides})


def test_frozen_pass_keeps_the_taps_it_is_asked_for(subset, make_model):
    _, images, _ = subset
    net = make_model("mobilenet_v2")
    keep = torch.tensor([i % 3 == 0 for i in range(len(images))])
    frozen = helper.frozen_pass(net, images, (0.5,) * 3, (0.25,) * 3, batch_size=4, device=CPU, precision="fp32",
                                tap_images=keep, progress=False)
    assert frozen.features.shape == (17, 96, 4, 4) and frozen.tap.shape == (int(keep.sum()), 32, 8, 8)
    full = helper.frozen_pass(net, images, (0.5,) * 3, (0.25,) * 3, batch_size=4, device=CPU, precision="fp32",
                              progress=False)
    idx = torch.tensor([9, 0, 3])
    torch.testing.assert_close(frozen.tap_of(idx), full.tap_of(idx))
    assert frozen.patches_of(idx).shape == (3 * 8 * 8, 32 + 96)
    with pytest.raises(ValueError, match="no stride-8 tap"):
        frozen.tap_of(torch.tensor([1]))


def test_a_fold_scores_from_the_cache_what_predict_scores_from_the_images(subset, make_model, tmp_path):
    samples, images, labels = subset
    config = _config(tmp_path)
    template = make_model("mobilenet_v2")
    untouched = {k: v.clone() for k, v in template.state_dict().items()}
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=5, device=CPU,
                                precision="fp32", progress=False)
    train, test = torch.arange(0, 17, 2), torch.arange(1, 17, 2)
    fold = helper.run_fold(config, template, frozen, labels, train, test, device=CPU, precision="fp32",
                           test_maps=True, progress=False)
    assert all(torch.equal(v, template.state_dict()[k]) for k, v in untouched.items())  # the template stays untrained
    assert fold.classifier and fold.history["epochs_run"] == 2
    # the memory holds patches of the good training images only, less those held back to calibrate
    n_good = int((labels[train] == GOOD).sum())
    held = fold.calibration_images
    assert len(held) == 1 and set(held.tolist()) <= set(train.tolist()) and bool((labels[held] == GOOD).all())
    assert fold.memory_info["n_patches"] == (n_good - 1) * 8 * 8 and len(fold.patch_memory) == 150
    direct = inference.predict(fold.model, images[test], config["mean"], config["std"], batch_size=5, device=CPU,
                               precision="fp32", patch_memory=fold.patch_memory, explain=True)
    assert set(fold.test) == set(direct)
    for key, value in direct.items():
        np.testing.assert_allclose(fold.test[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    assert set(fold.calibration["thresholds"]) >= {"cam", "patch_knn", "cam_knn", "gradref", "explain"}
    assert fold.calibration["thresholds"]["patch_knn"] > 0  # a held-back image is never in the memory


def test_cross_validation_holds_out_every_image_once(subset, make_model, tmp_path):
    samples, images, _ = subset
    config = _config(tmp_path, epochs=1, patch_memory_size=0)
    template = make_model("mobilenet_v2")
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=5, device=CPU,
                                precision="fp32", progress=False)
    seen = []
    results = helper.cross_validate(config, samples, template, frozen, n_folds=3, device=CPU, precision="fp32",
                                    on_fold_end=lambda fold, m, held_out, _: seen.append((fold, len(held_out))))
    assert [f for f, _ in seen] == [1, 2, 3] and sum(n for _, n in seen) == 17 and len(results) == 3
    counted = sum(sum(r["confusion_matrix"].values()) for r in results)
    anomalies = sum(r["confusion_matrix"]["TP"] + r["confusion_matrix"]["FN"] for r in results)
    assert counted == len(samples) == 17 and anomalies == 9
