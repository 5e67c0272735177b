"""How an image meets the model's canvas: its size, the two resize modes, and where the part lies on it.

The canvas is `image_size`: a square side, or [height, width]. "stretch" (the published way)
squashes every image to the canvas. "pad" keeps the aspect ratio: the image is scaled to fit and
placed at the canvas's top-left corner, the rest is black padding. The part's region is then the
top-left (h, w) of the canvas, one pair per image ("parts" (N, 2) below); padding is never part
of the part, so it is kept out of the patch memory, the top-k pooling, the maps' metrics and
the boxes. Pure functions; no other module of the package is imported.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

RESIZES = ("stretch", "pad")
DEFAULT_RESIZE = "stretch"  # the published preprocessing; checkpoints without `resize` used it


def canvas(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) of the canvas of a checked `image_size`: a side S -> (S, S), [H, W] -> (H, W)."""
    if isinstance(image_size, (list, tuple)):
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


def resize_of(config: dict[str, Any]) -> str:
    """The resize mode of a configuration; checkpoints from before it stretched."""
    return config.get("resize", DEFAULT_RESIZE)


def fitted_size(width: int, height: int, size: tuple[int, int], resize: str) -> tuple[int, int]:
    """(h, w) the image of `width` x `height` pixels covers on the (H, W) canvas: the whole canvas
    when stretched; scaled by min(H / height, W / width) when padded (at least 1 px, at most the
    canvas: the rounding never spills over)."""
    if resize == "stretch":
        return size
    scale = min(size[0] / height, size[1] / width)
    return (min(size[0], max(1, round(height * scale))), min(size[1], max(1, round(width * scale))))


def fit_image(rgb: Image.Image, size: tuple[int, int], resize: str) -> torch.Tensor:
    """An RGB image on the (H, W) canvas -> (3, H, W) uint8: stretched bilinearly, or scaled
    bilinearly to `fitted_size` and placed top-left on black."""
    h, w = fitted_size(rgb.width, rgb.height, size, resize)
    resized = torch.from_numpy(np.asarray(rgb.resize((w, h), Image.BILINEAR)).copy()).permute(2, 0, 1)
    if (h, w) == size:
        return resized
    out = torch.zeros((3, *size), dtype=torch.uint8)
    out[:, :h, :w] = resized
    return out


def fit_mask(defect: np.ndarray, size: tuple[int, int], resize: str) -> torch.Tensor:
    """A (h0, w0) bool defect mask on the canvas as its image is placed -> (H, W) bool, resized
    with nearest neighbour only; padding is never defect."""
    h, w = fitted_size(defect.shape[1], defect.shape[0], size, resize)
    image = Image.fromarray(defect.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
    out = torch.zeros(size, dtype=torch.bool)
    out[:h, :w] = torch.from_numpy(np.asarray(image) > 0)
    return out


def part_pixels(parts: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) bool: which canvas pixels hold the part, for parts (N, 2) = the (h, w) each image
    covers at the top-left."""
    rows = torch.arange(size[0])[None, :, None] < parts[:, 0, None, None]
    cols = torch.arange(size[1])[None, None, :] < parts[:, 1, None, None]
    return rows & cols


def cells_inside(parts: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) bool: the cells of an (h, w) feature grid over the (H, W) canvas that lie wholly on
    the part (a cell with padding in it would put padding in the memory or the pooling). A part
    thinner than one cell keeps its first row or column, so every image has a cell."""
    rows = torch.clamp(parts[:, 0] * grid[0] // size[0], min=1)  # (N,) whole cells down
    cols = torch.clamp(parts[:, 1] * grid[1] // size[1], min=1)
    return part_pixels(torch.stack([rows, cols], dim=1), grid)


def spread_into_padding(grid: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Grid maps (B, h, w) with each cell outside the part (`inside` (B, h, w) bool, a top-left
    block per image) set to the nearest inside cell's value, so upsampling and blurring never pull
    padding's values onto the part's edge."""
    rows = inside[:, :, 0].sum(dim=1)  # (B,) inside rows
    cols = inside[:, 0, :].sum(dim=1)
    r = torch.minimum(torch.arange(grid.shape[1])[None], rows[:, None] - 1)  # (B, h) nearest inside row
    c = torch.minimum(torch.arange(grid.shape[2])[None], cols[:, None] - 1)  # (B, w)
    b = torch.arange(len(grid))[:, None, None]
    return grid[b, r.to(grid.device)[:, :, None], c.to(grid.device)[:, None, :]]


def cold_padding(maps: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Maps (B, H, W) with the pixels off the part (`pixels` (B, H, W) bool) set to the map's
    minimum on the part: padding is never hotter than the part, so no threshold puts it in a box
    and no maximum lands there."""
    pixels = pixels.to(maps.device)
    low = torch.where(pixels, maps, torch.full_like(maps, math.inf)).flatten(1).amin(dim=1)  # (B,)
    return torch.where(pixels, maps, low[:, None, None])


def masked_max(grid: torch.Tensor, inside: torch.Tensor | None) -> torch.Tensor:
    """The maximum of each map (B, h, w) over its cells `inside` (B, h, w) bool (all when None) -> (B,)."""
    if inside is None:
        return grid.flatten(1).amax(dim=1)
    return torch.where(inside.to(grid.device), grid, torch.full_like(grid, -math.inf)).flatten(1).amax(dim=1)


def clip_boxes(boxes: np.ndarray, part: Sequence[int]) -> np.ndarray:
    """Boxes (K, 4) x1, y1, x2, y2 in canvas pixels cut to the part's (h, w) block at the top-left."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    boxes[:, 0::2] = np.minimum(boxes[:, 0::2], float(part[1]))
    boxes[:, 1::2] = np.minimum(boxes[:, 1::2], float(part[0]))
    return boxes


def describe_sizes(sizes: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Summary of image sizes [(W, H), ...]: counts of each size (the most common first, at most 5),
    the aspect ratio (W / H) min, median and max."""
    aspects = np.array([w / h for w, h in sizes], np.float64)
    kinds, counts = np.unique(np.array(sizes).reshape(-1, 2), axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:5]
    return {"n": len(sizes), "sizes": {f"{kinds[i][0]}x{kinds[i][1]}": int(counts[i]) for i in order},
            "n_sizes": int(len(kinds)), "aspect_min": float(aspects.min()),
            "aspect_median": float(np.median(aspects)), "aspect_max": float(aspects.max())}


# Aspect ratios within this factor of 1 are square enough: a square canvas loses little.
SQUARE_ENOUGH = 1.25


def suggest_canvas(aspect: float, side: int, keep: str = "long", multiple: int = 32) -> list[int] | None:
    """A [height, width] canvas for images of aspect ratio `aspect` (W / H): the `keep` side ("long"
    or "short") at `side` px (the current square resolution), the other the aspect's share of it,
    both rounded to `multiple`; None when the aspect is within SQUARE_ENOUGH of square. "long" costs
    fewer pixels than the square; "short" keeps the square's detail across the part, at more."""
    if 1 / SQUARE_ENOUGH <= aspect <= SQUARE_ENOUGH:
        return None
    ratio = max(aspect, 1 / aspect)  # long / short >= 1
    kept = max(2 * multiple, round(side / multiple) * multiple)
    other = kept / ratio if keep == "long" else kept * ratio
    other = max(2 * multiple, round(other / multiple) * multiple)
    long_side, short = (kept, other) if keep == "long" else (other, kept)
    return [short, long_side] if aspect > 1 else [long_side, short]


def squashed_share(sizes: Sequence[tuple[int, int]], size: tuple[int, int]) -> float:
    """Share of images [(W, H), ...] whose aspect ratio differs from the (H, W) canvas's by more than
    SQUARE_ENOUGH: stretched onto it, they are squashed that much in one direction."""
    aspects = np.array([w / h for w, h in sizes], np.float64) / (size[1] / size[0])
    return float(np.mean(np.maximum(aspects, 1 / aspects) > SQUARE_ENOUGH))


def describe_canvas(sizes: Sequence[tuple[int, int]], image_size: int | Sequence[int], resize: str) -> str:
    """A few lines on how a subset's images [(W, H), ...] meet the canvas: their sizes and aspect
    ratios (`describe_sizes`), the canvas's, how many are squashed on it, and when they are far
    from it, canvases that keep their shape (`suggest_canvas`)."""
    summary, (h, w) = describe_sizes(sizes), canvas(image_size)
    shown = list(image_size) if isinstance(image_size, (list, tuple)) else image_size
    listed = ", ".join(f"{k} ({v})" for k, v in summary["sizes"].items())
    more = summary["n_sizes"] - len(summary["sizes"])
    squashed = squashed_share(sizes, (h, w))
    lines = [f"{summary['n']} images: {listed}" + (f" and {more} other sizes" if more else ""),
             f"aspect ratio (width / height): min {summary['aspect_min']:.2f}, median "
             f"{summary['aspect_median']:.2f}, max {summary['aspect_max']:.2f}; the canvas image_size={shown} "
             f"is {w / h:.2f} (resize={resize!r})"]
    if squashed == 0:
        return "\n".join(lines)
    lines.append(f"{squashed:.0%} of the images differ from the canvas's shape by more than {SQUARE_ENOUGH}x: "
                 + ("padded, they keep their shape" if resize == "pad" else
                    "stretched, they are squashed, and a thin defect across the squashed direction thins too"))
    aspect, side = summary["aspect_median"], max(h, w)
    fewer, detail = suggest_canvas(aspect, side, "long"), suggest_canvas(aspect, side, "short")
    if max(aspect * h / w, w / (aspect * h)) > SQUARE_ENOUGH:  # the canvas is far from their median aspect
        lines.append(f'a canvas of their median aspect: resize="pad" with image_size={side} (square)' if fewer is None
                     else f'a canvas of their median aspect: resize="pad" with image_size={fewer} (the long side at '
                          f"{side} px: fewer pixels) or {detail} (the short side at {side} px: more detail, more time)")
    elif resize != "pad":
        lines.append(f'their median aspect is near the canvas\'s: resize="pad" keeps every image\'s shape on it')
    return "\n".join(lines)
