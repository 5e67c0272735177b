"""Maps that join the published head's CAM and the patch map, measured on held-out images.

The published head's CAM (a 7x7 grid upsampled) knows from the labels roughly where a defect is;
the patch map (distance to the nearest good patch) is sharp and on one scale for every image but
cannot tell an unusual texture from a defect. For each category: the study's five folds
(`study.py`, variant "published_both_layers": the published head beside the patch map of both
layers), and on each fold's held-out images the pixel AUROC and AUPRO of the CAM, the patch map
(blurred half a cell, as `head="auto"` shows it by default) and the ways of joining them listed
in FORMS; fold means.

    python benchmarks/map_fusion.py --data-dir ../shared/data/surface_defects --subsets magnetic_tile \\
        --out results/reference/map_fusion.json
    python benchmarks/map_fusion.py --subsets pill toothbrush --out results/reference/map_fusion.json
    python benchmarks/map_fusion.py --table --out results/reference/map_fusion.json

The scaled forms divide each map by the 99th percentile of its pixels on the fold's held-out good
images: a scale no deployed model could take from its test images, kept because it is what was
tried. Which of these forms became a candidate of head="auto" (`localizers.patch_cam`), and on
which data, is said in docs/method.md.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import study  # noqa: E402  (the frozen-pass cache, configurations and folds of the pooled study)
from utils import dataloader, localizers, metrics, runtime  # noqa: E402
from utils.checkpoint import save_json  # noqa: E402
from utils.constants import GOOD  # noqa: E402
from utils.patchknn import PatchRule  # noqa: E402
from utils.postprocess import minmax_normalise  # noqa: E402

VARIANT = "published_both_layers"  # the published head, and the patch map of both layers unblurred
QUANTILE = 0.99


def _scaled(m: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Maps (N, H, W) divided by the QUANTILE of their pixels on the good images (N,) bool."""
    return m / np.quantile(m[good], QUANTILE)


def forms(cam_raw: np.ndarray, p: np.ndarray, patch: np.ndarray, good: np.ndarray) -> dict[str, np.ndarray]:
    """Every map compared (N, H, W), from the raw CAM (N, H, W), the Anomaly probability (N,), the
    blurred patch map (N, H, W) and which images are good (N,) bool (for the scaled forms only)."""
    cam = localizers.localizer_maps(cam_raw, p)["cam"]
    out = {"cam": cam, "patch_knn": patch, "cam_knn": patch * minmax_normalise(cam_raw),
           "patch_cam": localizers.patch_cam(patch, cam),
           "patch x (0.1 + min-max CAM)": patch * (0.1 + minmax_normalise(cam_raw))}
    scaled_patch, scaled_cam = _scaled(patch, good), _scaled(cam, good)
    for w in (0.5, 1.0, 2.0):
        out[f"scaled patch + {w:g} x scaled cam"] = scaled_patch + w * scaled_cam
    out["max(scaled patch, scaled cam)"] = np.maximum(scaled_patch, scaled_cam)
    return out


def measure(oof: dict, labels: np.ndarray, masks: np.ndarray) -> dict:
    """Per-fold pixel AUROC and AUPRO of every form on the held-out images, and their fold means."""
    patch = PatchRule("both", 0.5).smooth(torch.from_numpy(oof["patch_map"])).numpy()
    per_fold: dict[str, list] = {}
    for k in np.unique(oof["fold"]):
        sel = oof["fold"] == k
        y, m = labels[sel], masks[sel]
        for name, fused in forms(oof["cam"][sel], oof["p_anomaly"][sel], patch[sel], y == GOOD).items():
            per_fold.setdefault(name, []).append({"pixel_auroc": metrics.pixel_auroc(fused, m),
                                                  "aupro": metrics.aupro(fused, m)})
    return {name: {"pixel_auroc": float(np.mean([f["pixel_auroc"] for f in folds])),
                   "aupro": float(np.mean([f["aupro"] for f in folds])), "folds": folds}
            for name, folds in per_fold.items()}


def table(report: dict) -> str:
    """A markdown table: one row per category and form, fold-mean pixel AUROC and AUPRO."""
    lines = ["| data | map | pixel AUROC | AUPRO |", "|---|---|---|---|"]
    for key, entry in report.items():
        lines += [f"| {key} | {name} | {row['pixel_auroc']:.3f} | {row['aupro']:.3f} |"
                  for name, row in entry["maps"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(study.DEFAULT_DATA))
    parser.add_argument("--subsets", nargs="+", default=["pill", "toothbrush"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--cache", default="/tmp/study_cache", help="folder for the frozen passes")
    parser.add_argument("--scratch", default="/tmp/study_scratch", help="weights_dir/results_dir of the configs")
    parser.add_argument("--out", default="results/map_fusion.json")
    parser.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    # what study.run_variant reads: MobileNetV2 with torchvision's weights at 224 px, stretched
    args.image_size, args.resize = None, "stretch"
    device = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision(args.precision, device)
    out_path = Path(args.out)
    report = json.loads(out_path.read_text()) if out_path.exists() else {}
    for subset in args.subsets:
        start = time.perf_counter()
        samples = dataloader.index_subset(args.data_dir, subset)
        masks = dataloader.load_masks(args.data_dir, samples, 224, "stretch")
        result = study.run_variant(args, subset, "mobilenet_v2", VARIANT, None, samples, masks, device, precision)
        oof = result["oof"]
        labels = np.array([s.label for s in samples])[oof["index"]]
        report[f"{subset}/mobilenet_v2/224"] = {
            "maps": measure(oof, labels, masks[oof["index"]].numpy()), "variant": VARIANT, "folds": args.folds,
            "seed": args.seed, "precision": precision, "weights": "torchvision ImageNet",
            "epochs_run": [f["epochs_run"] for f in result["folds"]], "seconds": time.perf_counter() - start}
        save_json(out_path, report)
        print(table({subset: report[f"{subset}/mobilenet_v2/224"]}), flush=True)


if __name__ == "__main__":
    main()
