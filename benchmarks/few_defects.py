"""Few defect images: the general setting of DRA and AHL on the official split.

For each N in --n-defects, N defect images are drawn at random from the category's `test/` (seeded
by the draw), moved into training beside `train/good` and removed from the test set; each variant
(a Training head) is then run by `helper.run_fold` (the pipeline Training.ipynb runs: calibration
images held back, patch memory, head, calibration) on one cached frozen pass, and scored on the
rest of `test/`. Measured on the test images: the image AUROC of the decision score and of the
patch map's score on the same images (its memory is `train/good` whatever N, its layers and blur
the run's), and for every map (the one each run shows first, "shown") pixel AUROC, AUPRO and the
pointing game.
N = 0 is the good-only run: no head can train, the patch map decides.

    python benchmarks/few_defects.py --subset pill --out results/reference/few_defects.json
    python benchmarks/few_defects.py --data-dir ../shared/data/surface_defects --subset magnetic_tile \\
        --out results/reference/few_defects.json
    python benchmarks/few_defects.py --table --out results/reference/few_defects.json

`--image-size 448` runs the curve at another input side (rows keyed `.../draw0/448px`).
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

import study  # noqa: E402  (the frozen-pass cache and configurations of the pooled study)
from utils import dataloader, helper, localizers, metrics, runtime  # noqa: E402
from utils import model as model_lib  # noqa: E402
from utils.checkpoint import save_json  # noqa: E402
from utils.constants import ANOMALY, GOOD  # noqa: E402

PUBLISHED = {"DRA": 0.904, "AHL": 0.918, "PRN": 0.993}  # pill, image AUROC at N = 10 (their papers)
SIZE = 224  # the default input side; rows at another (--image-size) carry it in their keys and table rows


def draw_defects(test: list, n: int, seed: int) -> list:
    """N defect samples of `test` drawn at random with `seed` (every defect type equally likely per image)."""
    defects = [s for s in test if s.label == ANOMALY]
    order = torch.randperm(len(defects), generator=torch.Generator().manual_seed(seed)).tolist()
    return [defects[i] for i in order[:n]]


def measure_run(out: helper.Fold, y: np.ndarray, masks: np.ndarray | None) -> dict:
    """Image AUROC of the decision and of the patch map alone, and every map's localisation, on the test images."""
    shown = study.shown_map(out)
    maps = localizers.maps_of(out.test)
    selection = out.selection or {}
    row = {"head": out.head, "shown": shown, "selection_decision": selection.get("decision"),
           # the out-of-fold evidence the decision was taken on (None where no choice could be made)
           "selection_image_auroc": selection.get("image_auroc"),
           "selection_image_auroc_se": selection.get("image_auroc_se"),
           "selection_maps": selection.get("maps"),  # the candidate maps' out-of-fold figures, the map's evidence
           "patch_layers": out.fitted.patch_rule.layers, "patch_map_sigma": out.fitted.patch_rule.sigma,
           "image_auroc": metrics.ranking_metrics(y, localizers.image_score_of(out.test))["image_auroc"],
           "patch_image_auroc": metrics.ranking_metrics(y, out.test["patch_score"])["image_auroc"],
           "seconds": out.seconds, "maps": {}}
    if masks is not None:
        for name, m in {**maps, "shown": maps[shown]}.items():
            row["maps"][name] = {"pixel_auroc": metrics.pixel_auroc(m, masks), "aupro": metrics.aupro(m, masks),
                                 "pointing_game": metrics.pointing_game(m[y == ANOMALY], masks[y == ANOMALY])}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(study.DEFAULT_DATA))
    parser.add_argument("--subset", default="pill")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--vgg16-weights", default=None, help="backbone weights file for VGG16 (the Oxford file)")
    parser.add_argument("--variants", nargs="+", default=["auto", "evidence"], choices=sorted(study.VARIANTS))
    parser.add_argument("--n-defects", nargs="+", type=int, default=[0, 1, 5, 10, 20])
    parser.add_argument("--image-size", type=int, default=SIZE,
                        help="the input side in pixels (448: four times the patches; the rows are keyed apart)")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--draw-index", nargs="+", type=int, default=None,
                        help="run only these draws (0-based, each seeded as in a full run): to rerun a few rows")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--cache", default="/tmp/study_cache", help="folder for the frozen passes")
    parser.add_argument("--scratch", default="/tmp/study_scratch", help="weights_dir/results_dir of the configs")
    parser.add_argument("--out", default="results/few_defects.json")
    parser.add_argument("--table", action="store_true", help="print the table of --out and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    args.folds = 5  # study_config's n_cv_folds (unused by run_fold)
    device = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision(args.precision, device)
    out_path = Path(args.out)
    report = json.loads(out_path.read_text()) if out_path.exists() else {}
    samples = dataloader.index_subset(args.data_dir, args.subset)
    weights = (model_lib.load_backbone_weights(args.vgg16_weights, args.backbone)
               if args.backbone == "vgg16" and args.vgg16_weights else None)
    size = args.image_size
    frozen, _ = study.frozen_cache(args, args.subset, args.backbone, size, weights, samples, device, precision)
    all_masks = dataloader.load_masks(args.data_dir, samples, size)
    labels = torch.tensor([s.label for s in samples])
    types = [s.defect_type for s in samples]
    train0, test0 = dataloader.split_subset(samples, "official", test_size=0.2, seed=args.seed)
    for n in args.n_defects:
        for draw in (args.draw_index or range(args.draws)) if n else [0]:
            moved = draw_defects(test0, n, args.seed + draw)
            test = [s for s in test0 if s not in moved]
            train_idx, test_idx = dataloader.positions(samples, train0 + moved), dataloader.positions(samples, test)
            y = labels[test_idx].numpy()
            masks = None if all_masks is None else all_masks[test_idx].numpy()
            for variant in args.variants if n else ["auto"]:
                config = study.study_config(args, args.subset, args.backbone, size, weights, study.VARIANTS[variant][0])
                template = helper.new_model(config, weights, device, precision)
                start = time.perf_counter()
                out = helper.run_fold({**config, "seed": args.seed + draw}, template, frozen, labels, train_idx,
                                      test_idx, types=types, masks=all_masks, device=device, precision=precision,
                                      test_maps=True, progress=False)
                row = measure_run(out, y, masks)
                row.update(subset=args.subset, backbone=args.backbone, variant=variant, n_defects=n, draw=draw,
                           image_size=size, n_train_good=int((labels[train_idx] == GOOD).sum()), n_test=len(test_idx),
                           n_test_defective=int(y.sum()), precision=precision, cpu=study.cpu_name(),
                           moved=[s.path for s in moved], wall_seconds=time.perf_counter() - start)
                suffix = "" if size == SIZE else f"/{size}px"
                report[f"{args.subset}/{args.backbone}/{variant}/N{n}/draw{draw}{suffix}"] = row
                save_json(out_path, report)
                print(f"{args.subset} N={n} draw {draw} {variant}: image AUROC {_spread([row['image_auroc']])} "
                      f"(patch map alone {_spread([row['patch_image_auroc']])}), decided by "
                      f"{row['head'] or 'patch map'}, shows {row['shown']}"
                      + (f" AUPRO {_spread([row['maps']['shown']['aupro']])}" if row["maps"] else ""), flush=True)


def _spread(values: list) -> str:
    """Mean over draws, and min-max when there are several."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = f"{np.mean(values):.3f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.3f}-{max(values):.3f})"


def table(report: dict) -> str:
    """Per category and variant, per N: image AUROC of the decision and of the patch map alone, the
    shown map's AUPRO and pointing game and the patch map's AUPRO; mean over draws (min-max). The
    good-only rule's figures are the N = 0 row's."""
    # the patch map's memory is train/good's whatever N; its layers and blur are the run's own
    rows = ["| data | variant | N | image AUROC | patch map alone (good-only memory), image AUROC | map shown: AUPRO | "
            "pointing game | patch map alone: AUPRO | decided by (draws) |", "|" + "---|" * 9]
    def key(r: dict) -> tuple:  # rows before --image-size hold no size: they were all SIZE
        return r["subset"], r["backbone"], r.get("image_size", SIZE), r["variant"], r["n_defects"]

    keys = sorted({key(r) for r in report.values()}, key=lambda k: (k[0], k[1], k[2], k[3] != "auto", k[3], k[4]))
    for subset, backbone, size, variant, n in keys:
        runs = [r for r in report.values() if key(r) == (subset, backbone, size, variant, n)]
        shown = [r["maps"].get("shown", {}) for r in runs]
        patch = [r["maps"].get("patch_knn", {}) for r in runs]
        decided = ", ".join(sorted(r["head"] or "patch map" for r in runs))
        data = f"{subset} ({backbone}" + ("" if size == SIZE else f", {size} px") + ")"
        rows.append(f"| {data} | {variant} | {n} | {_spread([r['image_auroc'] for r in runs])} | "
                    f"{_spread([r['patch_image_auroc'] for r in runs])} | {_spread([m.get('aupro') for m in shown])} | "
                    f"{_spread([m.get('pointing_game') for m in shown])} | "
                    f"{_spread([m.get('aupro') for m in patch])} | {decided} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
