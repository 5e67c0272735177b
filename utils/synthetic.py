"""Deterministic synthetic MVTec-format subset: a textured surface with scratches, spots and cracks."""

import colorsys
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from .constants import GOOD_FOLDER, MASK_SUFFIX

SYNTHETIC_DEFECT_TYPES = ("crack", "scratch", "spot")
MARKER_NAME = ".synthetic.json"
# Bump when the drawing changes, so an old folder is recognised as generated with other settings.
GENERATOR_VERSION = 1
# Each folder has a fixed id in the per-image seed, so adding images or folders leaves earlier ones unchanged.
FOLDER_IDS = {"train/good": 0, "test/good": 1, "test/crack": 2, "test/scratch": 3, "test/spot": 4}

# Texture values stay in [TEXTURE_MIN, TEXTURE_MAX] and defect values outside it, in every channel,
# so every pixel a defect paints changes: the mask is exactly the set of changed pixels.
TEXTURE_MIN, TEXTURE_MAX = 70, 200
DARK_MAX, BRIGHT_MIN = 45, 220
# A defect must still cover this share of the image after downsizing (256 -> 64 px) to stay learnable.
MIN_DEFECT_AREA = 0.01
REFERENCE_SIZE = 256  # defect sizes below are given in pixels of a 256 px image and scale with the size


def image_generator(seed: int, folder: str, index: int) -> np.random.Generator:
    """The generator of one image, e.g. `image_generator(42, "test/spot", 3)`; texture first, defect next."""
    if folder not in FOLDER_IDS:
        raise ValueError(f"Unknown synthetic folder {folder!r}; expected one of {sorted(FOLDER_IDS)}.")
    return np.random.default_rng([seed, FOLDER_IDS[folder], index])


def make_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A product surface: jittered base colour, low-frequency shading and fine grain, (size, size, 3) uint8.

    Values lie in [TEXTURE_MIN, TEXTURE_MAX] so that near-black and near-white defects stand out.
    """
    hue = 0.08 + rng.normal(0.0, 0.02)  # a warm grey-beige product, jittered per image
    saturation = np.clip(0.25 + rng.normal(0.0, 0.04), 0.1, 0.4)
    value = np.clip(0.53 + rng.normal(0.0, 0.03), 0.45, 0.6)
    base = 255.0 * np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value))  # (3,)

    yy, xx = np.mgrid[0:size, 0:size] / size  # (size, size) coordinates in [0, 1)
    shading = np.zeros((size, size))
    for _ in range(3):
        angle = rng.uniform(0.0, np.pi)
        cycles = rng.uniform(0.5, 3.0)  # low frequency: at most 3 periods across the image
        phase = rng.uniform(0.0, 2 * np.pi)
        arg = 2 * np.pi * cycles * (np.cos(angle) * xx + np.sin(angle) * yy) + phase
        shading += rng.uniform(3.0, 6.0) * np.sin(arg)

    # Band-limited noise, blurred at a fixed fraction of the size so the grain looks alike at any size.
    blotches = gaussian_filter(rng.standard_normal((size, size)), sigma=2.0 * size / REFERENCE_SIZE)
    shading += 6.0 * blotches / (blotches.std() + 1e-8)
    grain = rng.normal(0.0, 3.0, (size, size, 3))
    texture = base[None, None, :] + shading[:, :, None] + grain  # (size, size, 3)
    return np.clip(np.rint(texture), TEXTURE_MIN, TEXTURE_MAX).astype(np.uint8)


def _walk(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    steps: int,
    step_length: float,
    jitter: float,
    drift: float,
    bounds: tuple[float, float],
) -> list[tuple[float, float]]:
    """Polyline of `steps + 1` (x, y) points; each step deviates `jitter` around a heading that drifts.

    A step that would leave [lo, hi]^2 is mirrored at that border, so the line stays in the image.
    """
    lo, hi = bounds
    points = [tuple(start)]
    position = np.array(start, dtype=float)
    for _ in range(steps):
        heading += rng.normal(0.0, drift)
        angle = heading + rng.normal(0.0, jitter)
        step = step_length * np.array([np.cos(angle), np.sin(angle)])
        for axis in range(2):
            if not lo <= position[axis] + step[axis] <= hi:
                step[axis] = -step[axis]
                # Mirror the heading as well so the walk moves away from the border afterwards.
                heading = np.pi - heading if axis == 0 else -heading
        position = np.clip(position + step, lo, hi)
        points.append(tuple(position))
    return points


def _draw_scratch(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    """One long thin polyline of 1-3 nearly straight segments, 7-11 px wide at 256 px."""
    scale = size / REFERENCE_SIZE
    width = max(2, round(rng.uniform(7.0, 11.0) * scale))
    segments = int(rng.integers(1, 4))
    length = rng.uniform(0.55, 0.85) * size
    margin = 0.08 * size
    start = rng.uniform(margin, size - margin, 2)
    points = _walk(rng, start, rng.uniform(0, 2 * np.pi), segments, length / segments,
                   jitter=0.0, drift=0.35, bounds=(margin, size - margin))
    draw.line(points, fill=255, width=width, joint="curve")


def _draw_crack(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    """A jagged random walk of ~200 px at 256 px, 6-9 px wide, with up to three thinner branches."""
    scale = size / REFERENCE_SIZE
    width = max(2, round(rng.uniform(6.0, 9.0) * scale))
    step_length = 6.0 * scale
    bounds = (0.05 * size, 0.95 * size)
    heading = rng.uniform(0, 2 * np.pi)
    trunk = _walk(rng, rng.uniform(0.2 * size, 0.8 * size, 2), heading, int(rng.integers(30, 46)),
                  step_length, jitter=0.5, drift=0.08, bounds=bounds)
    draw.line(trunk, fill=255, width=width, joint="curve")
    n_branches = int(rng.integers(0, 4))
    for knot in rng.choice(np.arange(4, len(trunk) - 2), size=n_branches, replace=False):
        side = rng.choice([-1.0, 1.0])
        branch = _walk(rng, np.array(trunk[knot]), heading + side * rng.uniform(0.5, 1.2),
                       int(rng.integers(8, 17)), step_length, jitter=0.5, drift=0.08, bounds=bounds)
        draw.line(branch, fill=255, width=max(2, width - 2), joint="curve")


def _draw_spot(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int) -> None:
    """A filled blob: one ellipse of radii 15-35 px at 256 px plus 0-2 smaller overlapping lobes."""
    scale = size / REFERENCE_SIZE
    radii = rng.uniform(15.0, 35.0, 2) * scale  # (rx, ry)
    centre = rng.uniform(radii.max(), size - radii.max(), 2)
    lobes = [(centre, radii)]
    for _ in range(int(rng.integers(0, 3))):
        offset = rng.uniform(-0.6, 0.6, 2) * radii
        lobes.append((centre + offset, radii * rng.uniform(0.5, 0.8, 2)))
    for (cx, cy), (rx, ry) in lobes:
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)


_DRAWERS = {"crack": _draw_crack, "scratch": _draw_scratch, "spot": _draw_spot}


def _defect_colour(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB colour (3,) of one defect and the value band its pixels stay in (outside the texture range)."""
    dark, bright = (0, DARK_MAX), (BRIGHT_MIN, 255)
    if kind == "crack":
        return rng.uniform(5, 25, 3), dark
    if kind == "scratch":
        return (rng.uniform(5, 25, 3), dark) if rng.random() < 0.5 else (rng.uniform(235, 250, 3), bright)
    palette = [  # spot: rust, soot or a pale stain
        (np.array([40.0, 22.0, 10.0]), dark),
        (np.array([15.0, 15.0, 18.0]), dark),
        (np.array([242.0, 236.0, 225.0]), bright),
    ]
    colour, band = palette[int(rng.integers(len(palette)))]
    return colour + rng.uniform(-4, 4, 3), band


def _defect_region(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) bool region of one defect covering at least MIN_DEFECT_AREA of the image.

    The geometry is drawn on its own binary layer, so the painted and the marked pixels are the same.
    A line that folds back on itself can come out too small to learn from: such a draw is redone.
    """
    for _ in range(20):
        layer = Image.new("L", (size, size), 0)
        _DRAWERS[kind](ImageDraw.Draw(layer), rng, size)
        region = np.asarray(layer) > 0
        if region.mean() >= MIN_DEFECT_AREA:
            break
    return region


def draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint 1-2 defects of `kind` on a copy of a (H, W, 3) uint8 image.

    Returns the defective image (H, W, 3) uint8 and its mask (H, W) uint8 with values {0, 255}: the
    pixels the defects painted. On a `make_texture` image these are exactly the pixels that changed.
    """
    if kind not in _DRAWERS:
        raise ValueError(f"Unknown defect type {kind!r}; expected one of {SYNTHETIC_DEFECT_TYPES}.")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"Expected a square (H, W, 3) image, got shape {image.shape}.")
    size = image.shape[0]
    result = image.copy()
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 3))):
        region = _defect_region(kind, rng, size)  # (H, W) bool
        colour, (low, high) = _defect_colour(kind, rng)
        shade = colour[None, :] + rng.normal(0.0, 4.0, (int(region.sum()), 3))  # (N, 3) slight unevenness
        result[region] = np.clip(np.rint(shade), low, high).astype(np.uint8)
        mask |= region
    return result, mask.astype(np.uint8) * 255


def write_png(array: np.ndarray, path: Path) -> None:
    """Write a (H, W, 3) RGB or (H, W) greyscale uint8 array as a PNG."""
    Image.fromarray(array, mode="RGB" if array.ndim == 3 else "L").save(path, format="PNG")


def _settings(seed: int, n_train_good: int, n_test_good: int, n_per_defect: int, image_size: int) -> dict:
    """The marker content: everything the generated files depend on."""
    for name, value in [("n_train_good", n_train_good), ("n_test_good", n_test_good),
                        ("n_per_defect", n_per_defect)]:
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not isinstance(image_size, (int, np.integer)) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}.")
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "n_train_good": int(n_train_good),
            "n_test_good": int(n_test_good), "n_per_defect": int(n_per_defect), "image_size": int(image_size)}


def _read_marker(root: Path) -> dict | None:
    """The settings stored in `root`'s marker, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _write_subset(folder: Path, settings: dict) -> None:
    """Write every image, mask and finally the marker of the subset into `folder`."""
    seed, size = settings["seed"], settings["image_size"]
    jobs = [("train/good", settings["n_train_good"]), ("test/good", settings["n_test_good"])]
    jobs += [(f"test/{kind}", settings["n_per_defect"]) for kind in SYNTHETIC_DEFECT_TYPES]
    progress = tqdm(total=sum(n for _, n in jobs), desc="Generating synthetic subset", leave=False)
    for name, count in jobs:
        digits = max(3, len(str(count - 1)))
        (folder / name).mkdir(parents=True)
        kind = name.split("/")[1]
        if kind != GOOD_FOLDER:
            (folder / "ground_truth" / kind).mkdir(parents=True)
        for index in range(count):
            rng = image_generator(seed, name, index)
            image = make_texture(rng, size)
            stem = f"{index:0{digits}d}"
            if kind != GOOD_FOLDER:
                image, mask = draw_defect(image, kind, rng)
                write_png(mask, folder / "ground_truth" / kind / f"{stem}{MASK_SUFFIX}.png")
            write_png(image, folder / name / f"{stem}.png")
            progress.update()
    progress.close()
    (folder / MARKER_NAME).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def generate_synthetic_subset(
    root: Path,
    seed: int = 42,
    n_train_good: int = 60,
    n_test_good: int = 20,
    n_per_defect: int = 20,
    image_size: int = 256,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic subset in MVTec layout at `root` and return `root`.

    Layout: train/good/000.png, test/good/000.png, test/<type>/000.png and
    ground_truth/<type>/000_mask.png for each type in SYNTHETIC_DEFECT_TYPES. The same arguments give
    byte-identical files. If `root` already holds a subset with the same settings nothing is done.
    The subset is built in a temporary sibling folder and renamed into place, so an interrupted run
    leaves no partial subset behind.
    """
    root = Path(root)
    settings = _settings(seed, n_train_good, n_test_good, n_per_defect, image_size)
    existing = _read_marker(root) if root.is_dir() else None
    if existing == settings:
        return root
    occupied = root.is_file() or (root.is_dir() and any(root.iterdir()))
    if occupied and not overwrite:
        found = existing if existing is not None else "no synthetic marker (not a generated subset)"
        raise ValueError(
            f"{root} already exists and was generated with other settings.\n  found:     {found}\n"
            f"  requested: {settings}\nDelete the folder or pass overwrite=True."
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".synthetic-"))
    staging.chmod(0o755)  # mkdtemp makes it private (0o700); the subset is ordinary data
    try:
        _write_subset(staging, settings)
        if root.is_dir() and any(root.iterdir()):
            # os.replace cannot replace a non-empty folder: move the old one aside first, then delete it.
            trash = Path(tempfile.mkdtemp(dir=root.parent, prefix=".synthetic-old-"))
            os.replace(root, trash / "old")
            os.replace(staging, root)
            shutil.rmtree(trash)
        else:
            if root.is_file():
                root.unlink()
            os.replace(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root
