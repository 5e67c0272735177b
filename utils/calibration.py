"""Thresholds from good images the model never trained on: each map's box threshold."""

from __future__ import annotations

import numpy as np

from .postprocess import to_numpy


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
    """The checkpoint's "calibration": a threshold per map of `localizers.localizer_maps` from good images.

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
