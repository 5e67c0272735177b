"""Heatmap post-processing: upsampling, per-image normalisation, thresholding to boxes, mask regions."""

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torchvision.ops import masks_to_boxes

from .geometry import cells_inside, clip_boxes, cold_padding, part_pixels, spread_into_padding

# 8-connectivity: diagonal neighbours belong to the same region, as in MVTec AD's region definition.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
BOX_MODES = ("components", "single")


def to_numpy(x) -> np.ndarray:
    """Return a numpy view/copy of a torch tensor (any device) or array-like."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def upsample_maps(maps, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize maps (B, h, w) to (B, H, W) = (B, *size), align_corners=False."""
    maps = torch.as_tensor(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (B, h, w), got {tuple(maps.shape)}")
    # interpolate wants a channel axis: (B, 1, h, w) -> (B, 1, H, W)
    out = F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return out[:, 0]


def grid_to_map(grid: torch.Tensor, size: tuple[int, int], parts: torch.Tensor | None = None,
                smooth: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Grid maps (B, h, w) -> maps (B, H, W): upsampled bilinearly (`upsample_maps`), then `smooth`.
    With parts (B, 2) (resize="pad", `geometry`), the cells off the part first take their nearest
    part cell's value, and the pixels off the part end at the map's minimum on the part."""
    if parts is None:
        out = upsample_maps(grid, size)
        return out if smooth is None else smooth(out)
    inside = cells_inside(parts, size, tuple(grid.shape[-2:]))
    out = upsample_maps(spread_into_padding(grid, inside), size)
    out = out if smooth is None else smooth(out)
    return cold_padding(out, part_pixels(parts, size))


def gaussian_smooth(maps: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Maps (B, H, W) each blurred by a Gaussian of sigma_px pixels (0: returned as they are).

    scipy.ndimage.gaussian_filter's blur (kernel cut at 4 sigma, borders mirrored: mode="mirror"),
    as two 1-D passes: 2 (2r + 1) products per pixel instead of the (2r + 1)^2 of a 2-D kernel (at
    sigma 8 px, 66 against 1089), so the maps of a whole training split blur in a second, and the
    exported ONNX graph runs this very function. PatchCore blurs its upsampled map the same way
    (sigma 4 px at 224 px)."""
    if sigma_px < 0:
        raise ValueError(f"sigma_px={sigma_px} must be >= 0")
    if sigma_px == 0:
        return maps
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (B, H, W), got {tuple(maps.shape)}")
    radius = int(4 * sigma_px + 0.5)
    # the reflected border needs the map to be larger than the kernel's radius
    radius = min(radius, min(maps.shape[-2:]) - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma_px) ** 2)
    kernel = (kernel / kernel.sum()).to(maps.dtype)  # (2r + 1,)
    x = F.pad(maps[:, None], (radius, radius, radius, radius), mode="reflect")  # (B, 1, H + 2r, W + 2r)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))  # along the width: (B, 1, H + 2r, W)
    return F.conv2d(x, kernel.view(1, 1, -1, 1))[:, 0]  # along the height: (B, H, W)


def minmax_normalise(maps) -> np.ndarray:
    """Min-max normalise each map of (N, H, W) to [0, 1]; a constant map becomes all zeros."""
    maps = to_numpy(maps).astype(np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (N, H, W), got {maps.shape}")
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    # a constant map has no hot spot: divide by 1 instead of 0 so it stays all zeros, never NaN
    return (maps - lo) / np.where(span > 0, span, 1.0).astype(np.float32)


def _boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Boxes (K, 4) float32 x1, y1, x2, y2 with exclusive x2, y2 around each non-empty mask of (K, H, W)."""
    if len(masks) == 0:
        return np.zeros((0, 4), dtype=np.float32)
    boxes = masks_to_boxes(torch.from_numpy(np.ascontiguousarray(masks)))
    # masks_to_boxes gives the last covered pixel; +1 makes the edges exclusive so area == pixel count
    boxes[:, 2:] += 1
    return boxes.numpy().astype(np.float32)


def heatmap_to_boxes(
    heatmap, thres: float, mode: str = "components", min_area: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes around the pixels of a [0, 1] heatmap (H, W) with value >= thres.

    mode="components": one box per 8-connected hot component of at least min_area pixels;
    mode="single": one box around all hot pixels (the published behaviour), kept if their
    count is at least min_area. Returns boxes (K, 4) float32 x1, y1, x2, y2 with exclusive
    x2, y2 and scores (K,) float32 = the maximum heat inside each box's pixels, sorted by
    score descending; K = 0 gives shapes (0, 4) and (0,).
    """
    heatmap = to_numpy(heatmap)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must have shape (H, W), got {heatmap.shape}")
    if not 0.0 <= thres <= 1.0:
        raise ValueError(f"thres={thres} must lie in [0, 1]: the heatmap is normalised to [0, 1]")
    if mode not in BOX_MODES:
        raise ValueError(f"mode={mode!r} must be one of {BOX_MODES}")
    if min_area < 1:
        raise ValueError(f"min_area={min_area} must be a positive number of pixels")
    hot = heatmap >= thres
    if mode == "single":
        masks = hot[None] if hot.sum() >= min_area else hot[:0]
        scores = np.array([heatmap.max()] if len(masks) else [], dtype=np.float32)
        return _boxes_from_masks(masks), scores
    return _component_boxes(hot, heatmap, min_area)


def _component_boxes(hot: np.ndarray, values: np.ndarray, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """One box per 8-connected component of the bool (H, W) `hot` with at least min_area pixels,
    scored by the maximum of `values` (H, W) inside it; sorted by score, descending."""
    labels, n = ndimage.label(hot, structure=EIGHT_CONNECTED)
    ids = np.arange(1, n + 1)
    ids = ids[np.bincount(labels.ravel(), minlength=n + 1)[1:] >= min_area]
    masks = labels[None] == ids[:, None, None]  # (K, H, W)
    scores = np.asarray(ndimage.maximum(values, labels, ids), dtype=np.float32).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    return _boxes_from_masks(masks)[order], scores[order]


def calibrated_boxes(
    map_hw: np.ndarray, threshold: float, min_area: int, extent_threshold: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes around the connected regions of a map (H, W) above a calibrated threshold.

    The threshold is in the map's own units (see `calibrate`), so a map that never exceeds it,
    as a good image's should not, gets no box. One box per 8-connected region of pixels
    > threshold with at least min_area pixels. With an `extent_threshold` (<= threshold), a
    region is the connected part above extent_threshold around pixels above threshold (it
    reaches out to where the map is still unusual, not only where it is at its hottest).
    Returns boxes (K, 4) float32 x1, y1, x2, y2 with exclusive x2, y2 and scores (K,) float32 =
    each region's maximum map value, by score descending; K = 0 gives shapes (0, 4) and (0,).
    """
    map_hw = to_numpy(map_hw).astype(np.float32, copy=False)
    if map_hw.ndim != 2:
        raise ValueError(f"map_hw must have shape (H, W), got {map_hw.shape}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold={threshold} must be a finite number in the map's units")
    if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 1:
        raise ValueError(f"min_area={min_area!r} must be a positive number of pixels")
    if extent_threshold is None:
        return _component_boxes(map_hw > threshold, map_hw, int(min_area))
    if not np.isfinite(extent_threshold) or extent_threshold > threshold:
        raise ValueError(f"extent_threshold={extent_threshold} must be a finite number <= threshold={threshold}")
    boxes, scores = _component_boxes(map_hw > extent_threshold, map_hw, int(min_area))
    keep = scores > threshold  # regions that reach above the threshold somewhere
    return boxes[keep], scores[keep]


def strongest_region(map_hw: np.ndarray, heatmap_thres: float) -> tuple[np.ndarray, np.ndarray]:
    """The box (1, 4) around the hottest part of a map (H, W) and its score (1,), the map's maximum:
    the 8-connected region holding the maximum among the pixels at or above `heatmap_thres` of the
    map's own range (the published rule, kept to the one region where the map peaks). A constant
    map has no hottest part: the box is the whole map."""
    map_hw = to_numpy(map_hw).astype(np.float32, copy=False)
    peak = np.unravel_index(int(np.argmax(map_hw)), map_hw.shape)
    hot = minmax_normalise(map_hw[None])[0] >= heatmap_thres
    labels, _ = ndimage.label(hot, structure=EIGHT_CONNECTED)
    region = labels == labels[peak] if hot[peak] else np.ones_like(hot)
    return _boxes_from_masks(region[None]), np.array([map_hw[peak]], dtype=np.float32)


def label_boxes(map_hw: np.ndarray, anomalous: bool, threshold: float, min_area: int,
                heatmap_thres: float) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (K, 4) and scores (K,) of one map (H, W) that agree with its image's label: none on an
    image labelled Good; on one labelled Anomaly, the regions above the map's calibrated
    `threshold` (`calibrated_boxes`), or, when none is, its strongest region (`strongest_region`),
    so every Anomaly shows where it is."""
    if not anomalous:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    boxes, scores = calibrated_boxes(map_hw, threshold, min_area)
    return (boxes, scores) if len(boxes) else strongest_region(map_hw, heatmap_thres)


DISPLAY_LEVEL = 2 / 3  # where a map's box threshold sits on the figures' colour scale


def calibrated_display(maps, floor: float, threshold: float) -> np.ndarray:
    """Maps (N, H, W) on one colour scale for every image: 0 at `floor` (where good parts sit),
    DISPLAY_LEVEL at the box `threshold`, 1 half as far again above it, clipped to [0, 1]. The same
    colour then means the same evidence in every image, and a good part looks cold."""
    maps = to_numpy(maps).astype(np.float32)
    span = float(threshold) - float(floor)
    if not span > 0:  # a degenerate calibration: keep the threshold where it belongs on the scale
        span = abs(float(threshold)) or 1.0
    return np.clip((maps - float(floor)) / span * DISPLAY_LEVEL, 0.0, 1.0)


def mask_regions(mask) -> np.ndarray:
    """Label the 8-connected regions of a bool mask (H, W): int32 (H, W), 0 = background."""
    mask = to_numpy(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {mask.shape}")
    labels, _ = ndimage.label(mask.astype(bool), structure=EIGHT_CONNECTED)
    return labels.astype(np.int32)


def regions_to_boxes(labels) -> np.ndarray:
    """Boxes (R, 4) float32 x1, y1, x2, y2 (exclusive x2, y2) of each label > 0 of (H, W), by label."""
    labels = to_numpy(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must have shape (H, W), got {labels.shape}")
    ids = np.unique(labels)
    ids = ids[ids > 0]
    return _boxes_from_masks(labels[None] == ids[:, None, None])


def probability_scaled(maps, probs) -> np.ndarray:
    """Per-image min-max normalised maps (N, H, W) times the Anomaly probability (N,) of each image.

    The result is comparable across images: a good image with low probability stays cold.
    """
    probs = to_numpy(probs).astype(np.float32).reshape(-1)
    normalised = minmax_normalise(maps)
    if len(probs) != len(normalised):
        raise ValueError(f"got {len(probs)} probabilities for {len(normalised)} maps: need one per map")
    return normalised * probs[:, None, None]


def boxes_for_maps(maps, thres: float, mode: str = "components") -> list[np.ndarray]:
    """Boxes (K_i, 4) of each map of (N, H, W) after per-image min-max normalisation.

    One rule for every localiser: normalise each map to [0, 1] on its own, keep pixels >= thres.
    """
    return [heatmap_to_boxes(m, thres, mode=mode)[0] for m in minmax_normalise(maps)]


BOX_THRESHOLDS = ("calibrated", "minmax")


def boxes_for_rule(
    maps: dict[str, np.ndarray], box_threshold: str, *, labels, heatmap_thres: float, box_mode: str = "components",
    calibration: dict | None = None, parts=None,
) -> dict[str, list[np.ndarray]]:
    """Boxes (K_i, 4) of each image of each map (N, H, W) of `localizers.localizer_maps` under one
    rule, drawn on the images `labels` (N,) marks Anomaly only.

    "calibrated": regions above the map's calibrated threshold, or the strongest region when none
    is (`label_boxes`); "minmax": the published rule, each map normalised per image and cut at
    heatmap_thres. With parts (N, 2) (resize="pad"), every box is cut to its image's part.
    """
    boxes = _boxes_for_rule(maps, box_threshold, labels=labels, heatmap_thres=heatmap_thres, box_mode=box_mode,
                            calibration=calibration)
    if parts is None:
        return boxes
    return {name: [clip_boxes(b, part) for b, part in zip(stack, to_numpy(parts))] for name, stack in boxes.items()}


def _boxes_for_rule(maps, box_threshold, *, labels, heatmap_thres, box_mode, calibration):
    if box_threshold not in BOX_THRESHOLDS:
        raise ValueError(f"box_threshold={box_threshold!r} must be one of {BOX_THRESHOLDS}")
    labels = to_numpy(labels).reshape(-1)
    if box_threshold == "minmax":
        boxes = {name: boxes_for_maps(m, heatmap_thres, box_mode) for name, m in maps.items()}
        return {name: [b if labels[i] else b[:0] for i, b in enumerate(stack)] for name, stack in boxes.items()}
    if not calibration:
        raise ValueError('box_threshold="calibrated" needs the checkpoint\'s "calibration": retrain with '
                         'Training.ipynb, or use box_threshold="minmax"')
    missing = sorted(set(maps) - set(calibration["thresholds"]))
    if missing:
        raise ValueError(f"the calibration has no threshold for {missing}: retrain with Training.ipynb, "
                         'or use box_threshold="minmax"')
    return {name: [label_boxes(m, bool(labels[i]), calibration["thresholds"][name], calibration["min_area"],
                               heatmap_thres)[0] for i, m in enumerate(stack)]
            for name, stack in maps.items()}
