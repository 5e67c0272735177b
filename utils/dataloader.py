"""Find, read and split the images and masks of one MVTec AD-format subset."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import StratifiedKFold, train_test_split
from tqdm.auto import tqdm

from .constants import ANOMALY, GOOD, GOOD_FOLDER, IMAGE_EXTENSIONS, MASK_SUFFIX, SYNTHETIC_SUBSET
from .download import ensure_subset
from .synthetic import generate_synthetic_subset


@dataclass(frozen=True)
class Sample:
    """One image of a subset. Paths are relative to the data folder (`data_dir`)."""

    path: str
    label: int  # GOOD (0) or ANOMALY (1)
    defect_type: str  # "good" or the name of the defect folder
    mask_path: str | None  # None for good images and for subsets without masks


def list_subsets(data_dir: str | Path) -> list[str]:
    """Names of the subset folders in `data_dir` (sorted; hidden folders ignored)."""
    root = Path(data_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    """Image files of one folder, sorted; hidden files and other extensions are ignored."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _type_folders(split_dir: Path) -> list[Path]:
    if not split_dir.is_dir():
        return []
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def index_subset(data_dir: str | Path, subset_name: str) -> list[Sample]:
    """Index `data_dir/subset_name` (train and test pooled) in a deterministic order.

    Layout: `train/good/*`, `test/<type>/*` and `ground_truth/<type>/<stem>_mask.png`. A folder
    named `good` holds Good images, any other type folder Anomaly images. When the subset has a
    `ground_truth` folder, every anomalous image must have its mask there.
    """
    data_dir = Path(data_dir)
    root = data_dir / subset_name
    if not root.is_dir():
        present = list_subsets(data_dir)
        raise FileNotFoundError(
            f"Subset folder {root} does not exist. Subsets present in {data_dir}: "
            f"{', '.join(present) if present else 'none'}. Check `subset_name` and `data_dir`."
        )
    gt_root = root / "ground_truth"
    has_masks = gt_root.is_dir()
    samples = []
    for split in ("train", "test"):
        for type_dir in _type_folders(root / split):
            defect_type = type_dir.name
            label = GOOD if defect_type == GOOD_FOLDER else ANOMALY
            for image in _image_files(type_dir):
                mask = None
                if label == ANOMALY and has_masks:
                    mask = gt_root / defect_type / f"{image.stem}{MASK_SUFFIX}.png"
                    if not mask.is_file():
                        raise FileNotFoundError(
                            f"Mask {mask} for image {image} is missing. Every defect image needs "
                            f"its mask when {gt_root} exists: add it, or remove the image."
                        )
                samples.append(Sample(
                    path=image.relative_to(data_dir).as_posix(),
                    label=label,
                    defect_type=defect_type,
                    mask_path=None if mask is None else mask.relative_to(data_dir).as_posix(),
                ))
    if not samples:
        raise ValueError(
            f"No images found under {root}/train or {root}/test (expected the MVTec layout "
            f"train/good/*.png, test/<type>/*.png)."
        )
    return samples


def check_both_classes(samples: Sequence[Sample], where: str) -> None:
    """Raise when `samples` lack Good or Anomaly images, which a classifier needs both of."""
    counts = np.bincount([s.label for s in samples], minlength=2)
    if counts.min() == 0:
        missing = "Good" if counts[GOOD] == 0 else "Anomaly"
        raise ValueError(
            f"{where} has no {missing} images ({counts[GOOD]} Good, {counts[ANOMALY]} Anomaly); "
            f"training a Good/Anomaly classifier needs both."
        )


def split_samples(
    samples: Sequence[Sample], test_size: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Stratified train/test split by defect type, as published (scikit-learn rounds the test
    share up: 501 images give 400 train / 101 test)."""
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size={test_size!r} must be a fraction strictly between 0 and 1.")
    types = [s.defect_type for s in samples]
    _check_stratifiable(types, 2, "the train/test split")
    train, test = train_test_split(
        list(samples), test_size=test_size, stratify=types, random_state=seed
    )
    return train, test


SPLITS = ("pooled", "official")


def official_split(samples: Sequence[Sample]) -> tuple[list[Sample], list[Sample]]:
    """The dataset's own split: the images under `<subset>/train/` train, those under `<subset>/test/` test
    (MVTec AD's protocol: good images only in train/, so no classifier can be trained on them)."""
    parts = {"train": [], "test": []}
    for s in samples:
        parts[s.path.split("/")[1]].append(s)
    for name, part in parts.items():
        if not part:
            subset = samples[0].path.split("/")[0] if samples else "the subset"
            raise ValueError(
                f"split='official' needs images under {subset}/{name}/, but there are none: add them "
                f"(MVTec layout {name}/<type>/*.png), or use split='pooled'."
            )
    return parts["train"], parts["test"]


def split_subset(
    samples: Sequence[Sample], split: str, test_size: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Train and test samples: "pooled" = the published stratified split of all images (`split_samples`),
    "official" = the subset's train/ and test/ folders (`official_split`)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}.")
    if split == "official":
        return official_split(samples)
    return split_samples(samples, test_size=test_size, seed=seed)


def has_anomalies(samples: Sequence[Sample]) -> bool:
    """True when some sample is an Anomaly image (a classifier can train only then)."""
    return any(s.label == ANOMALY for s in samples)


def kfold_splits(
    samples: Sequence[Sample], n_folds: int, seed: int
) -> Iterator[tuple[list[Sample], list[Sample]]]:
    """Stratified (by defect type) and shuffled k-fold splits of `samples`."""
    types = [s.defect_type for s in samples]
    _check_stratifiable(types, n_folds, f"{n_folds}-fold cross-validation")
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for train_idx, test_idx in folds.split(np.zeros(len(types)), types):
        yield [samples[i] for i in train_idx], [samples[i] for i in test_idx]


def _check_stratifiable(types: Sequence[str], n_groups: int, what: str) -> None:
    values, counts = np.unique(types, return_counts=True)
    small = [f"{v} ({c})" for v, c in zip(values, counts) if c < n_groups]
    if small:
        raise ValueError(
            f"{what} is stratified by defect type and needs at least {n_groups} images of each "
            f"type; too few: {', '.join(small)}."
        )


def image_to_tensor(image: Image.Image | np.ndarray, size: int) -> torch.Tensor:
    """A PIL image or (H, W) / (H, W, 3|4) uint8 array -> (3, size, size) uint8, as in training:
    converted to RGB (grayscale and RGBA too) and resized bilinearly."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def read_image(path: str | Path, size: int) -> torch.Tensor:
    """Decode one image file as (3, size, size) uint8 RGB (see `image_to_tensor`).

    A truncated or corrupt file raises a ValueError naming it.
    """
    try:
        with Image.open(path) as img:
            return image_to_tensor(img, size)
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise ValueError(
            f"Cannot read image {path} ({err}). The file is truncated or not an image: "
            f"replace it or delete it."
        ) from err


def read_mask(mask_path: str | Path, image_path: str | Path, size: int) -> torch.Tensor:
    """Read a defect mask as a (size, size) bool tensor, resized with nearest neighbour only.

    The mask must have the size of its image, otherwise a ValueError names both files.
    """
    with Image.open(image_path) as img:
        image_size = img.size
    try:
        with Image.open(mask_path) as m:
            if m.size != image_size:
                raise ValueError(
                    f"Mask {mask_path} is {m.size[0]}x{m.size[1]} but its image {image_path} is "
                    f"{image_size[0]}x{image_size[1]}; a mask must match its image."
                )
            m = m.convert("L").resize((size, size), Image.NEAREST)
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"Cannot read mask {mask_path} ({err}): replace it.") from err
    return torch.from_numpy(np.asarray(m) > 127)


def load_images(
    data_dir: str | Path, samples: Sequence[Sample], size: int, desc: str = "Decoding images"
) -> torch.Tensor:
    """Decode `samples` once: (N, 3, size, size) uint8 (4x smaller than float, normalised later).

    Pillow releases the GIL while it decodes, so a thread per core decodes in parallel.
    """
    data_dir = Path(data_dir)
    out = torch.empty((len(samples), 3, size, size), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(lambda s: read_image(data_dir / s.path, size), samples)
        for i, image in enumerate(tqdm(decoded, total=len(samples), desc=desc, leave=False)):
            out[i] = image
    return out


def load_masks(data_dir: str | Path, samples: Sequence[Sample], size: int) -> torch.Tensor | None:
    """(N, size, size) bool masks (all False for good images); None when the subset has none."""
    if not any(s.mask_path for s in samples):
        if any(s.label == ANOMALY for s in samples):
            warnings.warn("No ground-truth masks found: localisation metrics will be null.")
        return None
    data_dir = Path(data_dir)
    out = torch.zeros((len(samples), size, size), dtype=torch.bool)
    for i, s in enumerate(samples):
        if s.mask_path:
            out[i] = read_mask(data_dir / s.mask_path, data_dir / s.path, size)
    return out


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 scaled to [0, 1] and normalised with the weights' mean/std."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches for one epoch from a seeded generator (last batch may be short)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


def summarise(samples: Sequence[Sample]) -> dict[str, int]:
    """Image count per defect type, sorted by type name."""
    types, counts = np.unique([s.defect_type for s in samples], return_counts=True)
    return {str(t): int(c) for t, c in zip(types, counts)}


def prepare_subset(
    data_dir: str | Path, subset_name: str, download: bool, seed: int, url: str | None = None
) -> Path:
    """Make sure `data_dir/subset_name` exists: generate the synthetic subset, or find / fetch an
    MVTec AD category (see `utils.download.ensure_subset`). Returns the subset folder."""
    if subset_name == SYNTHETIC_SUBSET:
        return generate_synthetic_subset(Path(data_dir) / subset_name, seed=seed)
    return ensure_subset(data_dir, subset_name, download=download, url=url)


def select_samples(data_dir: str | Path, subset_name: str, paths: Sequence[str]) -> list[Sample]:
    """The indexed samples of `subset_name` whose paths (relative to data_dir) are `paths`, in
    that order; used to score exactly the test files a checkpoint lists."""
    by_path = {s.path: s for s in index_subset(data_dir, subset_name)}
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} test images listed in the checkpoint are not in {Path(data_dir) / subset_name} "
            f"(first: {missing[0]}). Evaluate with the data_dir the model was trained on."
        )
    return [by_path[p] for p in paths]


def positions(samples: Sequence[Sample], chosen: Sequence[Sample]) -> torch.Tensor:
    """Indices (K,) of `chosen` within `samples`, to take rows of images decoded once for all."""
    index = {s.path: i for i, s in enumerate(samples)}
    return torch.tensor([index[s.path] for s in chosen], dtype=torch.long)
