"""Thresholds from good images the model never trained on: the image decision, each map's box threshold."""

from __future__ import annotations

import math

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

    good_maps[name] is (N, H, W), the maps of good images the model never trained on. Returns {"thresholds": {name: float},
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


def decision_threshold(good_scores, false_alarm_rate: float | None) -> dict:
    """The image decision from scores (N,) of good images the model never trained on.

    false_alarm_rate None keeps the published argmax (Anomaly when the probability is >= 0.5).
    Otherwise the threshold is the k-th smallest score, k = ceil((N + 1) * (1 - rate)), and an image
    is Anomaly when its score exceeds it: a new good image, exchangeable with the calibration
    images, is then flagged with probability (N + 1 - k) / (N + 1) <= rate ("expected_false_alarms").
    With fewer than 1 / rate - 1 images no threshold can promise the rate: the highest score is
    taken and the promise is 1 / (N + 1), above the rate (`meets_rate` False).
    """
    scores = np.sort(to_numpy(good_scores).astype(np.float64).reshape(-1))
    n = len(scores)
    if false_alarm_rate is None:
        return {"rule": "argmax", "false_alarm_rate": None, "threshold": 0.5, "n_images": n}
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate={false_alarm_rate} must lie in (0, 1), or be None for the argmax")
    if n == 0:
        raise ValueError("a calibrated decision needs good images the model never trained on, and there are none")
    k = min(n, math.ceil(round((n + 1) * (1.0 - false_alarm_rate), 9)))  # rounded: float products land just above
    expected = (n + 1 - k) / (n + 1)
    return {"rule": "calibrated", "false_alarm_rate": float(false_alarm_rate), "threshold": float(scores[k - 1]),
            "n_images": n, "expected_false_alarms": expected, "meets_rate": bool(expected <= false_alarm_rate)}


def promise_warning(decision: dict) -> str:
    """What to warn a user of when a calibrated `decision` (`decision_threshold`) cannot promise its
    stated false-alarm rate (too few calibration images: N of them promise at best 1 / (N + 1));
    "" when it can, or for the argmax."""
    if decision.get("rule") != "calibrated" or decision.get("meets_rate") is not False:
        return ""
    rate, promised = decision["false_alarm_rate"], decision["expected_false_alarms"]
    needed = math.ceil(round(1.0 / rate - 1.0, 9))
    return (f"the calibration cannot promise the stated false_alarm_rate={rate:g}: its {decision['n_images']} good "
            f"images promise only that at most {promised:.3f} of new good parts are flagged; {needed} would promise "
            f"{rate:g}. Hold back more good images (calibration_share, or more good training images), or state a "
            f"rate of at least {promised:.3f}.")


def decide(scores, decision: dict) -> np.ndarray:
    """Labels (N,) int64, 1 = Anomaly, of image scores (N,) under a `decision_threshold` rule."""
    scores = to_numpy(scores).astype(np.float64).reshape(-1)
    if decision["rule"] == "argmax":
        return (scores >= 0.5).astype(np.int64)  # the argmax of the two softmax scores
    return (scores > decision["threshold"]).astype(np.int64)


def floors(good_maps: dict[str, np.ndarray], valid=None) -> dict[str, float]:
    """Per map (N, H, W), the level a good part sits at: the median over images of each map's median.
    Figures draw a map from this floor (cold) to its box threshold, so colours mean the same everywhere.
    valid (N, H, W) bool: the part's pixels (resize="pad"), the only ones whose median counts."""
    if valid is None:
        return {name: float(np.median(np.median(to_numpy(m).reshape(len(m), -1), axis=1)))
                for name, m in good_maps.items()}
    keep = to_numpy(valid).astype(bool).reshape(len(valid), -1)
    return {name: float(np.median([np.median(row[k]) for row, k in zip(to_numpy(m).reshape(len(m), -1), keep)]))
            for name, m in good_maps.items()}


def calibrate_all(good_maps: dict[str, np.ndarray], good_scores, *, quantile: float, min_area: int,
                  false_alarm_rate: float | None, method: str, valid=None) -> dict:
    """The checkpoint's "calibration" from the maps (N, H, W) and image scores (N,) of good images
    the model never trained on: box thresholds (`calibrate`), display floors (`floors`, on the
    part's pixels `valid` (N, H, W) bool with resize="pad"), the image decision
    (`decision_threshold`) and how the images were held out (`method`)."""
    out = calibrate(good_maps, quantile, min_area)
    out.update(floors=floors(good_maps, valid), decision=decision_threshold(good_scores, false_alarm_rate), method=method)
    return out
