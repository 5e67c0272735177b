"""What a larger canvas costs: the frozen pass and the patch memory at each canvas, in one run.

For each canvas (default: the published 224 px square, stretched, and [224, 576] padded, a strip's
shape at the same height), in its own process so that its peak memory is its own: decode the
good images of one category once, run the frozen layers over them (seconds, cache MiB), build the
patch memory of their patches as Training builds it (coreset to 10,000 rows: seconds, patches),
and read the process's peak RSS. Ratios are over the first canvas, measured in the same run, since
the machine may be shared: the load average is printed before and after.

    python benchmarks/canvas_cost.py                       # magnetic tile, MobileNetV2, 224 vs [224, 576] pad
    python benchmarks/canvas_cost.py --n-images 8 --memory-size 500   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # so `utils` imports when run as `python benchmarks/canvas_cost.py`

import torch  # noqa: E402

from utils import dataloader, geometry, helper, parameters, runtime  # noqa: E402
from utils.checkpoint import save_json  # noqa: E402
from utils.constants import GOOD  # noqa: E402

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "surface_defects"
DEFAULT_CANVASES = ("224:stretch", "224x576:pad")


def parse_canvas(text: str) -> tuple[int | list[int], str]:
    """"224:stretch" -> (224, "stretch"); "224x576:pad" -> ([224, 576], "pad"), checked as Training checks them."""
    size_text, _, resize = text.partition(":")
    sides = [int(v) for v in size_text.split("x")]
    size = sides[0] if len(sides) == 1 else sides
    parameters.check_image_size(size)
    parameters.check_resize(resize or "stretch")
    return size, resize or "stretch"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="folder of MVTec-layout subsets")
    p.add_argument("--subset", default="magnetic_tile", help="category whose train/good images are used")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--canvases", nargs="+", default=list(DEFAULT_CANVASES),
                   help="SIDE[xWIDTH]:RESIZE each, the first the baseline (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=64, help="good images decoded and passed (default: %(default)s)")
    p.add_argument("--memory-size", type=int, default=10000, help="coreset rows, Training's default (default: %(default)s)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure this canvas in this process
    return p.parse_args(argv)


def measure_one(args: argparse.Namespace, canvas_text: str) -> dict[str, Any]:
    """One canvas in this process: decode, frozen pass, patch memory; seconds, sizes, peak RSS."""
    torch.set_num_threads(args.threads)
    size, resize = parse_canvas(canvas_text)
    samples = [s for s in dataloader.index_subset(args.data_dir, args.subset) if s.label == GOOD][:args.n_images]
    config = parameters.training_config(
        data_dir=args.data_dir, subset_name=args.subset, download=False, backbone=args.backbone, pretrained=True,
        image_size=size, resize=resize, batch_size=10, epochs=10, lr=1e-4, class_weight=[1, 3],
        target_train_accuracy=0.98, test_size=0.2, seed=0, heatmap_thres=0.7, n_cv_folds=0,
        weights_dir="/tmp/canvas_cost", results_dir="/tmp/canvas_cost", device="cpu", precision=args.precision,
        patch_memory_size=args.memory_size, head="published")
    device = torch.device("cpu")
    start = time.perf_counter()
    images = dataloader.load_images(args.data_dir, samples, size, resize=resize)
    parts = dataloader.load_parts(args.data_dir, samples, size, resize)
    decode = time.perf_counter() - start
    model = helper.new_model(config, None, device, args.precision)
    start = time.perf_counter()
    frozen = helper.frozen_pass(model, images, config["mean"], config["std"], batch_size=10, device=device,
                                precision=args.precision, parts=parts, progress=False)
    frozen_seconds = time.perf_counter() - start
    _, _, info = helper.patch_memory_of(config, frozen, torch.arange(len(samples)))
    h, w = geometry.canvas(size)
    return {"canvas": canvas_text, "image_size": size, "resize": resize, "pixels": h * w, "n_images": len(samples),
            "decode_seconds": decode, "frozen_seconds": frozen_seconds,
            "frozen_cache_mib": sum(t.nelement() * t.element_size() for t in (frozen.features, frozen.tap)) / 2**20,
            "patches": info["n_patches"], "memory_rows": info["size"], "memory_seconds": info["seconds"],
            "peak_rss_mib": runtime.peak_rss_mib()}


def spawn(args: argparse.Namespace, canvas_text: str) -> dict[str, Any]:
    """`measure_one` in a fresh process: its peak RSS is this canvas's alone."""
    command = [sys.executable, __file__, "--one", canvas_text, "--data-dir", str(args.data_dir), "--subset",
               args.subset, "--backbone", args.backbone, "--n-images", str(args.n_images), "--memory-size",
               str(args.memory_size), "--precision", args.precision, "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return json.loads(done.stdout.strip().splitlines()[-1])


RATIO_KEYS = ("pixels", "frozen_seconds", "frozen_cache_mib", "patches", "memory_seconds", "peak_rss_mib")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure_one(args, args.one)))
        return
    for text in args.canvases:
        parse_canvas(text)  # a wrong canvas stops the run before anything is measured
    load_before = os.getloadavg()
    rows = [spawn(args, text) for text in args.canvases]
    base = rows[0]
    for row in rows:
        row["ratio"] = {k: row[k] / base[k] if base[k] else None for k in RATIO_KEYS}
    print(f"{args.subset}, {args.backbone}, {base['n_images']} good images, {args.precision}, {args.threads} thread(s); "
          f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'canvas':<14}{'pixels':>8}{'frozen s':>10}{'cache MiB':>11}{'patches':>9}{'memory s':>10}"
          f"{'peak RSS MiB':>14}   ratio to {base['canvas']}: frozen s / memory s / peak RSS")
    for r in rows:
        q = r["ratio"]
        print(f"{r['canvas']:<14}{r['pixels']:>8}{r['frozen_seconds']:>10.2f}{r['frozen_cache_mib']:>11.1f}"
              f"{r['patches']:>9}{r['memory_seconds']:>10.2f}{r['peak_rss_mib']:>14.0f}   "
              f"{q['frozen_seconds']:.2f}x / {q['memory_seconds']:.2f}x / {q['peak_rss_mib']:.2f}x")
    if args.out:
        save_json(args.out, {"settings": {k: v for k, v in vars(args).items() if k != "one"},
                             "load_average": [load_before[0], os.getloadavg()[0]], "results": rows})


if __name__ == "__main__":
    main()
