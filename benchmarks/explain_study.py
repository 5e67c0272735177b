"""Which explanation of the classifier points at the defect: pooled five-fold cross-validation.

Reads the caches of `explain_cache.py` (frozen layers run once per subset and backbone), trains
only the fine-tuned layers per fold and training variant on them (the published recipe: 10
epochs, Adam 1e-4, class weights [1, 3], batch 10, early stop at train accuracy 0.98, seed 42 +
fold), scores each held-out fold with the CAM and the explanations of `utils.explain`, and
measures the pooled out-of-fold predictions: accuracy, image AUROC, pointing game, pixel AUROC,
AUPRO and box IoU per map (maps made comparable across images as Evaluation does).

    python benchmarks/explain_study.py --subsets toothbrush pill --backbones mobilenet_v2 \
        --variants avg topk --cache /tmp/i12 --out results/explain_study.json

Variants: `avg` (published), `max`, `topk` (the head's pooling), suffix `_flip` for flip
augmentation on the cached features of the flipped images.
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

from utils.checkpoint import atomic_write_bytes, save_json  # noqa: E402
from utils import explain, helper, metrics, postprocess  # noqa: E402
from utils import model as model_lib  # noqa: E402
from utils.constants import ANOMALY  # noqa: E402
from utils.dataloader import Sample, kfold_splits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explain_cache import build_model, cache_path  # noqa: E402

MAPS = ("cam",) + explain.EXPLANATIONS
RECIPE = dict(epochs=10, lr=1e-4, class_weight=[1.0, 3.0], batch_size=10, target_train_accuracy=0.98)


def parse_variant(name: str) -> tuple[str, bool]:
    """"topk_flip" -> ("topk", True)."""
    pooling, _, flip = name.partition("_")
    model_lib.check_pooling(pooling)
    if flip not in ("", "flip"):
        raise ValueError(f"variant {name!r}: expected POOLING or POOLING_flip")
    return pooling, flip == "flip"


def run_folds(cache: dict, flipped: torch.Tensor | None, backbone: str, pooling: str, vgg16_weights: str | None,
              n_folds: int, seed: int, max_folds: int, save_models: Path | None = None) -> dict[str, np.ndarray]:
    """Out-of-fold p_anomaly (N,), raw low-resolution maps {name: (N, h, w)} of one variant and
    "scored" (N,) bool: the images held out by the first `max_folds` folds (all when it is n_folds)."""
    labels = cache["labels"]
    samples = [Sample(p, int(y), t, None) for p, y, t in zip(cache["paths"], labels.tolist(), cache["types"])]
    index = {p: i for i, p in enumerate(cache["paths"])}
    n = len(samples)
    p_anomaly = np.zeros(n, np.float32)
    maps: dict[str, np.ndarray] = {}
    scored = np.zeros(n, bool)
    for fold, (train, test) in enumerate(kfold_splits(samples, n_folds, seed)):
        if fold >= max_folds:
            break
        tr = torch.tensor([index[s.path] for s in train])
        te = torch.tensor([index[s.path] for s in test])
        net = build_model(backbone, vgg16_weights, pooling)
        saved = Path(f"{save_models}_fold{fold}.pt") if save_models is not None else None
        if saved is not None and saved.is_file():  # trained by an earlier run: only the maps are computed again
            kept = torch.load(saved, weights_only=True)
            if not (torch.equal(kept["test"], te) and torch.equal(kept["train"], tr)):
                raise ValueError(f"{saved} was trained on another split: remove it to train again")
            net.load_state_dict(kept["state_dict"], strict=False)
        else:
            torch.manual_seed(seed + fold)  # the dense layer's init
            net.fc.reset_parameters()
            helper.train_model(net, torch.empty(0), labels[tr], mean=cache["mean"], std=cache["std"], seed=seed + fold,
                               device=torch.device("cpu"), precision="fp32", features=cache["frozen"][tr],
                               flipped_features=None if flipped is None else flipped[tr], progress=False, **RECIPE)
        net.eval()
        if saved is not None and not saved.is_file():  # the trained layers: maps again later, the deletion test
            trained = {k: v for k, v in net.state_dict().items() if not k.startswith("frozen.")}
            atomic_write_bytes(saved, lambda f: torch.save({"state_dict": trained, "test": te, "train": tr}, f))
        # the "gradref" baseline, as Training.ipynb sets it: the fold's good training images' mean frozen output
        net.explain_reference = explain.reference_features(cache["frozen"][tr], labels[tr])
        for start in range(0, len(te), 20):
            idx = te[start:start + 20]
            scores, ex = explain.explanation_maps(net, cache["tap"][idx], cache["tap_index"])
            with torch.no_grad():
                _, last = net.head(cache["frozen"][idx])
                ex["cam"] = model_lib.class_activation_map(last, net.fc.weight[ANOMALY])
            p_anomaly[idx.numpy()] = scores.float().softmax(1)[:, ANOMALY].numpy()
            for name, m in ex.items():
                maps.setdefault(name, np.zeros((n, *m.shape[1:]), np.float32))[idx.numpy()] = m.detach().numpy()
        scored[te.numpy()] = True
    return {"p_anomaly": p_anomaly, "scored": scored, **{f"map_{k}": v for k, v in maps.items()}}


def measure(oof: dict[str, np.ndarray], cache: dict, heatmap_thres: float) -> dict:
    """Pooled metrics of one variant: classification once, localisation per map."""
    keep = oof["scored"] if "scored" in oof else np.ones(len(oof["p_anomaly"]), bool)
    oof = {k: v[keep] for k, v in oof.items()}
    y = cache["labels"].numpy()[keep]
    p = oof["p_anomaly"]
    masks = cache["masks"].numpy()[keep]
    size = masks.shape[-2:]
    types = np.array(cache["types"])[keep]
    out = {"classification": metrics.classification_metrics(y, (p >= 0.5).astype(int), p), "maps": {},
           "n_scored": int(keep.sum()), "n_defective_scored": int(y.sum())}
    for name in MAPS:
        up = explain.upsample(torch.from_numpy(oof[f"map_{name}"]), size).numpy()
        scaled = postprocess.probability_scaled(up, p)
        boxes = postprocess.boxes_for_maps(scaled, heatmap_thres)
        m = metrics.localisation_metrics(scaled, masks, boxes, p, y)
        m["pointing_per_type"] = {t: metrics.pointing_game(scaled[types == t], masks[types == t])
                                  for t in sorted(set(types[y == 1].tolist()))}
        # on the defective images the classifier detects: an explanation of a "Good" decision
        # has no reason to show the defect
        detected = (y == 1) & (p >= 0.5)
        m["pointing_game_detected"] = metrics.pointing_game(scaled[detected], masks[detected])
        m["n_detected"] = int(detected.sum())
        out["maps"][name] = m
    return out


def markdown_table(report: dict) -> str:
    """One row per (subset, backbone, variant, map) of a report: the README's table."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    rows = ["| subset | backbone | head | folds | accuracy | image AUROC | map | pointing game | pixel AUROC | AUPRO | box IoU |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in report.items():
        c = r["classification"]
        folds = f"{r['folds_scored']}/{r['folds']}" if r.get("folds_scored", r["folds"]) != r["folds"] else str(r["folds"])
        for name, m in r["maps"].items():
            rows.append(f"| {r['subset']} | {r['backbone']} | {r['variant']} | {folds} | {fmt(c['accuracy'])} | "
                        f"{fmt(c['image_auroc'])} | {name} | {fmt(m['pointing_game'])} | {fmt(m['pixel_auroc'])} | "
                        f"{fmt(m['aupro'])} | {fmt(m['box_iou'])} |")
    return "\n".join(rows)


def compact_tables(report: dict) -> str:
    """The README's two tables: per (subset, backbone, head) the classification and each map's
    pointing game; then each map's pixel AUROC / AUPRO."""
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    names = [n for n in MAPS if any(n in r["maps"] for r in report.values())]
    head = "| subset | backbone | head | folds | accuracy | image AUROC | " + " | ".join(names) + " |"
    rows = ["**Pointing game** (share of defective images whose map maximum lies in the defect)", "",
            head, "|" + "---|" * (6 + len(names))]
    rows2 = ["", "**Pixel AUROC / AUPRO**", "", "| subset | backbone | head | folds | " + " | ".join(names) + " |",
             "|" + "---|" * (4 + len(names))]
    for r in report.values():
        c = r["classification"]
        folds = f"{r['folds_scored']}/{r['folds']}" if r.get("folds_scored", r["folds"]) != r["folds"] else str(r["folds"])
        key = f"| {r['subset']} | {r['backbone']} | {r['variant']} | {folds} |"
        rows.append(f"{key} {c['accuracy']:.3f} | {c['image_auroc']:.3f} | "
                    + " | ".join(fmt(r["maps"].get(n, {}).get("pointing_game")) for n in names) + " |")
        rows2.append(f"{key} " + " | ".join(
            f"{fmt(r['maps'][n]['pixel_auroc'])} / {fmt(r['maps'][n]['aupro'])}" if n in r["maps"] else "-"
            for n in names) + " |")
    return "\n".join(rows + rows2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", nargs="+", default=["toothbrush", "pill"])
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "vgg16"])
    parser.add_argument("--variants", nargs="+", default=["avg", "topk"])
    parser.add_argument("--vgg16-weights", default="/tmp/vgg16_oxford.pth")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--max-folds", type=int, default=None, help="score only the first folds (a partial run)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--heatmap-thres", type=float, default=0.7)
    parser.add_argument("--cache", default="/tmp/i12")
    parser.add_argument("--out", default="results/explain_study.json")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
    parser.add_argument("--compact", action="store_true", help="with --table: the README's two compact tables")
    args = parser.parse_args()
    if args.table:
        report = json.loads(Path(args.out).read_text())
        print(compact_tables(report) if args.compact else markdown_table(report))
        return
    torch.set_grad_enabled(True)
    out_path = Path(args.out)
    report = json.loads(out_path.read_text()) if out_path.exists() else {}
    for backbone in args.backbones:
        for subset in args.subsets:
            cache = torch.load(cache_path(Path(args.cache), subset, backbone, args.image_size), weights_only=True)
            for variant in args.variants:
                pooling, flip = parse_variant(variant)
                flipped = None
                if flip:
                    flipped = torch.load(cache_path(Path(args.cache), subset, backbone, args.image_size, True),
                                         weights_only=True)["frozen"]
                max_folds = args.max_folds or args.folds
                part = "" if max_folds == args.folds else f"_{max_folds}of{args.folds}"
                oof_file = Path(args.cache) / f"oof_{subset}_{backbone}_{variant}{part}.npz"
                start = time.perf_counter()
                oof = dict(np.load(oof_file)) if oof_file.exists() else {}
                if any(f"map_{name}" not in oof for name in MAPS):  # new, or made before a map was added
                    oof = run_folds(cache, flipped, backbone, pooling, args.vgg16_weights, args.folds, args.seed,
                                    max_folds, oof_file.with_suffix(""))
                    np.savez(oof_file, **oof)
                result = measure(oof, cache, args.heatmap_thres)
                result.update(subset=subset, backbone=backbone, variant=variant, folds=args.folds, seed=args.seed,
                              folds_scored=max_folds,
                              n_images=len(cache["labels"]), seconds=time.perf_counter() - start,
                              weights="Oxford ImageNet (backbone_weights file)" if backbone == "vgg16"
                              else "torchvision ImageNet")
                report[f"{subset}/{backbone}/{variant}{part}"] = result
                save_json(out_path, report)
                c = result["classification"]
                print(f"{subset:<11}{backbone:<13}{variant:<10} acc {c['accuracy']:.3f} AUROC {c['image_auroc']:.3f} | "
                      + "  ".join(f"{k} {v['pointing_game']:.2f}/{v['pixel_auroc']:.2f}/{v['aupro']:.2f}"
                                  for k, v in result["maps"].items()), flush=True)


if __name__ == "__main__":
    main()
