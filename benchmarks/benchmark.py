"""Benchmark training and CAM inference: the published plain loop against this repository's fast path.

Every measured way runs in its own child process (this script re-invoked with the hidden `--only`
flag), so each peak-memory figure belongs to that way alone. Run from the repository root:

    python benchmarks/benchmark.py            # 50 images, 10 epochs, about 10 minutes on 2 CPU cores
    python benchmarks/benchmark.py --quick    # smoke run: 10 images, 2 epochs
    python benchmarks/benchmark.py --subset pill --n-images 300 --ways train_plain_split,notebook
                                              # the whole Training.ipynb against the plain loop
    python benchmarks/benchmark.py --subset pill --n-images 300 --ways notebook,notebook_auto \
        --vgg16-weights /tmp/vgg16_oxford.pth     # the default head's price where a head decides
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # so `utils` imports when run as `python benchmarks/benchmark.py`

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

from utils import helper, inference, runtime  # noqa: E402
from utils.checkpoint import save_json  # noqa: E402
from utils.constants import IMAGENET_MEAN, IMAGENET_STD, SYNTHETIC_SUBSET  # noqa: E402
from utils.dataloader import Sample, index_subset, load_images, split_subset  # noqa: E402
from utils.model import CAMClassifier  # noqa: E402
from utils.synthetic import generate_synthetic_subset  # noqa: E402

DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "mvtec_anomaly_detection"
CLASS_WEIGHT = (1.0, 3.0)  # Good, Anomaly, as published
LR = 1e-4
TRAINING_TARGET = 10.0  # images/s of the repository's training over the plain loop, 10-epoch run
# The whole Training.ipynb (default settings, VGG16 224 px, early stopping off) over the plain loop on its
# training split: 6x on a CPU with native bf16, 3x on one without (fp32).
NOTEBOOK_TARGET = {True: 6.0, False: 3.0}
NOTEBOOK_OVERHEAD_TARGET = 0.15  # at most this share of the notebook outside decoding, the frozen pass, the epochs
NOTEBOOK_TEST_SIZE = 0.2  # Training.ipynb's default test_size
INFERENCE_TARGET = 4.0  # VGG16 224 px inference with heatmaps, fast path over fp32
# The whole notebook with head="auto" (the default) at most 1.5x as long as with head="published":
# a throughput ratio of at least 1 / 1.5
AUTO_TARGET = 1 / 1.5

# name -> (section, label shown in the table)
WAYS: dict[str, tuple[str, str]] = {
    "train_plain": ("training", "plain loop (PNG decode every step, full VGG16 fp32)"),
    "train_repo": ("training", "repository (decode once + cached frozen pass, auto precision)"),
    "train_repo_fp32": ("training", "repository fp32 (decode once + cached frozen pass)"),
    "train_plain_split": ("notebook", "plain loop on the notebook's training split (training only)"),
    "notebook": ("notebook", "whole Training.ipynb via papermill (peak RSS: papermill, not its kernel)"),
    "notebook_evidence": ("notebook", "whole Training.ipynb, head=\"evidence\" (peak RSS: papermill)"),
    "notebook_auto": ("notebook", "whole Training.ipynb, head=\"auto\", the default (peak RSS: papermill)"),
    "infer_vgg16_fp32": ("inference", "VGG16 fp32"),
    "infer_vgg16_fast": ("inference", "VGG16 fast path (auto precision, channels-last)"),
    "infer_mobilenet_v2_fp32": ("inference", "MobileNetV2 fp32"),
    "infer_mobilenet_v2_fast": ("inference", "MobileNetV2 fast path (auto precision, channels-last)"),
}
# The default run: the notebook ways take a quarter of an hour on ~300 images, so they are asked for by name.
DEFAULT_WAYS = [w for w, (section, _) in WAYS.items() if section != "notebook"]
# (numerator way, denominator way, target or None)
RATIOS = (
    ("train_repo", "train_plain", TRAINING_TARGET),
    ("train_repo_fp32", "train_plain", None),
    ("notebook", "train_plain_split", NOTEBOOK_TARGET[runtime.cpu_supports_bf16()]),
    ("notebook_evidence", "train_plain_split", None),
    ("notebook_auto", "notebook", AUTO_TARGET),  # the default head's price against the published head's
    ("infer_vgg16_fast", "infer_vgg16_fp32", INFERENCE_TARGET),
    ("infer_mobilenet_v2_fast", "infer_mobilenet_v2_fp32", None),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; --quick shrinks the run to a smoke test."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR),
                   help="folder holding MVTec AD-format subsets (default: ../shared/data/mvtec_anomaly_detection "
                        "beside the repository); when the subset is missing there, a synthetic subset is "
                        "generated in --work-dir instead")
    p.add_argument("--subset", default="toothbrush", help="subset (category) to read (default: %(default)s)")
    p.add_argument("--work-dir", default=None,
                   help="where the synthetic fallback subset is generated (default: a folder in the system temp dir)")
    p.add_argument("--synthetic-size", type=int, default=1024,
                   help="side in px of the synthetic fallback images (default: %(default)s, as MVTec AD)")
    p.add_argument("--n-images", type=int, default=50,
                   help="use the first N indexed images of the subset (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs, early stopping off (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=10, help="batch size everywhere (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="network input size in px (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed inference passes over the images after the warm-up; the median counts "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads in each child; 0 keeps torch's default (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or auto (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="seed of weights and batch order (default: %(default)s)")
    p.add_argument("--vgg16-weights", default=None,
                   help="the notebook ways' VGG16 weights file (python -m utils.offline_weights --vgg16-oxford "
                        "PATH); default: random weights, where no head learns and head=\"auto\" keeps the "
                        "patch map, so its price then leaves out the chosen head's fit")
    p.add_argument("--ways", default=",".join(DEFAULT_WAYS),
                   help=f"comma-separated ways to measure (default: %(default)s; also: "
                        f"{','.join(w for w in WAYS if w not in DEFAULT_WAYS)})")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 10 images and 2 epochs (overrides --n-images and --epochs)")
    p.add_argument("--out", default="results/benchmark.json",
                   help="JSON file for the results, written atomically (default: %(default)s)")
    # Internal: run one way in this process and write its result to --child-out.
    p.add_argument("--only", choices=sorted(WAYS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n_images, args.epochs = 10, 2
    unknown = sorted(set(args.ways.split(",")) - set(WAYS))
    if unknown:
        p.error(f"--ways has unknown names {unknown}; choose from {list(WAYS)}.")
    for name in ("n_images", "epochs", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer.")
    return args


# ---------------------------------------------------------------- machine and data


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_bf16_flags() -> list[str]:
    """Which of the CPU flags behind fast bf16 matmuls /proc/cpuinfo lists (AMX is ~4x AVX512-BF16)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in ("avx512_bf16", "amx_bf16") if f in flags]


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the timings depend on: CPU, torch, threads, bf16 support and how busy the machine is."""
    info = {
        "cpu": cpu_model(),
        "cpu_bf16_flags": cpu_bf16_flags(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": runtime.cpu_supports_bf16(),
        "auto_precision": runtime.resolve_precision("auto", device),
        "device": str(device),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def resolve_data(args: argparse.Namespace) -> tuple[Path, str, bool]:
    """(data folder, subset name, synthetic?): the real subset if present, else a generated synthetic one.

    The synthetic fallback is written at --synthetic-size px (1024 like MVTec AD) so that decoding
    costs what a user's images cost, with about as many Good as defect images among the first N.
    """
    data_dir = Path(args.data_dir)
    if (data_dir / args.subset).is_dir():
        return data_dir, args.subset, False
    n, size = args.n_images, args.synthetic_size
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / "cam-benchmark"
    work = work / f"n{n}_{size}px"  # other settings get their own folder (the generator refuses to mix)
    generate_synthetic_subset(work / SYNTHETIC_SUBSET, seed=args.seed, n_train_good=n // 2 + 1,
                              n_test_good=1, n_per_defect=n // 6 + 1, image_size=size)
    return work, SYNTHETIC_SUBSET, True


def select_samples(data_dir: Path, subset: str, n_images: int) -> list[Sample]:
    """The first `n_images` samples of the subset's deterministic index."""
    samples = index_subset(data_dir, subset)
    if n_images > len(samples):
        raise ValueError(
            f"--n-images {n_images} asks for more images than {data_dir / subset} holds ({len(samples)}); "
            f"lower --n-images."
        )
    return samples[:n_images]


def image_megapixels(path: Path) -> str:
    """'WxH MODE' of one image file, for the printout."""
    with Image.open(path) as img:
        return f"{img.size[0]}x{img.size[1]} {img.mode}"


# ---------------------------------------------------------------- the published plain loop (baseline)


class PlainPNGDataset(Dataset):
    """The published input pipeline: every __getitem__ opens, decodes, resizes and normalises one PNG."""

    def __init__(self, paths: list[Path], labels: list[int], size: int) -> None:
        self.paths, self.labels = paths, labels
        self.transform = transforms.Compose([
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]  # (3, size, size) float32


def train_plain(args, device, data_dir, samples) -> dict[str, Any]:
    """Full VGG16 forward (frozen layers included) in fp32 and backward/Adam at every step."""
    torch.manual_seed(args.seed)
    model = CAMClassifier("vgg16", pretrained=False).to(device)
    dataset = PlainPNGDataset([data_dir / s.path for s in samples], [s.label for s in samples], args.image_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    criterion = nn.CrossEntropyLoss(weight=torch.tensor(CLASS_WEIGHT, device=device))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        total_loss, correct = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            scores = model(x)  # (B, 2)
            loss = criterion(scores, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(y)
            correct += (scores.argmax(1) == y).sum().item()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "precision": "fp32", "final_loss": total_loss / len(samples)}


# ---------------------------------------------------------------- this repository's training


def train_repo(args, device, data_dir, samples, precision: str) -> dict[str, Any]:
    """Decode once, frozen layers once (cache), then train conv5 + head on the cached activations.

    The frozen pass is called here rather than inside train_model only to time it apart and to
    measure the cache; train_model(features=...) then runs exactly its cache=True path.
    """
    torch.manual_seed(args.seed)
    precision = runtime.resolve_precision(precision, device)
    model = runtime.prepare_model(CAMClassifier("vgg16", pretrained=False), device, precision)
    labels = torch.tensor([s.label for s in samples], dtype=torch.int64)
    start = time.perf_counter()
    images = load_images(data_dir, samples, args.image_size)  # (N, 3, S, S) uint8
    decoded = time.perf_counter()
    features = helper.frozen_pass(model, images, IMAGENET_MEAN, IMAGENET_STD, batch_size=args.batch_size,
                                  device=device, precision=precision, tap_images=False).features  # (N, 512, S/16, S/16)
    frozen = time.perf_counter()
    history = helper.train_model(
        model, images, labels, mean=IMAGENET_MEAN, std=IMAGENET_STD, epochs=args.epochs, lr=LR,
        class_weight=CLASS_WEIGHT, batch_size=args.batch_size, target_train_accuracy=None, seed=args.seed,
        device=device, precision=precision, cache=True, features=features, progress=False,
    )
    end = time.perf_counter()
    cache_bytes = features.numel() * features.element_size()
    return {
        "seconds": end - start, "precision": precision, "final_loss": history["loss"][-1],
        "decode_seconds": decoded - start, "frozen_pass_seconds": frozen - decoded,
        "epochs_seconds": end - frozen,
        "cache": {"shape": list(features.shape), "dtype": str(features.dtype).replace("torch.", ""),
                  "megabytes": cache_bytes / 1e6, "megabytes_per_image": cache_bytes / 1e6 / len(samples)},
    }


# ---------------------------------------------------------------- the whole Training.ipynb


def notebook_train_split(samples: list[Sample], args) -> list[Sample]:
    """The training images Training.ipynb draws from these samples: its pooled split, test_size 0.2, --seed."""
    train, _ = split_subset(samples, "pooled", test_size=NOTEBOOK_TEST_SIZE, seed=args.seed)
    return train


def mirror_samples(data_dir: Path, samples: list[Sample], out: Path) -> None:
    """A data folder under `out` that holds exactly `samples` (images and masks, as symlinks), so a
    notebook run on it sees those images and no others."""
    for rel in [s.path for s in samples] + [s.mask_path for s in samples if s.mask_path]:
        link = out / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((data_dir / rel).resolve())


def run_training_notebook(args, data_dir: Path, samples: list[Sample], head: str = "published") -> dict[str, Any]:
    """Wall seconds of Training.ipynb as a user runs it with papermill (kernel start included) on these
    images: VGG16 (random weights, or --vgg16-weights), `head`, for the published head (and auto's
    published candidate) --epochs with early stopping off (the evidence head takes neither:
    `parameters.PUBLISHED_RECIPE`), every other parameter at its default; and where the time went
    (training.json's stage seconds; "other" is the rest: kernel start, imports, the data checks,
    saving)."""
    import papermill as pm  # only this way needs it

    subset = samples[0].path.split("/")[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        mirror_samples(data_dir, samples, work / "data")
        parameters = dict(data_dir=str(work / "data"), subset_name=subset, download=False, backbone="vgg16",
                          pretrained=bool(args.vgg16_weights), backbone_weights=args.vgg16_weights,
                          image_size=args.image_size, batch_size=args.batch_size,
                          test_size=NOTEBOOK_TEST_SIZE, seed=args.seed, weights_dir=str(work / "weights"),
                          results_dir=str(work / "results"), device=args.device, precision="auto", head=head,
                          # auto fits the published head as a candidate: the same epochs as the published way
                          **(dict(epochs=args.epochs, target_train_accuracy=None) if head != "evidence" else {}))
        start = time.perf_counter()
        pm.execute_notebook(str(REPO_ROOT / "Training.ipynb"), str(work / "Training.out.ipynb"),
                            parameters=parameters, cwd=str(REPO_ROOT), progress_bar=False, log_output=False)
        seconds = time.perf_counter() - start
        training = json.loads(next((work / "results").rglob("training.json")).read_text())
    stages = training["stage_seconds"]
    stages["other"] = seconds - sum(stages.values())
    core = stages["decode"] + stages["frozen_pass"] + stages["epochs"]
    return {"seconds": seconds, "precision": runtime.resolve_precision("auto", runtime.resolve_device(args.device)),
            "stages": stages, "overhead_share": 1.0 - core / seconds,
            "kernel_peak_rss_mib": training["peak_rss_mib"], "frozen_cache_mib": training["frozen_cache_mib"],
            "training_json": {k: training.get(k) for k in ("seconds", "patch_memory", "n_train", "n_test",
                                                           "epochs_run", "precision", "calibration", "selection")}}


# ---------------------------------------------------------------- inference with heatmaps


def infer(args, device, data_dir, samples, backbone: str, precision: str) -> dict[str, Any]:
    """inference.predict (scores + CAM heatmaps) on pre-decoded uint8 images: one warm-up batch, then the
    median of --repeats timed passes over all images."""
    torch.manual_seed(args.seed)
    precision = runtime.resolve_precision(precision, device)
    model = runtime.prepare_model(CAMClassifier(backbone, pretrained=False), device, precision)
    images = load_images(data_dir, samples, args.image_size)  # (N, 3, S, S) uint8, not timed
    kwargs = dict(batch_size=args.batch_size, device=device, precision=precision)
    inference.predict(model, images[: args.batch_size], IMAGENET_MEAN, IMAGENET_STD, **kwargs)  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = inference.predict(model, images, IMAGENET_MEAN, IMAGENET_STD, **kwargs)
        times.append(time.perf_counter() - start)
        assert out["cam"].shape == (len(samples), args.image_size, args.image_size)
    seconds = sorted(times)[len(times) // 2]  # the median pass: robust to a busy machine
    return {"seconds": seconds, "precision": precision, "channels_last": precision != "fp32",
            "repeat_seconds": times}


def run_way(way: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one way in this process; images/s counts every image seen (x epochs for training)."""
    rss_start = runtime.peak_rss_mib()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = runtime.resolve_device(args.device)
    data_dir = Path(args.data_dir)
    samples = select_samples(data_dir, args.subset, args.n_images)
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "train_plain": lambda: train_plain(args, device, data_dir, samples),
        "train_repo": lambda: train_repo(args, device, data_dir, samples, "auto"),
        "train_repo_fp32": lambda: train_repo(args, device, data_dir, samples, "fp32"),
        "train_plain_split": lambda: train_plain(args, device, data_dir, notebook_train_split(samples, args)),
        "notebook": lambda: run_training_notebook(args, data_dir, samples),
        "notebook_evidence": lambda: run_training_notebook(args, data_dir, samples, head="evidence"),
        "notebook_auto": lambda: run_training_notebook(args, data_dir, samples, head="auto"),
        "infer_vgg16_fp32": lambda: infer(args, device, data_dir, samples, "vgg16", "fp32"),
        "infer_vgg16_fast": lambda: infer(args, device, data_dir, samples, "vgg16", "auto"),
        "infer_mobilenet_v2_fp32": lambda: infer(args, device, data_dir, samples, "mobilenet_v2", "fp32"),
        "infer_mobilenet_v2_fast": lambda: infer(args, device, data_dir, samples, "mobilenet_v2", "auto"),
    }
    result = runners[way]()
    # notebook ways count the training split's images x epochs, so their ratio is one of wall seconds
    n_seen = len(notebook_train_split(samples, args)) if WAYS[way][0] == "notebook" else len(samples)
    seen = n_seen * (args.epochs if WAYS[way][0] in ("training", "notebook") else 1)
    result.update({
        "way": way, "section": WAYS[way][0], "label": WAYS[way][1], "images_seen": seen,
        "images_per_s": seen / result["seconds"], "threads": torch.get_num_threads(),
        "max_rss_mib": runtime.peak_rss_mib(), "rss_after_imports_mib": rss_start,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })
    if device.type == "cuda":
        result["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


# ---------------------------------------------------------------- parent: spawn, collect, report


def spawn_way(way: str, args: argparse.Namespace, data_dir: Path, subset: str) -> dict[str, Any]:
    """Run one way in a fresh Python process and return the result it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", way, "--child-out", str(out),
               "--data-dir", str(data_dir), "--subset", subset, "--n-images", str(args.n_images),
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--image-size", str(args.image_size), "--threads", str(args.threads),
               "--repeats", str(args.repeats),
               "--device", args.device, "--seed", str(args.seed)]
        if args.vgg16_weights:
            cmd += ["--vgg16-weights", str(Path(args.vgg16_weights).resolve())]
        env = {**os.environ, "TQDM_DISABLE": "1"}  # children's progress bars would garble the table
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"Benchmark child '{way}' failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def ratios(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Throughput of each fast way over its baseline, with its target where there is one."""
    rows = []
    for fast, base, target in RATIOS:
        if fast in results and base in results:
            ratio = results[fast]["images_per_s"] / results[base]["images_per_s"]
            rows.append({"way": fast, "over": base, "ratio": ratio, "target": target,
                         "meets_target": None if target is None else ratio >= target})
    return rows


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    """The results table, the training time breakdown, the feature cache size and the targets."""
    base_of = {fast: base for fast, base, _ in RATIOS}
    header = f"{'section':<10} {'way':<62} {'prec':<5} {'seconds':>8} {'img/s':>8} {'ratio':>7} {'peak RSS MiB':>12}"
    print(header)
    print("-" * len(header))
    for way, r in results.items():
        base = base_of.get(way)
        ratio = (f"{r['images_per_s'] / results[base]['images_per_s']:.2f}x" if base in results
                 else "1.00x" if way in base_of.values() else "")
        print(f"{r['section']:<10} {r['label']:<62} {r['precision']:<5} {r['seconds']:>8.2f} "
              f"{r['images_per_s']:>8.2f} {ratio:>7} {r['max_rss_mib']:>12.0f}")
    print(f"(training: images/s = {args.n_images} images x {args.epochs} epochs / wall seconds; training "
          f"ratios are over the plain loop, inference ratios over fp32 of the same backbone; peak RSS of "
          f"each way's own process, about {min(r['rss_after_imports_mib'] for r in results.values()):.0f} "
          f"MiB of it is Python + torch after import)")
    for way in ("train_repo", "train_repo_fp32"):
        if way in results:
            r, c = results[way], results[way]["cache"]
            print(f"{way}: decode {r['decode_seconds']:.2f} s, frozen pass {r['frozen_pass_seconds']:.2f} s, "
                  f"{args.epochs} epochs {r['epochs_seconds']:.2f} s; feature cache {c['shape']} {c['dtype']}: "
                  f"{c['megabytes']:.1f} MB = {c['megabytes_per_image']:.3f} MB/image "
                  f"(~{c['megabytes_per_image'] * 1000:.0f} MB per 1000 images)")
    for way in ("notebook", "notebook_evidence", "notebook_auto"):
        if way in results:
            r = results[way]
            print(f"{way}: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["stages"].items())
                  + f"; outside decoding, the frozen pass and the epochs: {r['overhead_share']:.1%} "
                  + f"(target at most {NOTEBOOK_OVERHEAD_TARGET:.0%}); the kernel's peak memory "
                  + f"{r['kernel_peak_rss_mib']:.0f} MiB, of which the frozen cache {r['frozen_cache_mib']:.0f} MiB")
    for row in ratios(results):
        if row["target"] is not None:
            verdict = "meets" if row["meets_target"] else "MISSES"
            note = " (set for a 10-epoch run)" if row["way"] == "train_repo" and args.epochs != 10 else ""
            print(f"target: {row['way']} / {row['over']} = {row['ratio']:.2f}x {verdict} "
                  f"the {row['target']:.2g}x target{note}")


def main() -> None:
    """Parent: print the machine, run every way in its own process, print and save. Child: one way."""
    args = parse_args()
    if args.only:
        if not args.child_out:
            raise SystemExit("--only is internal and needs --child-out.")
        save_json(args.child_out, run_way(args.only, args))
        return

    device = runtime.resolve_device(args.device)
    command = shlex.join([sys.executable, *sys.argv])
    machine = machine_info(device)
    data_dir, subset, synthetic = resolve_data(args)
    samples = select_samples(data_dir, subset, args.n_images)
    print(f"command: {command}")
    print(f"machine: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), torch {machine['torch']}, "
          f"{machine['torch_threads']} torch threads, CPU bf16: {machine['cpu_bf16']} "
          f"({', '.join(machine['cpu_bf16_flags']) or 'no bf16 flags'}), "
          f"auto precision on {device}: {machine['auto_precision']}, load average {machine['load_average_at_start']}"
          + (f", GPU {machine['gpu']}" if "gpu" in machine else ""))
    n_anomaly = sum(s.label for s in samples)
    print(f"data: {data_dir / subset}{' (synthetic fallback)' if synthetic else ''}, first {len(samples)} "
          f"images ({len(samples) - n_anomaly} Good, {n_anomaly} Anomaly; e.g. "
          f"{image_megapixels(data_dir / samples[0].path)}), {args.image_size} px, batch {args.batch_size}, "
          f"{args.epochs} epochs, early stopping off")
    print()

    results: dict[str, dict[str, Any]] = {}
    for way in args.ways.split(","):
        print(f"running {way} ...", flush=True)
        results[way] = spawn_way(way, args, data_dir, subset)
        print(f"  {results[way]['seconds']:.2f} s, {results[way]['images_per_s']:.2f} images/s, "
              f"peak RSS {results[way]['max_rss_mib']:.0f} MiB", flush=True)
    print()
    print_table(results, args)
    print(f"load average before the run {machine['load_average_at_start']} (1, 5, 15 min): well above 0 means "
          f"other processes were using the CPUs and the timings are noisy")

    settings = {k: v for k, v in vars(args).items() if k not in ("only", "child_out")}
    settings.update({"data_dir": str(data_dir), "subset": subset, "synthetic": synthetic,
                     "files": [s.path for s in samples]})
    save_json(args.out, {"command": command, "machine": machine, "settings": settings,
                                "results": results, "ratios": ratios(results)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
