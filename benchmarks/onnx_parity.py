"""Parity of the exported ONNX graph with predict.py's PyTorch path on real images (MVTec AD pill).

For each backbone, a checkpoint of each kind is trained on part of the category as Training.ipynb
trains it (`helper.run_fold`): the published head, the evidence head, the patch memory alone
(good images only), both heads fused (`head="fused"`) and the default head (`head="auto"`, whichever
decision and map it chooses).
Each is exported (export.py's code) and the same held-out test images are scored three ways:
predict.py's path (`inference.score_batch`, fp32), the graph under ONNX Runtime, and end to end
from the files by predict.py and deploy/onnx_predict.py. Reported per checkpoint: the largest
differences of the decision score, the map's image score and the map, labels that differ, and
images whose boxes differ. Run from the repository root:

    python benchmarks/onnx_parity.py --vgg16-weights /tmp/vgg16_oxford.pth \\
        --out results/reference/onnx_parity.json
    python benchmarks/onnx_parity.py --quick        # smoke run: MobileNetV2 only, a few images
    python benchmarks/onnx_parity.py --quick --kinds published --explain \
        --out results/reference/onnx_parity_explain_quick.json   # the published head's explanations too

The test images are never trained on: the first --n-test-good of test/good and the first
--n-test-defect of each defect folder. Training uses the first --n-train-good of train/good and,
for the heads, the next --n-train-defect images of each defect folder. The memory is a random
subset of --memory rows (how rows are chosen does not change what parity measures).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # so `utils` imports when run as `python benchmarks/onnx_parity.py`
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import predict  # noqa: E402
from benchmark import machine_info  # noqa: E402
from deploy import onnx_predict as runner  # noqa: E402
from utils import helper, inference, onnx_export, parameters, selection  # noqa: E402
from utils.checkpoint import load_checkpoint, save_json  # noqa: E402
from utils.constants import GOOD_FOLDER, MVTEC_DIR_ENV  # noqa: E402
from utils.dataloader import Sample, index_subset, load_images, positions  # noqa: E402
from utils.download import sha256_of  # noqa: E402
from utils.model import load_backbone_weights  # noqa: E402

DEFAULT_DATA_DIR = os.environ.get(MVTEC_DIR_ENV) or REPO_ROOT.parent / "shared" / "data" / "mvtec_anomaly_detection"
KINDS = ("published", "evidence", "patch_only", "auto", "fused")  # auto: the default head, whatever it chooses
CPU = torch.device("cpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                   help="folder holding MVTec AD-format subsets (default: $MVTEC_AD_DIR, else "
                        "../shared/data/mvtec_anomaly_detection)")
    p.add_argument("--subset", default="pill", help="category (default: %(default)s)")
    p.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "vgg16"], help="(default: %(default)s)")
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="(default: all)")
    p.add_argument("--vgg16-weights", default=None,
                   help="VGG16 backbone weights file (python -m utils.offline_weights --vgg16-oxford PATH); "
                        "default: torchvision's ImageNet weights")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--n-train-good", type=int, default=60)
    p.add_argument("--n-train-defect", type=int, default=4, help="training images per defect folder (heads only)")
    p.add_argument("--n-test-good", type=int, default=8)
    p.add_argument("--n-test-defect", type=int, default=3, help="test images per defect folder")
    p.add_argument("--memory", type=int, default=10000, help="patch memory rows (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="published head's epochs (default: %(default)s)")
    p.add_argument("--explain", action="store_true",
                   help="also export each published checkpoint with each explanation head='auto' may show "
                        "('explain', 'layercam_s8') and compare it")
    p.add_argument("--work-dir", default=None,
                   help="where checkpoints, models and predictions go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="JSON file for the full output")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: MobileNetV2, 10 good + 1 per type to train, 11 to test")
    args = p.parse_args(argv)
    if args.quick:
        args.backbones, args.n_train_good, args.n_train_defect = ["mobilenet_v2"], 10, 1
        args.n_test_good, args.n_test_defect, args.memory, args.epochs = 4, 1, 2000, 2
    return args


def select(samples: list[Sample], args: argparse.Namespace) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(good training images, defective training images, test images) of the category, by folder
    order: the test images are the first of each test/ folder, the defective training ones the next."""
    by_folder: dict[str, list[Sample]] = {}
    for s in samples:
        by_folder.setdefault(s.path.rsplit("/", 1)[0], []).append(s)
    subset = args.subset
    good = by_folder[f"{subset}/train/{GOOD_FOLDER}"][:args.n_train_good]
    test = by_folder[f"{subset}/test/{GOOD_FOLDER}"][:args.n_test_good]
    defects = []
    for folder, members in sorted(by_folder.items()):
        if folder.startswith(f"{subset}/test/") and not folder.endswith(f"/{GOOD_FOLDER}"):
            test += members[:args.n_test_defect]
            defects += members[args.n_test_defect:args.n_test_defect + args.n_train_defect]
    return good, defects, test


def config_of(args: argparse.Namespace, backbone: str, kind: str, work: Path) -> dict[str, Any]:
    """Training.ipynb's configuration for one checkpoint: defaults, but a random memory of --memory rows."""
    weights = args.vgg16_weights if backbone == "vgg16" else None
    return parameters.training_config(
        data_dir=args.data_dir, subset_name=args.subset, download=False, backbone=backbone, pretrained=True,
        backbone_weights=weights, image_size=args.image_size, batch_size=10, lr=1e-4,
        # the evidence head refuses the published head's epochs other than their default
        epochs=parameters.PUBLISHED_RECIPE["epochs"] if kind == "evidence" else args.epochs,
        class_weight=[1, 3], target_train_accuracy=0.98, test_size=0.2, seed=42, heatmap_thres=0.7, n_cv_folds=0,
        weights_dir=str(work), results_dir=str(work), device="cpu", precision="fp32", patch_memory_size=args.memory,
        patch_memory_method="random", head=kind if kind in ("evidence", "auto", "fused") else "published")


def train(args, backbone, kind, samples, frozen, template, train_idx, test, work) -> Path:
    """Fit one checkpoint on the images `train_idx` (the good ones alone for patch_only) and save it."""
    config = config_of(args, backbone, kind, work)
    labels = torch.tensor([s.label for s in samples])
    if kind == "patch_only":
        train_idx = train_idx[labels[train_idx] == 0]
    fold = helper.run_fold(config, template, frozen, labels, train_idx, torch.zeros(0, dtype=torch.long),
                           device=CPU, precision="fp32", progress=False)
    path = work / f"{args.subset}_{backbone}_{kind}.pt"
    torch.save(fold.checkpoint(config, [s.path for s in test], n_train=len(train_idx)), path)
    return path


def rows_agree(ours: Path, theirs: Path) -> dict[str, Any]:
    """predict.py's and the runner's predictions.csv for the same files: labels and boxes that differ,
    the largest score differences."""

    def read(folder):
        with open(folder / "predictions.csv", newline="") as f:
            return list(csv.DictReader(f))

    a, b = read(ours), read(theirs)
    assert [r["path"] for r in a] == [r["path"] for r in b]
    number = lambda v: float(v) if v else 0.0  # noqa: E731 (an empty cell: no classifier)
    return {
        "n_rows": len(a),
        "labels_differ": sum(x["label"] != y["label"] for x, y in zip(a, b)),
        "boxes_differ": sum([box[:4] for box in json.loads(x["boxes"])] != [box[:4] for box in json.loads(y["boxes"])]
                            for x, y in zip(a, b)),
        "n_boxes": sum(int(x["n_boxes"] or 0) for x in a),
        "p_anomaly": max(abs(number(x["p_anomaly"]) - number(y["p_anomaly"])) for x, y in zip(a, b)),
        "image_score": max(abs(number(x["image_score"]) - number(y["image_score"])) for x, y in zip(a, b)),
    }


def check_one(args, backbone: str, kind: str, checkpoint: Path, test_images: torch.Tensor, test_files: list[Path],
              work: Path, localizer: str | None = None) -> dict[str, Any]:
    """Export one checkpoint with map `localizer` (None: its own) and compare the graph with
    predict.py's path on the test images."""
    model, ckpt = load_checkpoint(checkpoint)
    path = checkpoint.with_suffix(".onnx") if localizer is None else checkpoint.with_name(
        f"{checkpoint.stem}_{localizer}.onnx")
    localizer = localizer or inference.default_localizer(ckpt)
    start = time.perf_counter()
    payload = onnx_export.export_checkpoint(model, ckpt, localizer, checkpoint.name, sha256_of(checkpoint))
    seconds = time.perf_counter() - start
    onnx_export.save_model(path, payload)
    session = onnx_export.session_of(path)
    outputs = [onnx_export.run_session(session, test_images[i:i + 16]) for i in range(0, len(test_images), 16)]
    outputs = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
    results = inference.score_batch(test_images, model, ckpt, localizer=localizer, batch_size=16)
    decision = inference.decision_of(ckpt)
    diff = onnx_export.compare(results, outputs, float(decision["threshold"]),
                               onnx_export.near_ties(model, ckpt, test_images))
    meta = runner.load_model(path).meta
    boxes_differ = 0
    for i, result in enumerate(results):
        boxes, _ = runner.label_boxes(outputs["map"][i], bool(outputs["label"][i]), meta["box_threshold"],
                                      meta["box_min_area"], meta["heatmap_thres"])
        boxes_differ += not np.array_equal(boxes, result["boxes"])
    files = [str(f) for f in test_files]
    ours, theirs = work / f"{path.stem}_onnx", work / f"{path.stem}_torch"
    runner.main(["--model", str(path), "--images", *files, "--out", str(ours), "--no-overlays"])
    predict.main(["--checkpoint", str(checkpoint), "--images", *files, "--out", str(theirs), "--precision", "fp32",
                  "--localizer", localizer])
    return {"backbone": backbone, "kind": kind, "localizer": localizer, "decision": decision,
            "memory_rows": meta["memory_rows"], "model_mib": round(len(payload) / 2**20, 1),
            "export_seconds": round(seconds, 1), "graph": diff, "boxes_differ": boxes_differ,
            "n_boxes": int(sum(len(r["boxes"]) for r in results)), "files": rows_agree(ours, theirs)}


def make_checkpoints(args, backbone: str, work: Path) -> tuple[dict[str, Path], list[Sample], torch.Tensor]:
    """A checkpoint of each of --kinds for one backbone, trained on one frozen pass over the chosen
    images (those already in `work` are kept: a rerun with the same --work-dir and settings only
    compares again); returns their paths by kind, the test samples and their decoded images (N, 3, S, S)."""
    good, defects, test = select(index_subset(args.data_dir, args.subset), args)
    paths = {kind: work / f"{args.subset}_{backbone}_{kind}.pt" for kind in args.kinds}
    if all(path.is_file() for path in paths.values()):
        return paths, test, load_images(args.data_dir, test, args.image_size)
    samples = good + defects + test
    images = load_images(args.data_dir, samples, args.image_size)
    config = config_of(args, backbone, "published", work)
    weights = load_backbone_weights(args.vgg16_weights, backbone) if config["backbone_weights"] else None
    template = helper.new_model(config, weights, CPU, "fp32")
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=10, device=CPU,
                                precision="fp32", progress=False)
    train_idx = positions(samples, good + defects)
    checkpoints = {kind: train(args, backbone, kind, samples, frozen, template, train_idx, test, work)
                   for kind in args.kinds}
    return checkpoints, test, images[positions(samples, test)]


def run_backbone(args, backbone: str, work: Path) -> list[dict[str, Any]]:
    """Every kind of checkpoint of one backbone: trained, exported, compared."""
    checkpoints, test, test_images = make_checkpoints(args, backbone, work)
    test_files = [Path(args.data_dir) / s.path for s in test]
    out = []
    shown = [(kind, checkpoint, None) for kind, checkpoint in checkpoints.items()]
    if args.explain and "published" in checkpoints:  # the explanations head="auto" may show
        shown += [("published", checkpoints["published"], name) for name in selection.MAP_EXPLANATIONS]
    for kind, checkpoint, localizer in shown:
        out.append(check_one(args, backbone, kind, checkpoint, test_images, test_files, work, localizer))
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(0)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="onnx-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "machine": machine_info(CPU),
              "data": {"subset": args.subset, "image_size": args.image_size, "n_train_good": args.n_train_good,
                       "n_train_defect_per_type": args.n_train_defect, "n_test_good": args.n_test_good,
                       "n_test_defect_per_type": args.n_test_defect, "memory": args.memory},
              "targets": {"scores": onnx_export.SCORE_TOLERANCE, "maps": onnx_export.MAP_TOLERANCE,
                          "explanation_maps": onnx_export.GRADIENT_MAP_TOLERANCE,
                          "labels": "equal", "boxes": "equal"},
              "results": []}
    for backbone in args.backbones:
        report["results"] += run_backbone(args, backbone, work)
    report["all_ok"] = all(r["graph"]["ok"] and not r["boxes_differ"] and not r["files"]["labels_differ"]
                           and not r["files"]["boxes_differ"] for r in report["results"])
    if args.out:
        save_json(args.out, report)
    print(f"all within the targets: {report['all_ok']}" + (f"; wrote {args.out}" if args.out else ""))
    return report


if __name__ == "__main__":
    main()
