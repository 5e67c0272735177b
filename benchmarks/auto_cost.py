"""Where head="auto" spends its time: one fold of `helper.run_fold` timed function by function.

The images are a subset's first --n-images indexed files (as `benchmark.py` takes them), 80 % of
them shuffled into training (the calibration hold-out as Training.ipynb's), the rest scored. Every
stage of the choice is wrapped with a clock: the candidate memories (`_candidates`, with their
coreset and nearest-row search inside), the evidence head's and the published head's out-of-fold
fits, the candidate maps' pixel metrics. Seconds of nested functions overlap (a parent's include
its children's); calls count each entry. Run on a quiet machine; a breakdown, not a race:

    python benchmarks/auto_cost.py --subset pill --n-images 300 --out results/reference/auto_cost.json
    python benchmarks/auto_cost.py --subset pill --n-images 300 --vgg16-weights /tmp/vgg16_oxford.pth \
        --out results/reference/auto_cost_real.json    # where a head decides
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark.py, beside this script

import torch  # noqa: E402

from benchmark import cpu_model  # noqa: E402
from utils import dataloader, evidence, helper, parameters, runtime, selection  # noqa: E402
from utils import model as model_lib  # noqa: E402
from utils.checkpoint import save_json  # noqa: E402

DEFAULT_DATA_DIR = os.environ.get("MVTEC_AD_DIR") or REPO_ROOT.parent / "shared" / "data" / "mvtec_anomaly_detection"
# (module, function) pairs whose calls are timed
TIMED = ((helper, "_candidates"), (helper, "patch_memory_of"), (helper, "build_patch_memory"),
         (evidence, "evidence_inputs"), (evidence, "nearest_rows"), (helper, "_oof_evidence"),
         (evidence, "train_head"), (helper, "_oof_published"), (helper, "_oof_explain"), (helper, "_train_classifier"),
         (helper, "_choose_maps"), (selection, "map_evidence"), (selection, "image_shares"),
         (helper, "predict_frozen"))


def timed(seconds: dict, calls: collections.Counter, module, name: str) -> None:
    """Replace module.name by a wrapper adding its wall seconds to seconds[name]."""
    function = getattr(module, name)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start
            calls[name] += 1

    setattr(module, name, wrapper)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--subset", default="pill")
    p.add_argument("--n-images", type=int, default=300)
    p.add_argument("--backbone", default="vgg16", help="random weights unless --vgg16-weights, as benchmark.py's")
    p.add_argument("--vgg16-weights", default=None,
                   help="VGG16's weights file (the Oxford file): the choice where a head decides; default: random "
                        "weights, where the patch map does")
    p.add_argument("--epochs", type=int, default=10, help="the published candidate's, early stopping off")
    p.add_argument("--precision", default="auto")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default=None, help="JSON file for the breakdown")
    args = p.parse_args(argv)
    load = [round(x, 2) for x in os.getloadavg()]
    seconds, calls = collections.defaultdict(float), collections.Counter()
    for module, name in TIMED:
        timed(seconds, calls, module, name)
    device = torch.device("cpu")
    precision = runtime.resolve_precision(args.precision, device)
    samples = dataloader.index_subset(args.data_dir, args.subset)[: args.n_images]
    weights = model_lib.load_backbone_weights(args.vgg16_weights, args.backbone) if args.vgg16_weights else None
    config = parameters.training_config(
        data_dir=args.data_dir, subset_name=args.subset, download=False, backbone=args.backbone,
        pretrained=weights is not None, backbone_weights=args.vgg16_weights,
        image_size=224, batch_size=10, epochs=args.epochs, lr=1e-4, class_weight=[1, 3], target_train_accuracy=None,
        test_size=0.2, seed=args.seed, heatmap_thres=0.7, n_cv_folds=0, weights_dir="unused", results_dir="unused",
        device="cpu", precision=precision, head="auto")
    template = helper.new_model(config, weights, device, precision)
    images = dataloader.load_images(args.data_dir, samples, 224)
    masks = dataloader.load_masks(args.data_dir, samples, 224, "stretch")
    start = time.perf_counter()
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=10, device=device,
                                precision=precision, progress=False)
    frozen_seconds = time.perf_counter() - start
    labels = torch.tensor([s.label for s in samples])
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed))
    cut = int(0.8 * len(samples))
    start = time.perf_counter()
    fold = helper.run_fold(config, template, frozen, labels, order[:cut], order[cut:],
                           types=[s.defect_type for s in samples], masks=masks, device=device,
                           precision=precision, progress=False)
    report = {
        "command": "python " + " ".join([f"benchmarks/{Path(__file__).name}", *(sys.argv[1:] if argv is None else argv)]),
        "cpu": cpu_model(),
        "cpu_bf16": runtime.cpu_supports_bf16(), "precision": precision, "threads": torch.get_num_threads(),
        "load_average_at_start": load, "data": f"{args.subset}, first {len(samples)} indexed images",
        "frozen_pass_seconds": frozen_seconds, "run_fold_seconds": time.perf_counter() - start,
        "stage_seconds": fold.seconds, "decision": fold.fitted.selection["decision"],
        "functions": {name: {"seconds": seconds[name], "calls": calls[name]}
                      for name in sorted(seconds, key=seconds.get, reverse=True)},
    }
    for name, row in report["functions"].items():
        print(f"{name:<22}{row['seconds']:8.1f} s  {row['calls']:4d} calls")
    print(f"selection {fold.seconds['selection']:.1f} s of run_fold {report['run_fold_seconds']:.1f} s; "
          f"decision {report['decision']}")
    if args.out:
        save_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
