"""Heatmap post-processing: upsampling, per-image normalisation, thresholding to boxes, mask regions."""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torchvision.ops import masks_to_boxes

from .explain import EXPLAIN, EXPLANATIONS, REFERENCE_EXPLANATIONS

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


def resize_mask_nearest(mask, size: tuple[int, int]) -> np.ndarray:
    """Resize a bool/uint8 mask (H, W) to bool (size_h, size_w) with PIL Image.resize(NEAREST).

    Nearest neighbour only: interpolating a mask would invent fractional labels at the edges.
    """
    mask = to_numpy(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {mask.shape}")
    size_h, size_w = size
    image = Image.fromarray((mask > 0).astype(np.uint8) * 255)
    # PIL takes (width, height)
    return np.asarray(image.resize((size_w, size_h), Image.Resampling.NEAREST)) > 0


def probability_scaled(maps, probs) -> np.ndarray:
    """Per-image min-max normalised maps (N, H, W) times the Anomaly probability (N,) of each image.

    The result is comparable across images: a good image with low probability stays cold.
    """
    probs = to_numpy(probs).astype(np.float32).reshape(-1)
    normalised = minmax_normalise(maps)
    if len(probs) != len(normalised):
        raise ValueError(f"got {len(probs)} probabilities for {len(normalised)} maps: need one per map")
    return normalised * probs[:, None, None]


MEMORY_LOCALIZERS = ("patch_knn", "cam_knn")  # these need the checkpoint's patch memory
LOCALIZERS = ("cam", *MEMORY_LOCALIZERS, *EXPLANATIONS, "explain")
CLASSIFIER_LOCALIZERS = ("cam", "cam_knn", *EXPLANATIONS, "explain")  # need the trained classifier
# need the checkpoint's explanation reference (checkpoints of Training.ipynb with a classifier have it)
REFERENCE_LOCALIZERS = (*REFERENCE_EXPLANATIONS, *(("explain",) if EXPLAIN in REFERENCE_EXPLANATIONS else ()))


def check_localizer(localizer: str, has_classifier: bool, has_memory: bool, checkpoint: str = "the checkpoint",
                    has_reference: bool = True) -> None:
    """Raise a ValueError naming what is missing when `localizer` cannot be computed from a checkpoint."""
    if localizer not in LOCALIZERS:
        raise ValueError(f"localizer={localizer!r} must be one of {LOCALIZERS}.")
    if localizer in CLASSIFIER_LOCALIZERS and not has_classifier:
        usable = [name for name in MEMORY_LOCALIZERS if name not in CLASSIFIER_LOCALIZERS]
        raise ValueError(
            f"localizer={localizer!r} needs the classifier, but {checkpoint} has none (its training split "
            f"had no Anomaly images): use localizer={usable[0]!r}, or train on a split with Anomaly images."
        )
    if localizer in MEMORY_LOCALIZERS and not has_memory:
        raise ValueError(f"localizer={localizer!r} needs the patch memory, but {checkpoint} has none: "
                         f"train with patch_memory_size > 0.")
    if localizer in REFERENCE_LOCALIZERS and not has_reference:
        raise ValueError(f"localizer={localizer!r} needs the explanation reference (the good training images' "
                         f"mean features), but {checkpoint} predates it: train again with Training.ipynb, or "
                         f"use localizer='layercam_s8'.")


def localizer_maps(cam, p_anomaly, patch_map=None, explanations: dict | None = None) -> dict[str, np.ndarray]:
    """Pixel-scoring maps (N, H, W) per localiser, each comparable across images.

    cam and p_anomaly are None for a model without a classifier: then only "patch_knn" exists.

    "cam": the per-image min-max CAM scaled by the image's Anomaly probability (the raw CAM's
    scale differs between images; see the README for the measurement behind this choice);
    "patch_knn": the nearest-neighbour distance to good training patches (its scale is fixed by
    the memory); "cam_knn": their product, the patch distance kept where the classifier looks.
    `explanations` ({name: raw (N, H, W)} of `utils.explain`) are scaled as the CAM is, and
    "explain" is the one named by `explain.EXPLAIN`.
    """
    if cam is None and patch_map is None:
        raise ValueError("localizer_maps needs a CAM, a patch map or both; got neither")
    maps = {} if cam is None else {"cam": probability_scaled(cam, p_anomaly)}
    if patch_map is not None:
        patch_map = to_numpy(patch_map).astype(np.float32)
        maps["patch_knn"] = patch_map
        if cam is not None:
            maps["cam_knn"] = patch_map * minmax_normalise(cam)
    for name, m in (explanations or {}).items():
        maps[name] = probability_scaled(m, p_anomaly)
    if EXPLAIN in maps:
        maps["explain"] = maps[EXPLAIN]
    return maps


def localizer_image_scores(maps: dict[str, np.ndarray], p_anomaly, patch_score=None) -> dict[str, np.ndarray]:
    """Image-level score (N,) per localiser of `localizer_maps`: the classifier's Anomaly
    probability for "cam" and the explanations, the patch map's maximum (at feature resolution)
    for "patch_knn", the map's maximum for "cam_knn"."""
    scores = {name: to_numpy(p_anomaly) for name in maps if name not in MEMORY_LOCALIZERS}
    if "patch_knn" in maps:
        scores["patch_knn"] = to_numpy(patch_score)
    if "cam_knn" in maps:
        scores["cam_knn"] = maps["cam_knn"].reshape(len(maps["cam_knn"]), -1).max(axis=1)
    return scores


def boxes_for_maps(maps, thres: float, mode: str = "components") -> list[np.ndarray]:
    """Boxes (K_i, 4) of each map of (N, H, W) after per-image min-max normalisation.

    One rule for every localiser: normalise each map to [0, 1] on its own, keep pixels >= thres.
    """
    return [heatmap_to_boxes(m, thres, mode=mode)[0] for m in minmax_normalise(maps)]


BOX_THRESHOLDS = ("calibrated", "minmax")


def calibration_threshold(good_maps, quantile: float = 1.0) -> float:
    """Threshold (map units) from maps (N, H, W) of good images that did not build the map.

    The `quantile` of the images' maxima: 1.0 is the highest value any good image reached (no
    good calibration image would get a box), 0.9 lets the hottest tenth of them through.
    """
    good_maps = to_numpy(good_maps).astype(np.float32, copy=False)
    if good_maps.ndim != 3 or len(good_maps) == 0:
        raise ValueError(f"good_maps must have shape (N, H, W) with N >= 1, got {good_maps.shape}: "
                         "calibration needs good images that did not build the map")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile={quantile} must lie in [0, 1]")
    peaks = good_maps.reshape(len(good_maps), -1).max(axis=1)  # (N,)
    return float(np.quantile(peaks.astype(np.float64), quantile))


def calibrate(good_maps: dict[str, np.ndarray], quantile: float, min_area: int) -> dict:
    """The checkpoint's "calibration": a threshold per map of `localizer_maps` from good images.

    good_maps[name] is (N, H, W), the maps of good images that did not build that map's reference
    (for the patch map, leave-one-image-out maps). Returns {"thresholds": {name: float},
    "min_area": int, "rule": str, "quantile": float, "n_images": {name: int}}.
    """
    if not good_maps:
        raise ValueError("good_maps is empty: give the maps of at least one localiser")
    if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 1:
        raise ValueError(f"min_area={min_area!r} must be a positive number of pixels")
    return {
        "thresholds": {name: calibration_threshold(m, quantile) for name, m in good_maps.items()},
        "min_area": int(min_area),
        "rule": f"quantile {quantile:g} of the per-image maxima of good calibration images",
        "quantile": float(quantile),
        "n_images": {name: int(len(m)) for name, m in good_maps.items()},
    }


def boxes_for_rule(
    maps: dict[str, np.ndarray], box_threshold: str, *, heatmap_thres: float, box_mode: str = "components",
    calibration: dict | None = None,
) -> dict[str, list[np.ndarray]]:
    """Boxes (K_i, 4) of each image of each map (N, H, W) of `localizer_maps` under one rule.

    "calibrated": regions above the map's calibrated threshold (`calibrated_boxes`);
    "minmax": the published rule, each map normalised per image and cut at heatmap_thres.
    """
    if box_threshold not in BOX_THRESHOLDS:
        raise ValueError(f"box_threshold={box_threshold!r} must be one of {BOX_THRESHOLDS}")
    if box_threshold == "minmax":
        return {name: boxes_for_maps(m, heatmap_thres, box_mode) for name, m in maps.items()}
    if not calibration:
        raise ValueError('box_threshold="calibrated" needs the checkpoint\'s "calibration": retrain with '
                         'Training.ipynb, or use box_threshold="minmax"')
    missing = sorted(set(maps) - set(calibration["thresholds"]))
    if missing:
        raise ValueError(f"the calibration has no threshold for {missing}: retrain with Training.ipynb, "
                         'or use box_threshold="minmax"')
    return {
        name: [calibrated_boxes(m, calibration["thresholds"][name], calibration["min_area"])[0] for m in stack]
        for name, stack in maps.items()
    }
