"""bf16 autocast + channels-last keeps the results of fp32 on the synthetic subset."""

import numpy as np
import pytest
import torch

from utils import dataloader, helper, inference, localizers, metrics, runtime
from utils import model as model_lib

CPU = torch.device("cpu")


def _train_and_score(data_dir, precision):
    runtime.set_seed(0)
    samples = dataloader.index_subset(data_dir, "synthetic")
    train, test = dataloader.split_samples(samples, 0.25, seed=0)
    x_train = dataloader.load_images(data_dir, train, 64)
    x_test = dataloader.load_images(data_dir, test, 64)
    y_train = torch.tensor([s.label for s in train])
    y_test = np.array([s.label for s in test])
    net = runtime.prepare_model(model_lib.CAMClassifier("vgg16", pretrained=False), CPU, precision)
    mean, std = model_lib.normalisation("vgg16", False)
    helper.train_model(net, x_train, y_train, mean=mean, std=std, epochs=4, lr=1e-3, class_weight=[1, 3],
                       batch_size=10, target_train_accuracy=None, seed=0, device=CPU, precision=precision,
                       progress=False)
    pred = inference.predict(net, x_test, mean, std, batch_size=10, device=CPU, precision=precision, progress=False)
    masks = dataloader.load_masks(data_dir, test, 64).numpy()
    p = pred["p_anomaly"]
    cls = metrics.classification_metrics(y_test, (p >= 0.5).astype(int), p)
    cam = localizers.localizer_maps(pred["cam"], p)["cam"]
    return cls, metrics.pixel_auroc(cam, masks), p


@pytest.mark.skipif(not runtime.cpu_supports_bf16(), reason="this CPU has no fast bf16 (AVX512-BF16/AMX)")
def test_bf16_keeps_fp32_metrics(tmp_path):
    from utils.synthetic import generate_synthetic_subset

    generate_synthetic_subset(tmp_path / "synthetic", seed=0, n_train_good=30, n_test_good=10, n_per_defect=8)
    fp32, fp32_pix, p32 = _train_and_score(tmp_path, "fp32")
    bf16, bf16_pix, p16 = _train_and_score(tmp_path, "bf16")
    # Stated tolerance (README): 0.02 on image AUROC and pixel AUROC, at most one test image
    # changing its decision, Anomaly probabilities within 0.1. bf16 keeps 8 mantissa
    # bits, so scores move slightly but the decisions and rankings must not.
    assert abs(fp32["image_auroc"] - bf16["image_auroc"]) <= 0.02
    assert abs(fp32_pix - bf16_pix) <= 0.02
    assert abs(fp32["accuracy"] - bf16["accuracy"]) <= 1 / len(p32) + 1e-9
    assert np.abs(p32 - p16).max() <= 0.1
