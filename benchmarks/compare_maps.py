"""Compare pixel-scoring maps over k cross-validation folds of one subset.

For each fold: train the CAM classifier on the fold's training images (the published recipe),
build the patch memory from the fold's good training images, score the held-out images, and
pool the held-out maps of all folds. Then report pixel AUROC, AUPRO and the pointing game of:
  cam_raw       the raw CAM (its scale differs from image to image),
  cam_minmax    the per-image min-max CAM (every image spans [0, 1], good ones included),
  cam_prob      the min-max CAM times the image's Anomaly probability (the repository's "cam"),
  patch_knn     the nearest-neighbour distance to good training patches,
  cam_knn       patch_knn times the min-max CAM (the repository's "cam_knn"),
  cam_knn_prob  patch_knn times cam_prob (an alternative that also weighs by the probability).

    python benchmarks/compare_maps.py --data-dir ../shared/data/mvtec_anomaly_detection \
        --subset toothbrush --backbone mobilenet_v2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import runtime  # noqa: E402
from utils import inference  # noqa: E402
from utils.checkpoint import save_json  # noqa: E402
from utils import dataloader, helper, metrics, postprocess  # noqa: E402
from utils import model as model_lib  # noqa: E402


def fold_maps(args, samples, train, test, images, index, device, precision, fold):
    """Train on `train`, return the held-out maps and Anomaly probabilities of `test`."""
    runtime.set_seed(args.seed + fold)
    net = runtime.prepare_model(model_lib.CAMClassifier(args.backbone, pretrained=True), device, precision)
    mean, std = model_lib.normalisation(args.backbone, True)
    x_train = images[[index[s.path] for s in train]]
    y_train = torch.tensor([s.label for s in train])
    features, good = helper.frozen_pass(net, x_train, mean, std, batch_size=10, device=device,
                                        precision=precision, patch_images=y_train == 0)
    helper.train_model(net, x_train, y_train, mean=mean, std=std, epochs=args.epochs, lr=1e-4,
                       class_weight=[1, 3], batch_size=10, target_train_accuracy=0.98,
                       seed=args.seed + fold, device=device, precision=precision, features=features,
                       progress=False)
    memory, info = helper.build_patch_memory(good, size=args.memory_size, method=args.memory_method, seed=args.seed)
    print(f"fold {fold + 1}: memory {info['size']} of {info['n_patches']} patches ({info['method']}, "
          f"{info['seconds']:.2f} s)", flush=True)
    x_test = images[[index[s.path] for s in test]]
    return inference.predict(net, x_test, mean, std, batch_size=10, device=device, precision=precision,
                          patch_memory=memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/mvtec_anomaly_detection", help="folder of subset folders")
    parser.add_argument("--subset", default="toothbrush", help="subset to measure")
    parser.add_argument("--backbone", default="mobilenet_v2", help="vgg16 or mobilenet_v2 (pretrained)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    parser.add_argument("--epochs", type=int, default=10, help="at most this many epochs per fold")
    parser.add_argument("--image-size", type=int, default=224, help="input size")
    parser.add_argument("--memory-size", type=int, default=10000, help="patch memory size")
    parser.add_argument("--memory-method", default="coreset", help="patch memory subsampling: coreset or random")
    parser.add_argument("--seed", type=int, default=42, help="seed of folds, init and shuffling")
    parser.add_argument("--out", default=None, help="optional JSON file for the numbers")
    args = parser.parse_args()

    device = runtime.resolve_device("auto")
    precision = runtime.resolve_precision("auto", device)
    samples = dataloader.index_subset(args.data_dir, args.subset)
    images = dataloader.load_images(args.data_dir, samples, args.image_size)
    masks = dataloader.load_masks(args.data_dir, samples, args.image_size)
    index = {s.path: i for i, s in enumerate(samples)}
    pooled = {k: [] for k in ("cam", "p_anomaly", "patch_map", "idx")}
    for fold, (train, test) in enumerate(dataloader.kfold_splits(samples, args.folds, args.seed)):
        out = fold_maps(args, samples, train, test, images, index, device, precision, fold)
        for key in ("cam", "p_anomaly", "patch_map"):
            pooled[key].append(out[key])
        pooled["idx"] += [index[s.path] for s in test]
        print(f"fold {fold + 1}/{args.folds} done", flush=True)
    cam, prob, patch = (np.concatenate(pooled[k]) for k in ("cam", "p_anomaly", "patch_map"))
    gt = masks[pooled["idx"]].numpy()
    labels = np.array([samples[i].label for i in pooled["idx"]])
    cam_minmax = postprocess.minmax_normalise(cam)
    maps = {
        "cam_raw": cam,
        "cam_minmax": cam_minmax,
        **postprocess.localizer_maps(cam, prob, patch),
    }
    maps["cam_prob"] = maps.pop("cam")
    maps["cam_knn_prob"] = patch * maps["cam_prob"]
    rows = {}
    print(f"{args.subset}, {args.backbone} (ImageNet), {len(samples)} images, {args.folds}-fold CV, "
          f"held-out maps pooled; image AUROC {metrics.classification_metrics(labels, (prob >= .5).astype(int), prob)['image_auroc']:.3f}")
    print(f"{'map':<14}{'pixel AUROC':>12}{'AUPRO':>8}{'pointing':>10}")
    for name, m in maps.items():
        rows[name] = {"pixel_auroc": metrics.pixel_auroc(m, gt), "aupro": metrics.aupro(m, gt),
                      "pointing_game": metrics.pointing_game(m, gt)}
        print(f"{name:<14}{rows[name]['pixel_auroc']:>12.3f}{rows[name]['aupro']:>8.3f}"
              f"{rows[name]['pointing_game']:>10.3f}")
    if args.out:
        save_json(args.out, {"args": vars(args), "maps": rows})


if __name__ == "__main__":
    main()
