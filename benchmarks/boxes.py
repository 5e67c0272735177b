"""Boxes from calibrated thresholds against the published per-image min-max rule, by cross-validation.

For each of k stratified folds of one subset: train the CAM classifier (the published recipe) on
the fold's training images, build the patch memory from its good training images, and score
  - the fold's held-out images (the out-of-fold maps that are measured), and
  - the fold's good training images, the calibration set: their CAM from the trained classifier,
    their patch map with each image's own rows left out of the memory
    (`patchknn.leave_one_image_out_maps`), as Training.ipynb calibrates.
The frozen layers are deterministic, so they run once per image for all folds. Maps are cached
at feature resolution in --cache (one .npz per subset, backbone and weights) and reused.

Then, for every map, the out-of-fold boxes of the published rule (min-max per image at 0.7)
and of calibrated thresholds (each fold's thresholds from its own calibration set only) are
measured pooled: box IoU, box recall, box precision, good images with boxes.

    python benchmarks/boxes.py --data-dir ../shared/data/mvtec_anomaly_detection \
        --subset pill --backbone mobilenet_v2
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import runtime  # noqa: E402
from utils.checkpoint import save_json  # noqa: E402
from utils import dataloader, helper, metrics, patchknn, postprocess  # noqa: E402
from utils import model as model_lib  # noqa: E402


@torch.no_grad()
def head_outputs(net, features: torch.Tensor, device, precision) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly probability (N,) and raw CAM at feature resolution (N, h, w) of cached frozen features."""
    net.eval()
    probs, cams = [], []
    for start in range(0, len(features), 10):
        x = features[start:start + 10].to(device)
        with runtime.autocast(device, precision):
            scores, maps = net.head(x)
        probs.append(scores.float().softmax(dim=1)[:, 1].cpu())
        cams.append(model_lib.class_activation_map(maps.float(), net.fc.weight[1].float()).cpu())
    return torch.cat(probs).numpy(), torch.cat(cams).numpy()


def collect(args, cache: Path) -> dict[str, np.ndarray]:
    """Out-of-fold and calibration maps at feature resolution for all folds (see the module doc)."""
    device = runtime.resolve_device("auto")
    precision = runtime.resolve_precision("auto", device)
    samples = dataloader.index_subset(args.data_dir, args.subset)
    images = dataloader.load_images(args.data_dir, samples, args.image_size)
    labels = torch.tensor([s.label for s in samples])
    if args.backbone_weights:
        weights = model_lib.load_backbone_weights(args.backbone_weights, args.backbone)
        net = model_lib.CAMClassifier(args.backbone, pretrained=True, weights=weights)
        mean, std = weights.mean, weights.std
    else:
        net = model_lib.CAMClassifier(args.backbone, pretrained=True)
        mean, std = model_lib.normalisation(args.backbone, True)
    net = runtime.prepare_model(net, device, precision)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    start = time.perf_counter()
    features, patches = helper.frozen_pass(net, images, mean, std, batch_size=10, device=device,
                                           precision=precision, patch_images=torch.ones(len(images), dtype=torch.bool))
    side = args.image_size // 8
    patches = patches.view(len(images), side * side, -1)  # image-major, as flatten_patches gives them
    print(f"frozen pass {time.perf_counter() - start:.0f} s", flush=True)
    out: dict[str, list] = {k: [] for k in ("test_idx", "test_fold", "p", "cam", "patch", "patch_score",
                                            "cal_idx", "cal_fold", "cal_p", "cal_cam", "cal_patch")}
    for fold, (train, test) in enumerate(dataloader.kfold_splits(samples, args.folds, args.seed)):
        t0 = time.perf_counter()
        runtime.set_seed(args.seed + fold)
        net.load_state_dict(init)
        train_pos = dataloader.positions(samples, train)
        test_pos = dataloader.positions(samples, test)
        helper.train_model(net, images[train_pos], labels[train_pos], mean=mean, std=std, epochs=args.epochs,
                           lr=1e-4, class_weight=[1, 3], batch_size=10, target_train_accuracy=0.98,
                           seed=args.seed + fold, device=device, precision=precision,
                           features=features[train_pos], progress=False)
        good_pos = train_pos[labels[train_pos] == 0]
        good_patches = patches[good_pos].reshape(-1, patches.shape[-1])
        memory, info = helper.build_patch_memory(good_patches, size=args.memory_size,
                                                 method=args.memory_method, seed=args.seed)
        t1 = time.perf_counter()
        p, cam = head_outputs(net, features[test_pos], device, precision)
        test_patch = patchknn.nearest_distances(patches[test_pos].reshape(-1, patches.shape[-1]), memory)
        test_patch = test_patch.view(len(test_pos), side, side).numpy()
        cal_p, cal_cam = head_outputs(net, features[good_pos], device, precision)
        cal_patch = patchknn.leave_one_image_out_maps(good_patches, memory, (side, side)).numpy()
        for key, value in (("test_idx", test_pos.numpy()), ("test_fold", np.full(len(test_pos), fold)),
                           ("p", p), ("cam", cam), ("patch", test_patch),
                           ("patch_score", test_patch.reshape(len(test_pos), -1).max(1)),
                           ("cal_idx", good_pos.numpy()), ("cal_fold", np.full(len(good_pos), fold)),
                           ("cal_p", cal_p), ("cal_cam", cal_cam), ("cal_patch", cal_patch)):
            out[key].append(value)
        print(f"fold {fold + 1}/{args.folds}: memory {info['size']} of {info['n_patches']} patches "
              f"({info['seconds']:.0f} s), train {t1 - t0 - info['seconds']:.0f} s, scoring {time.perf_counter() - t1:.0f} s",
              flush=True)
    result = {k: np.concatenate(v) for k, v in out.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **result)
    return result


QUANTILES = (1.0, 0.95, 0.9)  # of the good calibration images' map maxima
MIN_AREAS = (1, 64, 256)  # pixels at 224 px: a point, one 8x8 cell of the stride-8 patch grid, 16x16
EXTENT_QUANTILES = (0.999,)  # of all good calibration pixels: where a flagged region ends


def full_maps(cam, p, patch, size: int) -> dict[str, np.ndarray]:
    """`localizer_maps` at image size from feature-resolution CAMs (N, h, w) and patch maps (N, h8, w8)."""
    up = lambda m: postprocess.upsample_maps(torch.from_numpy(m), (size, size)).numpy()  # noqa: E731
    return postprocess.localizer_maps(up(cam), p, up(patch))


def box_row(boxes, masks, labels) -> dict:
    """Box IoU, recall, precision and good images with boxes of per-image boxes."""
    return {"box_iou": metrics.box_iou_score(boxes, masks), **metrics.box_detection(boxes, masks, labels)}


def region_diagnostics(maps: dict[str, np.ndarray], masks: np.ndarray, labels: np.ndarray) -> None:
    """What limits box IoU: ground-truth regions per image and their size, and the box IoU of an
    oracle that picks, per defective image, the best of nine thresholds (quantiles of its own map)."""
    counts, sizes = [], []
    for mask in masks[labels == 1]:
        regions = postprocess.mask_regions(mask)
        counts.append(int(regions.max()))
        sizes += np.bincount(regions.ravel())[1:].tolist()
    print(f"regions per defective image (count of images with 0, 1, 2, ... regions): {np.bincount(counts).tolist()}; "
          f"region size median {np.median(sizes):.0f} px, 10-90 % {np.quantile(sizes, 0.1):.0f}-{np.quantile(sizes, 0.9):.0f} px")
    for name, stack in maps.items():
        best = []
        for m, mask in zip(stack[labels == 1], masks[labels == 1]):
            ts = np.quantile(m, [0.5, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999])
            best.append(max(metrics.box_iou_score([postprocess.calibrated_boxes(m, t, 1)[0]], mask[None]) for t in ts))
        print(f"{name}: oracle per-image threshold, mean region box IoU {np.mean(best):.3f}")


def analyse(args, c: dict[str, np.ndarray], weights: str) -> None:
    """Measure the published and the calibrated boxes on the pooled out-of-fold maps."""
    samples = dataloader.index_subset(args.data_dir, args.subset)
    masks = dataloader.load_masks(args.data_dir, samples, args.image_size).numpy()[c["test_idx"]]
    labels = np.array([samples[i].label for i in c["test_idx"]])
    maps = full_maps(c["cam"], c["p"], c["patch"], args.image_size)
    folds = range(args.folds)
    # per fold, the calibration maps' maxima: all a quantile threshold needs
    peaks = {name: {} for name in maps}
    pixel_q = {(name, q): {} for name in maps for q in EXTENT_QUANTILES}
    for fold in folds:
        sel = c["cal_fold"] == fold
        cal = full_maps(c["cal_cam"][sel], c["cal_p"][sel], c["cal_patch"][sel], args.image_size)
        for name, m in cal.items():
            peaks[name][fold] = m.reshape(len(m), -1).max(axis=1)
            for q in EXTENT_QUANTILES:  # of all good calibration pixels
                pixel_q[(name, q)][fold] = float(np.quantile(m, q))
    rows = {}
    gated = labels * 0 + (c["p"] >= 0.5)  # the classifier's decision, for the gated published rule
    for name, m in maps.items():
        minmax = postprocess.boxes_for_maps(m, 0.7, "components")
        rows[(name, "minmax 0.7")] = box_row(minmax, masks, labels)
        rows[(name, "minmax 0.7, Anomaly only")] = box_row(
            [b if g else b[:0] for b, g in zip(minmax, gated)], masks, labels)
        for q, area in itertools.product(QUANTILES, MIN_AREAS):
            thresholds = {f: float(np.quantile(peaks[name][f], q)) for f in folds}
            boxes = [postprocess.calibrated_boxes(m[i], thresholds[c["test_fold"][i]], area)[0]
                     for i in range(len(m))]
            rows[(name, f"calibrated q={q:g}, min_area={area}")] = box_row(boxes, masks, labels)
        for eq, area in itertools.product(EXTENT_QUANTILES, (64,)):
            high = {f: float(np.max(peaks[name][f])) for f in folds}
            boxes = [postprocess.calibrated_boxes(m[i], high[c["test_fold"][i]], area,
                                                  extent_threshold=min(pixel_q[(name, eq)][c["test_fold"][i]],
                                                                       high[c["test_fold"][i]]))[0]
                     for i in range(len(m))]
            rows[(name, f"calibrated q=1, extent pixel q={eq:g}, min_area={area}")] = box_row(boxes, masks, labels)
    n_good = int((labels == 0).sum())
    print(f"\n{args.subset}, {args.backbone} ({weights} weights), {len(labels)} images ({n_good} good), "
          f"{args.folds}-fold CV (seed {args.seed}), out-of-fold boxes pooled; thresholds per fold "
          f"from that fold's good training images")
    fmt = lambda v: "   -  " if v is None else f"{v:6.3f}"  # noqa: E731
    print(f"{'map':<10}{'rule':<40}{'box IoU':>8}{'recall':>8}{'precis.':>8}{'good w/ box':>12}")
    for (name, rule), r in rows.items():
        print(f"{name:<10}{rule:<40}{fmt(r['box_iou']):>8}{fmt(r['box_recall']):>8}"
              f"{fmt(r['box_precision']):>8}{fmt(r['good_images_with_boxes']):>12}")
    if args.diagnose:
        region_diagnostics(maps, masks, labels)
    if args.out:
        save_json(args.out, {"args": vars(args), "weights": weights,
                                    "rows": [{"map": n, "rule": r, **v} for (n, r), v in rows.items()]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/mvtec_anomaly_detection", help="folder of subset folders")
    parser.add_argument("--subset", default="toothbrush", help="subset to measure")
    parser.add_argument("--backbone", default="mobilenet_v2", help="vgg16 or mobilenet_v2 (pretrained)")
    parser.add_argument("--backbone-weights", default=None, help="backbone weights file (default: torchvision's)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    parser.add_argument("--epochs", type=int, default=10, help="at most this many epochs per fold")
    parser.add_argument("--image-size", type=int, default=224, help="input size")
    parser.add_argument("--memory-size", type=int, default=10000, help="patch memory size")
    parser.add_argument("--memory-method", default="coreset", help="patch memory subsampling: coreset or random")
    parser.add_argument("--seed", type=int, default=42, help="seed of folds, init and shuffling")
    parser.add_argument("--cache", default="/tmp/i11", help="folder of the cached maps")
    parser.add_argument("--collect-only", action="store_true", help="compute and cache the maps, then stop")
    parser.add_argument("--diagnose", action="store_true", help="also print region counts/sizes and an oracle box IoU")
    parser.add_argument("--out", default=None, help="optional JSON file for the numbers")
    args = parser.parse_args()

    weights = Path(args.backbone_weights).stem if args.backbone_weights else "torchvision"
    cache = Path(args.cache) / f"{args.subset}_{args.backbone}_{weights}_{args.folds}fold_{args.memory_method}.npz"
    if cache.is_file():
        cached = dict(np.load(cache))
        print(f"maps from {cache}")
    else:
        cached = collect(args, cache)
        print(f"cached {cache}")
    if args.collect_only:
        return
    analyse(args, cached, weights)


if __name__ == "__main__":
    main()
