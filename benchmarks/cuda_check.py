"""Check the CUDA path end to end on the synthetic subset: train, predict, patch map, checkpoint.

Runs the same code as the notebooks with device "cuda" in fp32 and in the automatic mixed
precision, and prints the metrics of both so a reader can see they agree.

    python benchmarks/cuda_check.py --work-dir /tmp/cuda_check
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import runtime  # noqa: E402
from utils import inference  # noqa: E402
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils import dataloader, helper, metrics, postprocess  # noqa: E402
from utils import model as model_lib  # noqa: E402


def run(precision: str, device: torch.device, data_dir: Path, args) -> dict:
    """Train and evaluate once; return the metrics and timings."""
    runtime.set_seed(args.seed)
    samples = dataloader.index_subset(data_dir, "synthetic")
    train, test = dataloader.split_samples(samples, 0.2, args.seed)
    x_train = dataloader.load_images(data_dir, train, args.image_size)
    x_test = dataloader.load_images(data_dir, test, args.image_size)
    masks = dataloader.load_masks(data_dir, test, args.image_size)
    y_train = torch.tensor([s.label for s in train])
    y_test = np.array([s.label for s in test])
    amp = runtime.resolve_precision(precision, device)
    net = runtime.prepare_model(model_lib.CAMClassifier(args.backbone, pretrained=False), device, amp)
    mean, std = model_lib.normalisation(args.backbone, False)
    start = time.perf_counter()
    features, good = helper.frozen_pass(net, x_train, mean, std, batch_size=10, device=device,
                                        precision=amp, patch_images=y_train == 0)
    history = helper.train_model(net, x_train, y_train, mean=mean, std=std, epochs=args.epochs, lr=1e-3,
                                 class_weight=[1, 3], batch_size=10, target_train_accuracy=None,
                                 seed=args.seed, device=device, precision=amp, features=features,
                                 progress=False)
    memory, info = helper.build_patch_memory(good.to(device), size=2000, method="coreset", seed=args.seed)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    pred = inference.predict(net, x_test, mean, std, batch_size=10, device=device, precision=amp,
                          patch_memory=memory)
    infer_s = time.perf_counter() - start
    ckpt = Path(args.work_dir) / f"check_{amp}.pt"
    save_checkpoint(ckpt, net, {"backbone": args.backbone, "image_size": args.image_size,
                                       "pretrained": False}, [s.path for s in test])
    reloaded, _ = load_checkpoint(ckpt)
    again = inference.predict(runtime.prepare_model(reloaded, device, amp), x_test, mean, std, batch_size=10,
                           device=device, precision=amp)
    maps = postprocess.localizer_maps(pred["cam"], pred["p_anomaly"], pred["patch_map"])
    p = pred["p_anomaly"]
    return {
        "precision": amp, "final_loss": history["loss"][-1],
        "classification": metrics.classification_metrics(y_test, (p >= 0.5).astype(int), p),
        "pixel_auroc": {k: metrics.pixel_auroc(m, masks.numpy()) for k, m in maps.items()},
        "reload_max_diff": float(np.abs(again["p_anomaly"] - p).max()),
        "train_seconds": train_s, "images_per_second": len(x_test) / infer_s,
        "memory_device": str(memory.device), "patch_memory": info,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="/tmp/cuda_check", help="where the synthetic subset goes")
    parser.add_argument("--backbone", default="vgg16", help="vgg16 or mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=128, help="input size")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs")
    parser.add_argument("--seed", type=int, default=42, help="seed")
    args = parser.parse_args()
    device = runtime.resolve_device("auto")
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""))
    data_dir = Path(args.work_dir) / "data"
    dataloader.prepare_subset(data_dir, "synthetic", download=False, seed=args.seed)
    for precision in ("fp32", "auto"):
        result = run(precision, device, data_dir, args)
        print(result, flush=True)


if __name__ == "__main__":
    main()
