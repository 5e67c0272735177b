"""Tests of the classification and localisation metrics against hand-computed answers."""

import tracemalloc

import numpy as np
import pytest
import torch
from scipy import ndimage

from utils.calibration import decision_threshold

from utils.metrics import (
    aupro,
    box_detection,
    box_iou_score,
    classification_metrics,
    confusion_counts,
    decision_metrics,
    image_shares,
    localisation_metrics,
    per_defect_type,
    pixel_auroc,
    pointing_game,
    ranking_metrics,
)

Y_TRUE = [1, 1, 1, 0, 0, 0]
Y_PRED = [1, 0, 1, 1, 0, 0]
P_ANOMALY = [0.9, 0.3, 0.8, 0.6, 0.2, 0.1]


def test_confusion_counts():
    assert confusion_counts(Y_TRUE, Y_PRED) == {"TP": 2, "FN": 1, "FP": 1, "TN": 2}
    assert confusion_counts([0, 0], [0, 0]) == {"TP": 0, "FN": 0, "FP": 0, "TN": 2}


def test_classification_metrics_by_hand():
    out = classification_metrics(np.array(Y_TRUE), torch.tensor(Y_PRED), P_ANOMALY)
    assert out["accuracy"] == pytest.approx(4 / 6)
    # recall Anomaly 2/3, recall Good 2/3
    assert out["balanced_accuracy"] == pytest.approx(2 / 3)
    assert out["confusion_matrix"] == {"TP": 2, "FN": 1, "FP": 1, "TN": 2}
    # pairs (anomaly score > good score): 0.9 beats 3, 0.3 beats 2, 0.8 beats 3 -> 8 / 9
    assert out["image_auroc"] == pytest.approx(8 / 9)
    # ranking P P N P N N: AP = 1/3 * 1 + 1/3 * 1 + 1/3 * 3/4 = 11/12
    assert out["image_ap"] == pytest.approx(11 / 12)
    assert all(type(v) is float for k, v in out.items() if k != "confusion_matrix")


def test_classification_metrics_single_class_is_none():
    out = classification_metrics([0, 0, 0], [0, 1, 0], [0.1, 0.7, 0.2])
    assert out["image_auroc"] is None and out["image_ap"] is None
    out = classification_metrics([1, 1], [1, 1], [0.9, 0.7])
    assert out["image_auroc"] is None and out["image_ap"] == pytest.approx(1.0)


def test_ranking_metrics_take_any_score_larger_for_anomaly():
    # distances, not probabilities: the same ranking as P_ANOMALY gives the same 8/9 and 11/12
    distances = [12.0, 4.0, 11.0, 7.5, 3.0, 2.0]
    out = ranking_metrics(Y_TRUE, distances)
    assert out == {"image_auroc": pytest.approx(8 / 9), "image_ap": pytest.approx(11 / 12)}
    assert ranking_metrics([1, 1], [3.0, 9.0]) == {"image_auroc": None, "image_ap": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="same, non-zero length"):
        ranking_metrics([0, 1], [0.5])


def test_classification_metrics_rejects_bad_input():
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0, 1], [0.5])
    with pytest.raises(ValueError):
        classification_metrics([0, 2], [0, 1], [0.5, 0.5])


def test_pixel_auroc_perfect_inverted_and_by_hand():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 1:3, 1:3] = True
    maps = masks.astype(np.float32) + 0.1
    assert pixel_auroc(maps, masks) == pytest.approx(1.0)
    assert pixel_auroc(-maps, masks) == pytest.approx(0.0)
    # positives 0.9, 0.4; negatives 0.4, 0.6: 0.9 beats both (2), 0.4 ties 0.4 (0.5), loses to 0.6 -> 2.5 / 4
    small_map = np.array([[[0.9, 0.4], [0.6, 0.4]]])
    small_mask = np.array([[[True, False], [False, True]]])
    assert pixel_auroc(small_map, small_mask) == pytest.approx(0.625)
    assert pixel_auroc(torch.from_numpy(small_map), torch.from_numpy(small_mask)) == pytest.approx(0.625)


def test_pixel_auroc_undefined_is_none():
    assert pixel_auroc(np.random.rand(2, 3, 3), np.zeros((2, 3, 3), dtype=bool)) is None
    assert pixel_auroc(np.random.rand(2, 3, 3), np.ones((2, 3, 3), dtype=bool)) is None


def _two_region_example() -> tuple[np.ndarray, np.ndarray]:
    """Two images (2, 2, 4): region A (2 px, image 0, column 0), region B (4 px, image 1, columns 2-3).

    Ten negative pixels; two of them (image 0, column 3) score 0.8, the rest 0.
    """
    masks = np.zeros((2, 2, 4), dtype=bool)
    masks[0, :, 0] = True
    masks[1, :, 2:] = True
    maps = np.zeros((2, 2, 4), dtype=np.float32)
    maps[0, :, 0] = 1.0
    maps[0, :, 3] = 0.8
    maps[1, :, 2:] = 0.5
    return maps, masks


def test_aupro_perfect_and_inverted():
    maps, masks = _two_region_example()
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    assert aupro(1.0 - masks.astype(np.float32), masks) == pytest.approx(0.0)


def test_aupro_region_found_at_known_fpr():
    maps, masks = _two_region_example()
    # curve (FPR, PRO): (0, 0) -> t=1.0 finds A: (0, 0.5) -> t=0.8: two of ten negatives: (0.2, 0.5)
    # -> t=0.5 finds B: (0.2, 1.0) -> t=0: (1, 1).
    # area to 0.3 = 0.2 * 0.5 + 0.1 * 1.0 = 0.2 -> / 0.3 = 2/3; area to 0.1 = 0.05 -> / 0.1 = 0.5
    assert aupro(maps, masks) == pytest.approx(2 / 3)
    assert aupro(maps, masks, max_fpr=0.1) == pytest.approx(0.5)


def test_aupro_averages_over_regions_not_pixels():
    maps, masks = _two_region_example()
    maps[1, :, 2] = 1.0  # half of B found together with A
    # t=1.0: A overlap 1, B overlap 1/2 -> PRO 0.75 (pixel-wise it would be 4/6)
    # curve (0, 0), (0, 0.75), (0.2, 0.75), (0.2, 1), (1, 1): area to 0.3 = 0.15 + 0.1 = 0.25 -> 5/6
    assert aupro(maps, masks) == pytest.approx(5 / 6)


def test_aupro_ties_form_one_threshold():
    maps, masks = _two_region_example()
    maps[0, :, 3] = 0.5  # the two negatives tie with region B
    # curve (0, 0), (0, 0.5), (0.2, 1.0), (1, 1): the tie is one step, a sloped segment
    # PRO at FPR 0.1 interpolates to 0.75: area = 0.1 * (0.5 + 0.75) / 2 = 0.0625 -> / 0.1 = 0.625
    assert aupro(maps, masks, max_fpr=0.1) == pytest.approx(0.625)
    assert aupro(maps, masks, max_fpr=0.3) == pytest.approx(0.25 / 0.3)


def _aupro_brute_force(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """Slow reference: evaluate PRO and FPR at every distinct score, then integrate segment by segment."""
    regions = []
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labels == k) for k in range(1, n + 1)]
    negatives = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(np.unique(maps), reverse=True):
        hot = maps >= t
        pro = np.mean([hot[i][region].mean() for i, region in regions])
        fpr = (hot & negatives).sum() / negatives.sum()
        points.append((fpr, pro))
    area = 0.0
    for (f0, p0), (f1, p1) in zip(points, points[1:]):
        if f0 >= max_fpr:
            break
        if f1 > max_fpr:
            p1 = p0 + (p1 - p0) * (max_fpr - f0) / (f1 - f0)
            f1 = max_fpr
        area += (f1 - f0) * (p0 + p1) / 2
    return area / max_fpr


@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(decimals, max_fpr):
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 12, 12), dtype=bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 8:11, 9] = True
    masks[1, 5:7, 1:9] = True
    # image 2 is a good image: its pixels count as negatives
    maps = rng.random(masks.shape).astype(np.float32) + 0.4 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)  # many ties
    expected = _aupro_brute_force(maps, masks, max_fpr)
    assert 0.0 < expected < 1.0
    assert aupro(maps, masks, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-3)


def test_image_shares_by_hand():
    # Negatives 0.1, 0.2, 0.3 (image 0) and 0.05, 0.15 (image 1); defects 0.9 (image 0, one region)
    # and 0.25, 0.12 (image 1, one region of two pixels). Placements among the 5 negatives: 1, 4/5,
    # 2/5: pixel AUROC shares 1/3 and (4/5 + 2/5) / 3. AUPRO (max FPR 0.3, 2 regions): 0.9 turns on
    # at FPR 0, (0.3 - 0) / 0.3 / (1 pixel * 2 regions) = 1/2; 0.25 at FPR 1/5, (0.3 - 0.2) / 0.3 /
    # (2 pixels * 2 regions) = 1/12; 0.12 at FPR 3/5 > 0.3: nothing. Sums: pixel AUROC 2.2/3, AUPRO 7/12.
    maps = np.array([[[0.9, 0.1, 0.2, 0.3]], [[0.25, 0.12, 0.05, 0.15]]])
    masks = np.array([[[1, 0, 0, 0]], [[1, 1, 0, 0]]], dtype=bool)
    auroc_shares, aupro_shares = image_shares(maps, masks)
    np.testing.assert_allclose(auroc_shares, [1 / 3, 1.2 / 3])
    np.testing.assert_allclose(aupro_shares, [1 / 2, 1 / 12])
    assert pixel_auroc(maps, masks) == pytest.approx(2.2 / 3)
    assert aupro(maps, masks) == pytest.approx(7 / 12)
    assert image_shares(maps, np.zeros_like(masks)) is None


@pytest.mark.parametrize("decimals", [None, 1])
def test_image_shares_sum_to_the_metrics(decimals):
    # Catches a share that does not add up to the metric it splits (ties, regions, the part's pixels).
    rng = np.random.default_rng(1)
    masks = np.zeros((6, 20, 20), dtype=bool)
    masks[0, 2:5, 2:6] = masks[0, 12:15, 15] = masks[1, 5:7, 1:9] = masks[3, 10:18, 10:12] = True
    maps = rng.random(masks.shape) + 0.5 * masks
    maps = maps if decimals is None else np.round(maps, decimals)
    valid = np.ones_like(masks)
    valid[:, :, 17:] = False
    for on in (None, valid):
        auroc_shares, aupro_shares = image_shares(maps, masks, valid=on)
        assert auroc_shares[[2, 4, 5]].sum() == 0 and aupro_shares[[2, 4, 5]].sum() == 0
        assert auroc_shares.sum() == pytest.approx(pixel_auroc(maps, masks, on), abs=1e-9)
        assert aupro_shares.sum() == pytest.approx(aupro(maps, masks, valid=on), abs=2e-3)


def test_aupro_undefined_and_bad_max_fpr():
    assert aupro(np.random.rand(2, 4, 4), np.zeros((2, 4, 4), dtype=bool)) is None
    with pytest.raises(ValueError):
        aupro(np.random.rand(1, 4, 4), np.ones((1, 4, 4), dtype=bool), max_fpr=0.0)


def test_pixel_metrics_on_a_full_size_test_set_with_known_answers():
    # 100 images of 224 x 224; defect pixels score U + 0.5, the rest U, U ~ uniform [0, 1).
    # pixel AUROC = P(U1 + 0.5 > U2) = 1 - 1/8 = 0.875.
    # at threshold t: FPR f = 1 - t, PRO = P(U + 0.5 >= t) = min(1, 0.5 + f);
    # area to 0.3 = 0.3 * 0.5 + 0.3 ** 2 / 2 = 0.195 -> / 0.3 = 0.65
    rng = np.random.default_rng(1)
    masks = np.zeros((100, 224, 224), dtype=bool)
    masks[::2, 50:90, 60:120] = True
    maps = rng.random(masks.shape, dtype=np.float32) + np.float32(0.5) * masks
    tracemalloc.start()
    assert pixel_auroc(maps, masks) == pytest.approx(0.875, abs=0.005)
    assert aupro(maps, masks) == pytest.approx(0.65, abs=0.01)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # about 5 M pixels: stay within a few hundred bytes' worth of arrays per pixel at most
    assert peak < 600 * 2**20


def test_pointing_game_half():
    masks = np.zeros((3, 3, 3), dtype=bool)
    maps = np.zeros((3, 3, 3), dtype=np.float32)
    masks[0, 0, 0] = True
    maps[0, 0, 0] = 1.0  # hit
    masks[1, 2, 2] = True
    maps[1, 0, 1] = 1.0  # miss
    maps[2, 1, 1] = 1.0  # good image (empty mask): not counted
    assert pointing_game(maps, masks) == pytest.approx(0.5)


def test_pointing_game_first_argmax_and_none():
    masks = np.zeros((1, 2, 2), dtype=bool)
    masks[0, 0, 0] = True
    assert pointing_game(np.ones((1, 2, 2)), masks) == 1.0  # a flat map points at pixel (0, 0)
    assert pointing_game(np.ones((1, 2, 2)), np.zeros((1, 2, 2), dtype=bool)) is None


def test_box_iou_score_by_hand():
    masks = np.zeros((4, 4, 8), dtype=bool)
    masks[:, 0:2, 0:4] = True  # every image: one region, box [0, 0, 4, 2], 8 pixels
    masks[3] = False  # image 3 is good
    pred = [
        np.array([[2, 0, 6, 2]], dtype=np.float32),  # 4 px overlap, union 12 -> 1/3
        np.zeros((0, 4), dtype=np.float32),  # no box -> 0
        np.array([[5, 2, 8, 4], [0, 0, 2, 2]], dtype=np.float32),  # best: half the region -> 4/8
        np.array([[0, 0, 8, 4]], dtype=np.float32),  # good image: no region, ignored
    ]
    assert box_iou_score(pred, masks) == pytest.approx((1 / 3 + 0 + 0.5) / 3)


def test_box_iou_score_each_region_separately_and_none():
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 0:2, 0:2] = True
    masks[0, 4:6, 4:6] = True
    pred = [np.array([[0, 0, 2, 2]], dtype=np.float32)]
    assert box_iou_score(pred, masks) == pytest.approx(0.5)  # regions: IoU 1 and 0
    assert box_iou_score(pred, np.zeros((1, 6, 6), dtype=bool)) is None
    with pytest.raises(ValueError):
        box_iou_score([], masks)


def test_per_defect_type():
    types = ["good", "good", "crack", "crack", "crack", "hole"]
    out = per_defect_type(types, [0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 1, 0])
    assert list(out) == ["crack", "good", "hole"]
    assert out["crack"] == {"n": 3, "recall": pytest.approx(2 / 3)}
    assert out["good"] == {"n": 2, "recall": 0.5}
    assert out["hole"] == {"n": 1, "recall": 0.0}


def test_localisation_metrics_perfect_map_and_no_masks():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[1, 1:3, 1:3] = True  # one defect region in the second image
    maps = masks.astype(np.float32)  # hot exactly on the defect
    boxes = [np.zeros((0, 4), np.float32), np.array([[1, 1, 3, 3]], np.float32)]
    m = localisation_metrics(maps, masks, boxes, image_scores=[0.1, 0.9], y_true=[0, 1])
    assert m == {"pixel_auroc": 1.0, "aupro": 1.0, "pointing_game": 1.0, "box_iou": 1.0, "box_recall": 1.0,
                 "box_precision": 1.0, "good_images_with_boxes": 0.0, "image_auroc": 1.0}
    empty = localisation_metrics(maps, None, boxes, image_scores=[0.9, 0.1], y_true=[0, 1])
    assert empty == {"pixel_auroc": None, "aupro": None, "pointing_game": None, "box_iou": None,
                     "box_recall": None, "box_precision": None, "good_images_with_boxes": 0.0,
                     "image_auroc": 0.0}


def box_test_set():
    """Three 4 x 8 images: two defective (three regions in all) and one good, with their boxes."""
    masks = np.zeros((3, 4, 8), dtype=bool)
    masks[0, 0:2, 0:2] = True  # region A: box [0, 0, 2, 2], 4 px
    masks[0, 2:4, 6:8] = True  # region B: box [6, 2, 8, 4], 4 px
    masks[1, 0:2, 0:4] = True  # region C: box [0, 0, 4, 2], 8 px
    boxes = [
        np.array([[0, 0, 2, 2], [0, 0, 3, 4]], np.float32),  # A exactly (IoU 1); 2nd box vs A: 4/12 = 1/3
        np.array([[2, 0, 6, 2]], np.float32),  # C: overlap 4, union 12 -> IoU 1/3 >= 0.3, a match
        np.array([[3, 1, 5, 3]], np.float32),  # a box on the good image: a false alarm
    ]
    return masks, boxes, np.array([1, 1, 0])


def test_box_detection_by_hand():
    masks, boxes, y = box_test_set()
    # regions A and C found, B missed: 2/3; boxes matching a region: both of image 0, image 1's: 3 of 4
    assert box_detection(boxes, masks, y) == {"box_recall": pytest.approx(2 / 3), "box_precision": 0.75,
                                              "good_images_with_boxes": 1.0}
    # at IoU 0.5 only the exact box of A matches
    assert box_detection(boxes, masks, y, iou=0.5) == {"box_recall": pytest.approx(1 / 3),
                                                       "box_precision": 0.25, "good_images_with_boxes": 1.0}


def test_box_detection_empty_cases():
    masks, boxes, y = box_test_set()
    none = [np.zeros((0, 4), np.float32)] * 3
    # no boxes: every region missed, precision undefined, no false alarm
    assert box_detection(none, masks, y) == {"box_recall": 0.0, "box_precision": None,
                                             "good_images_with_boxes": 0.0}
    # no regions (all images good): recall undefined, every box a false alarm
    assert box_detection(boxes, np.zeros_like(masks), [0, 0, 0]) == {
        "box_recall": None, "box_precision": 0.0, "good_images_with_boxes": 1.0}
    # no good images: the false-alarm share is undefined
    assert box_detection(boxes[:2], masks[:2], [1, 1])["good_images_with_boxes"] is None
    # no masks: only the good images' share is known
    assert box_detection(boxes, None, y) == {"box_recall": None, "box_precision": None,
                                             "good_images_with_boxes": 1.0}
    with pytest.raises(ValueError, match="one box array per image"):
        box_detection(boxes[:2], masks, y)


def test_decision_block_records_what_the_calibration_promises():
    """metrics.json's decision block: the stated rate, what the calibration promises, the measured
    shares. Catches: decision_metrics without expected_false_alarms and meets_rate (a block that says
    0.05 where the calibration promised 0.091)."""
    decision = decision_threshold(np.arange(10.0), 0.05)  # 10 images: 1/11 at best
    block = decision_metrics(Y_TRUE, Y_PRED, decision)
    assert block == {"rule": "calibrated", "false_alarm_rate": 0.05, "threshold": 9.0,
                     "expected_false_alarms": pytest.approx(1 / 11), "meets_rate": False,
                     "accuracy": pytest.approx(4 / 6), "recall": pytest.approx(2 / 3),
                     "false_alarms": pytest.approx(1 / 3)}
    argmax = decision_metrics(Y_TRUE, Y_PRED, decision_threshold([0.1], None))
    assert argmax["expected_false_alarms"] is None and argmax["meets_rate"] is None
