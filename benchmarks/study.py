"""The cross-validated study: every head, decision and map measured out of fold on real categories.

For each category, backbone and variant: stratified k-fold cross-validation (seed 42), each fold
run by `helper.run_fold` (the pipeline Training.ipynb runs) on one frozen pass over all images
(cached on disk per category, backbone, weights and input size), its held-out predictions pooled.
Measured on the pooled out-of-fold predictions:

- classification: accuracy at the published argmax, image AUROC and AP;
- the calibrated decision: the stated false-alarm rate against the measured share of held-out good
  images labelled Anomaly, recall and accuracy at it;
- every map: pixel AUROC, AUPRO, the pointing game (all defective images, and those the decision
  flags), box IoU, box recall and precision and the good images with a box, boxes drawn on the
  images labelled Anomaly only, as Evaluation.ipynb draws them;
- seconds per stage (fit, calibration, test) and the frozen pass.

    python benchmarks/study.py --subsets pill toothbrush --backbones vgg16 mobilenet_v2 \\
        --variants published evidence --vgg16-weights /tmp/vgg16_oxford.pth --out results/reference/study.json
    python benchmarks/study.py --table --out results/reference/study.json   # the tables of docs/results.md
    python benchmarks/study.py --data-dir ../shared/data/surface_defects --subsets magnetic_tile \
        --backbones mobilenet_v2 --image-size 224 224 --resize pad --out results/shape.json   # another canvas

Variants are named in VARIANTS below: the Training parameters they change, and for the mask
study how many masks per defect type each fold's training split keeps. `--image-size` (a side, or
height and width) and `--resize` set the canvas of every variant; with resize "pad" the metrics
count each image's part only and its boxes are cut to it, as Evaluation.ipynb does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import calibration, dataloader, geometry, helper, localizers, metrics, parameters, postprocess, runtime  # noqa: E402
from utils import model as model_lib  # noqa: E402
from utils import selection  # noqa: E402
from utils.checkpoint import atomic_write_bytes, save_json  # noqa: E402
from utils.constants import ANOMALY, GOOD, MVTEC_DIR_ENV  # noqa: E402

DEFAULT_DATA = Path(os.environ.get(MVTEC_DIR_ENV, Path(__file__).resolve().parents[2] / "shared" / "data"
                                   / "mvtec_anomaly_detection"))
# name -> (Training parameters it sets, masks kept per defect type in a fold's training split: None = all)
VARIANTS: dict[str, tuple[dict, int | None]] = {
    "auto": ({"head": "auto"}, None),  # the default: chooses from out-of-fold scores of each fold's training split
    "published": ({"head": "published"}, None),  # calibration "holdout", the default
    "published_cross_fit": ({"head": "published", "calibration": "cross_fit"}, None),
    "evidence": ({"head": "evidence"}, None),
    "fused": ({"head": "fused"}, None),  # both heads, the decision on their standardised logits summed
    "evidence_cross_fit": ({"head": "evidence", "calibration": "cross_fit"}, None),
    # the evidence head with its defective training images grouped as its good ones (helper.GROUP_DEFECTS)
    "evidence_grouped_defects": ({"head": "evidence"}, None),
    "evidence_masks": ({"head": "evidence", "mask_supervision": True}, None),
    "evidence_masks1": ({"head": "evidence", "mask_supervision": True}, 1),
    "evidence_masks5": ({"head": "evidence", "mask_supervision": True}, 5),
    "evidence_448": ({"head": "evidence", "image_size": 448}, None),
    "evidence_random_memory": ({"head": "evidence", "patch_memory_method": "random"}, None),
    # the patch rule before the official-split study (both layers, no blur): what the new default changed
    "evidence_both_layers": ({"head": "evidence", "patch_layers": "both", "patch_map_sigma": 0.0}, None),
    "evidence_fine_layer": ({"head": "evidence", "patch_layers": "fine"}, None),
    "published_both_layers": ({"head": "published", "patch_layers": "both", "patch_map_sigma": 0.0}, None),
}
RATES = (0.01, 0.05, 0.1, 0.2)  # false-alarm rates the decision is also measured at (from the same folds)


def canvas_key(size: int | list[int], resize: str) -> str:
    """The canvas's part of a cache file's name: "224" for the published square stretch (the name
    caches had before other canvases), else "{H}x{W}_{resize}", e.g. "224x576_pad"."""
    if isinstance(size, int) and resize == "stretch":
        return str(size)
    h, w = geometry.canvas(size)
    return f"{h}x{w}_{resize}"


def frozen_cache(args, subset: str, backbone: str, size: int | list[int], weights, samples, device, precision,
                 resize: str = "stretch"):
    """The frozen pass over every image of `subset`, from --cache or computed and saved there."""
    tag = Path(args.vgg16_weights).stem if backbone == "vgg16" and args.vgg16_weights else "torchvision"
    path = Path(args.cache) / f"{subset}_{backbone}_{tag}_{canvas_key(size, resize)}_{precision}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved["paths"] == [s.path for s in samples]:
            return helper.Frozen(saved["features"], saved["tap"], saved["has_tap"], saved.get("parts"),
                                 geometry.canvas(size)), saved["seconds"]
    config = study_config(args, subset, backbone, size, weights, {"resize": resize})
    template = helper.new_model(config, weights, device, precision)
    images = dataloader.load_images(args.data_dir, samples, size, resize=resize)
    parts = dataloader.load_parts(args.data_dir, samples, size, resize)
    start = time.perf_counter()
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=10, device=device,
                                precision=precision, parts=parts, progress=False)
    seconds = time.perf_counter() - start
    content = {"features": frozen.features, "tap": frozen.tap, "has_tap": frozen.has_tap, "seconds": seconds,
               "paths": [s.path for s in samples], "parts": parts}
    atomic_write_bytes(path, lambda f: torch.save(content, f))
    return frozen, seconds


def study_config(args, subset: str, backbone: str, size: int | list[int], weights, overrides: dict) -> dict:
    """Training's configuration of a variant: the published recipe, the repository's defaults."""
    return parameters.training_config(
        data_dir=args.data_dir, subset_name=subset, download=False, backbone=backbone, pretrained=True,
        backbone_weights=weights.path if weights is not None else None, image_size=size, batch_size=10, epochs=10,
        lr=1e-4, class_weight=[1, 3], target_train_accuracy=0.98, test_size=0.2, seed=args.seed, heatmap_thres=0.7,
        n_cv_folds=args.folds, weights_dir=args.scratch, results_dir=args.scratch, device=args.device,
        precision=args.precision, **{k: v for k, v in overrides.items() if k != "image_size"})


def keep_masks(masks: torch.Tensor, samples, train: torch.Tensor, per_type: int | None, seed: int) -> torch.Tensor:
    """Masks (N, H, W) with only `per_type` masks per defect type among the training images `train` (seeded)."""
    if per_type is None:
        return masks
    kept = torch.zeros_like(masks)
    generator = torch.Generator().manual_seed(seed)
    for kind in sorted({samples[i].defect_type for i in train.tolist() if samples[i].label == ANOMALY}):
        members = torch.tensor([i for i in train.tolist() if samples[i].defect_type == kind])
        chosen = members[torch.randperm(len(members), generator=generator)[:per_type]]
        kept[chosen] = masks[chosen]
    return kept


def run_variant(args, subset, backbone, variant, weights, samples, masks, device, precision) -> dict:
    """Out-of-fold predictions of one variant, pooled, with each fold's calibration and seconds."""
    grouped = helper.GROUP_DEFECTS
    helper.GROUP_DEFECTS = variant == "evidence_grouped_defects" or grouped
    try:
        return _run_variant(args, subset, backbone, variant, weights, samples, masks, device, precision)
    finally:
        helper.GROUP_DEFECTS = grouped


def variant_canvas(args, variant: str) -> tuple[int | list[int], str]:
    """The image_size and resize a variant runs at: --image-size and --resize when given, else the
    variant's own size (224 px by default), stretched."""
    size = VARIANTS[variant][0].get("image_size", 224) if args.image_size is None else (
        args.image_size[0] if len(args.image_size) == 1 else list(args.image_size))
    return size, args.resize


def _run_variant(args, subset, backbone, variant, weights, samples, masks, device, precision) -> dict:
    """`run_variant` under the module settings it runs with."""
    overrides, per_type = VARIANTS[variant]
    size, resize = variant_canvas(args, variant)
    frozen, frozen_seconds = frozen_cache(args, subset, backbone, size, weights, samples, device, precision, resize)
    config = study_config(args, subset, backbone, size, weights, {**overrides, "resize": resize})
    template = helper.new_model(config, weights, device, precision)
    labels = torch.tensor([s.label for s in samples])
    types = [s.defect_type for s in samples]
    pooled: dict[str, list] = {}
    folds = []
    for fold, (train_s, test_s) in enumerate(dataloader.kfold_splits(samples, args.folds, args.seed)):
        train, test = dataloader.positions(samples, train_s), dataloader.positions(samples, test_s)
        fold_masks = keep_masks(masks, samples, train, per_type, args.seed + fold) if masks is not None else None
        out = helper.run_fold({**config, "seed": args.seed + fold}, template, frozen, labels, train, test,
                              types=types, masks=fold_masks, device=device, precision=precision, test_maps=True,
                              progress=False)
        shown = shown_map(out)
        # what the fold decides with and shows: with head="auto" folds may choose differently
        scored = {**out.test, "decision_score": localizers.image_score_of(out.test),
                  "shown_map": localizers.maps_of(out.test)[shown]}
        if "cam" in out.test:  # the probability the CAM is scaled by, in every fold that has one (a fused
            # fold's "p_anomaly" is the fused score, `localizers.maps_of`): pooled maps scale it alike
            scored["p_published"] = out.test.get("p_published", out.test["p_anomaly"])
        for key, value in scored.items():
            pooled.setdefault(key, []).append(value)
        pooled.setdefault("index", []).append(test.numpy())
        pooled.setdefault("fold", []).append(np.full(len(test), fold))
        folds.append({"seconds": out.seconds, "calibration": out.calibration, "epochs_run": out.history["epochs_run"],
                      "n_calibration": len(out.calibration_images),
                      "calibration_scores": out.calibration_scores.tolist(), "head": out.head, "shown": shown,
                      "selection": out.selection})
        print(f"  fold {fold + 1}/{args.folds}: " + ", ".join(f"{k} {v:.1f} s" for k, v in out.seconds.items()),
              flush=True)
    # keys every fold has (head="auto" folds that chose different heads have different maps)
    oof = {k: np.concatenate(v) for k, v in pooled.items() if len(v) == args.folds}
    return {"oof": oof, "folds": folds, "frozen_seconds": frozen_seconds, "config": config}


def shown_map(out: helper.Fold) -> str:
    """The map a fold's checkpoint shows by default (`localizers.default_localizer`)."""
    return localizers.default_localizer({"selection": out.selection, "classifier": out.classifier,
                                         "config": {"head": out.head or "auto"}})


def fold_means(oof: dict, samples, masks_full: torch.Tensor, valid_full: torch.Tensor | None = None,
               maps: dict | None = None) -> dict:
    """Per-fold image AUROC of the decision score and of the patch map's score alone, and per-fold
    pixel AUROC, AUPRO and pointing game of the map shown and the patch map (and of every map of
    `maps`, {name: (N, H, W)} in oof's order), averaged over folds: comparable across variants even
    where folds decide or show on different scales (head="auto").
    valid_full (N, H, W) bool: the parts' pixels with resize="pad" (None: all pixels count)."""
    per_fold: dict[str, list] = {}
    for k in np.unique(oof["fold"]):
        sel = oof["fold"] == k
        y = np.array([samples[i].label for i in oof["index"][sel]])
        masks = masks_full[oof["index"][sel]].numpy()
        valid = None if valid_full is None else valid_full[oof["index"][sel]].numpy()
        per_fold.setdefault("image_auroc", []).append(metrics.ranking_metrics(y, oof["decision_score"][sel])
                                                      ["image_auroc"])
        per_fold.setdefault("patch_image_auroc", []).append(metrics.ranking_metrics(y, oof["patch_score"][sel])
                                                            ["image_auroc"])
        named = {"shown": oof["shown_map"], "patch_knn": oof["patch_map"], **(maps or {})}
        for name, every in named.items():
            m = every[sel]
            on = (lambda keep: None) if valid is None else (lambda keep: valid[keep])  # noqa: E731
            everything = np.ones(len(y), bool)
            for metric, value in (("pixel_auroc", metrics.pixel_auroc(m, masks, on(everything))),
                                  ("aupro", metrics.aupro(m, masks, valid=on(everything))),
                                  ("pointing_game", metrics.pointing_game(m[y == ANOMALY], masks[y == ANOMALY],
                                                                          on(y == ANOMALY)))):
                per_fold.setdefault(f"{name}/{metric}", []).append(value)
    return {k: (None if any(v is None for v in values) else float(np.mean(values)))
            for k, values in per_fold.items()}


def decisions(y: np.ndarray, score: np.ndarray, fold: np.ndarray, folds: list, stated: float | None) -> dict:
    """The decision measured on the held-out images: the run's rule (each fold's own threshold),
    the published argmax, and the calibrated rule at each of RATES (thresholds from each fold's
    calibration scores)."""
    def row(decided):
        return {"false_alarms": float(decided[y == GOOD].mean()), "recall": float(decided[y == ANOMALY].mean()),
                "accuracy": float((decided == y).mean())}
    out = {"run": {"false_alarm_rate": stated, **row(decide_per_fold(score, fold, [f["calibration"]["decision"]
                                                                                    for f in folds]))},
           "argmax": row((score >= 0.5).astype(int))}
    for rate in RATES:
        per_fold = [calibration.decision_threshold(np.array(f["calibration_scores"]), rate) for f in folds]
        out[f"{rate:g}"] = {"false_alarm_rate": rate, **row(decide_per_fold(score, fold, per_fold))}
    return out


def decide_per_fold(score: np.ndarray, fold: np.ndarray, rules: list[dict]) -> np.ndarray:
    """Labels (N,) of pooled scores (N,), each image under its own fold's decision rule."""
    decided = np.zeros(len(score), dtype=np.int64)
    for k, rule in enumerate(rules):
        decided[fold == k] = calibration.decide(score[fold == k], rule)
    return decided


def measure(result: dict, samples, masks_full: torch.Tensor, heatmap_thres: float,
            parts_full: torch.Tensor | None = None) -> dict:
    """Pooled metrics of one variant (see the module docstring). parts_full (N, 2): with resize="pad",
    each image's part (`dataloader.load_parts`): only its pixels count, and boxes are cut to it."""
    oof, folds = result["oof"], result["folds"]
    index, fold = oof["index"], oof["fold"]
    y = np.array([samples[i].label for i in index])
    types = np.array([samples[i].defect_type for i in index])
    masks = masks_full[index].numpy()
    parts = None if parts_full is None else parts_full[index]
    valid_full = None if parts_full is None else geometry.part_pixels(parts_full, tuple(masks_full.shape[-2:]))
    valid = None if valid_full is None else valid_full[index].numpy()
    on = (lambda keep: None) if valid is None else (lambda keep: valid[keep])  # noqa: E731
    score = oof["decision_score"]
    decided = decide_per_fold(score, fold, [f["calibration"]["decision"] for f in folds])
    out = {"n_images": len(y), "n_defective": int(y.sum()),
           "classification": metrics.classification_metrics(y, (score >= 0.5).astype(int), score),
           "decision": decisions(y, score, fold, folds, result["config"]["false_alarm_rate"]), "maps": {}}
    maps = localizers.maps_of(oof)
    image_scores = localizers.localizer_image_scores(maps, oof.get("p_anomaly"), oof.get("patch_score"))
    min_area = folds[0]["calibration"]["min_area"]
    # every map's fold means too: a head="auto" row's shown map is compared with them, not with pooled figures
    out["fold_means"] = fold_means(oof, samples, masks_full, valid_full, maps)
    maps["shown"], image_scores["shown"] = oof["shown_map"], score  # each fold's default map
    for name, m in maps.items():
        thresholds = [f["calibration"]["thresholds"][f["shown"] if name == "shown" else name] for f in folds]
        boxes = [postprocess.label_boxes(m[i], bool(decided[i]), thresholds[fold[i]], min_area, heatmap_thres)[0]
                 for i in range(len(m))]
        if parts is not None:
            boxes = [geometry.clip_boxes(b, part) for b, part in zip(boxes, parts.tolist())]
        row = metrics.localisation_metrics(m, masks, boxes, image_scores[name], y, valid)
        detected = (y == ANOMALY) & (decided == 1)
        row["pointing_game_detected"] = metrics.pointing_game(m[detected], masks[detected], on(detected))
        row["pointing_per_type"] = {t: metrics.pointing_game(m[types == t], masks[types == t], on(types == t))
                                    for t in sorted(set(types[y == ANOMALY].tolist()))}
        out["maps"][name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--subsets", nargs="+", default=["pill", "toothbrush"])
    parser.add_argument("--backbones", nargs="+", default=["vgg16", "mobilenet_v2"])
    parser.add_argument("--variants", nargs="+", default=["published", "evidence"], choices=sorted(VARIANTS))
    parser.add_argument("--vgg16-weights", default=None, help="backbone weights file for VGG16 (the Oxford file)")
    parser.add_argument("--image-size", type=int, nargs="+", default=None, metavar="SIDE",
                        help="the canvas of every variant: a side, or HEIGHT WIDTH (multiples of 32); default: "
                             "each variant's own (224 px)")
    parser.add_argument("--resize", default="stretch", choices=geometry.RESIZES,
                        help="how images meet the canvas (default: %(default)s, the published way)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--cache", default="/tmp/study_cache", help="folder for the frozen passes")
    parser.add_argument("--scratch", default="/tmp/study_scratch", help="weights_dir/results_dir of the configs")
    parser.add_argument("--out", default="results/study.json")
    parser.add_argument("--inner-folds", type=int, default=None,
                        help="the inner groups of head='auto' (selection.INNER_FOLDS, default "
                             f"{selection.INNER_FOLDS}): what choosing on larger inner fits changes and costs")
    parser.add_argument("--table", action="store_true", help="print the tables of --out and stop")
    parser.add_argument("--auto-table", action="store_true",
                        help="print the table of head='auto' against the other variants of --out and stop")
    args = parser.parse_args()
    if args.image_size is not None and len(args.image_size) > 2:
        parser.error(f"--image-size takes a side or HEIGHT WIDTH, got {args.image_size}")
    if args.table or args.auto_table:
        report = json.loads(Path(args.out).read_text())
        print(auto_table(report) if args.auto_table else tables(report))
        return
    if args.inner_folds is not None:
        if args.inner_folds < 2:
            parser.error(f"--inner-folds must be at least 2 (every image scored by a fit without it), got "
                         f"{args.inner_folds}")
        selection.INNER_FOLDS = args.inner_folds
    device = runtime.resolve_device(args.device)
    args.precision = runtime.resolve_precision(args.precision, device)
    out_path = Path(args.out)
    report = json.loads(out_path.read_text()) if out_path.exists() else {}
    for subset in args.subsets:
        samples = dataloader.index_subset(args.data_dir, subset)
        for backbone in args.backbones:
            weights = (model_lib.load_backbone_weights(args.vgg16_weights, backbone)
                       if backbone == "vgg16" and args.vgg16_weights else None)
            for variant in args.variants:
                size, resize = variant_canvas(args, variant)
                masks = dataloader.load_masks(args.data_dir, samples, size, resize)
                print(f"{subset} / {backbone} / {variant} at image_size={size}, resize={resize!r}", flush=True)
                start = time.perf_counter()
                result = run_variant(args, subset, backbone, variant, weights, samples, masks, device,
                                     args.precision)
                measured = measure(result, samples, masks, 0.7, dataloader.load_parts(args.data_dir, samples, size,
                                                                                         resize))
                measured.update(subset=subset, backbone=backbone, variant=variant, folds=args.folds, seed=args.seed,
                                image_size=size, resize=resize, precision=args.precision,
                                seconds=time.perf_counter() - start,
                                frozen_seconds=result["frozen_seconds"], cpu=cpu_name(),
                                weights="Oxford ImageNet (backbone_weights file)" if weights is not None
                                else "torchvision ImageNet", fold_details=result["folds"])
                canvas = "" if (size, resize) == (VARIANTS[variant][0].get("image_size", 224), "stretch") else \
                    f"/{canvas_key(size, resize)}"
                report[f"{subset}/{backbone}/{variant}{canvas}"] = measured
                save_json(out_path, report)
                print(summary_line(measured), flush=True)


def cpu_name() -> str:
    """The CPU model and whether it has native bf16 (the study's timings depend on both)."""
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").is_file() else "unknown"
    return f"{name}, {os.cpu_count()} logical CPUs, native bf16: {runtime.cpu_supports_bf16()}"


def summary_line(r: dict) -> str:
    """One line per variant: accuracy, image AUROC, the decision at the run's rate, each map's localisation."""
    c, d = r["classification"], r["decision"]["run"]
    maps = "  ".join(f"{k} {v['pointing_game']:.2f}/{v['pixel_auroc']:.3f}/{v['aupro']:.3f}"
                     for k, v in r["maps"].items() if v["pointing_game"] is not None)
    fm = r["fold_means"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    chosen = ", ".join(f"{f['head'] or 'patch map'}/{f['shown']}" for f in r["fold_details"])
    return (f"  acc {c['accuracy']:.3f} AUROC {c['image_auroc']:.3f} | rate {d['false_alarm_rate']}: false alarms "
            f"{d['false_alarms']:.3f} recall {d['recall']:.3f} | point/pixAUROC/AUPRO: {maps}\n"
            f"  fold means: image AUROC {fmt(fm['image_auroc'])} (patch map alone {fmt(fm['patch_image_auroc'])}), "
            f"shown map pixel AUROC {fmt(fm['shown/pixel_auroc'])} AUPRO {fmt(fm['shown/aupro'])}; folds: {chosen}")


OWN_MAP = {"published": ("cam", "explain"), "evidence": ("evidence",)}  # the maps a head's table shows


def tables(report: dict) -> str:
    """The tables of docs/results.md: each variant's decision and its head's maps beside the patch
    map, then the stated false-alarm rate against the measured one."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = ["| data | backbone | variant | calibration | image AUROC | argmax accuracy | false alarms (5 %) | "
            "recall (5 %) | map | pixel AUROC | AUPRO | pointing game |", "|" + "---|" * 12]
    rates = ["| data | backbone | variant | " + " | ".join(f"{r:.0%}: promised / measured / recall" for r in RATES)
             + " |",
             "|" + "---|" * (3 + len(RATES))]
    for key, r in report.items():
        head = "evidence" if r["variant"].startswith("evidence") else "published"
        methods = sorted({f["calibration"]["method"] for f in r["fold_details"]})
        d, c = r["decision"]["0.05"], r["classification"]
        data = f"{r['subset']} ({canvas_label(r)})"
        for k, name in enumerate((*OWN_MAP[head], "patch_knn")):
            m = r["maps"][name]
            lead = (f"| {data} | {r['backbone']} | {r['variant']} | {'/'.join(methods)} | {fmt(c['image_auroc'])} | "
                    f"{fmt(c['accuracy'])} | {fmt(d['false_alarms'])} | {fmt(d['recall'])} |") if k == 0 else (
                    "| | | | | | | | |")
            rows.append(f"{lead} {name} | {fmt(m['pixel_auroc'])} | {fmt(m['aupro'])} | {fmt(m['pointing_game'])} |")
        rates.append(f"| {data} | {r['backbone']} | {r['variant']} | " + " | ".join(
            f"{fmt(promised(r, rate))} / {fmt(r['decision'][f'{rate:g}']['false_alarms'])} / "
            f"{fmt(r['decision'][f'{rate:g}']['recall'])}" for rate in RATES) + " |")
    return "\n".join(rows + ["", *rates])


def auto_table(report: dict) -> str:
    """docs/results.md's table of the default head: per category and backbone, each variant's
    per-fold mean image AUROC (and the patch map alone's), the map it shows and that map's per-fold
    mean pixel AUROC, AUPRO and pointing game, what each fold decided with and showed."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = ["| data | backbone | variant | image AUROC | patch map alone | map shown | pixel AUROC | AUPRO | "
            "pointing game | folds: decision / map |", "|" + "---|" * 10]
    order = {"auto": 0, "published": 1, "evidence": 2}
    for key in sorted(report, key=lambda k: (report[k]["subset"], report[k]["backbone"],
                                             order.get(report[k]["variant"], 9))):
        r, fm = report[key], report[key]["fold_means"]
        shown = sorted({f["shown"] for f in r["fold_details"]})
        counts: dict[str, int] = {}
        for f in r["fold_details"]:
            name = f"{f['head'] or 'patch map'} / {f['shown']}"
            counts[name] = counts.get(name, 0) + 1
        rows.append(f"| {r['subset']} ({canvas_label(r)}) | {r['backbone']} | {r['variant']} | "
                    f"{fmt(fm['image_auroc'])} | {fmt(fm['patch_image_auroc'])} | {', '.join(shown)} | "
                    f"{fmt(fm['shown/pixel_auroc'])} | {fmt(fm['shown/aupro'])} | {fmt(fm['shown/pointing_game'])} | "
                    + ", ".join(f"{n} x{c}" for n, c in counts.items()) + " |")
    return "\n".join(rows)


def canvas_label(entry: dict) -> str:
    """How a report entry met its canvas: "224 px", or e.g. "224x576 px, pad"."""
    h, w = geometry.canvas(entry["image_size"])
    resize = entry.get("resize", "stretch")
    return f"{h} px" if h == w and resize == "stretch" else f"{h}x{w} px, {resize}"


def promised(entry: dict, rate: float) -> float:
    """The false-alarm share the folds' calibrations promise at `rate`, averaged over folds: below
    1 / rate - 1 calibration images a fold can promise only 1 / (n + 1) (`calibration.decision_threshold`)."""
    return float(np.mean([calibration.decision_threshold(np.arange(f["n_calibration"], dtype=float), rate)
                          ["expected_false_alarms"] for f in entry["fold_details"]]))


if __name__ == "__main__":
    main()
