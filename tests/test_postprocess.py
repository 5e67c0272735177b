"""Tests of heatmap post-processing on tiny hand-made arrays."""

import numpy as np
import pytest
import torch

from utils.localizers import check_localizer, localizer_image_scores, localizer_maps
from utils.postprocess import (
    DISPLAY_LEVEL,
    boxes_for_maps,
    boxes_for_rule,
    calibrated_boxes,
    calibrated_display,
    gaussian_smooth,
    heatmap_to_boxes,
    mask_regions,
    minmax_normalise,
    probability_scaled,
    regions_to_boxes,
    strongest_region,
    upsample_maps,
)


def test_upsample_constant_and_shape():
    maps = torch.full((2, 7, 7), 3.0)
    out = upsample_maps(maps, (224, 224))
    assert out.shape == (2, 224, 224)
    assert torch.allclose(out, torch.full_like(out, 3.0))


def test_upsample_bilinear_half_pixel_centres():
    # align_corners=False on [0, 1] -> 4 samples: sample centres map to source x = -0.25, 0.25, 0.75, 1.25,
    # clamped at the borders, so the values are 0, 0.25, 0.75, 1
    out = upsample_maps(torch.tensor([[[0.0, 1.0]]]), (1, 4))
    assert torch.allclose(out, torch.tensor([[[0.0, 0.25, 0.75, 1.0]]]))


@pytest.mark.parametrize("sigma", [1.5, 4.0, 8.0])
def test_blur_is_scipys_gaussian_filter(sigma):
    """The maps' blur is scipy's Gaussian (cut at 4 sigma, mirrored borders), non-square maps included.
    Fails when: the kernel is cut at 3 sigma, the borders are padded with zeros or repeated, or the
    two 1-D passes run along the same axis."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    maps = rng.random((2, 48, 80)).astype(np.float32) * 5
    ours = gaussian_smooth(torch.from_numpy(maps), sigma).numpy()
    for m, o in zip(maps, ours):
        np.testing.assert_allclose(o, gaussian_filter(m.astype(np.float64), sigma, mode="mirror", truncate=4.0),
                                   atol=2e-5, rtol=0)
    same = torch.from_numpy(maps)
    assert gaussian_smooth(same, 0) is same


def test_minmax_normalise_per_image_and_constant():
    maps = np.array([[[2.0, 4.0], [6.0, 10.0]], [[5.0, 5.0], [5.0, 5.0]]])
    out = minmax_normalise(torch.from_numpy(maps))
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out[0], [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(out[1], np.zeros((2, 2)))


def test_square_blob_gives_exactly_its_box():
    heat = np.zeros((10, 10), dtype=np.float32)
    heat[2:5, 3:6] = 0.9  # rows 2..4, columns 3..5
    heat[3, 4] = 1.0
    boxes, scores = heatmap_to_boxes(heat, 0.5)
    np.testing.assert_array_equal(boxes, [[3, 2, 6, 5]])
    np.testing.assert_allclose(scores, [1.0])
    assert boxes.dtype == np.float32 and scores.dtype == np.float32
    # exclusive edges: box area == pixel count of the filled rectangle
    assert (boxes[0, 2] - boxes[0, 0]) * (boxes[0, 3] - boxes[0, 1]) == 9


def test_two_blobs_give_two_boxes_sorted_by_score_and_one_in_single_mode():
    heat = np.zeros((8, 10), dtype=np.float32)
    heat[0:2, 0:2] = 0.6
    heat[5:8, 6:9] = 0.8
    boxes, scores = heatmap_to_boxes(heat, 0.5)
    np.testing.assert_array_equal(boxes, [[6, 5, 9, 8], [0, 0, 2, 2]])
    np.testing.assert_allclose(scores, [0.8, 0.6])
    boxes, scores = heatmap_to_boxes(heat, 0.5, mode="single")
    np.testing.assert_array_equal(boxes, [[0, 0, 9, 8]])
    np.testing.assert_allclose(scores, [0.8])


def test_diagonal_pixels_are_one_component():
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[1, 1] = heat[2, 2] = 1.0
    boxes, _ = heatmap_to_boxes(heat, 0.5)
    np.testing.assert_array_equal(boxes, [[1, 1, 3, 3]])


def test_min_area_drops_small_components():
    heat = np.zeros((6, 6), dtype=np.float32)
    heat[0, 5] = 1.0  # 1 pixel
    heat[3:5, 0:2] = 0.7  # 4 pixels
    boxes, scores = heatmap_to_boxes(heat, 0.5, min_area=2)
    np.testing.assert_array_equal(boxes, [[0, 3, 2, 5]])
    np.testing.assert_allclose(scores, [0.7])


@pytest.mark.parametrize("mode", ["components", "single"])
def test_cold_map_gives_no_box(mode):
    boxes, scores = heatmap_to_boxes(np.full((5, 5), 0.2, dtype=np.float32), 0.5, mode=mode)
    assert boxes.shape == (0, 4) and scores.shape == (0,)


@pytest.mark.parametrize("mode", ["components", "single"])
def test_hot_pixel_at_origin(mode):
    heat = np.zeros((5, 5), dtype=np.float32)
    heat[0, 0] = 1.0
    boxes, scores = heatmap_to_boxes(heat, 0.7, mode=mode)
    np.testing.assert_array_equal(boxes, [[0, 0, 1, 1]])
    np.testing.assert_allclose(scores, [1.0])


def test_threshold_is_inclusive_and_higher_threshold_gives_smaller_box():
    # concentric rings: value 1.0 at the centre, 0.7 around it, 0.4 around that
    heat = np.zeros((7, 7), dtype=np.float32)
    heat[1:6, 1:6] = 0.4
    heat[2:5, 2:5] = 0.7
    heat[3, 3] = 1.0
    expected = {0.4: [1, 1, 6, 6], 0.5: [2, 2, 5, 5], 0.7: [2, 2, 5, 5], 1.0: [3, 3, 4, 4]}
    areas = []
    for thres, box in expected.items():
        boxes, _ = heatmap_to_boxes(heat, thres)
        np.testing.assert_array_equal(boxes, [box])
        areas.append((boxes[0, 2] - boxes[0, 0]) * (boxes[0, 3] - boxes[0, 1]))
    assert areas == sorted(areas, reverse=True)


def test_heatmap_to_boxes_accepts_tensor():
    heat = torch.zeros(4, 4)
    heat[3, 3] = 1.0
    boxes, _ = heatmap_to_boxes(heat, 0.5)
    np.testing.assert_array_equal(boxes, [[3, 3, 4, 4]])


@pytest.mark.parametrize("kwargs", [{"thres": 1.5}, {"thres": -0.1}, {"thres": 0.5, "mode": "blobs"}])
def test_heatmap_to_boxes_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        heatmap_to_boxes(np.zeros((3, 3)), **kwargs)


def test_mask_regions_and_their_boxes():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one region
    mask[4:6, 3:6] = True
    labels = mask_regions(mask)
    assert labels.dtype == np.int32
    assert labels.max() == 2 and labels[0, 0] == labels[1, 1] != labels[5, 5]
    assert (labels[~mask] == 0).all()
    np.testing.assert_array_equal(regions_to_boxes(labels), [[0, 0, 2, 2], [3, 4, 6, 6]])
    assert regions_to_boxes(np.zeros((3, 3), dtype=np.int32)).shape == (0, 4)


def test_probability_scaled_keeps_low_probability_images_cold():
    maps = np.array([[[0.0, 2.0], [1.0, 2.0]], [[3.0, 3.0], [4.0, 5.0]]])
    out = probability_scaled(maps, np.array([0.1, 0.8]))
    np.testing.assert_allclose(out[0], [[0.0, 0.1], [0.05, 0.1]], rtol=1e-6)
    np.testing.assert_allclose(out[1], [[0.0, 0.0], [0.4, 0.8]], rtol=1e-6)
    with pytest.raises(ValueError):
        probability_scaled(maps, np.array([0.5]))


def test_localizer_maps_and_scores_by_hand():
    cam = np.array([[[0.0, 2.0], [4.0, 8.0]], [[1.0, 1.0], [1.0, 1.0]]], dtype=np.float32)
    prob = np.array([0.5, 0.9])
    patch = np.array([[[1.0, 0.0], [0.0, 3.0]], [[2.0, 2.0], [2.0, 2.0]]], dtype=np.float32)
    maps = localizer_maps(cam, prob, patch)
    # cam: min-max per image (0, .25, .5, 1) times 0.5; a constant CAM is all zeros
    np.testing.assert_allclose(maps["cam"][0], [[0.0, 0.125], [0.25, 0.5]])
    np.testing.assert_allclose(maps["cam"][1], 0.0)
    np.testing.assert_allclose(maps["patch_knn"], patch)
    np.testing.assert_allclose(maps["cam_knn"][0], [[0.0, 0.0], [0.0, 3.0]])
    # patch_cam: the patch map times 1 + the scaled CAM: raised by half at the CAM's peak (p = 0.5),
    # kept where the CAM is cold and everywhere in an image whose CAM says nothing
    np.testing.assert_allclose(maps["patch_cam"][0], [[1.0, 0.0], [0.0, 4.5]])
    np.testing.assert_allclose(maps["patch_cam"][1], patch[1])
    scores = localizer_image_scores(maps, prob, np.array([3.0, 2.0]))
    np.testing.assert_allclose(scores["cam"], prob)
    np.testing.assert_allclose(scores["patch_knn"], [3.0, 2.0])
    np.testing.assert_allclose(scores["cam_knn"], [3.0, 0.0])
    np.testing.assert_allclose(scores["patch_cam"], [4.5, 2.0])
    assert set(localizer_maps(cam, prob)) == {"cam"}


def test_boxes_for_maps_normalise_each_map_before_thresholding():
    maps = np.zeros((2, 6, 6), dtype=np.float32)
    maps[0, 1:3, 2:5] = 10.0  # scale 10
    maps[1, 4, 0] = 0.001  # tiny scale: normalised per image it is as hot as the first
    boxes = boxes_for_maps(maps, 0.5)
    np.testing.assert_array_equal(boxes[0], [[2, 1, 5, 3]])
    np.testing.assert_array_equal(boxes[1], [[0, 4, 1, 5]])


def test_calibrated_boxes_fit_a_known_blob_in_map_units():
    m = np.full((10, 12), 0.2, dtype=np.float32)
    m[2:5, 3:9] = 3.0  # a 3 x 6 blob far above the good level
    m[3, 4] = 4.0  # its peak
    boxes, scores = calibrated_boxes(m, threshold=1.0, min_area=1)
    np.testing.assert_array_equal(boxes, [[3, 2, 9, 5]])
    np.testing.assert_array_equal(scores, [4.0])  # the region's maximum, in map units
    assert boxes.dtype == np.float32 and scores.dtype == np.float32


def test_calibrated_boxes_none_when_the_map_never_exceeds_the_threshold():
    m = np.full((6, 6), 0.5, dtype=np.float32)
    m[0, 0] = 0.9
    for threshold in (0.9, 2.0):  # equal is not above: a good image at the calibration maximum gets no box
        boxes, scores = calibrated_boxes(m, threshold, min_area=1)
        assert boxes.shape == (0, 4) and scores.shape == (0,)
    # unlike the min-max rule, which always finds the image's own hottest part
    assert len(heatmap_to_boxes(minmax_normalise(m[None])[0], 0.7)[0]) == 1


def test_calibrated_boxes_min_area_and_order():
    m = np.zeros((8, 8), dtype=np.float32)
    m[0, 0] = 9.0  # one hot pixel: the largest value, but below min_area
    m[4:7, 4:7] = 2.0  # 9 pixels
    m[0:2, 5:7] = 3.0  # 4 pixels
    boxes, scores = calibrated_boxes(m, threshold=1.0, min_area=4)
    np.testing.assert_array_equal(boxes, [[5, 0, 7, 2], [4, 4, 7, 7]])
    np.testing.assert_array_equal(scores, [3.0, 2.0])


@pytest.mark.parametrize("kwargs", [dict(threshold=float("nan"), min_area=1), dict(threshold=1.0, min_area=0),
                                    dict(threshold=1.0, min_area=2.5)])
def test_calibrated_boxes_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        calibrated_boxes(np.zeros((4, 4)), **kwargs)
    with pytest.raises(ValueError, match="shape"):
        calibrated_boxes(np.zeros((1, 4, 4)), threshold=1.0, min_area=1)


def test_boxes_for_rule_calibrated_and_minmax_follow_the_labels():
    maps = {"cam": np.zeros((3, 6, 6), np.float32)}
    maps["cam"][0, 1:3, 1:3] = 0.8  # defective image: hot well above the good level
    maps["cam"][1, 4, 4] = 0.05  # good image: its own maximum, yet below the threshold
    maps["cam"][2, 0, 5] = 0.5  # passes the threshold, but the image is labelled Good
    cal = {"thresholds": {"cam": 0.1}, "min_area": 1}
    labels = [1, 0, 0]
    boxes = boxes_for_rule(maps, "calibrated", labels=labels, heatmap_thres=0.7, calibration=cal)["cam"]
    np.testing.assert_array_equal(boxes[0], [[1, 1, 3, 3]])
    assert boxes[1].shape == boxes[2].shape == (0, 4)
    # labelled Anomaly below the threshold: its strongest region
    strongest = boxes_for_rule(maps, "calibrated", labels=[0, 1, 0], heatmap_thres=0.7, calibration=cal)["cam"]
    np.testing.assert_array_equal(strongest[1], [[4, 4, 5, 5]])
    published = boxes_for_rule(maps, "minmax", labels=[1, 1, 0], heatmap_thres=0.7)["cam"]
    np.testing.assert_array_equal(published[1], [[4, 4, 5, 5]])  # the published rule boxes any Anomaly's peak
    assert published[2].shape == (0, 4)
    with pytest.raises(ValueError, match="calibration"):
        boxes_for_rule(maps, "calibrated", labels=labels, heatmap_thres=0.7, calibration=None)
    with pytest.raises(ValueError, match="no threshold"):
        boxes_for_rule(maps, "calibrated", labels=labels, heatmap_thres=0.7, calibration={"thresholds": {}, "min_area": 1})
    with pytest.raises(ValueError, match="box_threshold"):
        boxes_for_rule(maps, "otsu", labels=labels, heatmap_thres=0.7)


def test_strongest_region_is_the_component_holding_the_peak():
    m = np.zeros((6, 8), np.float32)
    m[1:3, 1:3] = 0.9
    m[4, 6] = 1.0  # the peak, alone
    boxes, scores = strongest_region(m, 0.7)
    np.testing.assert_array_equal(boxes, [[6, 4, 7, 5]]) and np.testing.assert_array_equal(scores, [1.0])
    np.testing.assert_array_equal(strongest_region(np.full((3, 4), 2.0), 0.7)[0], [[0, 0, 4, 3]])  # constant: all


def test_calibrated_display_puts_floor_and_threshold_at_fixed_colours():
    shown = calibrated_display(np.array([[[1.0, 2.0, 3.0, 4.0, 9.0]]]), floor=1.0, threshold=4.0)
    np.testing.assert_allclose(shown[0, 0], [0.0, 2 / 9, 4 / 9, DISPLAY_LEVEL, 1.0])


def test_calibrated_boxes_extent_reaches_the_unusual_shoulder_of_a_flagged_region():
    m = np.zeros((8, 10), dtype=np.float32)
    m[2:6, 1:5] = 0.5  # shoulder above the extent threshold only
    m[3:5, 2:4] = 2.0  # peak above the threshold
    m[1:3, 7:9] = 0.5  # a region as warm as the shoulder but without a peak: no box
    np.testing.assert_array_equal(calibrated_boxes(m, 1.0, 1)[0], [[2, 3, 4, 5]])  # peak only
    boxes, scores = calibrated_boxes(m, 1.0, 1, extent_threshold=0.25)
    np.testing.assert_array_equal(boxes, [[1, 2, 5, 6]])
    np.testing.assert_array_equal(scores, [2.0])
    with pytest.raises(ValueError, match="extent_threshold"):
        calibrated_boxes(m, 1.0, 1, extent_threshold=1.5)


def test_without_classifier_only_the_patch_map_exists():
    patch = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    maps = localizer_maps(None, None, patch)
    assert list(maps) == ["patch_knn"] and np.array_equal(maps["patch_knn"], patch)
    scores = localizer_image_scores(maps, None, np.array([3.0, 5.0]))
    assert list(scores) == ["patch_knn"] and scores["patch_knn"].tolist() == [3.0, 5.0]


@pytest.mark.parametrize("localizer", ["cam", "cam_knn"])
def test_classifier_localizer_without_classifier_is_a_clear_error(localizer):
    with pytest.raises(ValueError, match=f"localizer='{localizer}' needs the classifier.*'patch_knn'"):
        check_localizer(localizer, has_classifier=False, has_memory=True)


def test_localizer_checks():
    check_localizer("patch_knn", has_classifier=False, has_memory=True)
    check_localizer("cam", has_classifier=True, has_memory=False)
    with pytest.raises(ValueError, match="needs the patch memory"):
        check_localizer("patch_knn", has_classifier=True, has_memory=False)
    with pytest.raises(ValueError, match="must be one of"):
        check_localizer("gradcam++", has_classifier=True, has_memory=True)
    check_localizer("gradcam", has_classifier=True, has_memory=False)  # an explanation needs no memory
    with pytest.raises(ValueError, match="needs the classifier"):
        check_localizer("explain", has_classifier=False, has_memory=True)
