"""Find, read and split the images and masks of one MVTec AD-format subset."""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from sklearn.model_selection import StratifiedKFold, train_test_split
from tqdm.auto import tqdm

from .constants import (
    ANOMALY, GOOD, GOOD_FOLDER, GOOD_SYNONYMS, IMAGE_EXTENSIONS, MASK_SUFFIX, SUBSET_FOLDERS, SYNTHETIC_SUBSET,
)
from .download import ensure_subset
from .geometry import DEFAULT_RESIZE, canvas, fit_image, fit_mask, fitted_size
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


@dataclass(frozen=True)
class Skipped:
    """A file or folder of a subset that the index does not use, and why. Path relative to data_dir."""

    path: str
    reason: str
    kind: str  # short category for the summary line


def check_data_dir(data_dir: str | Path) -> None:
    """Raise when `data_dir` exists but is not a folder (a missing one is the download's business)."""
    path = Path(data_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"data_dir={str(data_dir)!r}: {path} is a file, not a folder. Point data_dir at the folder "
            f"that holds one folder per subset (e.g. data/mvtec_anomaly_detection)."
        )


def _entries(folder: Path) -> list[Path]:
    """The visible entries of `folder`, sorted; a folder this user may not list is named as such."""
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except PermissionError as err:
        raise PermissionError(
            f"Cannot list folder {folder}: permission denied. Give this user read access to it, or move "
            f"it out of the subset."
        ) from err


def _images_under(folder: Path, data_dir: Path, skipped: list[Skipped], seen: set[Path]) -> list[Path]:
    """Image files anywhere under `folder` (nested folders included), sorted; everything else that is
    not hidden goes to `skipped` with its reason."""
    images = []
    for entry in _entries(folder):
        rel = entry.relative_to(data_dir).as_posix()
        if entry.is_symlink() and not entry.exists():
            skipped.append(Skipped(rel, "broken link: its target does not exist", "broken link"))
        elif entry.is_dir():
            real = entry.resolve()
            if real not in seen:  # a linked folder is followed once (no loop)
                seen.add(real)
                images += _images_under(entry, data_dir, skipped, seen)
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(entry)
        else:
            skipped.append(Skipped(
                rel, f"not an image file (images end in {', '.join(IMAGE_EXTENSIONS)})", "non-image file"))
    return sorted(images)


def _type_label(type_dir: Path) -> tuple[int, str]:
    """(label, defect_type) of a type folder: `good` in any case is Good, any other name a defect type.
    A common other name for good parts (OK, normal, ...) is refused rather than taken as a defect."""
    name = type_dir.name
    if name.lower() == GOOD_FOLDER:
        return GOOD, GOOD_FOLDER
    if name.lower() in GOOD_SYNONYMS:
        raise ValueError(
            f"Folder {type_dir} ({type_dir.parent.name}/{name}) would be read as a defect type named "
            f"'{name}': only a folder named 'good' (any case) holds Good images. Rename it to 'good' if "
            f"it holds good parts, or to the defect's name if it holds defects."
        )
    return ANOMALY, name


def _sample(data_dir: Path, image: Path, type_dir: Path, gt_root: Path | None) -> Sample:
    """The Sample of `image` inside `type_dir`; its mask mirrors the image's path under
    `gt_root/<type folder>/` with the `_mask.png` suffix (None for Good images or without masks)."""
    label, defect_type = _type_label(type_dir)
    mask = None
    if label == ANOMALY and gt_root is not None:
        inner = image.relative_to(type_dir)
        mask = gt_root / type_dir.name / inner.parent / f"{image.stem}{MASK_SUFFIX}.png"
        if not mask.is_file():
            raise FileNotFoundError(
                f"Mask {mask} for image {image} is missing. Every defect image needs its mask when "
                f"{gt_root} exists: add it, or remove the image."
            )
    return Sample(
        path=image.relative_to(data_dir).as_posix(),
        label=label,
        defect_type=defect_type,
        mask_path=None if mask is None else mask.relative_to(data_dir).as_posix(),
    )


def _subset_root(data_dir: Path, subset_name: str) -> Path:
    check_data_dir(data_dir)
    root = data_dir / subset_name
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is a file, not a subset folder: check `subset_name` and `data_dir`.")
    if not root.is_dir():
        present = list_subsets(data_dir)
        raise FileNotFoundError(
            f"Subset folder {root} does not exist. Subsets present in {data_dir}: "
            f"{', '.join(present) if present else 'none'}. Check `subset_name` and `data_dir`."
        )
    return root


def scan_subset(data_dir: str | Path, subset_name: str) -> tuple[list[Sample], list[Skipped]]:
    """Index `data_dir/subset_name` (train and test pooled) in a deterministic order, and report
    every visible file or folder it does not use (see `index_subset` for the layout)."""
    data_dir = Path(data_dir)
    root = _subset_root(data_dir, subset_name)
    gt_root = root / "ground_truth"
    gt_root = gt_root if gt_root.is_dir() else None
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    for entry in _entries(root):
        if entry.name not in SUBSET_FOLDERS or not entry.is_dir():
            kind = "folder not read" if entry.is_dir() else "file outside train/ and test/"
            skipped.append(Skipped(entry.relative_to(data_dir).as_posix(),
                                   "only train/, test/ and ground_truth/ are read", kind))
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for entry in _entries(split_dir):
            rel = entry.relative_to(data_dir).as_posix()
            if entry.is_dir():
                for image in _images_under(entry, data_dir, skipped, {entry.resolve()}):
                    samples.append(_sample(data_dir, image, entry, gt_root))
            elif entry.is_symlink() and not entry.exists():
                skipped.append(Skipped(rel, "broken link: its target does not exist", "broken link"))
            else:
                skipped.append(Skipped(
                    rel, f"not inside a type folder: put it in {split}/good/ or {split}/<defect type>/",
                    "file outside a type folder"))
    if not samples:
        raise ValueError(
            f"No images found under {root}/train or {root}/test (expected the MVTec layout "
            f"train/good/*.png, test/<type>/*.png)."
        )
    return samples, skipped


def index_subset(data_dir: str | Path, subset_name: str) -> list[Sample]:
    """Index `data_dir/subset_name` (train and test pooled) in a deterministic order.

    Layout: `train/<type>/...` and `test/<type>/...` (images may sit in nested folders of a type
    folder) and `ground_truth/<type>/<same subfolders>/<stem>_mask.png`. A type folder named `good`
    (any case) holds Good images, any other Anomaly images; `OK`, `normal` and the like are refused.
    When the subset has a `ground_truth` folder, every anomalous image must have its mask there.
    What it skips is reported by `scan_subset`.
    """
    return scan_subset(data_dir, subset_name)[0]


# Most telling first: the summary line names these before anything else.
_SKIP_ORDER = ("folder not read", "file outside a type folder", "broken link", "file outside train/ and test/",
               "non-image file")


def describe_skipped(skipped: Sequence[Skipped], n_examples: int = 3) -> str:
    """One line: how many entries the index skipped, per kind, with the first few paths."""
    if not skipped:
        return "index: nothing skipped"
    counts = Counter(s.kind for s in skipped)
    ranked = sorted(skipped, key=lambda s: (_SKIP_ORDER.index(s.kind) if s.kind in _SKIP_ORDER else 99, s.path))
    examples = ", ".join(s.path for s in ranked[:n_examples])
    more = f" and {len(skipped) - n_examples} more" if len(skipped) > n_examples else ""
    kinds = ", ".join(f"{counts[k]} x {k}" for k in sorted(counts, key=lambda k: _SKIP_ORDER.index(k)
                                                          if k in _SKIP_ORDER else 99))
    return f"index: skipped {len(skipped)} ({kinds}): {examples}{more}"


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
    _check_test_size(types, test_size)
    train, test = train_test_split(
        list(samples), test_size=test_size, stratify=types, random_state=seed
    )
    return train, test


def _check_test_size(types: Sequence[str], test_size: float) -> None:
    """Both sides of a split stratified by type need at least one image of every type."""
    n, n_types = len(types), len(set(types))
    n_test = math.ceil(test_size * n)  # scikit-learn's rounding
    n_train = n - n_test
    if n_test < n_types:
        raise ValueError(
            f"test_size={test_size!r} holds out {n_test} of {n} images, fewer than the {n_types} defect "
            f"types the split is stratified by ({', '.join(sorted(set(types)))}): use test_size of at "
            f"least {n_types / n:.3f}."
        )
    if n_train < n_types:
        raise ValueError(
            f"test_size={test_size!r} leaves {n_train} of {n} images for training, fewer than the "
            f"{n_types} defect types the split is stratified by: use test_size of at most "
            f"{(n - n_types) / n:.3f}."
        )


def check_splits(samples: Sequence[Sample], test_size: float, n_cv_folds: int) -> None:
    """Raise now, before any training, when the train/test split or the `n_cv_folds`-fold
    cross-validation (0 = none) cannot be made from `samples`."""
    types = [s.defect_type for s in samples]
    _check_stratifiable(types, 2, "the train/test split")
    _check_test_size(types, test_size)
    if n_cv_folds:
        _check_stratifiable(types, n_cv_folds, f"n_cv_folds={n_cv_folds} ({n_cv_folds}-fold cross-validation)")


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


ORIENTATION_TAG = 0x0112  # EXIF orientation; values 5-8 swap width and height
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_COLOUR_MODES = ("CMYK", "YCbCr", "LAB", "HSV")  # their zero is not black: converted to RGB first


def _scaled_grey(image: Image.Image, name: str) -> Image.Image:
    """A 16/32-bit integer or float grey image as 8-bit "L" on a fixed scale (never clipped):
    integers 0..65535 -> /257 (full range), floats 0..1 -> *255. Other ranges have no defined grey
    level and are refused with the file's name."""
    a = np.asarray(image)
    lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if a.size else (0.0, 0.0)
    if image.mode == "F":
        if not np.isfinite(a).all() or lo < 0 or hi > 1:
            raise ValueError(
                f"Image {name} is a floating-point image with values {lo:g}..{hi:g}"
                f"{' and NaN/inf' if not np.isfinite(a).all() else ''}; only values in [0, 1] have a defined "
                f"grey level. Save it as an 8- or 16-bit image, or scale it to [0, 1]."
            )
        out = np.round(a * 255.0)
    else:
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"Image {name} is a 32-bit integer image with values {lo:g}..{hi:g}, outside the 16-bit "
                f"range 0..65535 this reader scales: save it as an 8- or 16-bit image."
            )
        out = np.round(a / 257.0)  # 65535 -> 255
    return Image.fromarray(out.astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """`image` as a viewer shows it, as 8-bit RGB at its own size.

    EXIF orientation is applied; 16-bit (I;16) and 32-bit integer (I) grey is scaled from 0..65535
    and float (F) grey from 0..1 (other ranges are refused); palette images show their colours; an
    alpha channel is dropped and the colour under it kept (as OpenCV's imread does); 1-bit, grey,
    CMYK and YCbCr convert as Pillow converts them. A mode that cannot be converted raises a
    ValueError naming `name`.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = _scaled_grey(image, name)
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"Image {name} has pixel mode {image.mode!r}, which cannot be read as RGB ({err}): "
                         f"save it as an 8-bit RGB or grey image.") from err


def _resized_tensor(rgb: Image.Image, size: int | Sequence[int], resize: str = DEFAULT_RESIZE) -> torch.Tensor:
    return fit_image(rgb, canvas(size), resize)


def image_to_tensor(image: Image.Image | np.ndarray, size: int | Sequence[int],
                    resize: str = DEFAULT_RESIZE) -> torch.Tensor:
    """A PIL image or (H, W) / (H, W, 3|4) array -> (3, H, W) uint8 on the canvas `size` (a side or
    [H, W]), as in training: read as a viewer shows it (`to_rgb`; a uint16 array is 16-bit grey)
    and resized bilinearly, stretched or padded (`geometry.fit_image`)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return _resized_tensor(to_rgb(image), size, resize)


def _unreadable(path: str | Path, err: BaseException, what: str = "image") -> ValueError:
    """The error for a file that cannot be decoded, saying why in the user's terms."""
    if isinstance(err, PermissionError):
        return ValueError(f"Cannot read {what} {path}: permission denied. Give this user read access "
                          f"(chmod / chown), or remove the file.")
    if isinstance(err, IsADirectoryError):
        return ValueError(f"Cannot read {what} {path}: it is a folder, not a file.")
    if isinstance(err, Image.DecompressionBombError):
        return ValueError(
            f"{what.capitalize()} {path} has more pixels than Pillow's decompression-bomb limit "
            f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; {err}). Downscale the file, or, if "
            f"you trust it, raise PIL.Image.MAX_IMAGE_PIXELS before reading."
        )
    return ValueError(f"Cannot read {what} {path} ({err}). The file is truncated or not an image: "
                      f"replace it or delete it.")


_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, EOFError, Image.DecompressionBombError)


def open_image(path: str | Path) -> Image.Image:
    """Decode one image file as a viewer shows it (8-bit RGB at full size, see `to_rgb`).

    A file that cannot be read (permission, truncated, not an image, too many pixels, unknown
    mode) raises a ValueError naming it and saying why.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img, str(path))
    except _DECODE_ERRORS as err:
        raise _unreadable(path, err) from err


def read_image(path: str | Path, size: int | Sequence[int], resize: str = DEFAULT_RESIZE) -> torch.Tensor:
    """Decode one image file as (3, H, W) uint8 RGB on the canvas `size` (a side or [H, W]), as a
    viewer shows it (`open_image`), resized bilinearly, stretched or padded (`geometry.fit_image`).
    A file that cannot be read raises a ValueError naming it."""
    return _resized_tensor(open_image(path), size, resize)


def shown_size(path: str | Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """((W, H) as a viewer shows the file, (W, H) as stored) from its header, without decoding."""
    try:
        with Image.open(path) as img:
            stored = img.size
            orientation = img.getexif().get(ORIENTATION_TAG, 1)
    except _DECODE_ERRORS as err:
        raise _unreadable(path, err) from err
    return (stored[::-1] if orientation in (5, 6, 7, 8) else stored), stored


def defect_pixels(mask: Image.Image) -> np.ndarray:
    """(H, W) bool of a mask image: a pixel is defect when any colour channel is nonzero (any mode,
    any colour, 0/1 and label maps included) and it is not fully transparent."""
    mask = ImageOps.exif_transpose(mask)
    if mask.mode == "P":
        mask = mask.convert("RGBA")
    elif mask.mode in _COLOUR_MODES:
        mask = mask.convert("RGB")
    a = np.asarray(mask)
    if mask.mode in _ALPHA_MODES:
        return (a[..., :-1] != 0).any(axis=-1) & (a[..., -1] != 0)
    return (a != 0).any(axis=-1) if a.ndim == 3 else a != 0


def _mask_pixels(mask_path: str | Path, image_path: str | Path) -> np.ndarray:
    """(H, W) bool defect pixels of a mask at full size; a ValueError names a mask that cannot be read
    or whose size is not its image's (as a viewer shows the image)."""
    shown, stored = shown_size(image_path)
    try:
        with Image.open(mask_path) as m:
            m.load()
            defect = defect_pixels(m)
    except _DECODE_ERRORS as err:
        raise _unreadable(mask_path, err, "mask") from err
    size = (defect.shape[1], defect.shape[0])
    if size != shown:
        hint = ""
        if size == stored:
            hint = (f" The image's EXIF orientation turns it to {shown[0]}x{shown[1]} as viewers show it, "
                    f"but the mask matches the sensor orientation: rotate the mask like the image.")
        raise ValueError(
            f"Mask {mask_path} is {size[0]}x{size[1]} but its image {image_path} is "
            f"{shown[0]}x{shown[1]}; a mask must match its image.{hint}"
        )
    return defect


def read_mask(mask_path: str | Path, image_path: str | Path, size: int | Sequence[int],
              resize: str = DEFAULT_RESIZE) -> torch.Tensor:
    """Read a defect mask as an (H, W) bool tensor on the canvas `size`, placed as its image is
    (`geometry.fit_mask`), resized with nearest neighbour only.

    Any nonzero pixel is defect (see `defect_pixels`). The mask must have the size of its image
    as a viewer shows it, otherwise a ValueError names both files.
    """
    return fit_mask(_mask_pixels(mask_path, image_path), canvas(size), resize)


def check_masks(data_dir: str | Path, samples: Sequence[Sample], max_listed: int = 10) -> None:
    """Read every mask of `samples` (all splits) against its image before anything trains.

    One ValueError lists every mask that cannot be read, differs in size from its image, marks no
    pixel (a defect image needs its defect marked) or marks every pixel (an inverted mask).
    """
    data_dir = Path(data_dir)
    problems = []
    for s in samples:
        if not s.mask_path:
            continue
        try:
            defect = _mask_pixels(data_dir / s.mask_path, data_dir / s.path)
        except ValueError as err:
            problems.append(str(err))
            continue
        if not defect.any():
            problems.append(f"Mask {data_dir / s.mask_path} marks no pixel as defect (all 0) but its image "
                            f"{s.path} is in the defect folder '{s.defect_type}'.")
        elif defect.all():
            problems.append(f"Mask {data_dir / s.mask_path} marks every pixel as defect: is it inverted? "
                            f"Background must be 0 (black), the defect any other value.")
    if problems:
        listed = "\n  ".join(problems[:max_listed])
        more = f"\n  ... and {len(problems) - max_listed} more" if len(problems) > max_listed else ""
        raise ValueError(
            f"{len(problems)} of {sum(bool(s.mask_path) for s in samples)} masks cannot be used "
            f"(a mask is 0 for background and any nonzero value for defect, the size of its image):"
            f"\n  {listed}{more}"
        )


def load_images(
    data_dir: str | Path, samples: Sequence[Sample], size: int | Sequence[int], desc: str = "Decoding images",
    resize: str = DEFAULT_RESIZE,
) -> torch.Tensor:
    """Decode `samples` once: (N, 3, H, W) uint8 on the canvas `size` (a side or [H, W]), stretched
    or padded (4x smaller than float, normalised later).

    Pillow releases the GIL while it decodes, so a thread per core decodes in parallel.
    """
    data_dir = Path(data_dir)
    out = torch.empty((len(samples), 3, *canvas(size)), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(lambda s: read_image(data_dir / s.path, size, resize), samples)
        for i, image in enumerate(tqdm(decoded, total=len(samples), desc=desc, leave=False)):
            out[i] = image
    return out


def load_masks(data_dir: str | Path, samples: Sequence[Sample], size: int | Sequence[int],
               resize: str = DEFAULT_RESIZE) -> torch.Tensor | None:
    """(N, H, W) bool masks on the canvas `size`, placed as their images are (all False for good
    images and padding); None when the subset has none."""
    if not any(s.mask_path for s in samples):
        if any(s.label == ANOMALY for s in samples):
            warnings.warn("No ground-truth masks found: localisation metrics will be null.")
        return None
    check_masks(data_dir, samples)
    data_dir = Path(data_dir)
    out = torch.zeros((len(samples), *canvas(size)), dtype=torch.bool)
    for i, s in enumerate(samples):
        if s.mask_path:
            out[i] = read_mask(data_dir / s.mask_path, data_dir / s.path, size, resize)
    return out


def image_sizes(data_dir: str | Path, samples: Sequence[Sample]) -> list[tuple[int, int]]:
    """(W, H) of each sample as a viewer shows it, from the file headers only."""
    return [shown_size(Path(data_dir) / s.path)[0] for s in samples]


def load_parts(data_dir: str | Path, samples: Sequence[Sample], size: int | Sequence[int],
               resize: str = DEFAULT_RESIZE) -> torch.Tensor | None:
    """(N, 2) long: the (h, w) each sample covers at the top-left of the canvas with resize="pad"
    (`geometry.fitted_size`, from the file headers); None with "stretch", where every image covers
    the whole canvas."""
    if resize == "stretch":
        return None
    hw = canvas(size)
    return torch.tensor([fitted_size(w, h, hw, resize) for w, h in image_sizes(data_dir, samples)], dtype=torch.long)


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
    check_data_dir(data_dir)
    if subset_name == SYNTHETIC_SUBSET:
        return generate_synthetic_subset(Path(data_dir) / subset_name, seed=seed)
    return ensure_subset(data_dir, subset_name, download=download, url=url)


def select_samples(data_dir: str | Path, subset_name: str, paths: Sequence[str]) -> list[Sample]:
    """The samples of `subset_name` at `paths` (relative to data_dir), in that order; used to score
    exactly the test files a checkpoint lists. Only these files are looked at, so images added to
    the folder after training change nothing."""
    data_dir = Path(data_dir)
    root = _subset_root(data_dir, subset_name)
    gt_root = root / "ground_truth"
    gt_root = gt_root if gt_root.is_dir() else None
    missing, samples = [], []
    for path in paths:
        parts = PurePosixPath(path).parts
        if len(parts) < 4 or parts[0] != subset_name or parts[1] not in ("train", "test") \
                or not (data_dir / path).is_file():
            missing.append(path)
            continue
        samples.append(_sample(data_dir, data_dir / path, root / parts[1] / parts[2], gt_root))
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} test images listed in the checkpoint are not in {root} "
            f"(first: {missing[0]}). Evaluate with the data_dir the model was trained on."
        )
    return samples


def positions(samples: Sequence[Sample], chosen: Sequence[Sample]) -> torch.Tensor:
    """Indices (K,) of `chosen` within `samples`, to take rows of images decoded once for all."""
    index = {s.path: i for i, s in enumerate(samples)}
    return torch.tensor([index[s.path] for s in chosen], dtype=torch.long)
