"""Check the CUDA path end to end on the synthetic subset: the fold pipeline, a checkpoint, predict.

Runs `helper.run_fold` (what Training.ipynb runs) with device "cuda" for both heads in fp32 and in
the automatic mixed precision, saves and reloads the checkpoint, scores the held-out images from
the reloaded one and prints the metrics of each run, so a reader can see they agree.

    python benchmarks/cuda_check.py --work-dir /tmp/cuda_check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import calibration, dataloader, helper, inference, localizers, metrics, parameters, runtime  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402


def run(head: str, precision: str, device: torch.device, data_dir: Path, args) -> dict:
    """One fold on the device, the checkpoint round trip, the reloaded model's predictions."""
    # the evidence head takes the published recipe's defaults only (parameters.PUBLISHED_RECIPE)
    recipe = dict(epochs=args.epochs, lr=1e-3, target_train_accuracy=None) if head == "published" else \
        parameters.PUBLISHED_RECIPE
    config = parameters.training_config(
        data_dir=str(data_dir), subset_name="synthetic", download=False, backbone=args.backbone, pretrained=False,
        image_size=args.image_size, batch_size=10, class_weight=[1, 3], test_size=0.2, seed=args.seed,
        heatmap_thres=0.7, n_cv_folds=0, weights_dir=args.work_dir, results_dir=args.work_dir, device=str(device),
        precision=precision, patch_memory_size=2000, head=head, **recipe)
    samples = dataloader.index_subset(data_dir, "synthetic")
    train, test = dataloader.split_samples(samples, 0.2, args.seed)
    images = dataloader.load_images(data_dir, samples, args.image_size)
    labels = torch.tensor([s.label for s in samples])
    amp = runtime.resolve_precision(precision, device)
    start = time.perf_counter()
    template = helper.new_model(config, None, device, amp)
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=10, device=device,
                                precision=amp, progress=False)
    test_idx = dataloader.positions(samples, test)
    fold = helper.run_fold(config, template, frozen, labels, dataloader.positions(samples, train), test_idx,
                           types=[s.defect_type for s in samples], device=device, precision=amp, test_maps=True,
                           progress=False)
    seconds = time.perf_counter() - start
    path = Path(args.work_dir) / f"check_{head}_{amp}.pt"
    torch.save(fold.checkpoint(config, [s.path for s in test], len(train)), path)
    reloaded, ckpt = load_checkpoint(path)
    again = inference.predict(runtime.prepare_model(reloaded, device, amp), images[test_idx], config["mean"],
                              config["std"], batch_size=10, device=device, precision=amp,
                              **inference.needs(ckpt, localizers.default_localizer(ckpt)))
    y = labels[test_idx].numpy()
    score = localizers.image_score_of(fold.test)
    masks = dataloader.load_masks(data_dir, test, args.image_size).numpy()
    return {
        "head": head, "precision": amp, "seconds": seconds,
        "decision": metrics.decision_metrics(y, calibration.decide(score, fold.calibration["decision"]),
                                             fold.calibration["decision"]),
        "image_auroc": metrics.classification_metrics(y, y, score)["image_auroc"],
        "pixel_auroc": {k: metrics.pixel_auroc(m, masks) for k, m in localizers.maps_of(fold.test).items()},
        "reload_max_diff": float(np.abs(localizers.image_score_of(again) - score).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="/tmp/cuda_check", help="where the synthetic subset goes")
    parser.add_argument("--backbone", default="vgg16", help="vgg16 or mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=128, help="input size")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the published head")
    parser.add_argument("--seed", type=int, default=42, help="seed")
    args = parser.parse_args()
    device = runtime.resolve_device("auto")
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    data_dir = Path(args.work_dir) / "data"
    dataloader.prepare_subset(data_dir, "synthetic", download=False, seed=args.seed)
    for head in ("published", "evidence"):
        for precision in ("fp32", "auto"):
            print(run(head, precision, device, data_dir, args), flush=True)


if __name__ == "__main__":
    main()
