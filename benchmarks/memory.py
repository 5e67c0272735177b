"""Benchmark the patch memory: coreset seconds and patch-map accuracy of each way of building it, in one run.

Builds the memory from the good training patches of one category's official split (train/good) and
measures, on its test/ images, the patch map each memory gives. Run from the repository root:

    python benchmarks/memory.py            # pill (448 px copy) at 224 px, MobileNetV2: ~209k patches
    python benchmarks/memory.py --quick    # smoke run: 40 training images, every 4th test image, small memory

Speeds are reported as ratios to the stepwise greedy loop measured in the same run, since the
machine may be shared: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # so `utils` imports when run as `python benchmarks/memory.py`

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

from utils import runtime  # noqa: E402
from utils.checkpoint import atomic_write_bytes, save_json  # noqa: E402
from utils import helper, metrics, patchknn  # noqa: E402
from utils.constants import GOOD, MVTEC_DIR_ENV  # noqa: E402
from utils.dataloader import index_subset, load_images, load_masks  # noqa: E402
from utils.evidence import residuals  # noqa: E402
from utils.model import CAMClassifier, normalisation  # noqa: E402
from utils.postprocess import upsample_maps  # noqa: E402

DEFAULT_DATA_DIR = os.environ.get(MVTEC_DIR_ENV) or REPO_ROOT.parent / "shared" / "data" / "mvtec_anomaly_detection"
SPEED_TARGET = 10.0  # default coreset over the stepwise loop
AUPRO_TOLERANCE = 0.01  # default memory's AUPRO may trail the stepwise coreset's by at most this


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; --quick shrinks the run to a smoke test."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                   help="folder holding MVTec AD-format subsets (default: $MVTEC_AD_DIR, else ../shared/data/mvtec_anomaly_detection)")
    p.add_argument("--subset", default="pill", help="category with train/good and test/ folders (default: %(default)s)")
    p.add_argument("--backbone", default="mobilenet_v2", help="backbone whose taps give the patches (default: %(default)s)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="ImageNet weights (default: on; --no-pretrained for random weights)")
    p.add_argument("--image-size", type=int, default=224, help="input side in px (default: %(default)s)")
    p.add_argument("--size", type=int, default=10000, help="memory rows of the compared ways (default: %(default)s)")
    p.add_argument("--shares", default="0.01,0.025,0.05",
                   help="memory sizes as shares of the patches, for the size sweep (default: %(default)s)")
    p.add_argument("--sigma", type=float, default=4.0,
                   help="Gaussian blur (px) of the smoothed map columns, PatchCore's choice (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=None, help="use the first N training images (default: all)")
    p.add_argument("--test-every", type=int, default=1, help="use every k-th test image (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="coreset seed (default: %(default)s)")
    p.add_argument("--patch-layers", default="both", choices=patchknn.PATCH_LAYERS,
                   help="layers of the patch embedding (default: %(default)s, 128 dims for MobileNetV2, so the "
                        "coreset's 128- and 64-dim projections are what is compared; the reference file used it)")
    p.add_argument("--cache", default=None, help="file to keep the extracted patches in between runs (default: none)")
    p.add_argument("--extra", action="store_true",
                   help="also 32 dims, greedy on a random half, and the whole patch set as memory (slow to score)")
    p.add_argument("--skip-stepwise", action="store_true",
                   help="skip the slow reference loop (no speed-up or overlap columns)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads (default: every core, %(default)s)")
    p.add_argument("--out", default="results/memory.json", help="JSON with every figure (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke run: 40 training images, every 4th test image, 2000 rows")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.test_every, args.size = args.n_train or 40, 4, min(args.size, 2000)
    return args


def machine() -> dict[str, Any]:
    """What the timings depend on."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()}


def extract(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Good training patches (N, D) and test embeddings (T, h, w, D), masks (T, S, S), labels (T,)."""
    samples = index_subset(args.data_dir, args.subset)
    train = [s for s in samples if s.path.split("/")[1] == "train" and s.label == GOOD][: args.n_train]
    test = [s for s in samples if s.path.split("/")[1] == "test"][:: args.test_every]
    device = torch.device("cpu")
    precision = runtime.resolve_precision("auto", device)
    net = runtime.prepare_model(CAMClassifier(args.backbone, pretrained=args.pretrained), device, precision)
    mean, std = normalisation(args.backbone, args.pretrained)
    out = {}
    for name, part in (("train", train), ("test", test)):
        images = load_images(args.data_dir, part, args.image_size)
        frozen = helper.frozen_pass(net, images, mean, std, batch_size=10, device=device, precision=precision)
        out[name] = frozen.patches_of(torch.arange(len(part)), patchknn.PatchRule(args.patch_layers))
    side = int(round((len(out["test"]) / len(test)) ** 0.5))
    out["test"] = out["test"].view(len(test), side, side, -1)
    masks = load_masks(args.data_dir, test, args.image_size)
    out["masks"] = masks if masks is not None else torch.zeros(len(test), args.image_size, args.image_size, dtype=torch.bool)
    out["labels"] = torch.tensor([s.label for s in test])
    return out


def map_metrics(memory: torch.Tensor, test: torch.Tensor, masks: np.ndarray, labels: np.ndarray,
                size: int, sigma: float) -> dict[str, float | None]:
    """Pixel AUROC, AUPRO and image AUROC of the patch map of memory (M, D) on test embeddings (T, h, w, D),
    raw (each patch's distance to its nearest memory row, `evidence.residuals` as inference computes it,
    upsampled; the image score its maximum on the patch grid) and blurred with a Gaussian of `sigma` px
    (as PatchCore does)."""
    _, distance = residuals(test.permute(0, 3, 1, 2), memory)  # (T, h, w)
    scores = distance.flatten(1).amax(dim=1)
    maps = upsample_maps(distance, (size, size)).numpy()
    smooth = np.stack([gaussian_filter(m, sigma=sigma) for m in maps])
    return {
        "pixel_auroc": metrics.pixel_auroc(maps, masks), "aupro": metrics.aupro(maps, masks),
        "image_auroc": metrics.classification_metrics(labels, labels, scores.numpy())["image_auroc"],
        "pixel_auroc_smooth": metrics.pixel_auroc(smooth, masks), "aupro_smooth": metrics.aupro(smooth, masks),
        "image_auroc_smooth": metrics.classification_metrics(labels, labels, smooth.reshape(len(smooth), -1).max(1))["image_auroc"],
    }


def ways(size: int, shares: list[float], n: int, seed: int, skip_stepwise: bool, extra: bool) -> dict[str, Callable]:
    """name -> function(patches) -> indices of the memory rows."""
    out: dict[str, Callable] = {}
    if not skip_stepwise:
        out["stepwise greedy, 128 dims (before)"] = lambda p: patchknn.greedy_coreset_stepwise(p, size, seed)
    out["blocked exact greedy, 128 dims (default)"] = lambda p: patchknn.greedy_coreset(p, size, seed)
    out["blocked exact greedy, 64 dims"] = lambda p: patchknn.greedy_coreset(p, size, seed, projection_dim=64)
    out["random"] = lambda p: patchknn.random_subsample(p, size, seed)
    for share in shares:
        m = max(1, round(share * n))
        out[f"blocked greedy, {share:.1%} of patches ({m})"] = lambda p, m=m: patchknn.greedy_coreset(p, m, seed)
    if extra:
        out["blocked exact greedy, 32 dims"] = lambda p: patchknn.greedy_coreset(p, size, seed, projection_dim=32)
        out["blocked exact greedy on a random half of the patches"] = lambda p: _on_half(p, size, seed)
        out["all patches (no subsampling)"] = lambda p: torch.arange(len(p))
    return out


def _on_half(patches: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Greedy coreset of a seeded random half of the rows: half the distance computations."""
    half = patchknn.random_subsample(patches, len(patches) // 2, seed)
    return half[patchknn.greedy_coreset(patches[half], size, seed)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"command": "python benchmarks/memory.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                              "machine_before": machine(), "args": vars(args)}
    print(report["command"])
    print("machine:", report["machine_before"])
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file():
        data = torch.load(cache, weights_only=True)
    else:
        data = extract(args)
        if cache is not None:
            atomic_write_bytes(cache, lambda f: torch.save(data, f))
    patches, test = data["train"], data["test"]
    masks, labels = data["masks"].numpy(), data["labels"].numpy()
    n, dim = patches.shape
    print(f"{args.subset}: {n:,} good training patches of {dim} dims; {len(test)} test images "
          f"({int(labels.sum())} anomalous), {args.backbone} at {args.image_size} px")
    shares = [float(s) for s in args.shares.split(",") if s]
    rows: dict[str, dict[str, Any]] = {}
    reference = None
    report["n_patches"], report["dim"], report["rows"] = n, dim, rows
    for name, build in ways(args.size, shares, n, args.seed, args.skip_stepwise, args.extra).items():
        start = time.perf_counter()
        index = build(patches)
        seconds = time.perf_counter() - start
        row = {"rows": int(len(index)), "seconds": seconds}
        if reference is None and "stepwise" in name:
            reference = index
        if reference is not None and len(index) == len(reference):
            row["same_rows_as_stepwise"] = len(set(index.tolist()) & set(reference.tolist())) / len(reference)
        row.update(map_metrics(patches[index], test, masks, labels, args.image_size, args.sigma))
        rows[name] = row
        print(f"  {name}: {seconds:.2f} s, pixel AUROC {row['pixel_auroc']:.4f}, AUPRO {row['aupro']:.4f}", flush=True)
        save_json(args.out, report)  # after every way: a long run interrupted keeps what it measured
    report["machine_after"] = machine()
    print_table(report, args)
    save_json(args.out, report)
    print("wrote", args.out)
    return 0


def print_table(report: dict[str, Any], args: argparse.Namespace) -> None:
    """One line per way: rows, seconds, speed-up, shared rows and the maps' metrics (raw | smoothed)."""
    rows = report["rows"]
    base = next((r for k, r in rows.items() if "stepwise" in k), None)
    fmt = lambda v: "  n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"\nload average before {report['machine_before']['load_average']}, after {report['machine_after']['load_average']}")
    print(f"{'way':<48}{'rows':>7}{'sec':>8}{'speedup':>8}{'same':>6} | {'pixAUROC':>8}{'AUPRO':>7}{'imgAUC':>7}"
          f" | sigma={args.sigma:g}: {'pixAUROC':>8}{'AUPRO':>7}{'imgAUC':>7}")
    for name, r in rows.items():
        speed = f"{base['seconds'] / r['seconds']:.1f}x" if base else "n/a"
        same = fmt(r.get("same_rows_as_stepwise"))
        print(f"{name:<48}{r['rows']:>7}{r['seconds']:>8.2f}{speed:>8}{same:>6} | {fmt(r['pixel_auroc']):>8}"
              f"{fmt(r['aupro']):>7}{fmt(r['image_auroc']):>7} | {'':>9}{fmt(r['pixel_auroc_smooth']):>8}"
              f"{fmt(r['aupro_smooth']):>7}{fmt(r['image_auroc_smooth']):>7}")
    default = rows.get("blocked exact greedy, 128 dims (default)")
    if base and default:
        speedup = base["seconds"] / default["seconds"]
        delta = default["aupro"] - base["aupro"]
        ok = speedup >= SPEED_TARGET and delta >= -AUPRO_TOLERANCE
        print(f"default coreset: {speedup:.1f}x faster than the stepwise loop (target {SPEED_TARGET:g}x), "
              f"AUPRO {delta:+.4f} (tolerance {-AUPRO_TOLERANCE:+g}): {'met' if ok else 'NOT met'}"
              + (" (smoke run: the target is for the full patch count)" if args.quick else ""))


if __name__ == "__main__":
    sys.exit(main())
