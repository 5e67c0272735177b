"""Does the classifier's decision rest on the defect? Paint the defect over and score again.

For each fold model saved by `explain_study.py` and each defective image it held out: the
Anomaly probability of the image, of the image with its defect (mask dilated by 4 px) replaced
by the mean good training image of that fold at the same pixels (MVTec AD objects are aligned,
so this is a plausible defect-free image), and of a control with the same mask turned 180
degrees about the centre (the same area painted over elsewhere). If the probability falls
when the defect goes and not in the control, the decision reads the defect, and an explanation
that misses it fails as an explanation; if it stays, the classifier reads another cue.

    python benchmarks/explain_deletion.py --subset pill --backbone vgg16 --variant avg --folds 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils import inference  # noqa: E402
from utils.checkpoint import save_json  # noqa: E402
from utils import dataloader, helper  # noqa: E402
from utils.constants import ANOMALY  # noqa: E402
from explain_cache import DEFAULT_DATA, build_model, cache_path  # noqa: E402


@torch.no_grad()
def p_anomaly(net, images: torch.Tensor, mean, std) -> np.ndarray:
    """Anomaly probability (N,) of (N, 3, H, W) uint8 images."""
    return inference.predict(net, images, mean, std, batch_size=10, device=torch.device("cpu"), precision="fp32",
                          progress=False)["p_anomaly"]


def paint(images: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 with the (N, H, W) bool masks' pixels taken from `fill` (3, H, W) uint8."""
    return torch.where(masks[:, None], fill[None], images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--subset", default="pill")
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--variant", default="avg", help="as in explain_study.py (oof file name part)")
    parser.add_argument("--folds", type=int, nargs="+", default=[0])
    parser.add_argument("--vgg16-weights", default="/tmp/vgg16_oxford.pth")
    parser.add_argument("--cache", default="/tmp/i12")
    parser.add_argument("--dilate", type=int, default=4)
    parser.add_argument("--out", default="results/explain_deletion.json")
    args = parser.parse_args()
    cache = torch.load(cache_path(Path(args.cache), args.subset, args.backbone, 224), weights_only=True)
    samples = dataloader.index_subset(args.data_dir, args.subset)
    assert [s.path for s in samples] == cache["paths"], "the cache was made from another copy of the subset"
    rows = {"orig": [], "removed": [], "control": []}
    types = []
    for fold in args.folds:
        saved = sorted(Path(args.cache).glob(f"oof_{args.subset}_{args.backbone}_{args.variant}*_fold{fold}.pt"))
        if not saved:
            raise FileNotFoundError(f"no fold model {fold} for {args.subset}/{args.backbone}/{args.variant} in {args.cache}")
        state = torch.load(saved[0], weights_only=True)
        net = build_model(args.backbone, args.vgg16_weights, args.variant.split("_")[0])
        net.load_state_dict(state["state_dict"], strict=False)
        net.eval()
        test = [int(i) for i in state["test"] if cache["labels"][i] == ANOMALY]
        good_train = [int(i) for i in state["train"] if cache["labels"][i] != ANOMALY]
        images = dataloader.load_images(args.data_dir, [samples[i] for i in test], 224)
        fill = dataloader.load_images(args.data_dir, [samples[i] for i in good_train], 224).float().mean(0).round().to(torch.uint8)
        masks = cache["masks"][test]
        k = 2 * args.dilate + 1
        masks = F.max_pool2d(masks[:, None].float(), k, stride=1, padding=args.dilate)[:, 0] > 0
        control = masks.flip(-1).flip(-2) & ~masks
        for name, x in (("orig", images), ("removed", paint(images, masks, fill)), ("control", paint(images, control, fill))):
            rows[name].append(p_anomaly(net, x, cache["mean"], cache["std"]))
        types += [cache["types"][i] for i in test]
    p = {k: np.concatenate(v) for k, v in rows.items()}
    types = np.array(types)
    summary = {name: {"mean_p_anomaly": float(v.mean()), "recall": float((v >= 0.5).mean())} for name, v in p.items()}
    summary["per_type_recall"] = {t: {name: float((v[types == t] >= 0.5).mean()) for name, v in p.items()}
                                  for t in sorted(set(types.tolist()))}
    summary.update(subset=args.subset, backbone=args.backbone, variant=args.variant, folds=args.folds,
                   n_defective=int(len(types)), dilate=args.dilate)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report[f"{args.subset}/{args.backbone}/{args.variant}/folds{'-'.join(map(str, args.folds))}"] = summary
    save_json(out, report)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
