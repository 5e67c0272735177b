"""The maps a checkpoint offers: which exist, how each is made comparable across images, and its image score."""

from __future__ import annotations

from typing import Any

import numpy as np

from .explain import EXPLAIN, EXPLANATIONS, REFERENCE_EXPLANATIONS
from .model import EVIDENCE_HEADS, PUBLISHED_HEADS
from .postprocess import minmax_normalise, probability_scaled, to_numpy

MEMORY_LOCALIZERS = ("patch_knn", "cam_knn", "patch_cam")  # these need the checkpoint's patch memory
LOCALIZERS = ("cam", *MEMORY_LOCALIZERS, *EXPLANATIONS, "explain", "evidence")
# need the published head, trained
CLASSIFIER_LOCALIZERS = ("cam", "cam_knn", "patch_cam", *EXPLANATIONS, "explain")
EVIDENCE_LOCALIZERS = ("evidence",)  # need the evidence head
# need the checkpoint's explanation reference (checkpoints of Training.ipynb with a classifier have it)
REFERENCE_LOCALIZERS = (*REFERENCE_EXPLANATIONS, *(("explain",) if EXPLAIN in REFERENCE_EXPLANATIONS else ()))


def check_localizer(localizer: str, has_classifier: bool, has_memory: bool, where: str = "the checkpoint",
                    has_reference: bool = True, head: str = "published") -> None:
    """Raise a ValueError naming what `where` lacks when `localizer` cannot be computed from it.
    has_classifier: a head was trained; head: which ("published", "evidence", or "fused": both)."""
    if localizer not in LOCALIZERS:
        raise ValueError(f"localizer={localizer!r} must be one of {LOCALIZERS}.")
    if localizer in EVIDENCE_LOCALIZERS and not (has_classifier and head in EVIDENCE_HEADS):
        raise ValueError(f"localizer={localizer!r} is the evidence head's map, but {where} has no evidence head: "
                         f"train with head='evidence', or use localizer='patch_knn' or 'cam'.")
    if localizer in CLASSIFIER_LOCALIZERS and has_classifier and head not in PUBLISHED_HEADS:
        raise ValueError(f"localizer={localizer!r} is a map of the published head, but {where} holds the "
                         f"{head} head: use localizer='evidence' (its own map) or 'patch_knn'.")
    if localizer in CLASSIFIER_LOCALIZERS and not has_classifier:
        usable = [name for name in MEMORY_LOCALIZERS if name not in CLASSIFIER_LOCALIZERS]
        raise ValueError(
            f"localizer={localizer!r} needs the classifier, but {where} has none (its training split "
            f"had no Anomaly images): use localizer={usable[0]!r}, or train on a split with Anomaly images."
        )
    if localizer in MEMORY_LOCALIZERS and not has_memory:
        raise ValueError(f"localizer={localizer!r} needs the patch memory, but {where} has none: "
                         f"train with patch_memory_size > 0.")
    if localizer in REFERENCE_LOCALIZERS and not has_reference:
        raise ValueError(f"localizer={localizer!r} needs the explanation reference (the good training images' "
                         f"mean features), but {where} predates it: train again with Training.ipynb, or "
                         f"use localizer='layercam_s8'.")


def check_checkpoint_localizer(localizer: str, checkpoint: dict[str, Any], where: str = "the checkpoint") -> None:
    """`check_localizer` against what a checkpoint holds."""
    check_localizer(localizer, bool(checkpoint.get("classifier", True)), checkpoint.get("patch_memory") is not None,
                    where, has_reference=checkpoint.get("explain_reference") is not None, head=head_of(checkpoint))


def head_of(checkpoint: dict[str, Any]) -> str:
    """The head a checkpoint's configuration names ("published" for checkpoints that predate heads).
    A head="auto" run records the head it chose there (and "auto" when it chose none: then the
    checkpoint has no classifier)."""
    return (checkpoint.get("config") or {}).get("head", "published")


def default_localizer(checkpoint: dict[str, Any]) -> str:
    """The map a checkpoint shows by default: the one head="auto" chose (`selection["map"]`), the
    published CAM, the evidence head's own map, or the patch map when no classifier was trained."""
    chosen = (checkpoint.get("selection") or {}).get("map")
    if chosen is not None:
        return chosen
    if not checkpoint.get("classifier", True):
        return "patch_knn"
    return "evidence" if head_of(checkpoint) in EVIDENCE_HEADS else "cam"


def localizer_maps(cam, p_anomaly, patch_map=None, explanations: dict | None = None,
                   evidence=None) -> dict[str, np.ndarray]:
    """Pixel-scoring maps (N, H, W) per localiser, each comparable across images.

    cam is None without the published head, p_anomaly None without any classifier; `evidence`
    (N, H, W) is the evidence head's map, each patch's logit (one scale for all images).

    "cam": the per-image min-max CAM scaled by the image's Anomaly probability (the raw CAM's
    scale differs between images); "patch_knn": the nearest-neighbour distance to good training
    patches (its scale is fixed by the memory); "cam_knn": their product, the patch distance kept
    where the classifier looks; "patch_cam": the patch distance raised where the classifier looks
    (`patch_cam`). `explanations` ({name: raw (N, H, W)} of `utils.explain`) are
    scaled as the CAM is, and "explain" is the one named by `explain.EXPLAIN`.
    """
    if cam is None and patch_map is None and evidence is None:
        raise ValueError("localizer_maps needs a CAM, a patch map or an evidence map; got none")
    maps = {} if cam is None else {"cam": probability_scaled(cam, p_anomaly)}
    if evidence is not None:
        maps["evidence"] = to_numpy(evidence).astype(np.float32)
    if patch_map is not None:
        patch_map = to_numpy(patch_map).astype(np.float32)
        maps["patch_knn"] = patch_map
        if cam is not None:
            maps["cam_knn"] = patch_map * minmax_normalise(cam)
            maps["patch_cam"] = patch_cam(patch_map, maps["cam"])
    for name, m in (explanations or {}).items():
        maps[name] = probability_scaled(m, p_anomaly)
    if EXPLAIN in maps:
        maps["explain"] = maps[EXPLAIN]
    return maps


def patch_cam(patch_map, cam):
    """The patch map (N, H, W) times 1 plus the probability-scaled CAM (N, H, W), "cam" of
    `localizer_maps` (each image's min-max CAM times its Anomaly probability, in [0, 1]).

    The patch distance ranks pixels of every image on one scale but cannot tell an unusual texture
    from a defect; the published head learnt that from the labels, coarsely (its CAM is a 7x7 grid
    upsampled). The product keeps the patch map's detail and scale: where the head sees no anomaly
    (probability near 0) the map is the patch map, and where it does, a patch's distance is raised
    by up to its own value at the CAM's peak. Unlike "cam_knn", a patch the CAM misses keeps its
    distance. Works on NumPy arrays and torch tensors alike (the exported graph computes it too)."""
    return patch_map * (1 + cam)


def maps_of(pred: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`localizer_maps` of the output of `inference.predict`: every map it computed."""
    # the CAM is scaled by its own head's probability: with both heads ("fused") the decision's is not the CAM's
    return localizer_maps(pred.get("cam"), pred.get("p_published", pred.get("p_anomaly")), pred.get("patch_map"),
                          explanations={k: pred[k] for k in EXPLANATIONS if k in pred}, evidence=pred.get("evidence"))


def image_score_of(pred: dict[str, np.ndarray]) -> np.ndarray:
    """The score (N,) the image decision is made on, from `inference.predict`'s output: the
    classifier's Anomaly probability (either head), or the patch map's image score without one."""
    return np.asarray(pred["p_anomaly"] if "p_anomaly" in pred else pred["patch_score"], dtype=np.float32)


def localizer_image_scores(maps: dict[str, np.ndarray], p_anomaly, patch_score=None) -> dict[str, np.ndarray]:
    """Image-level score (N,) per localiser of `localizer_maps`: the classifier's Anomaly
    probability for "cam", the explanations and "evidence", the patch map's maximum (at feature
    resolution) for "patch_knn", the map's maximum for "cam_knn" and "patch_cam"."""
    scores = {name: to_numpy(p_anomaly) for name in maps if name not in MEMORY_LOCALIZERS}
    if "patch_knn" in maps:
        scores["patch_knn"] = to_numpy(patch_score)
    for name in ("cam_knn", "patch_cam"):
        if name in maps:
            scores[name] = maps[name].reshape(len(maps[name]), -1).max(axis=1)
    return scores
