"""The notebooks' parameters: checked before anything is read or written, then kept as the run's configuration."""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any, Sequence

from .dataloader import SPLITS
from .constants import SIZE_MULTIPLE
from .evidence import LR, STEPS, TOPK_FRACTION
from .geometry import DEFAULT_RESIZE, RESIZES
from .model import EVIDENCE_HEADS, FUSED, HEADS, POOLINGS, get_spec, load_backbone_weights, normalisation
from .patchknn import MEMORY_METHODS, PATCH_LAYERS
from .runtime import PRECISIONS, SEED_RANGE, is_seed, resolve_device


def check(condition: bool, name: str, value: Any, expected: str) -> None:
    """Raise a ValueError that names the parameter, its value and what it accepts."""
    if not condition:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}.")


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def run_name(subset_name: str, backbone: str) -> str:
    """The name of a run's checkpoint and results folder: `{subset}_{backbone}`."""
    return f"{subset_name}_{backbone}"


def check_output_dir(folder: Any, name: str) -> None:
    """Raise a ValueError naming `name` unless `folder` is a writable folder or can be created as
    one; creates nothing (checks run before anything is written)."""
    check(isinstance(folder, (str, Path)) and str(folder) != "", name, folder, "a folder path")
    probe = Path(folder)
    while not probe.exists() and probe.parent != probe:  # the nearest part that exists
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{name}={str(folder)!r} cannot be used: {probe} is a file, not a folder. "
                         f"Choose another {name}, or move the file.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{name}={str(folder)!r} cannot be written: permission denied on {probe}. "
                         f"Choose a folder this user can write to.")


def map_names(value: str | Sequence[str], name: str = "grid_maps") -> list[str]:
    """A list of map names from one name or a list of them (papermill's `-p grid_maps patch_knn`
    passes one name as a string); anything else raises a ValueError naming the parameter."""
    names = [value] if isinstance(value, str) else value
    check(isinstance(names, (list, tuple)) and all(isinstance(v, str) for v in names), name, value,
          'a map name or a list of them, e.g. ["patch_knn"]')
    return list(names)


def check_evaluation_parameters(
    *, batch_size: int, n_samples: int, heatmap_thres: float, results_dir: str | None = None
) -> None:
    """Check Evaluation.ipynb's numeric parameters (and that results_dir can be written) before
    anything is loaded; a bad one raises a ValueError naming it."""
    check(is_int(batch_size) and batch_size >= 1, "batch_size", batch_size, "a positive integer")
    check(is_int(n_samples) and n_samples >= 0, "n_samples", n_samples, "0 or a positive integer")
    check(is_number(heatmap_thres) and 0 <= heatmap_thres <= 1, "heatmap_thres", heatmap_thres,
          "a number in [0, 1]")
    if results_dir is not None:
        check_output_dir(results_dir, "results_dir")


def is_side(v: Any) -> bool:
    """A canvas side: an integer multiple of SIZE_MULTIPLE, at least 2 of them."""
    return is_int(v) and v >= 2 * SIZE_MULTIPLE and v % SIZE_MULTIPLE == 0


def check_image_size(value: Any) -> None:
    """`image_size`: a square side, or [height, width], each an integer multiple of 32 of at least
    64 (both backbones downsample by 32); anything else raises a ValueError naming the value."""
    pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(is_side(v) for v in value)
    check(is_side(value) or pair, "image_size", value,
          f"a square side or [height, width], each an integer multiple of {SIZE_MULTIPLE} of at least "
          f"{2 * SIZE_MULTIPLE}, e.g. 224 or [224, 576]")


def check_resize(resize: Any, pooling: str = "avg") -> None:
    """`resize`: one of geometry.RESIZES. With "pad" the published head's pooling must be "avg": its
    "max" and "topk" pool positions, and positions of padding would compete with the part's."""
    check(isinstance(resize, str) and resize in RESIZES, "resize", resize,
          f"one of {RESIZES} ('stretch' squashes to image_size as published, 'pad' keeps the aspect ratio)")
    check(resize != "pad" or pooling == "avg", "pooling", pooling,
          "'avg' with resize='pad' (the positional poolings would pool padding)")


def _check_recipe(p: dict[str, Any]) -> None:
    """The training recipe's values (see `training_config`)."""
    check_image_size(p["image_size"])
    check_resize(p["resize"], p["pooling"])
    check(is_int(p["batch_size"]) and p["batch_size"] >= 1, "batch_size", p["batch_size"], "a positive integer")
    check(is_int(p["epochs"]) and p["epochs"] >= 1, "epochs", p["epochs"], "a positive integer")
    check(is_number(p["lr"]) and p["lr"] > 0, "lr", p["lr"], "a positive number")
    weights = p["class_weight"]
    check(isinstance(weights, (list, tuple)) and len(weights) == 2 and all(is_number(w) and w > 0 for w in weights),
          "class_weight", weights, "two positive numbers [Good, Anomaly]")
    target = p["target_train_accuracy"]
    check(target is None or (is_number(target) and 0 < target <= 1), "target_train_accuracy", target,
          "None or a number in (0, 1]")
    check(is_number(p["test_size"]) and 0 < p["test_size"] < 1, "test_size", p["test_size"], "a fraction in (0, 1)")
    check(is_seed(p["seed"]), "seed", p["seed"], SEED_RANGE)
    check(is_number(p["heatmap_thres"]) and 0 <= p["heatmap_thres"] <= 1, "heatmap_thres", p["heatmap_thres"],
          "a number in [0, 1]")
    check(is_int(p["n_cv_folds"]) and (p["n_cv_folds"] == 0 or p["n_cv_folds"] >= 2), "n_cv_folds",
          p["n_cv_folds"], "0 (skip) or an integer of at least 2")
    check(p["pooling"] in POOLINGS, "pooling", p["pooling"], f"one of {POOLINGS} ('avg' is the published head)")


# How the calibration images are kept from the model (helper.run_fold). "holdout" is the default: it
# calibrates the deployed model itself; "cross_fit" calibrates models fitted without each group, whose
# scores misjudged the deployed model's on toothbrush: 0.4x to 7x the false alarms promised (docs/results.md).
CALIBRATIONS = ("holdout", "cross_fit")


# The published head's training knobs at their defaults. The evidence head trains evidence.STEPS
# full-batch steps at evidence.LR and pools the top evidence.TOPK_FRACTION of its patch logits, so
# with head="evidence" these would be ignored: other values are refused rather than dropped silently.
PUBLISHED_RECIPE = {"epochs": 10, "lr": 0.0001, "target_train_accuracy": 0.98, "pooling": "avg"}


def _check_evidence_recipe(p: dict[str, Any]) -> None:
    """With head="evidence", the published head's knobs (`PUBLISHED_RECIPE`) at their defaults."""
    if p["head"] != "evidence":
        return
    for name, default in PUBLISHED_RECIPE.items():
        check(p[name] == default, name, p[name],
              f"{default!r} with head='evidence', which has no such setting: it trains {STEPS} full-batch steps "
              f"at lr {LR} and pools the top {TOPK_FRACTION:.0%} of its patch logits (epochs, lr, "
              f"target_train_accuracy and pooling set the published head's training)")


def _check_decision(p: dict[str, Any]) -> None:
    """The head, its decision and its calibration (see `training_config`)."""
    check(p["head"] in HEADS, "head", p["head"], f"one of {HEADS} ('auto' chooses from the training split, "
          f"'published' is the seed's head, 'fused' both heads)")
    _check_evidence_recipe(p)
    check(isinstance(p["mask_supervision"], bool), "mask_supervision", p["mask_supervision"], "True or False")
    check(not p["mask_supervision"] or p["head"] == "evidence", "mask_supervision", p["mask_supervision"],
          "False unless head='evidence' (only the evidence head learns from masks)")
    check(p["head"] != "evidence" or p["patch_memory_size"] > 0, "patch_memory_size", p["patch_memory_size"],
          "a positive number of patches with head='evidence' (its evidence is the residual to the memory)")
    check(p["head"] != FUSED or p["patch_memory_size"] > 0, "patch_memory_size", p["patch_memory_size"],
          "a positive number of patches with head='fused' (its evidence head reads the residual to the memory)")
    check(p["head"] != FUSED or p["calibration"] == "holdout", "calibration", p["calibration"],
          "'holdout' with head='fused': the held-back good images, which neither head sees, put the two "
          "heads' logits on one scale")
    check(p["head"] != FUSED or p["false_alarm_rate"] is not None, "false_alarm_rate", p["false_alarm_rate"],
          "a share of good parts in (0, 1), e.g. 0.05, with head='fused': its score is not a probability, "
          "so the argmax rule (None) means nothing")
    check(p["head"] != "auto" or p["patch_memory_size"] > 0, "patch_memory_size", p["patch_memory_size"],
          "a positive number of patches with head='auto' (it chooses among the patch map and the heads; "
          "set head='published' for none)")
    rate = p["false_alarm_rate"]
    check(rate is None or (is_number(rate) and 0 < rate < 1), "false_alarm_rate", rate,
          "None (the published argmax) or a share of good parts in (0, 1), e.g. 0.05")
    check(p["calibration"] in CALIBRATIONS, "calibration", p["calibration"], f"one of {CALIBRATIONS}")
    check(is_number(p["calibration_share"]) and 0 < p["calibration_share"] < 1, "calibration_share",
          p["calibration_share"], "a fraction in (0, 1) of the good training images")


def _check_maps(p: dict[str, Any]) -> None:
    """The patch memory's and the boxes' values (see `training_config`)."""
    check(is_int(p["patch_memory_size"]) and p["patch_memory_size"] >= 0, "patch_memory_size",
          p["patch_memory_size"], "0 (no patch memory) or a positive integer")
    check(p["patch_memory_method"] in MEMORY_METHODS, "patch_memory_method", p["patch_memory_method"],
          f"one of {MEMORY_METHODS}")
    check(p["patch_layers"] is None or p["patch_layers"] in PATCH_LAYERS, "patch_layers", p["patch_layers"],
          f"None (head='auto' chooses; else the measured choice for the backbone and head) or one of {PATCH_LAYERS} (the stride-8 layer "
          f"alone, or with the stride-16 one)")
    sigma = p["patch_map_sigma"]
    check(sigma is None or (is_number(sigma) and 0 <= sigma <= 8), "patch_map_sigma", sigma,
          "None (head='auto' chooses it, otherwise 0.5) or a blur in patch cells in [0, 8], e.g. 0.5 (0: none)")
    check(is_number(p["box_quantile"]) and 0 <= p["box_quantile"] <= 1, "box_quantile", p["box_quantile"],
          "a number in [0, 1]")
    check(is_int(p["box_min_area"]) and p["box_min_area"] >= 1, "box_min_area", p["box_min_area"],
          "a positive number of pixels")


def _check_places(p: dict[str, Any]) -> None:
    """Folders, flags, device and split (see `training_config`)."""
    check(isinstance(p["data_dir"], (str, Path)), "data_dir", p["data_dir"], "a folder path")
    check(isinstance(p["subset_name"], str) and p["subset_name"] != "", "subset_name", p["subset_name"],
          "a subset name")
    for name in ("download", "pretrained", "cache_features"):
        check(isinstance(p[name], bool), name, p[name], "True or False")
    check(p["precision"] in PRECISIONS, "precision", p["precision"], f"one of {PRECISIONS}")
    check(p["split"] in SPLITS, "split", p["split"], f"one of {SPLITS}")
    resolve_device(p["device"])
    check_output_dir(p["weights_dir"], "weights_dir")
    check_output_dir(p["results_dir"], "results_dir")
    run = run_name(p["subset_name"], p["backbone"])
    checkpoint = Path(p["weights_dir"]) / f"{run}.pt"
    if checkpoint.is_dir():
        raise ValueError(f"weights_dir={str(p['weights_dir'])!r}: {checkpoint} is a folder, where the checkpoint "
                         f"would be written: move it away.")
    results = Path(p["results_dir"]) / run
    if results.exists() and not results.is_dir():
        raise ValueError(f"results_dir={str(p['results_dir'])!r}: {results} is a file, where the run's results "
                         f"folder would be: move it away.")


def _backbone_weights(backbone: str, pretrained: bool, path: Any) -> tuple[dict | None, list, list]:
    """What the configuration records of `backbone_weights` (None: torchvision's) and its mean/std."""
    check(path is None or isinstance(path, (str, Path)), "backbone_weights", path,
          "None or the path of a backbone weights file")
    if path is None:
        mean, std = normalisation(backbone, pretrained)
        return None, [float(v) for v in mean], [float(v) for v in std]
    check(pretrained, "pretrained", pretrained, "True when backbone_weights is given "
          "(pretrained=False means random init; set backbone_weights=None for that)")
    weights = load_backbone_weights(path, backbone)
    return weights.describe(), [float(v) for v in weights.mean], [float(v) for v in weights.std]


# Training.ipynb's parameters: those without a default here must be given to `training_config`.
TRAINING_PARAMETERS = ("data_dir", "subset_name", "download", "backbone", "pretrained", "image_size", "batch_size",
                       "epochs", "lr", "class_weight", "target_train_accuracy", "test_size", "seed", "heatmap_thres",
                       "n_cv_folds", "weights_dir", "results_dir", "device")
TRAINING_DEFAULTS = dict(precision="auto", cache_features=True, patch_memory_size=10000,
                         patch_memory_method="coreset", backbone_weights=None, pooling="avg", split="pooled",
                         box_quantile=0.9, box_min_area=64, mvtec_url=None, head="auto",
                         mask_supervision=False, false_alarm_rate=0.05, calibration="holdout",
                         calibration_share=0.2, patch_layers=None, patch_map_sigma=None, resize=DEFAULT_RESIZE)

# The patch map's blur with an explicit head when none is given: PatchCore's 4 px at 224 px, which
# the official-split study measured best at 224 px (docs/results.md); head="auto" chooses it.
DEFAULT_PATCH_MAP_SIGMA = 0.5


def resolve_patch_layers(patch_layers: str | None, head: str, backbone: str) -> str | None:
    """The patch embedding's layers: `patch_layers`, or for None: with head="auto" None (it chooses
    them from the training split); otherwise what was measured best on pill and toothbrush
    (docs/results.md): with head="evidence" or "fused", "both" (the evidence head decides better with the stride-16
    context); otherwise the backbone's `patch_layers`, the taps its patch map localises best with
    ("fine" for MobileNetV2, "both" for VGG16)."""
    if patch_layers is not None or head == "auto":
        return patch_layers
    return "both" if head in EVIDENCE_HEADS else get_spec(backbone).patch_layers


def training_config(**params: Any) -> dict[str, Any]:
    """Check the Training.ipynb parameters and return them as the run's configuration.

    Takes the parameters cell's names as keywords (those of `TRAINING_DEFAULTS` may be left out).
    A wrong type or value raises a ValueError that names the parameter and what it accepts. A
    `backbone_weights` file is read and checked here (see `model.load_backbone_weights`), so a bad
    file stops the run before anything is trained; the configuration records its name, sha256 and
    source, and the input `mean`/`std` of the run (the file's, or those of torchvision's weights).
    """
    missing = [k for k in TRAINING_PARAMETERS if k not in params]
    unknown = [k for k in params if k not in TRAINING_PARAMETERS and k not in TRAINING_DEFAULTS]
    if missing or unknown:
        raise TypeError(f"training_config: missing {missing}, unknown {unknown}")
    p = {**TRAINING_DEFAULTS, **params}
    get_spec(p["backbone"])
    _check_places(p)
    _check_recipe(p)
    _check_maps(p)
    _check_decision(p)
    weights_info, mean, std = _backbone_weights(p["backbone"], p["pretrained"], p["backbone_weights"])
    numbers_of = {"batch_size": int, "epochs": int, "lr": float, "test_size": float,
                  "seed": int, "heatmap_thres": float, "n_cv_folds": int, "patch_memory_size": int,
                  "box_quantile": float, "box_min_area": int, "calibration_share": float}
    config = {k: numbers_of[k](v) if k in numbers_of else v for k, v in p.items()}
    config.update(
        # recorded as given: a side stays an int (older readers expect one), a pair a list [H, W]
        image_size=int(p["image_size"]) if is_int(p["image_size"]) else [int(v) for v in p["image_size"]],
        data_dir=str(p["data_dir"]), weights_dir=str(p["weights_dir"]), results_dir=str(p["results_dir"]),
        class_weight=[float(w) for w in p["class_weight"]], backbone_weights=weights_info, mean=mean, std=std,
        target_train_accuracy=None if p["target_train_accuracy"] is None else float(p["target_train_accuracy"]),
        false_alarm_rate=None if p["false_alarm_rate"] is None else float(p["false_alarm_rate"]),
        patch_layers=resolve_patch_layers(p["patch_layers"], p["head"], p["backbone"]),
        patch_map_sigma=(None if p["head"] == "auto" else DEFAULT_PATCH_MAP_SIGMA) if p["patch_map_sigma"] is None
        else float(p["patch_map_sigma"]),
    )
    config.pop("mvtec_url", None)
    return config


def trains_classifier(config: dict[str, Any], n_train_anomalies: int) -> bool:
    """Whether the run trains a classifier: only with Anomaly training images. Without them only the
    patch memory is built, which needs patch_memory_size > 0 and no cross-validation (of a classifier)."""
    if n_train_anomalies:
        return True
    if not config["patch_memory_size"]:
        raise ValueError("The training split has no Anomaly images, so no classifier can train, and "
                         "patch_memory_size=0 builds no patch memory: nothing would be trained. "
                         "Set patch_memory_size > 0 (e.g. 10000).")
    if config["n_cv_folds"]:
        raise ValueError(f"n_cv_folds={config['n_cv_folds']} cross-validates the classifier, but the training "
                         f"split has no Anomaly images, so none is trained: set n_cv_folds=0.")
    return False
