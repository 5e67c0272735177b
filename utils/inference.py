"""Scoring new images with a trained checkpoint: label, image score, map and boxes per image."""

from __future__ import annotations

import csv
import glob
import io
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import explain as explain_lib
from . import postprocess
from .checkpoint import atomic_write_bytes, has_classifier
from .constants import ANOMALY, CLASS_NAMES, GOOD, IMAGE_EXTENSIONS
from .dataloader import image_to_tensor, open_image, shown_size, to_rgb
from .geometry import DEFAULT_RESIZE, canvas, cells_inside, clip_boxes, cold_padding, fitted_size, masked_max, \
    part_pixels, resize_of
from .explain import EXPLANATIONS
from .calibration import decide
from .localizers import (MEMORY_LOCALIZERS, check_checkpoint_localizer, default_localizer, head_of, image_score_of,
                         localizer_image_scores, maps_of)
from .model import EVIDENCE_HEADS, CAMClassifier, checkpoint_normalisation, check_input_size, fused_logit
from .evidence import evidence_logits, residuals
from .patchknn import PatchRule, patch_rule_of
from .postprocess import BOX_THRESHOLDS, grid_to_map, upsample_maps
from .runtime import autocast, to_input, to_layout

PREDICTION_COLUMNS = ("path", "label", "p_anomaly", "image_score", "n_boxes", "boxes", "width", "height",
                      "overlay", "error")
# Checkpoints carry calibrated thresholds (Training.ipynb); one without them falls back to "minmax"
# with a note, see `box_rule`.
DEFAULT_BOX_THRESHOLD = "calibrated"


@dataclass(frozen=True)
class BoxRule:
    """How boxes are cut from a map, on the images labelled Anomaly only: "calibrated" (regions
    above `threshold` in the map's units of at least min_area pixels, else the strongest region at
    `heatmap_thres`; figures draw the map from `floor` to the threshold) or "minmax" (the published
    rule: per-image min-max map >= heatmap_thres). `note` says why a rule other than the one asked
    for is used, else ""."""

    name: str
    threshold: float
    min_area: int = 1
    mode: str = "components"
    note: str = ""
    floor: float = 0.0
    heatmap_thres: float = 0.7

    def boxes(self, map_hw: np.ndarray, anomalous: bool) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (K, 4) and scores (K,) of one map (H, W) of an image with this label."""
        if self.name == "calibrated":
            return postprocess.label_boxes(map_hw, anomalous, self.threshold, self.min_area, self.heatmap_thres)
        if not anomalous:
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
        boxes, scores = postprocess.heatmap_to_boxes(postprocess.minmax_normalise(map_hw[None])[0], self.threshold,
                                                     mode=self.mode)
        return (boxes, scores) if len(boxes) else postprocess.strongest_region(map_hw, self.threshold)

    def display(self, maps: np.ndarray) -> np.ndarray:
        """Maps (N, H, W) in [0, 1] for figures: the calibrated scale, or min-max per image."""
        if self.name == "calibrated":
            return postprocess.calibrated_display(maps, self.floor, self.threshold)
        return postprocess.minmax_normalise(maps)


def decision_of(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The image decision a checkpoint carries (`calibration.decision_threshold`). Checkpoints from
    before it: the published argmax, or without a classifier the patch map's calibrated box
    threshold (an image was Anomaly when its patch map had a box). `expected_false_alarms` and
    `meets_rate` (what its calibration promises, `calibration.decision_threshold`) are None where
    nothing was promised."""
    calibration = checkpoint.get("calibration") or {}
    unpromised = {"expected_false_alarms": None, "meets_rate": None}
    if "decision" in calibration:
        return {**unpromised, **calibration["decision"]}
    if has_classifier(checkpoint):
        return {"rule": "argmax", "false_alarm_rate": None, "threshold": 0.5, **unpromised}
    threshold = (calibration.get("thresholds") or {}).get("patch_knn")
    if threshold is None:
        raise ValueError("this checkpoint has no classifier and no calibrated patch map, so nothing decides an "
                         "image's label: train again with Training.ipynb")
    return {"rule": "calibrated", "false_alarm_rate": None, "threshold": float(threshold), **unpromised}


@torch.no_grad()  # the explanations switch gradients on for themselves
def _score_batch(model: CAMClassifier, frozen: torch.Tensor, tap8: torch.Tensor | None, size: tuple[int, int],
                 memory: torch.Tensor | None, rule: PatchRule, classifier: bool, explain: bool,
                 parts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Everything of one batch from its frozen output (B, C, h, w) and stride-8 tap (B, C8, h8, w8):
    the patch map (embedded and blurred by `rule`) and its image score (with a memory); with the published head the Anomaly
    probability, the raw CAM and the explanations; with the evidence head its probability and
    its map; with both (head "fused") all of that, each head's logit, the published head's own
    probability ("p_published") and the fused decision's ("p_anomaly", `fused_logit`). With parts
    (B, 2) (resize="pad", `geometry`), scores come from the part's cells only and every map is at
    its minimum on the padding. Runs inside the caller's autocast."""
    out: dict[str, torch.Tensor] = {}
    evidence = model.evidence_head is not None
    fused = evidence and model.fusion is not None  # both heads, the decision on their logits (`fused_logit`)
    if classifier and (fused or not evidence):
        scores, maps = model.head(frozen)
        out["p_anomaly"] = scores.float().softmax(dim=1)[:, ANOMALY]
        out["logit_published"] = scores.float()[:, ANOMALY] - scores.float()[:, GOOD]  # exact where p rounds to 1
        out["cam"] = model.cam(maps, size)
        if explain:
            _, explanations = explain_lib.explanation_maps(model, tap8, model.spec.taps[0])
            out.update({name: upsample_maps(m, size) for name, m in explanations.items()})
        if parts is not None:
            pixels = part_pixels(parts, size)
            out.update({k: cold_padding(v, pixels) for k, v in out.items() if v.ndim == 3})
    if memory is not None:
        residual, distance = residuals(rule.embed(tap8.float(), frozen.float()), memory)  # (B, D, h8, w8)
        inside = None if parts is None else cells_inside(parts, size, tuple(distance.shape[-2:]))
        # the image score is the patch map's maximum at feature resolution, before upsampling and blur
        # (PatchCore's): the blur serves localisation, and would dilute a one-patch defect's score
        out["patch_map"] = grid_to_map(distance, size, parts, rule.smooth)
        out["patch_score"] = masked_max(distance, inside)
        if classifier and evidence:
            logit, patch = evidence_logits(model.evidence_head, residual, distance, inside)
            out["evidence"], out["logit_evidence"] = grid_to_map(patch, size, parts), logit.float()
            if fused:  # the CAM stays scaled by the published head's own probability (`localizers.maps_of`)
                out["p_published"] = out["p_anomaly"]
                out["p_anomaly"] = torch.sigmoid(fused_logit(out["logit_published"], logit, model.fusion.to(logit.device)))
            else:
                out["p_anomaly"] = torch.sigmoid(logit)
    return {k: v.detach().float().cpu() for k, v in out.items()}


def _concatenate(batches) -> dict[str, np.ndarray]:
    """One (N, ...) array per key of the batches' dicts of (B, ...) tensors."""
    out: dict[str, list] = {}
    for batch in batches:
        for k, v in batch.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def _check_predict(model: CAMClassifier, classifier: bool, patch_memory, patch_rule) -> None:
    if patch_memory is not None and patch_rule is None:
        raise ValueError("a patch_memory needs the patch_rule it was built with: pass "
                         "patch_rule=patchknn.patch_rule_of(checkpoint['config'])")
    if not classifier and patch_memory is None:
        raise ValueError("predict(classifier=False) needs a patch_memory: without a classifier it is the only map")
    if classifier and model.evidence_head is not None and patch_memory is None:
        raise ValueError("the evidence head needs the patch memory: its evidence is each patch's residual to it")


def predict(
    model: CAMClassifier,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    patch_memory: torch.Tensor | None = None,
    patch_rule: PatchRule | None = None,
    classifier: bool = True,
    explain: bool = False,
    desc: str = "Predicting",
    progress: bool = True,
    parts: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Score (N, 3, H, W) uint8 images in one pass through the network.

    Returns "p_anomaly" (N,), "cam" (N, H, W) raw CAM heatmaps (not normalised), with a
    `patch_memory` (M, D) and the `patch_rule` it was built with (`patchknn.patch_rule_of`) "patch_map"
    (N, H, W) nearest-neighbour distances, blurred as the rule says, and "patch_score" (N,),
    and with `explain` one raw (N, H, W) map per name of `explain.EXPLANATIONS` (gradients of the
    decision from the stride-8 tap up). A model with an evidence head (head="evidence") gives its
    "p_anomaly" and "evidence" (N, H, W) map instead of the CAM and explanations, and needs the
    patch memory; a fused one (head="fused", `model.fused_logit`) gives both heads' outputs, the
    published head's "p_published", and as "p_anomaly" the fused decision's score in (0, 1). Each
    head's image logit comes too ("logit_published", "logit_evidence"). With classifier=False (a
    model trained without one) only the frozen layers run: no "p_anomaly", "cam" or explanations,
    so a patch_memory is required. `parts` (N, 2): with
    resize="pad", where each image lies on the canvas (`dataloader.load_parts`).
    """
    _check_predict(model, classifier, patch_memory, patch_rule)
    model.eval()
    size = tuple(images.shape[-2:])
    check_input_size(size[1], size[0])
    tapped = patch_memory is not None or explain
    memory = patch_memory.to(device) if patch_memory is not None else None

    def batches():
        for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=not progress):
            x = to_input(images[start:start + batch_size], mean, std, device, precision)
            with autocast(device, precision), torch.no_grad():
                frozen, taps = model.frozen_features(x, (model.spec.taps[0],) if tapped else ())
            with autocast(device, precision):
                yield _score_batch(model, frozen, taps[0] if tapped else None, size, memory, patch_rule, classifier,
                                   explain, None if parts is None else parts[start:start + batch_size])

    return _concatenate(batches())


def predict_frozen(
    model: CAMClassifier,
    features: torch.Tensor,
    tap: torch.Tensor | None,
    *,
    size: tuple[int, int],
    batch_size: int,
    device: torch.device,
    precision: str,
    patch_memory: torch.Tensor | None = None,
    patch_rule: PatchRule | None = None,
    classifier: bool = True,
    explain: bool = False,
    parts: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """`predict` of images whose frozen layers already ran (`helper.frozen_pass`): their frozen
    outputs (N, C, h, w) and stride-8 taps (N, C8, h8, w8) (None when neither the patch memory nor
    the explanations are asked for); `size` is the input size. The same keys and values as `predict`."""
    _check_predict(model, classifier, patch_memory, patch_rule)
    model.eval()
    memory = patch_memory.to(device) if patch_memory is not None else None

    def batches():
        for start in range(0, len(features), batch_size):
            frozen = to_layout(features[start:start + batch_size], device, precision)
            tap8 = None if tap is None else to_layout(tap[start:start + batch_size], device, precision)
            with autocast(device, precision):
                yield _score_batch(model, frozen, tap8, size, memory, patch_rule, classifier, explain,
                                   None if parts is None else parts[start:start + batch_size])

    return _concatenate(batches())


check_localizer = check_checkpoint_localizer  # what predict.py and Evaluation call


def patch_width(model: CAMClassifier, rule: PatchRule) -> int:
    """Dims D of the patch embeddings `rule` makes from this network's frozen layers (read from one
    forward pass of a blank 64 px image)."""
    weight = next(model.frozen.parameters())
    with torch.no_grad():
        frozen, taps = model.frozen_features(torch.zeros(1, 3, 64, 64, dtype=weight.dtype, device=weight.device),
                                             (model.spec.taps[0],))
    return int(rule.embed(taps[0], frozen).shape[1])


def check_scorable(model: CAMClassifier, checkpoint: dict[str, Any], where: str = "the checkpoint") -> None:
    """Raise a ValueError naming `where` unless scoring can use everything it will read: a decision
    (`decision_of`); the patch memory where the decision or the evidence head needs it; a memory
    (M, D) of finite values whose width D is that of the patches the checkpoint's patch rule embeds
    with this network, and the width the evidence head reads. Run before any image is scored, so a
    damaged checkpoint stops a run before it writes anything."""
    try:
        decision_of(checkpoint)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    memory = checkpoint.get("patch_memory")
    evidence = model.evidence_head is not None
    if memory is None:
        if evidence or not has_classifier(checkpoint):
            raise ValueError(f"{where} has no patch memory, but its {'evidence head' if evidence else 'decision'} "
                             f"is computed from it: the file is incomplete; train again with Training.ipynb.")
        return
    if not isinstance(memory, torch.Tensor) or memory.ndim != 2 or len(memory) == 0 or \
            not bool(torch.isfinite(memory).all()):
        raise ValueError(f"{where}: its patch memory is not a finite (M, D) tensor. It is damaged or was edited; "
                         f"train again.")
    rule = patch_rule_of(checkpoint["config"])
    width = patch_width(model, rule)
    if memory.shape[1] != width:
        raise ValueError(f"{where}: its patch memory has {memory.shape[1]} dims per row, but its patch rule "
                         f"(patch_layers={rule.layers!r}) embeds {checkpoint['config']['backbone']} patches in "
                         f"{width}: the memory was built under another rule or the file was edited. Train again.")
    if evidence and model.evidence_head.net[0].in_channels != width + 1:
        raise ValueError(f"{where}: its evidence head reads {model.evidence_head.net[0].in_channels - 1}-dim "
                         f"residuals, but its patch memory has {width} dims. It is damaged or was edited; train again.")


def box_rule(
    checkpoint: dict[str, Any],
    localizer: str,
    box_threshold: str = DEFAULT_BOX_THRESHOLD,
    heatmap_thres: float | None = None,
    box_mode: str = "components",
) -> BoxRule:
    """The box rule for `localizer`: the checkpoint's calibrated threshold of that map, or the
    published per-image min-max rule at `heatmap_thres` (default: the checkpoint's). A checkpoint
    without a calibrated threshold for the map falls back to "minmax" with a note."""
    if box_threshold not in BOX_THRESHOLDS:
        raise ValueError(f"box_threshold={box_threshold!r} must be one of {BOX_THRESHOLDS}.")
    thres = checkpoint["config"]["heatmap_thres"] if heatmap_thres is None else float(heatmap_thres)
    if not 0.0 <= thres <= 1.0:
        raise ValueError(f"heatmap_thres={thres} must lie in [0, 1]: it is a share of each map's own range.")
    if box_threshold == "minmax":
        return BoxRule("minmax", thres, 1, box_mode, heatmap_thres=thres)
    calibration = checkpoint.get("calibration") or {}
    thresholds = calibration.get("thresholds") or {}
    if localizer not in thresholds:
        return BoxRule("minmax", thres, 1, box_mode, heatmap_thres=thres,
                       note=f"no calibrated threshold for {localizer!r} in the checkpoint: boxes use the "
                            f"per-image min-max rule at {thres} (retrain to calibrate)")
    floor = float((calibration.get("floors") or {}).get(localizer, 0.0))
    return BoxRule("calibrated", float(thresholds[localizer]), int(calibration.get("min_area", 1)), box_mode,
                   floor=floor, heatmap_thres=thres)


def results_from_predictions(pred: dict[str, np.ndarray], localizer: str, rule: BoxRule,
                             decision: dict[str, Any], parts: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Per-image results from `predict`'s output for N images.

    Each: "label" ("Good"/"Anomaly": the image score, `localizers.image_score_of`, under `decision`,
    `calibration.decide`), "p_anomaly" (None without a classifier), "decision_score" (the score the
    label was decided on), "image_score" (the localiser's image score,
    `localizers.localizer_image_scores`), "map" (S, S) float32 in the map's own units
    (`localizers.localizer_maps`), "heatmap" (S, S) the map on the rule's display scale in [0, 1]
    (`BoxRule.display`), "boxes" (K, 4) float32 x1, y1, x2, y2 (exclusive x2, y2) in pixels of the
    S x S input, only on images labelled Anomaly and at least one there, "box_scores" (K,)
    float32 (each box's maximum, in the map's units), "localizer", "box_threshold" (the rule used)
    and "box_note" (why it is not the one asked for, else ""). With parts (N, 2) (resize="pad"),
    boxes are cut to the part and "part" is its (h, w) at the canvas's top-left.
    """
    maps = maps_of(pred)
    p = pred.get("p_anomaly")
    scores = localizer_image_scores(maps, p, pred.get("patch_score"))
    decided = decide(image_score_of(pred), decision)
    chosen = maps[localizer]
    shown = rule.display(chosen)
    results = []
    for i in range(len(chosen)):
        boxes, box_scores = rule.boxes(chosen[i], bool(decided[i]))
        part = tuple(chosen.shape[1:]) if parts is None else tuple(int(v) for v in parts[i])
        if parts is not None:
            boxes = clip_boxes(boxes, part)
        results.append({
            "label": CLASS_NAMES[ANOMALY if decided[i] else GOOD], "p_anomaly": None if p is None else float(p[i]),
            "decision_score": float(image_score_of(pred)[i]), "image_score": float(scores[localizer][i]),
            "map": chosen[i], "heatmap": shown[i], "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "box_scores": np.asarray(box_scores, np.float32).reshape(-1), "localizer": localizer,
            "box_threshold": rule.name, "box_note": rule.note, "part": part,
        })
    return results


def needs(checkpoint: dict[str, Any], localizer: str) -> dict[str, Any]:
    """What `predict` must compute for `localizer` and the checkpoint's decision: the patch memory
    (for the patch maps, the evidence head, or the decision of a checkpoint without a classifier),
    the explanations (for theirs)."""
    classifier = has_classifier(checkpoint)
    memory = localizer in MEMORY_LOCALIZERS or not classifier or head_of(checkpoint) in EVIDENCE_HEADS
    return {"patch_memory": checkpoint.get("patch_memory") if memory else None,
            "patch_rule": patch_rule_of(checkpoint.get("config") or {}), "classifier": classifier,
            "explain": localizer in (*EXPLANATIONS, "explain")}


def check_image_batch(images: torch.Tensor, checkpoint: dict[str, Any]) -> None:
    """Raise a ValueError unless `images` is (N, 3, H, W) at the checkpoint's canvas (H, W)
    (`geometry.canvas` of its image_size): at another size the calibrated thresholds and the
    evidence head's top-k pooling would mean something else."""
    size = checkpoint["config"]["image_size"]
    h, w = canvas(size)
    if images.ndim != 4 or tuple(images.shape[1:]) != (3, h, w):
        raise ValueError(f"images of shape {tuple(images.shape)} cannot be scored by this checkpoint: it was "
                         f"trained and calibrated on (N, 3, {h}, {w}) images. Decode them with "
                         f"dataloader.read_image(path, {size!r}, {resize_of(checkpoint['config'])!r}), or score "
                         f"each with inference.score_image.")


def score_batch(
    images: torch.Tensor,
    model: CAMClassifier,
    checkpoint: dict[str, Any],
    *,
    localizer: str | None = None,
    box_threshold: str = DEFAULT_BOX_THRESHOLD,
    heatmap_thres: float | None = None,
    box_mode: str = "components",
    batch_size: int = 10,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
    parts: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Score (N, 3, H, W) uint8 images (decoded like training's on the checkpoint's canvas)
    in one pass per batch; returns one result per image (see `results_from_predictions`).
    localizer None: the checkpoint's default map (`localizers.default_localizer`). Images of another
    size raise a ValueError (`check_image_batch`). A checkpoint with resize="pad" needs `parts`
    (N, 2), where each image lies on the canvas (`geometry.fitted_size`)."""
    check_image_batch(images, checkpoint)
    if resize_of(checkpoint["config"]) == "pad" and parts is None:
        raise ValueError("this checkpoint pads images (resize='pad'): pass parts, the (h, w) each image covers at "
                         "the canvas's top-left (geometry.fitted_size), or score each with inference.score_image.")
    localizer = default_localizer(checkpoint) if localizer is None else localizer
    check_localizer(localizer, checkpoint)
    rule = box_rule(checkpoint, localizer, box_threshold, heatmap_thres, box_mode)
    mean, std = checkpoint_normalisation(checkpoint["config"])
    pred = predict(model, images, mean, std, batch_size=batch_size, device=device, precision=precision,
                   progress=False, parts=parts, **needs(checkpoint, localizer))
    return results_from_predictions(pred, localizer, rule, decision_of(checkpoint), parts)


def score_image(
    image: str | Path | Image.Image | np.ndarray,
    model: CAMClassifier,
    checkpoint: dict[str, Any],
    **kwargs: Any,
) -> dict[str, Any]:
    """Score one image (a path, PIL image or uint8 array) with training's preprocessing (RGB,
    bilinear resize to the checkpoint's canvas, stretched or padded as it was trained, the
    checkpoint's mean/std); keyword arguments are `score_batch`'s. Returns one result of
    `results_from_predictions`."""
    size, resize = checkpoint["config"]["image_size"], resize_of(checkpoint["config"])
    if isinstance(image, (str, Path)):
        rgb = open_image(image)
    else:  # as a viewer shows it: the part's size is known only after the EXIF orientation
        rgb = to_rgb(Image.fromarray(image) if isinstance(image, np.ndarray) else image)
    x = image_to_tensor(rgb, size, resize)
    part = torch.tensor([fitted_size(*rgb.size, canvas(size), resize)]) if resize == "pad" else None
    return score_batch(x[None], model, checkpoint, batch_size=1, parts=part, **kwargs)[0]


# --- folders of files -------------------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    """A visible file with one of the image extensions training reads."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(specs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """Image files named by `specs`, each a folder (searched recursively), a glob pattern (`**`
    recursive) or a file. Returns (path, name) pairs: `name` is the path relative to its folder or
    to the pattern's fixed prefix, unique across all specs (used for the overlay files). Folders
    and patterns keep image files only, sorted; a file named explicitly is kept whatever it is,
    so a broken one is reported rather than skipped. Raises FileNotFoundError for a spec that
    names nothing."""
    found: list[tuple[Path, str]] = []
    for spec in specs:
        spec_path = Path(spec)
        if spec_path.is_dir():
            files = sorted(p for p in spec_path.rglob("*") if is_image_file(p)
                           and not any(part.startswith(".") for part in p.relative_to(spec_path).parts))
            found += [(p, p.relative_to(spec_path).as_posix()) for p in files]
        elif spec_path.is_file():
            found.append((spec_path, spec_path.name))
        elif glob.has_magic(str(spec)):
            root = Path(_fixed_prefix(str(spec)))
            files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if is_image_file(Path(p)))
            found += [(p, os.path.relpath(p, root)) for p in files]
        else:
            raise FileNotFoundError(f"{spec} is neither a folder, a file nor a glob pattern that exists.")
    return _unique_names(found)


def _fixed_prefix(pattern: str) -> str:
    """The folder part of a glob pattern before its first wildcard ("a/b/*/c.png" -> "a/b")."""
    fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), Path(pattern).parts))
    return str(Path(*fixed)) if fixed else "."


def _unique_names(found: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
    """Drop repeated files; make names unique by suffixing "~2", "~3" to later clashes."""
    seen_paths, names, out = set(), set(), []
    for path, name in found:
        key = os.path.realpath(path)
        if key in seen_paths:
            continue
        seen_paths.add(key)
        unique, k = name, 2
        while unique in names:
            unique, k = f"{name}~{k}", k + 1
        names.add(unique)
        out.append((path, unique))
    return out


@dataclass
class Decoded:
    """One file decoded for scoring: the model input (3, H, W) uint8 on the canvas, the (h, w) the
    image covers on it (`geometry.fitted_size`), the full-size RGB image for the overlay
    (H0, W0, 3) uint8, or the error that stopped it."""

    path: Path
    name: str
    tensor: torch.Tensor | None = None
    display: np.ndarray | None = None
    error: str = ""
    part: tuple[int, int] | None = None


def decode(path: Path, name: str, size: int | Sequence[int], resize: str = DEFAULT_RESIZE) -> Decoded:
    """Decode one file with training's conversion; any failure becomes `error` (never raised)."""
    try:
        rgb = open_image(path)  # as a viewer shows it: the tensor and the overlay alike
        tensor = image_to_tensor(rgb, size, resize)
        part = fitted_size(rgb.width, rgb.height, canvas(size), resize)
    except Exception as err:  # one bad file is reported in its row; the run goes on
        return Decoded(path, name, error=f"{type(err).__name__}: {err}")
    return Decoded(path, name, tensor, np.asarray(rgb), part=part)


def decode_batches(files: Sequence[tuple[Path, str]], size: int | Sequence[int], batch_size: int,
                   resize: str = DEFAULT_RESIZE) -> Iterator[list[Decoded]]:
    """Decode `files` batch by batch on a thread per core (Pillow releases the GIL while decoding)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            yield list(pool.map(lambda f: decode(f[0], f[1], size, resize), chunk))


def scale_boxes(boxes: np.ndarray, size: int | Sequence[int], width: int, height: int) -> np.ndarray:
    """Boxes (K, 4) x1, y1, x2, y2 in canvas pixels -> pixels of the W x H original. `size`: the
    (h, w) the image covers at the canvas's top-left (the part, `geometry.fitted_size`; a side S
    for S x S): the part is the original resized, so x scales by W / w and y by H / h."""
    h, w = canvas(size)
    factors = np.array([width / w, height / h, width / w, height / h], np.float32)
    return np.asarray(boxes, np.float32).reshape(-1, 4) * factors


def prediction_row(path: str, result: dict[str, Any] | None, width: int | None = None,
                   height: int | None = None, size: int | Sequence[int] | None = None,
                   error: str = "") -> dict[str, Any]:
    """One row of predictions.csv: path, label, p_anomaly, image_score, n_boxes, boxes (a list of
    [x1, y1, x2, y2, score] in pixels of the original W x H image, rounded to 0.1 px), width,
    height and error ("" unless the file failed, then the other values are empty). `size`: the
    canvas side, or the (h, w) the image covers on the canvas; None: the result's own "part"."""
    if result is None:
        return {"path": path, "label": "", "p_anomaly": None, "image_score": None, "n_boxes": None,
                "boxes": [], "width": None, "height": None, "error": error}
    boxes = scale_boxes(result["boxes"], result["part"] if size is None else size, width, height)
    listed = [[round(float(v), 1) for v in box] + [float(s)] for box, s in zip(boxes, result["box_scores"])]
    return {"path": path, "label": result["label"], "p_anomaly": result["p_anomaly"],
            "image_score": result["image_score"], "n_boxes": len(listed), "boxes": listed,
            "width": width, "height": height, "error": error}


def original_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file as a viewer shows it (EXIF orientation), from its header only."""
    return shown_size(path)[0]


def predictions_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text of `prediction_row`s: PREDICTION_COLUMNS, boxes as JSON, empty cells for missing values."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PREDICTION_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**{k: "" if v is None else v for k, v in row.items()}, "boxes": json.dumps(row["boxes"])})
    return buffer.getvalue()


def save_predictions_csv(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write `predictions_csv(rows)` to path atomically."""
    text = predictions_csv(rows).encode()
    atomic_write_bytes(path, lambda f: f.write(text))
