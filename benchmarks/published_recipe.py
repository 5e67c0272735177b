"""The published recipe on one category: the published split with several training seeds, or k-fold
cross-validation pooled out of fold; classification metrics as in the README's published table.

The frozen layers are deterministic, so they run once per image; each seed or fold then trains the
fine-tuned layers and head on the cached activations (`helper.train_model(features=...)`), the same
computation as Training.ipynb's.

    python benchmarks/published_recipe.py --data-dir ../shared/data/mvtec_anomaly_detection \\
        --subset pill --backbone-weights /tmp/vgg16.pth --seeds 42 0 1
    python benchmarks/published_recipe.py --data-dir ../shared/data/mvtec_anomaly_detection \\
        --subset toothbrush --backbone-weights /tmp/vgg16.pth --folds 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import runtime  # noqa: E402
from utils.checkpoint import save_json  # noqa: E402
from utils import dataloader, helper, metrics  # noqa: E402
from utils import model as model_lib  # noqa: E402

RECIPE = dict(epochs=10, lr=1e-4, class_weight=[1.0, 3.0], target_train_accuracy=0.98, batch_size=10)


def train_and_score(weights, backbone, features, labels, train_idx, test_idx, seed, device, precision):
    """Train the published recipe on cached features of `train_idx`; Anomaly probabilities of `test_idx`."""
    runtime.set_seed(seed)
    net = runtime.prepare_model(model_lib.CAMClassifier(backbone, weights=weights, pretrained=weights is None),
                               device, precision)
    history = helper.train_model(net, None, torch.as_tensor(labels[train_idx]), mean=None, std=None, seed=seed,
                                 device=device, precision=precision, features=features[train_idx],
                                 progress=False, **RECIPE)
    net.eval()
    probs = []
    with torch.no_grad():
        for start in range(0, len(test_idx), 10):
            x = features[test_idx[start:start + 10]].to(device)
            with runtime.autocast(device, precision):
                scores, _ = net.head(x)
            probs.append(scores.float().softmax(dim=1)[:, 1].cpu())
    return torch.cat(probs).numpy(), history["epochs_run"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--subset", required=True)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--backbone-weights", default=None, help="backbone weights file (default: torchvision's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42],
                        help="training seeds on the published split (its split seed stays --split-seed)")
    parser.add_argument("--split-seed", type=int, default=42)
    parser.add_argument("--folds", type=int, default=0, help="k-fold cross-validation instead of the split")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    precision = runtime.resolve_precision("auto", device)
    weights = model_lib.load_backbone_weights(args.backbone_weights, args.backbone) if args.backbone_weights else None
    mean, std = (weights.mean, weights.std) if weights else model_lib.normalisation(args.backbone, True)
    samples = dataloader.index_subset(args.data_dir, args.subset)
    labels = np.array([s.label for s in samples])
    start = time.perf_counter()
    images = dataloader.load_images(args.data_dir, samples, 224)
    net = runtime.prepare_model(model_lib.CAMClassifier(args.backbone, weights=weights, pretrained=True), device,
                               precision)
    features, _ = helper.frozen_pass(net, images, mean, std, batch_size=10, device=device, precision=precision)
    del net, images
    runs = []
    if args.folds:
        pooled = np.zeros(len(samples))
        for fold, (train, test) in enumerate(dataloader.kfold_splits(samples, args.folds, args.split_seed)):
            tr, te = dataloader.positions(samples, train), dataloader.positions(samples, test)
            pooled[te.numpy()], epochs = train_and_score(weights, args.backbone, features, labels, tr, te,
                                                         args.split_seed + fold, device, precision)
            print(f"fold {fold + 1}/{args.folds}: {epochs} epochs", flush=True)
        m = metrics.classification_metrics(labels, (pooled >= 0.5).astype(int), pooled)
        runs.append({"protocol": f"{args.folds}-fold pooled out of fold", "seed": args.split_seed, **m})
    else:
        train, test = dataloader.split_samples(samples, 0.2, args.split_seed)
        tr, te = dataloader.positions(samples, train), dataloader.positions(samples, test)
        for seed in args.seeds:
            p, epochs = train_and_score(weights, args.backbone, features, labels, tr, te, seed, device, precision)
            m = metrics.classification_metrics(labels[te.numpy()], (p >= 0.5).astype(int), p)
            runs.append({"protocol": f"split {len(train)}/{len(test)} (seed {args.split_seed})",
                         "seed": seed, "epochs_run": epochs, **m})
    for r in runs:
        cm = r["confusion_matrix"]
        print(f"{args.subset} {r['protocol']} training seed {r['seed']}: accuracy {r['accuracy']:.3f} "
              f"balanced {r['balanced_accuracy']:.3f} AUROC {r['image_auroc']:.3f} "
              f"TP={cm['TP']} FN={cm['FN']} FP={cm['FP']} TN={cm['TN']}")
    report = {"subset": args.subset, "backbone": args.backbone, "precision": precision,
              "backbone_weights": weights.describe() if weights else None, "recipe": RECIPE,
              "seconds": time.perf_counter() - start, "runs": runs}
    if args.out:
        save_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
