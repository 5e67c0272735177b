"""The decision and box thresholds from good images the model never trained on: hand-built scores and maps."""

import numpy as np
import pytest

from utils.calibration import (calibrate, calibrate_all, calibration_threshold, decide, decision_threshold, floors,
                               promise_warning)


def test_decision_threshold_flags_the_stated_share_of_new_good_images():
    scores = np.arange(1.0, 20.0)  # 19 good calibration images scoring 1, 2, ..., 19
    d = decision_threshold(scores[::-1], 0.1)
    # k = ceil(20 * 0.9) = 18: the 18th smallest score; a new good image exceeds it with probability 2/20
    assert d["rule"] == "calibrated" and d["threshold"] == 18.0 and d["n_images"] == 19
    assert d["expected_false_alarms"] == pytest.approx(0.1) and d["meets_rate"]
    np.testing.assert_array_equal(decide([17.5, 18.0, 18.5, 30.0], d), [0, 0, 1, 1])  # strictly above
    # rank-based: with calibration and new good images from one distribution, the share of new good
    # images flagged averages (N + 1 - k) / (N + 1) = 5 / 100 over calibration draws (sd of the mean 0.0007)
    rng = np.random.default_rng(0)
    rates = [decide(rng.normal(size=2000), decision_threshold(rng.normal(size=99), 0.05)).mean() for _ in range(1000)]
    assert abs(np.mean(rates) - 0.05) < 0.003


def test_too_few_images_cannot_promise_the_rate_and_say_so():
    d = decision_threshold([0.1, 0.4, 0.2, 0.3, 0.5], 0.05)  # 5 images: 1 / 6 is the best promise
    assert d["threshold"] == 0.5 and not d["meets_rate"] and d["expected_false_alarms"] == pytest.approx(1 / 6)


def test_a_promise_short_of_the_stated_rate_is_warned_of():
    """toothbrush's 10 held-back images promise 1/11 = 9.1 %, not the stated 5 %; 19 images keep it.
    Catches: promise_warning returning "" (Training, Evaluation and predict.py then stay silent)."""
    short = promise_warning(decision_threshold(np.arange(10.0), 0.05))
    assert "false_alarm_rate=0.05" in short and "its 10 good images" in short and "at most 0.091" in short
    assert "19 would promise 0.05" in short
    assert promise_warning(decision_threshold(np.arange(19.0), 0.05)) == ""
    assert promise_warning(decision_threshold(np.arange(5.0), None)) == ""  # the argmax promises nothing


def test_argmax_rule_and_bad_rates():
    d = decision_threshold([0.2, 0.9], None)
    assert d == {"rule": "argmax", "false_alarm_rate": None, "threshold": 0.5, "n_images": 2}
    np.testing.assert_array_equal(decide([0.49, 0.5, 0.51], d), [0, 1, 1])  # the argmax of two softmax scores
    for rate in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="false_alarm_rate"):
            decision_threshold([0.1], rate)
    with pytest.raises(ValueError, match="none"):
        decision_threshold([], 0.05)


def test_calibration_threshold_is_a_quantile_of_image_maxima():
    maps = np.zeros((4, 3, 3), np.float32)
    maps[:, 1, 1] = [1.0, 2.0, 3.0, 4.0]  # the images' maxima
    assert calibration_threshold(maps, 1.0) == 4.0
    assert calibration_threshold(maps, 0.5) == pytest.approx(2.5)  # linear interpolation, like np.quantile
    with pytest.raises(ValueError, match="quantile"):
        calibration_threshold(maps, 1.5)
    with pytest.raises(ValueError, match="N >= 1"):
        calibration_threshold(np.zeros((0, 3, 3)), 0.9)


def test_calibrate_all_keeps_thresholds_floors_and_the_decision():
    maps = {"cam": np.stack([np.full((2, 2), v, np.float32) for v in (0.1, 0.2, 0.3)]),
            "patch_knn": np.stack([np.array([[1.0, 1.0], [1.0, 5.0]], np.float32)] * 3)}
    assert floors(maps) == {"cam": pytest.approx(0.2), "patch_knn": pytest.approx(1.0)}  # median of medians
    out = calibrate_all(maps, [0.1, 0.2, 0.3], quantile=1.0, min_area=16, false_alarm_rate=None, method="holdout")
    assert out["thresholds"] == calibrate(maps, 1.0, 16)["thresholds"] == {"cam": pytest.approx(0.3), "patch_knn": 5.0}
    assert out["decision"]["rule"] == "argmax" and out["method"] == "holdout" and out["min_area"] == 16
