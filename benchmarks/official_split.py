"""The patch map on the official split (good training images only): what each lever does to it.

For each category, the frozen MobileNetV2 features of train/good (the memory) and test/ (scored
against the masks) are computed once per input size, then each lever is changed alone from the
repository's map as it was before this study (`BEFORE`), and the chosen combination is measured
last. Levers: the Gaussian smoothing of the map (sigma in patch cells of the stride-8 grid), the
memory size, PatchCore's 3x3 neighbourhood aggregation against the local averaging, the image
score reweighted by the nearest neighbours' density (PatchCore's eq. 7), the feature layers, and
448 px input. Run from the repository root:

    python benchmarks/official_split.py                   # pill and toothbrush, 224 and 448 px
    python benchmarks/official_split.py --quick           # smoke run: a few images, small memory

Each row gives pixel AUROC, AUPRO (to 30 % FPR) and image AUROC, and the seconds the memory
and the scoring took on this machine (the CPU is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # so `utils` imports when run as `python benchmarks/official_split.py`

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from utils import metrics, patchknn, runtime  # noqa: E402
from utils.checkpoint import atomic_write_bytes, save_json  # noqa: E402
from utils.constants import MVTEC_DIR_ENV  # noqa: E402
from utils.dataloader import index_subset, load_images, load_masks, official_split  # noqa: E402
from utils.model import CAMClassifier, load_backbone_weights, normalisation  # noqa: E402
from utils.postprocess import upsample_maps  # noqa: E402

DEFAULT_DATA_DIR = os.environ.get(MVTEC_DIR_ENV) or REPO_ROOT.parent / "shared" / "data" / "mvtec_anomaly_detection"
# Frozen modules whose outputs may feed the patch embedding. MobileNetV2 (the study): the ends of
# the stride-4 stage (3: 24 ch), the stride-8 stage (6: 32 ch), the first stride-16 stage (10: 64 ch)
# and the stride-16 stage the repository taps (13: 96 ch). VGG16 (the check that the rule carries):
# conv4_3 (22: 512 ch, stride 8) and pool4 (23: 512 ch, stride 16), the repository's taps.
MODULES = {"mobilenet_v2": (3, 6, 10, 13), "vgg16": (22, 23)}


@dataclass(frozen=True)
class Variant:
    """One way to compute the patch map; `BEFORE` is the repository's map before this study."""

    layers: tuple[int, ...] = (6, 13)
    aggregation: str = "average"  # "average": 3x3 local mean per layer; "patchcore": 3x3 neighbourhood kept
    balance: bool = False  # divide each layer by its spread over the good patches, so each weighs the same
    memory: float | int = 10000  # rows (int) or a share of the good patches (float)
    sigma: float = 0.0  # Gaussian blur of the map, in patch cells (0: none)
    image_score: str = "max"  # "max": the map's maximum; "reweighted": PatchCore's eq. 7
    image_size: int = 224


BEFORE = Variant()
DEFAULT = Variant(layers=(6,), sigma=0.5)  # Training's patch rule since this study (patchknn.PatchRule())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                   help="folder holding MVTec AD-format subsets (default: $MVTEC_AD_DIR, else ../shared/data/mvtec_anomaly_detection)")
    p.add_argument("--subsets", nargs="+", default=["pill", "toothbrush"], help="categories (default: %(default)s)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448], help="input sides in px (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="coreset seed (default: %(default)s)")
    p.add_argument("--backbone", default="mobilenet_v2", choices=sorted(MODULES),
                   help="mobilenet_v2: every lever; vgg16: the rule before against the default (default: %(default)s)")
    p.add_argument("--backbone-weights", default=None,
                   help="backbone weights file (the offline VGG16: python -m utils.offline_weights --vgg16-oxford PATH)")
    p.add_argument("--cache", default=None, help="folder to keep the extracted features in between runs (default: none)")
    p.add_argument("--out", default="results/official_split_levers.json", help="JSON with every figure (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke run: 12 training and 12 test images, 500-row memory")
    p.add_argument("--table", action="store_true", help="print the lever table of --out as markdown and stop")
    return p.parse_args(argv)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), cpu)
        cpu += " (avx512_bf16)" if "avx512_bf16" in info else " (no avx512_bf16)"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "load_average": os.getloadavg()}


@torch.no_grad()
def extract(data_dir: str, subset: str, image_size: int, quick: bool, backbone: str,
            weights_path: str | None) -> dict[str, Any]:
    """Frozen outputs {module: (N, C, h, w)} of the official train (good) and test images, the test
    masks (T, S, S) bool and labels (T,), and the frozen pass's seconds."""
    train, test = official_split(index_subset(data_dir, subset))
    if quick:
        train, test = train[:12], test[:: max(1, len(test) // 12)]
    device = torch.device("cpu")
    precision = runtime.resolve_precision("auto", device)
    weights = load_backbone_weights(weights_path, backbone) if weights_path else None
    net = runtime.prepare_model(CAMClassifier(backbone, pretrained=True, weights=weights), device, precision).eval()
    mean, std = (weights.mean, weights.std) if weights else normalisation(backbone, True)
    modules = MODULES[backbone]
    out: dict[str, Any] = {"precision": precision}
    start = time.perf_counter()
    for name, part in (("train", train), ("test", test)):
        images = load_images(data_dir, part, image_size)
        taps: dict[int, list[torch.Tensor]] = {m: [] for m in modules}
        for lo in range(0, len(images), 10):
            x = runtime.to_input(images[lo:lo + 10], mean, std, device, precision)
            with runtime.autocast(device, precision):
                _, tapped = net.frozen_features(x, modules)
            for m, t in zip(modules, tapped):
                taps[m].append(t.float().cpu())
        out[name] = {m: torch.cat(v) for m, v in taps.items()}
    out["frozen_seconds"] = time.perf_counter() - start
    masks = load_masks(data_dir, test, image_size)
    out["masks"] = masks if masks is not None else torch.zeros(len(test), image_size, image_size, dtype=torch.bool)
    out["labels"] = torch.tensor([s.label for s in test])
    return out


def embed(taps: dict[int, torch.Tensor], layers: tuple[int, ...], aggregation: str,
          scales: dict[int, float] | None = None) -> torch.Tensor:
    """Patch embeddings (N, D, h, w) of the frozen outputs `taps` of `layers`, on the first layer's
    grid; with `scales`, each layer's pooled features are divided by its scale first."""
    if aggregation == "average":
        # the repository's rule (patchknn.patch_embeddings), for any number of layers
        pooled = [F.avg_pool2d(taps[m], 3, stride=1, padding=1, count_include_pad=False) / (scales or {}).get(m, 1.0)
                  for m in layers]
        size = pooled[0].shape[-2:]
        return torch.cat([F.interpolate(p, size=size, mode="bilinear", align_corners=False) if p.shape[-2:] != size
                          else p for p in pooled], dim=1)
    return patchcore_embed([taps[m] for m in layers])


def patchcore_embed(maps: list[torch.Tensor], dim: int = 1024) -> torch.Tensor:
    """PatchCore's local aggregation of layer outputs [(N, C_l, h_l, w_l)] -> (N, dim, h0, w0): each
    position's 3x3 neighbourhood (zero padded) of each layer, resized to `dim` values per layer by
    adaptive average pooling, the coarser layers' neighbourhoods resized bilinearly to the first
    layer's grid, then the layers' `dim`-vectors pooled together to `dim` values."""
    n, _, h0, w0 = maps[0].shape
    per_layer = []
    for m in maps:
        c, h, w = m.shape[1:]
        hood = F.unfold(m, kernel_size=3, padding=1).view(n, c * 9, h, w)  # (N, C*9, h, w)
        if (h, w) != (h0, w0):
            hood = F.interpolate(hood, size=(h0, w0), mode="bilinear", align_corners=False)
        rows = hood.permute(0, 2, 3, 1).reshape(-1, 1, c * 9)  # (N*h0*w0, 1, C*9)
        per_layer.append(F.adaptive_avg_pool1d(rows, dim))  # (P, 1, dim)
    stacked = torch.cat(per_layer, dim=1).reshape(len(per_layer[0]), 1, -1)  # (P, 1, L*dim)
    out = F.adaptive_avg_pool1d(stacked, dim)[:, 0]  # (P, dim)
    return out.view(n, h0, w0, dim).permute(0, 3, 1, 2)


def reweighted_scores(queries: torch.Tensor, distances: torch.Tensor, nearest: torch.Tensor,
                      memory: torch.Tensor, b: int = 9) -> torch.Tensor:
    """PatchCore's image score (eq. 7) per image: s* (the largest patch distance) times
    1 - exp(s*) / sum over the b memory rows nearest to m* (the row nearest the worst patch) of
    exp(||worst patch - row||). An outlier against a sparse part of the memory scores lower.
    queries (T, P, D), distances (T, P) and nearest (T, P) of each patch; memory (M, D) -> (T,)."""
    worst = distances.argmax(dim=1)  # (T,)
    t = torch.arange(len(worst))
    s_star, m_star, q = distances[t, worst], nearest[t, worst], queries[t, worst]  # (T,), (T,), (T, D)
    centre = memory[m_star]  # (T, D)
    hood = torch.cdist(centre, memory).topk(min(b, len(memory)), largest=False).indices  # (T, b)
    d = torch.linalg.vector_norm(q[:, None] - memory[hood], dim=2)  # (T, b)
    weight = 1 - 1 / torch.exp(d - s_star[:, None]).sum(dim=1)  # exp(s*) / sum exp(d), stably
    return weight * s_star


def spreads(taps: dict[int, torch.Tensor], layers: tuple[int, ...]) -> dict[int, float]:
    """Each layer's spread over the good images: the root mean squared distance of its 3x3-averaged
    features (N, C, h, w) to their mean. Dividing by it gives every layer the same share of the
    squared patch distance, whatever its channel count and activation scale."""
    out = {}
    for m in layers:
        f = F.avg_pool2d(taps[m], 3, stride=1, padding=1, count_include_pad=False)
        out[m] = float(((f - f.mean(dim=(0, 2, 3), keepdim=True)) ** 2).sum(dim=1).mean().sqrt())
    return out


def evaluate(data: dict[str, Any], v: Variant, seed: int, quick: bool) -> dict[str, Any]:
    """Pixel AUROC, AUPRO, image AUROC and seconds of variant v on one category's features."""
    scales = spreads(data["train"], v.layers) if v.balance else None
    train = embed(data["train"], v.layers, v.aggregation, scales)  # (N, D, h, w)
    test = embed(data["test"], v.layers, v.aggregation, scales)  # (T, D, h, w)
    patches = patchknn.flatten_patches(train)
    size = v.memory if isinstance(v.memory, int) else max(1, round(v.memory * len(patches)))
    size = min(size, 500) if quick else size
    start = time.perf_counter()
    memory = patches[patchknn.build_memory(patches, size, "coreset", seed)]
    memory_seconds = time.perf_counter() - start
    t, d, h, w = test.shape
    queries = test.permute(0, 2, 3, 1).reshape(t, h * w, d)
    start = time.perf_counter()
    nearest, distance = patchknn.nearest_rows(queries.reshape(-1, d), memory)
    nearest, distance = nearest.view(t, h * w), distance.view(t, h * w)
    # the library's blur (patchknn.PatchRule.smooth), so each row measures the map Training would give
    maps = patchknn.PatchRule(sigma=v.sigma).smooth(upsample_maps(distance.view(t, h, w), (v.image_size,) * 2)).numpy()
    if v.image_score == "max":
        scores = distance.amax(dim=1)
    else:
        scores = reweighted_scores(queries, distance, nearest, memory)
    score_seconds = time.perf_counter() - start
    masks, labels = data["masks"].numpy(), data["labels"].numpy()
    image = metrics.classification_metrics(labels, labels, scores.numpy())["image_auroc"]
    return {"variant": v.__dict__, "dim": d, "memory_rows": len(memory), "good_patches": len(patches),
            "patches_mib": patches.nelement() * 4 / 2**20, "test_patches": t * h * w,
            "pixel_auroc": metrics.pixel_auroc(maps, masks), "aupro": metrics.aupro(maps, masks),
            "pointing_game": metrics.pointing_game(maps[labels == 1], masks[labels == 1]), "image_auroc": image, "memory_seconds": memory_seconds, "score_seconds": score_seconds}


def levers(sizes: list[int], backbone: str = "mobilenet_v2") -> dict[str, list[tuple[str, Variant]]]:
    """Lever -> [(label, variant)], each changing one thing of BEFORE; the first is BEFORE itself.
    For VGG16, the rule before, the layers and the blur on its own taps (its default keeps both)."""
    if backbone == "vgg16":
        both, fine = Variant(layers=(22, 23)), Variant(layers=(22,))
        return {"before": [("224 px, conv4_3 + pool4, 3x3 mean, 10,000 rows, no blur, max", both)],
                "layers": [("conv4_3 alone", fine), ("conv4_3 alone, sigma 0.5 cells", replace(fine, sigma=0.5))],
                "blur": [("conv4_3 + pool4, sigma 0.5 cells: the default", replace(both, sigma=0.5))]}
    out = {
        "before": [("224 px, layers 6+13, 3x3 mean, 10,000 rows, no blur, max", BEFORE)],
        "smoothing": [(f"sigma {s:g} cells ({s * patchknn.PATCH_STRIDE:g} px)", replace(BEFORE, sigma=s)) for s in (0.25, 0.5, 1.0, 2.0)],
        "memory": [(f"{s:.0%} of the good patches", replace(BEFORE, memory=s)) for s in (0.01, 0.1, 0.25)],
        "aggregation": [("PatchCore 3x3 neighbourhood, 1024 dims", replace(BEFORE, aggregation="patchcore"))],
        "image score": [("reweighted (PatchCore eq. 7, b=9)", replace(BEFORE, image_score="reweighted"))],
        "layers": [(f"layers {'+'.join(map(str, ls))}", replace(BEFORE, layers=ls))
                   for ls in ((6,), (13,), (6, 10), (6, 10, 13), (3, 6))],
        "layer balance": [(f"layers {'+'.join(map(str, ls))}, each layer scaled to one spread",
                           replace(BEFORE, layers=ls, balance=True)) for ls in ((6, 13), (6, 10, 13), (3, 6))],
    }
    out["input size"] = [(f"{s} px", replace(BEFORE, image_size=s)) for s in sizes if s != 224]
    # The second round: the fine layer alone (the first round's best) with the other levers again.
    fine = replace(BEFORE, layers=(6,))
    out["layer 6 with"] = [
        ("sigma 0.5 cells: the default", DEFAULT),
        *[(f"sigma {s:g} cells", replace(fine, sigma=s)) for s in (0.75, 1.0)],
        ("10% of the good patches, sigma 0.5 cells", replace(DEFAULT, memory=0.1)),
        ("reweighted image score, sigma 0.5 cells", replace(DEFAULT, image_score="reweighted")),
        ("layers 3+6 (stride-4 grid), sigma 0.5 cells", replace(DEFAULT, layers=(3, 6))),
        *[(f"{s} px", replace(fine, image_size=s)) for s in sizes if s != 224],
        *[(f"{s} px, sigma {g:g} cells", replace(fine, image_size=s, sigma=g)) for s in sizes if s != 224
          for g in (0.5, 1.0)],
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return 0
    report: dict[str, Any] = {
        "command": "python benchmarks/official_split.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine(), "backbone": args.backbone,
        "weights": Path(args.backbone_weights).name if args.backbone_weights else "torchvision ImageNet", "results": {}}
    print(report["command"], "\nmachine:", report["machine"], flush=True)
    for subset in args.subsets:
        data = {s: load_features(args, subset, s) for s in sorted(set([224, *args.sizes]))}
        rows = report["results"][subset] = {"frozen_seconds": {s: d["frozen_seconds"] for s, d in data.items()}}
        for lever, variants in levers(args.sizes, args.backbone).items():
            for label, v in variants:
                row = evaluate(data[v.image_size], v, args.seed, args.quick)
                rows.setdefault(lever, {})[label] = row
                print(f"{subset:<11}{lever:<14}{label:<58}pix {row['pixel_auroc']:.3f}  AUPRO {row['aupro']:.3f}  "
                      f"point {row['pointing_game']:.3f}  "
                      f"img {row['image_auroc'] if row['image_auroc'] is None else round(row['image_auroc'], 3)}  "
                      f"mem {row['memory_seconds']:.1f} s  score {row['score_seconds']:.1f} s", flush=True)
                save_json(args.out, report)  # a long run interrupted keeps what it measured
    print_summary(report)
    save_json(args.out, report)
    print("wrote", args.out)
    return 0


def markdown_table(report: dict[str, Any]) -> str:
    """One row per lever and variant: pixel AUROC, AUPRO, pointing game and image AUROC per
    category, the default in bold."""
    subsets = list(report["results"])
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    head = "| lever | variant | " + " | ".join(f"{s} pixel AUROC | {s} AUPRO | {s} pointing | {s} image AUROC"
                                               for s in subsets) + " |"
    lines = [head, "|---|---|" + "---:|" * 4 * len(subsets)]
    first = report["results"][subsets[0]]
    for lever, variants in first.items():
        if lever == "frozen_seconds":
            continue
        for label in variants:
            cells = []
            for s in subsets:
                r = report["results"][s][lever][label]
                cells += [fmt(r[k]) for k in ("pixel_auroc", "aupro", "pointing_game", "image_auroc")]
            row = f"| {lever} | {label} | " + " | ".join(cells) + " |"
            lines.append(row.replace(label, f"**{label}**") if "the default" in label else row)
    return "\n".join(lines)


def print_summary(report: dict[str, Any]) -> None:
    """Per category: the map before this study, the default since, and the gain against the issue's
    target (+0.01 pixel AUROC and AUPRO, no loss)."""
    print(f"\n{'category':<12}{'map':<10}{'pixel AUROC':>12}{'AUPRO':>8}{'pointing':>9}{'image AUROC':>12}")
    for subset, rows in report["results"].items():
        before = rows["before"][next(iter(rows["before"]))]
        default = next(r for group in rows.values() if isinstance(group, dict)
                       for label, r in group.items() if isinstance(r, dict) and "the default" in str(label))
        for name, r in (("before", before), ("default", default)):
            img = "n/a" if r["image_auroc"] is None else f"{r['image_auroc']:.3f}"
            print(f"{subset:<12}{name:<10}{r['pixel_auroc']:>12.3f}{r['aupro']:>8.3f}{r['pointing_game']:>9.3f}{img:>12}")
        gains = {k: default[k] - before[k] for k in ("pixel_auroc", "aupro")}
        met = all(g >= 0.01 for g in gains.values())
        print(f"{subset:<12}{'gain':<10}{gains['pixel_auroc']:>+12.4f}{gains['aupro']:>+8.4f}"
              f"   target +0.01 each: {'met' if met else 'NOT met'}")


def load_features(args: argparse.Namespace, subset: str, size: int) -> dict[str, Any]:
    """`extract`, kept in --cache between runs."""
    name = f"{subset}_{size}_m{'-'.join(map(str, MODULES[args.backbone]))}{'_quick' if args.quick else ''}.pt"
    cache = Path(args.cache) / name if args.cache else None
    if cache is not None and cache.is_file():
        return torch.load(cache, weights_only=True)
    data = extract(args.data_dir, subset, size, args.quick, args.backbone, args.backbone_weights)
    if cache is not None:
        atomic_write_bytes(cache, lambda f: torch.save(data, f))
    return data


if __name__ == "__main__":
    sys.exit(main())
