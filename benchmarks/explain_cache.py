"""Run the frozen layers once per category and backbone and cache what the explanation study needs.

For every image of the subset (train and test pooled, the cross-validation's pool): the frozen
output (the training cache), the stride-8 tapped activation (Grad-CAM / LayerCAM at stride 8),
optionally the frozen output of the horizontally flipped image (flip augmentation on the cache),
labels, defect types, paths and the 224 px masks. One file per (subset, backbone, image_size).

    python benchmarks/explain_cache.py --subsets toothbrush pill --backbones mobilenet_v2 vgg16 \
        --vgg16-weights /tmp/vgg16_oxford.pth --out /tmp/i12
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.checkpoint import atomic_write_bytes  # noqa: E402
from utils import dataloader, helper  # noqa: E402
from utils import model as model_lib  # noqa: E402

# ../shared next to the repository; $MVTEC_AD_DIR overrides (as in the tests)
DEFAULT_DATA = Path(os.environ.get("MVTEC_AD_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_anomaly_detection"))


def cache_path(out: Path, subset: str, backbone: str, image_size: int, flipped: bool = False) -> Path:
    """Where the cache of one (subset, backbone, size) lives; the flipped pass is a separate file."""
    return out / f"{subset}_{backbone}_{image_size}{'_flip' if flipped else ''}.pt"


def build_model(backbone: str, vgg16_weights: str | None, pooling: str = "avg") -> model_lib.CAMClassifier:
    """The classifier with real ImageNet weights: the Oxford file for VGG16, torchvision's otherwise."""
    weights = model_lib.load_backbone_weights(vgg16_weights, backbone) if backbone == "vgg16" and vgg16_weights else None
    return model_lib.CAMClassifier(backbone, pretrained=True, weights=weights, pooling=pooling).eval()


@torch.no_grad()
def frozen_and_tap(net: model_lib.CAMClassifier, images: torch.Tensor, mean, std, batch_size: int,
                   tap: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Frozen output (N, C, h, w) and the module `tap`'s output (N, C8, h8, w8), fp32 on the CPU."""
    outs, taps = [], []
    for start in range(0, len(images), batch_size):
        x = dataloader.normalise(images[start:start + batch_size], mean, std)
        out, tapped = net.frozen_features(x, (tap,) if tap is not None else ())
        outs.append(out.contiguous())
        if tap is not None:
            taps.append(tapped[0].contiguous())
    return torch.cat(outs), (torch.cat(taps) if taps else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--subsets", nargs="+", default=["toothbrush", "pill"])
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "vgg16"])
    parser.add_argument("--vgg16-weights", default=None, help="backbone weights file for VGG16 (real ImageNet)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--flip", action="store_true", help="also cache the flipped images' frozen output")
    parser.add_argument("--out", default="/tmp/i12")
    args = parser.parse_args()
    out = Path(args.out)
    for flipped in ([False, True] if args.flip else [False]):
        for backbone in args.backbones:
            net = build_model(backbone, args.vgg16_weights)
            mean, std = (net_weights_norm(backbone, args.vgg16_weights))
            for subset in args.subsets:
                path = cache_path(out, subset, backbone, args.image_size, flipped)
                if path.exists():
                    print(f"{path} exists, kept", flush=True)
                    continue
                start = time.perf_counter()
                samples = dataloader.index_subset(args.data_dir, subset)
                images = dataloader.load_images(args.data_dir, samples, args.image_size)
                if flipped:
                    frozen, _ = frozen_and_tap(net, images.flip(-1), mean, std, args.batch_size, None)
                    content = {"frozen": frozen}
                else:
                    frozen, tapped = frozen_and_tap(net, images, mean, std, args.batch_size, net.spec.taps[0])
                    masks = dataloader.load_masks(args.data_dir, samples, args.image_size)
                    content = {"frozen": frozen, "tap": tapped, "tap_index": net.spec.taps[0],
                               "labels": torch.tensor([s.label for s in samples]),
                               "types": [s.defect_type for s in samples], "paths": [s.path for s in samples],
                               "masks": masks, "mean": list(mean), "std": list(std)}
                atomic_write_bytes(path, lambda f: torch.save(content, f))
                print(f"{path}: {len(samples)} images, {time.perf_counter() - start:.0f} s", flush=True)


def net_weights_norm(backbone: str, vgg16_weights: str | None):
    """The input mean/std of the weights used (the file's for VGG16)."""
    if backbone == "vgg16" and vgg16_weights:
        w = model_lib.load_backbone_weights(vgg16_weights, backbone)
        return w.mean, w.std
    return model_lib.normalisation(backbone, True)


if __name__ == "__main__":
    main()
