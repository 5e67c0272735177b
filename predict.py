"""Score new images with a trained checkpoint: a label, scores, boxes and an overlay picture per image.

Example:
    python predict.py --checkpoint weights/pill_vgg16.pt --images new_parts/ --out predictions/pill
    python predict.py --checkpoint weights/pill_vgg16.pt --images "line3/**/*.png" --out /tmp/pred \\
        --localizer patch_knn --batch-size 20

Writes OUT/predictions.csv (one row per image file found), OUT/predictions.json (the same, plus
the checkpoint's name and sha256 and the settings) and OUT/overlays/<image>.png (the image with
its boxes, and with the map blended in). The outputs are written into a hidden folder first and
moved into OUT once complete, so an interrupted run leaves OUT as it was. A file that cannot be
scored is reported in the `error` column and the run goes on; the exit status is 1 when any file
failed, 2 when the checkpoint or the arguments are unusable (checked before any image is scored;
nothing is written then).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from utils import checkpoint as checkpoints
from utils import calibration, inference, localizers, parameters, plots, runtime
from utils.download import sha256_of
from utils.geometry import resize_of

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by Training.ipynb")
    parser.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_GLOB",
                        help="folders (searched recursively for image files), glob patterns (quote them; "
                             "** is recursive) or image files")
    parser.add_argument("--out", required=True, help="folder for predictions.csv, predictions.json and overlays/")
    parser.add_argument("--localizer", default=None,
                        help="map for the image score, the boxes and the overlay; default: the checkpoint's own "
                             "(the one head='auto' chose; else cam for the published head, evidence for the evidence "
                             "and the fused heads, patch_knn without a classifier); also cam_knn, patch_cam, or an explanation of the published head (explain, "
                             "gradcam, layercam, gradcam_s8, layercam_s8, gradref)")
    parser.add_argument("--box-threshold", default=inference.DEFAULT_BOX_THRESHOLD,
                        choices=inference.BOX_THRESHOLDS,
                        help="calibrated: the checkpoint's threshold for the map; minmax: the published "
                             "per-image rule at --heatmap-thres (default: %(default)s)")
    parser.add_argument("--heatmap-thres", type=float, default=None,
                        help="threshold in [0, 1] of the minmax rule, and of an Anomaly's strongest region "
                             "(default: the checkpoint's heatmap_thres)")
    parser.add_argument("--box-mode", default="components", choices=("components", "single"),
                        help="minmax rule: one box per hot region, or one box around all (published)")
    parser.add_argument("--batch-size", type=int, default=10, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda' (default: %(default)s)")
    parser.add_argument("--precision", default="auto", choices=runtime.PRECISIONS,
                        help="autocast precision, as in the notebooks (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} must be a positive integer")
    return args


def overlay_name(name: str) -> str:
    """Overlay file of an image, relative to OUT: overlays/<name>, ending in .png."""
    return f"overlays/{name if name.lower().endswith('.png') else name + '.png'}"


def score_files(files, model, checkpoint, args, device, precision, out: Path) -> list[dict[str, Any]]:
    """Decode, score and draw `files` batch by batch; one row per file, failures included."""
    size, resize = checkpoint["config"]["image_size"], resize_of(checkpoint["config"])
    rows = []
    with tqdm(total=len(files), desc="Scoring images", unit="image") as bar:
        for batch in inference.decode_batches(files, size, args.batch_size, resize):
            good = [d for d in batch if not d.error]
            results = []
            if good:
                results = inference.score_batch(
                    torch.stack([d.tensor for d in good]), model, checkpoint,
                    localizer=args.localizer, box_threshold=args.box_threshold, heatmap_thres=args.heatmap_thres,
                    box_mode=args.box_mode, batch_size=args.batch_size, device=device, precision=precision,
                    parts=torch.tensor([d.part for d in good]) if resize == "pad" else None)
            by_path = dict(zip((d.path for d in good), results))
            for d in batch:
                if d.error:
                    rows.append({**inference.prediction_row(str(d.path), None, error=d.error), "overlay": ""})
                    continue
                height, width = d.display.shape[:2]
                row = inference.prediction_row(str(d.path), by_path[d.path], width, height, d.part)
                row["overlay"] = overlay_name(d.name)
                boxes = np.array([b[:4] for b in row["boxes"]], np.float32).reshape(-1, 4)
                heatmap = by_path[d.path]["heatmap"][:d.part[0], :d.part[1]]  # the part: padding is no pixel of it
                plots.save_png(plots.overlay_image(d.display, heatmap, boxes), out / row["overlay"])
                rows.append(row)
            bar.update(len(batch))
    return rows


def settings(args: argparse.Namespace, checkpoint: dict[str, Any], rule: inference.BoxRule,
             device, precision: str) -> dict[str, Any]:
    """What predictions.json records about how the images were scored."""
    config = checkpoint["config"]
    return {
        "images": [str(s) for s in args.images], "localizer": args.localizer,
        "box_threshold": rule.name, "threshold": rule.threshold, "min_area": rule.min_area,
        "box_mode": rule.mode, "box_note": rule.note, "decision": inference.decision_of(checkpoint),
        "batch_size": args.batch_size,
        "device": str(device), "precision": precision, "backbone": config["backbone"],
        "image_size": config["image_size"], "resize": resize_of(config), "trained_on": config.get("subset_name"),
        "class_names": list(checkpoint.get("class_names", [])),
        "boxes": "[x1, y1, x2, y2, score] in pixels of the original image, x2 and y2 exclusive",
    }


OUTPUT_FILES = ("predictions.csv", "predictions.json")


def staging_folder(out: Path) -> Path:
    """A new hidden folder for a run's outputs in the nearest existing folder of `out` (`out` itself,
    or the folder it will be created in), so that `publish` only renames within one file system."""
    base = out
    while not base.exists():
        base = base.parent
    staging = Path(tempfile.mkdtemp(prefix=".predict-", suffix=".partial", dir=base))
    os.chmod(staging, 0o755)  # mkdtemp creates 0700; when it becomes OUT it is meant to be shared
    return staging


def publish(staging: Path, out: Path) -> None:
    """Move the complete outputs in `staging` to `out`. A new `out` is one rename: it appears whole
    or not at all. Into an existing `out` the earlier run's CSV and JSON are removed first, then the
    overlays move in, then the CSV and the JSON last, so a predictions.json only ever stands beside
    the overlays it lists."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, out)
        return
    for name in OUTPUT_FILES[::-1]:
        (out / name).unlink(missing_ok=True)
    for path in sorted(p for p in (staging / "overlays").rglob("*") if p.is_file()):
        target = out / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    for name in OUTPUT_FILES:
        os.replace(staging / name, out / name)


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the run reads, checked before any image is scored: the output folder, the checkpoint
    and its model (`inference.check_scorable`), the map, the box rule, the image files, the device.
    Raises OSError, ValueError, RuntimeError or KeyError with a message when one is unusable."""
    parameters.check_output_dir(args.out, "--out")
    model, checkpoint = checkpoints.load_checkpoint(args.checkpoint)
    inference.check_scorable(model, checkpoint, where=args.checkpoint)
    if args.localizer is None:
        args.localizer = localizers.default_localizer(checkpoint)
    inference.check_localizer(args.localizer, checkpoint, where=args.checkpoint)
    rule = inference.box_rule(checkpoint, args.localizer, args.box_threshold, args.heatmap_thres, args.box_mode)
    device = runtime.resolve_device(args.device)
    return {"model": model, "checkpoint": checkpoint, "rule": rule, "files": inference.find_images(args.images),
            "device": device, "precision": runtime.resolve_precision(args.precision, device)}


def write_outputs(run: dict[str, Any], args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Score every file into `out` (overlays, predictions.csv, predictions.json); returns the report."""
    checkpoint = run["checkpoint"]
    model = runtime.prepare_model(run["model"], run["device"], run["precision"])
    rows = score_files(run["files"], model, checkpoint, args, run["device"], run["precision"], out)
    report = {
        "checkpoint": {"path": str(args.checkpoint), "name": Path(args.checkpoint).name,
                       "sha256": sha256_of(args.checkpoint)},
        "settings": settings(args, checkpoint, run["rule"], run["device"], run["precision"]),
        "n_images": len(rows), "n_failed": sum(bool(r["error"]) for r in rows),
        "n_anomaly": sum(r["label"] == "Anomaly" for r in rows),
        "predictions": rows,
    }
    inference.save_predictions_csv(out / "predictions.csv", rows)
    checkpoints.save_json(out / "predictions.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 all scored, 1 some files failed, 2 unusable input)."""
    args = parse_args(argv)
    try:
        run = prepare(args)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        # e.g. a missing file or a folder, another repository's checkpoint, a state_dict of another shape
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not run["files"]:
        print(f"error: no image files ({', '.join(inference.IMAGE_EXTENSIONS)}) found in "
              f"{' '.join(map(str, args.images))}.", file=sys.stderr)
        return 2
    if run["rule"].note:
        print(f"note: {run['rule'].note}", file=sys.stderr)
    warning = calibration.promise_warning(inference.decision_of(run["checkpoint"]))
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    out = Path(args.out)
    staging = staging_folder(out)
    try:
        report = write_outputs(run, args, staging)
        publish(staging, out)
    finally:  # an interrupted or failed run leaves no partial outputs behind
        shutil.rmtree(staging, ignore_errors=True)
    print(f"{report['n_images']} images: {report['n_anomaly']} Anomaly, {report['n_failed']} failed; "
          f"wrote {out / 'predictions.csv'}, {out / 'predictions.json'} and {out / 'overlays'}/")
    for row in report["predictions"]:
        if row["error"]:
            print(f"failed: {row['path']}: {row['error']}", file=sys.stderr)
    return 1 if report["n_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
