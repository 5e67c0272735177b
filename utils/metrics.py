"""Image- and pixel-level metrics for Good/Anomaly classification and CAM localisation (Anomaly = 1)."""

import warnings

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    auc,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    roc_auc_score,
)
from torchvision.ops import box_iou

from .constants import ANOMALY, GOOD
from .postprocess import mask_regions, regions_to_boxes, to_numpy


def _labels(y, name: str) -> np.ndarray:
    """Validate a vector of 0/1 labels (N,) and return it as int64."""
    y = to_numpy(y).reshape(-1)
    if y.size and not np.isin(y, (GOOD, ANOMALY)).all():
        raise ValueError(f"{name} must hold only {GOOD} (Good) and {ANOMALY} (Anomaly), got {np.unique(y)}")
    return y.astype(np.int64)


def _maps_and_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """Validate maps (N, H, W) float and masks (N, H, W) bool of equal shape; return float32, bool."""
    maps, masks = to_numpy(maps).astype(np.float32, copy=False), to_numpy(masks).astype(bool, copy=False)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both have shape (N, H, W)")
    return maps, masks


def confusion_counts(y_true, y_pred) -> dict:
    """Counts {"TP", "FN", "FP", "TN"} as ints for labels (N,), Anomaly = 1 positive."""
    y_true, y_pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    # labels fixed so the matrix stays 2 x 2 when a class is absent: rows true, columns predicted
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[GOOD, ANOMALY]).ravel()
    return {"TP": int(tp), "FN": int(fn), "FP": int(fp), "TN": int(tn)}


# The keys of classification_metrics. Without a classifier there is no argmax, so the first three are
# null; image_auroc and image_ap are then those of the patch map's image score (`ranking_metrics`).
CLASSIFICATION_KEYS = ("accuracy", "balanced_accuracy", "confusion_matrix", "image_auroc", "image_ap")


def classification_metrics(y_true, y_pred, p_anomaly) -> dict:
    """Image-level metrics for labels (N,), predictions (N,) and Anomaly probabilities (N,).

    Keys: accuracy, balanced_accuracy, confusion_matrix, image_auroc (None with one class),
    image_ap (None without an Anomaly image). Values are plain Python numbers.
    """
    y_true, y_pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    p_anomaly = to_numpy(p_anomaly).astype(np.float64).reshape(-1)
    if not len(y_true) == len(y_pred) == len(p_anomaly) > 0:
        raise ValueError(
            f"y_true ({len(y_true)}), y_pred ({len(y_pred)}) and p_anomaly ({len(p_anomaly)}) "
            "must have the same, non-zero length"
        )
    with warnings.catch_warnings():
        # with one class in y_true sklearn warns, yet balanced accuracy is still that class's recall
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y_true, y_pred))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": balanced,
        "confusion_matrix": confusion_counts(y_true, y_pred),
        **ranking_metrics(y_true, p_anomaly),
    }


def ranking_metrics(y_true, scores) -> dict:
    """How well image scores (N,) rank labels (N,): image_auroc (None with one class) and image_ap
    (None without an Anomaly image). Any score larger for Anomaly works: a probability, a distance."""
    y_true = _labels(y_true, "y_true")
    scores = to_numpy(scores).astype(np.float64).reshape(-1)
    if not len(y_true) == len(scores) > 0:
        raise ValueError(f"y_true ({len(y_true)}) and scores ({len(scores)}) must have the same, non-zero length")
    return {
        "image_auroc": float(roc_auc_score(y_true, scores)) if len(np.unique(y_true)) == 2 else None,
        "image_ap": float(average_precision_score(y_true, scores)) if y_true.any() else None,
    }


def _on_part(maps: np.ndarray, masks: np.ndarray, valid) -> tuple[np.ndarray, np.ndarray]:
    """The pixels (P,) of maps and masks (N, H, W) that `valid` (N, H, W) bool marks (all when None)."""
    if valid is None:  # ravel is a view, float32 scores: about 5 bytes per pixel before sklearn's sort
        return maps.ravel(), masks.ravel()
    valid = to_numpy(valid).astype(bool, copy=False)
    if valid.shape != maps.shape:
        raise ValueError(f"valid {valid.shape} must have the maps' shape {maps.shape}")
    return maps[valid], masks[valid]


def pixel_auroc(maps, masks, valid=None) -> float | None:
    """ROC AUC over all pixels of maps (N, H, W) against masks (N, H, W), or over the pixels `valid`
    (N, H, W) bool marks (the part's, with resize="pad"); None with one class."""
    maps, masks = _maps_and_masks(maps, masks)
    scores, truth = _on_part(maps, masks, valid)
    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, scores))


def _region_ids(masks: np.ndarray) -> np.ndarray:
    """Globally numbered 8-connected regions of masks (N, H, W): int32 (N, H, W), 0 = background."""
    ids = np.zeros(masks.shape, dtype=np.int32)
    offset = 0
    for i, mask in enumerate(masks):
        labels = mask_regions(mask)
        ids[i] = np.where(labels > 0, labels + offset, 0)
        offset += int(labels.max())
    return ids


def aupro(maps, masks, max_fpr: float = 0.3, valid=None) -> float | None:
    """Normalised area under the per-region-overlap curve up to max_fpr (Bergmann et al., IJCV 2021).

    maps (N, H, W), masks (N, H, W). Regions are the 8-connected components of each mask;
    PRO(t) is the mean over regions of the share of region pixels with map >= t, FPR(t) the share
    of all negative pixels with map >= t. Computed exactly from one sort of all pixels. Returns
    a value in [0, 1] (1 for a perfect map), None without regions or without negative pixels.
    `valid` (N, H, W) bool: only these pixels count (the part's, with resize="pad").
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr={max_fpr} must lie in (0, 1]")
    maps, masks = _maps_and_masks(maps, masks)
    score_map, ids = _on_part(maps, _region_ids(masks), valid)  # (P,) scores and region ids
    sizes = np.bincount(ids, minlength=1)  # sizes[0] = number of negative pixels
    n_regions, n_neg = len(sizes) - 1, int(sizes[0])
    if n_regions == 0 or n_neg == 0:
        return None
    # each region pixel adds 1 / (region size * n_regions) to PRO; background adds nothing
    pro_weight = np.concatenate([[0.0], 1.0 / (sizes[1:] * n_regions)])
    order = np.argsort(-score_map, kind="stable")  # descending score
    sorted_ids = ids[order]
    scores = score_map[order]
    # one threshold per distinct score: keep the last index of each tie group
    last = np.append(np.flatnonzero(np.diff(scores)), len(scores) - 1)
    pro = np.cumsum(pro_weight[sorted_ids])[last]
    fpr = np.cumsum(sorted_ids == 0)[last] / n_neg
    fpr, pro = np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])
    # cut the curve at max_fpr, interpolating PRO linearly on the segment that crosses it
    stop = int(np.searchsorted(fpr, max_fpr, side="right"))  # fpr[:stop] <= max_fpr
    if stop < len(fpr):
        pro_at_max = np.interp(max_fpr, fpr[stop - 1 : stop + 1], pro[stop - 1 : stop + 1])
        fpr = np.append(fpr[:stop], max_fpr)
        pro = np.append(pro[:stop], pro_at_max)
    return float(auc(fpr, pro) / max_fpr)


def image_shares(maps, masks, max_fpr: float = 0.3, valid=None) -> tuple[np.ndarray, np.ndarray] | None:
    """Each image's share (N,) of `pixel_auroc` and of `aupro` of maps (N, H, W) against masks (N, H, W).

    Both metrics are sums over defect pixels of one function of the pixel's placement u among the
    defect-free pixels (the share of them below it, ties half): pixel AUROC is the mean of u, AUPRO
    the mean over regions of each region's mean of max(0, max_fpr - (1 - u)) / max_fpr (1 - u is the
    false-positive rate at which the pixel turns on, halfway through its tie group, as the
    trapezoids of `aupro` credit it). Summed over images they give `pixel_auroc` exactly and `aupro`
    up to the one segment its curve crosses max_fpr on. Images, not pixels, are the units a
    standard error can count (pixels of one image are not independent: Obuchowski 1997, clustered
    ROC data). None where either metric is None. `valid` (N, H, W) bool: the part's pixels only.
    """
    maps, masks = _maps_and_masks(maps, masks)
    on = np.ones(maps.shape, bool) if valid is None else to_numpy(valid).astype(bool, copy=False)
    if on.shape != maps.shape:
        raise ValueError(f"valid {on.shape} must have the maps' shape {maps.shape}")
    negatives = np.sort(maps[on & ~masks])
    defect = on & masks
    if len(negatives) == 0 or not defect.any():
        return None
    scores, image = maps[defect], np.nonzero(defect)[0]
    region = _region_ids(masks)[defect]
    placement = (np.searchsorted(negatives, scores, "left") + np.searchsorted(negatives, scores, "right")) / (
        2 * len(negatives))
    regions, region_index, region_size = np.unique(region, return_inverse=True, return_counts=True)
    pro = np.maximum(0.0, max_fpr - (1.0 - placement)) / (max_fpr * region_size[region_index] * len(regions))
    auroc = placement / len(scores)
    return np.bincount(image, auroc, len(maps)), np.bincount(image, pro, len(maps))


def pointing_game(maps, masks, valid=None) -> float | None:
    """Share of images with a non-empty mask whose map argmax (first in flat order) is in the mask.

    maps (N, H, W), masks (N, H, W); None when no mask has a positive pixel. `valid` (N, H, W)
    bool: the argmax is taken over these pixels only (the part's, with resize="pad").
    """
    maps, masks = _maps_and_masks(maps, masks)
    if valid is not None:
        maps = np.where(to_numpy(valid).astype(bool, copy=False), maps, -np.inf)
    hits = [mask.ravel()[np.argmax(m.ravel())] for m, mask in zip(maps, masks) if mask.any()]
    return float(np.mean(hits)) if hits else None


def box_iou_score(pred_boxes: list[np.ndarray], masks) -> float | None:
    """Mean over ground-truth regions of the best IoU with a predicted box of the same image.

    pred_boxes[i] is (K_i, 4) x1, y1, x2, y2 with exclusive x2, y2 for image i; masks (N, H, W).
    Regions are 8-connected components of each mask. None when there is no region at all.
    """
    masks = to_numpy(masks).astype(bool, copy=False)
    if masks.ndim != 3 or len(pred_boxes) != len(masks):
        raise ValueError(
            f"need masks (N, H, W) and one box array per mask, got masks {masks.shape} "
            f"and {len(pred_boxes)} box arrays"
        )
    best = []
    for boxes, mask in zip(pred_boxes, masks):
        gt = torch.from_numpy(regions_to_boxes(mask_regions(mask)))  # (R, 4)
        boxes = torch.as_tensor(to_numpy(boxes), dtype=torch.float32).reshape(-1, 4)  # (K, 4)
        if len(gt) == 0:
            continue
        if len(boxes) == 0:
            best.extend([0.0] * len(gt))
            continue
        best.extend(box_iou(gt, boxes).max(dim=1).values.tolist())  # (R, K) -> (R,)
    return float(np.mean(best)) if best else None


BOX_MATCH_IOU = 0.3  # a box and a ground-truth region match at IoU >= 0.3


def _check_boxes(pred_boxes: list, n: int) -> list[torch.Tensor]:
    """Each of n per-image box arrays as a (K_i, 4) float32 tensor."""
    if len(pred_boxes) != n:
        raise ValueError(f"need one box array per image: got {len(pred_boxes)} box arrays for {n} images")
    return [torch.as_tensor(to_numpy(b), dtype=torch.float32).reshape(-1, 4) for b in pred_boxes]


def box_detection(pred_boxes: list[np.ndarray], masks, y_true, iou: float = BOX_MATCH_IOU) -> dict:
    """Detection counts of per-image boxes against the 8-connected regions of the masks.

    pred_boxes[i] is (K_i, 4) x1, y1, x2, y2 (exclusive x2, y2) for image i; masks (N, H, W) bool
    or None (no ground truth); y_true (N,) 0 = Good, 1 = Anomaly. Keys:
    "box_recall": share of ground-truth regions with a box of the same image at IoU >= iou
    (None without regions); "box_precision": share of all boxes, good images' included, that
    match a region of their image at IoU >= iou (None without boxes); "good_images_with_boxes":
    share of Good images with at least one box (None without Good images). Without masks the
    first two are None.
    """
    y_true = _labels(y_true, "y_true")
    boxes = _check_boxes(pred_boxes, len(y_true))
    good = y_true == GOOD
    with_boxes = np.array([len(b) > 0 for b in boxes], dtype=bool)
    result = {"box_recall": None, "box_precision": None,
              "good_images_with_boxes": float(with_boxes[good].mean()) if good.any() else None}
    if masks is None:
        return result
    masks = to_numpy(masks).astype(bool, copy=False)
    if masks.ndim != 3 or len(masks) != len(y_true):
        raise ValueError(f"masks must have shape (N, H, W) with N = {len(y_true)} images, got {masks.shape}")
    n_regions = n_found = n_boxes = n_true_boxes = 0
    for b, mask in zip(boxes, masks):
        gt = torch.from_numpy(regions_to_boxes(mask_regions(mask)))  # (R, 4)
        n_regions += len(gt)
        n_boxes += len(b)
        if len(gt) and len(b):
            hit = box_iou(gt, b) >= iou  # (R, K)
            n_found += int(hit.any(dim=1).sum())
            n_true_boxes += int(hit.any(dim=0).sum())
    result["box_recall"] = n_found / n_regions if n_regions else None
    result["box_precision"] = n_true_boxes / n_boxes if n_boxes else None
    return result


def per_defect_type(defect_types, y_true, y_pred) -> dict:
    """{type: {"n", "recall"}} per defect type of (N,) inputs; recall = share given their true label."""
    types = np.asarray(defect_types).reshape(-1)
    y_true, y_pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if not len(types) == len(y_true) == len(y_pred):
        raise ValueError(
            f"defect_types ({len(types)}), y_true ({len(y_true)}) and y_pred ({len(y_pred)}) "
            "must have the same length"
        )
    correct = y_true == y_pred
    return {
        str(t): {"n": int((types == t).sum()), "recall": float(correct[types == t].mean())}
        for t in sorted(set(types.tolist()))
    }


def localisation_metrics(maps, masks, boxes: list[np.ndarray], image_scores, y_true, valid=None) -> dict:
    """Localisation metrics of one map type: pixel_auroc, aupro, pointing_game, box_iou,
    box_recall, box_precision, good_images_with_boxes (see `box_detection`) and the
    image_auroc of its image scores. maps (N, H, W), masks (N, H, W) bool or None (no ground
    truth: the pixel metrics are None), boxes a list of N (K_i, 4) arrays, image_scores (N,).
    valid (N, H, W) bool or None: the pixel metrics count only these pixels (the part's, with
    resize="pad", `geometry.part_pixels`)."""
    y_true = _labels(y_true, "y_true")
    image_auroc = None
    if len(np.unique(y_true)) == 2:
        image_auroc = float(roc_auc_score(y_true, to_numpy(image_scores).astype(np.float64)))
    detection = box_detection(boxes, masks, y_true)
    if masks is None:
        return {"pixel_auroc": None, "aupro": None, "pointing_game": None, "box_iou": None,
                **detection, "image_auroc": image_auroc}
    return {
        "pixel_auroc": pixel_auroc(maps, masks, valid),
        "aupro": aupro(maps, masks, valid=valid),
        "pointing_game": pointing_game(maps, masks, valid),
        "box_iou": box_iou_score(boxes, masks),
        **detection,
        "image_auroc": image_auroc,
    }


def decision_metrics(y_true, y_pred, decision: dict) -> dict:
    """metrics.json's "decision" block: the rule and stated rate of `decision`
    (`calibration.decision_threshold`), its threshold, what its calibration can promise
    (expected_false_alarms, the share of new good images it flags at most, and meets_rate, whether
    that is within the stated rate; None for the argmax), and measured on labels y_true (N,) and the
    decided labels y_pred (N,): accuracy, recall (share of anomalies labelled Anomaly) and
    false_alarms (share of good images labelled Anomaly; None without good images)."""
    y_true, y_pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    good, bad = y_true == GOOD, y_true == ANOMALY
    return {
        "rule": decision["rule"], "false_alarm_rate": decision.get("false_alarm_rate"),
        "threshold": float(decision["threshold"]),
        "expected_false_alarms": decision.get("expected_false_alarms"), "meets_rate": decision.get("meets_rate"),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else None,
        "recall": float(y_pred[bad].mean()) if bad.any() else None,
        "false_alarms": float(y_pred[good].mean()) if good.any() else None,
    }


def localisation_table(localizers: dict[str, dict]) -> str:
    """The localisation metrics of every map ({name: `localisation_metrics`}) as a fixed-width table."""
    fmt = lambda v: "  null" if v is None else f"{v:6.3f}"  # noqa: E731
    lines = [f"{'map':<12}{'pixAUROC':>9}{'AUPRO':>7}{'point':>7}{'boxIoU':>7}{'recall':>7}{'prec.':>7}"
             f"{'good+box':>9}{'imgAUROC':>9}"]
    for name, m in localizers.items():
        lines.append(f"{name:<12}{fmt(m['pixel_auroc']):>9}{fmt(m['aupro']):>7}{fmt(m['pointing_game']):>7}"
                     f"{fmt(m['box_iou']):>7}{fmt(m['box_recall']):>7}{fmt(m['box_precision']):>7}"
                     f"{fmt(m['good_images_with_boxes']):>9}{fmt(m['image_auroc']):>9}")
    return "\n".join(lines)
