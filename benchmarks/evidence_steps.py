"""How long to train the evidence head: its held-out decision and map after each number of steps.

On the first fold of the study's five-fold split (seed 42) of each category: the patch memory of
the fold's good training images (the fold pipeline's own `helper.fit`, published head off), the
group-excluded residuals of the training images, then the evidence head trained for up to
--steps full-batch steps, with and without the correction penalty. After the steps listed in
--probe, the held-out images are scored: image AUROC, and the map's pixel AUROC, AUPRO and
pointing game beside those of the patch distance it starts from.

    python benchmarks/evidence_steps.py --subsets toothbrush pill --backbones mobilenet_v2 \\
        --out results/reference/evidence_steps.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from utils import dataloader, evidence, helper, metrics, patchknn  # noqa: E402
from utils import model as model_lib  # noqa: E402
from utils.checkpoint import save_json  # noqa: E402
from utils.constants import GOOD  # noqa: E402
from utils.postprocess import upsample_maps  # noqa: E402
import study  # noqa: E402  (the study's frozen-pass cache and configuration)


def held_out_metrics(head, inputs, y: np.ndarray, masks: np.ndarray, size: int) -> dict:
    """Image AUROC of the head and the pixel metrics of its map and of the distance map, held out."""
    head.eval()
    with torch.no_grad():
        image, patch = head(inputs.residual.float(), inputs.distance)
    out = {"image_auroc": float(roc_auc_score(y, image.numpy()))}
    for name, m in (("evidence", patch), ("distance", inputs.distance)):
        up = upsample_maps(m, (size, size)).numpy()
        out[name] = {"pixel_auroc": metrics.pixel_auroc(up, masks), "aupro": metrics.aupro(up, masks),
                     "pointing_game": metrics.pointing_game(up[y == 1], masks[y == 1])}
    return out


def run(args, subset: str, backbone: str, penalty: float) -> dict:
    """Per-step held-out metrics of one head trained on fold 0 of `subset`."""
    weights = (model_lib.load_backbone_weights(args.vgg16_weights, backbone)
               if backbone == "vgg16" and args.vgg16_weights else None)
    samples = dataloader.index_subset(args.data_dir, subset)
    masks = dataloader.load_masks(args.data_dir, samples, 224)
    cpu = torch.device("cpu")
    frozen, _ = study.frozen_cache(args, subset, backbone, 224, weights, samples, cpu, "fp32")
    config = study.study_config(args, subset, backbone, 224, weights, {"head": "evidence"})
    labels = torch.tensor([s.label for s in samples])
    train_s, test_s = next(iter(dataloader.kfold_splits(samples, 5, args.seed)))
    train, test = dataloader.positions(samples, train_s), dataloader.positions(samples, test_s)
    fit_idx, _ = helper.calibration_split(labels[train], config["calibration_share"], args.seed)
    fit_idx = train[fit_idx]
    y = labels[fit_idx]
    memory, memory_images, _ = helper.patch_memory_of(config, frozen, fit_idx[y == GOOD])
    inputs = helper.evidence_training_inputs(config, frozen, labels, fit_idx, memory, memory_images, cpu)
    rule = patchknn.patch_rule_of(config)
    held = evidence.evidence_inputs(lambda i: frozen.embeddings_of(test[i], rule), len(test), memory)
    y_test, m_test = labels[test].numpy(), masks[test].numpy()
    evidence.CORRECTION_PENALTY = penalty
    head = evidence.EvidenceHead(memory.shape[1])
    probes = {}

    def probe(step, loss, accuracy):
        if step in args.probe:
            probes[step] = {"train_loss": loss, **held_out_metrics(head, held, y_test, m_test, 224)}
            head.train()

    evidence.start_as_patch_map(head, inputs, y, config["class_weight"])
    probes[0] = held_out_metrics(head, held, y_test, m_test, 224)
    evidence.train_head(head, inputs, y, class_weight=config["class_weight"], device=cpu, steps=max(args.probe),
                        on_epoch_end=probe)
    return probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(study.DEFAULT_DATA))
    parser.add_argument("--subsets", nargs="+", default=["toothbrush", "pill"])
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2"])
    parser.add_argument("--vgg16-weights", default=None)
    parser.add_argument("--penalties", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--probe", type=int, nargs="+", default=[10, 20, 40, 80, 200])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--cache", default="/tmp/study_cache")
    parser.add_argument("--out", default="results/evidence_steps.json")
    args = parser.parse_args()
    args.folds, args.device, args.precision, args.scratch = 5, "cpu", "fp32", "/tmp/study_scratch"
    report = {}
    for subset in args.subsets:
        for backbone in args.backbones:
            for penalty in args.penalties:
                key = f"{subset}/{backbone}/penalty {penalty:g}"
                report[key] = run(args, subset, backbone, penalty)
                for step, r in sorted(report[key].items()):
                    e, d = r["evidence"], r["distance"]
                    print(f"{key} step {step:3d}: image AUROC {r['image_auroc']:.3f} | evidence "
                          f"{e['pixel_auroc']:.3f}/{e['aupro']:.3f}/{e['pointing_game']:.2f} | distance "
                          f"{d['pixel_auroc']:.3f}/{d['aupro']:.3f}/{d['pointing_game']:.2f}", flush=True)
                save_json(args.out, report)


if __name__ == "__main__":
    main()
