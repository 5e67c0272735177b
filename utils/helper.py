"""Training: the frozen pass, the training loop, the fold pipeline every caller runs, cross-validation."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import calibration as calibration_lib
from . import evidence as evidence_lib
from . import explain as explain_lib
from . import geometry
from . import selection as selection_lib
from .checkpoint import checkpoint_dict
from .constants import ANOMALY, GOOD
from .dataloader import batch_order, kfold_splits, positions
from .inference import predict_frozen
from .localizers import image_score_of, maps_of, patch_cam
from .metrics import classification_metrics
from .model import FUSED, BackboneWeights, CAMClassifier
from .patchknn import PATCH_LAYERS, PatchRule, build_memory, flatten_patches, memory_nbytes, patch_rule_of
from .postprocess import grid_to_map
from .runtime import autocast, cache_dtype, prepare_model, to_input, to_layout


@dataclass
class Frozen:
    """The frozen layers' outputs of N images, computed once (`frozen_pass`).

    features (N, C, h, w): the frozen output, the training cache and the coarse half of the patch
    embeddings; tap (N, C8, h8, w8) or None: the stride-8 tap (the fine half of the patch
    embeddings, where the explanations start), kept for the images `has_tap` (N,) bool marks;
    parts (N, 2) or None: with resize="pad", the (h, w) each image covers at the top-left of the
    (H, W) canvas `size` (`geometry`); None: every image covers it all.
    """

    features: torch.Tensor
    tap: torch.Tensor | None = None
    has_tap: torch.Tensor | None = None
    parts: torch.Tensor | None = None
    size: tuple[int, int] | None = None

    def parts_of(self, idx: torch.Tensor) -> torch.Tensor | None:
        """The parts (K, 2) of images `idx` (K,), None when stretched."""
        return None if self.parts is None else self.parts[idx]

    def inside_of(self, idx: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor | None:
        """(K, h, w) bool: the cells of an (h, w) grid wholly on the part of images `idx` (K,) (None
        when stretched: all of them)."""
        return None if self.parts is None else geometry.cells_inside(self.parts[idx], self.size, grid)

    def tap_of(self, idx: torch.Tensor) -> torch.Tensor:
        """The stride-8 taps (K, C8, h8, w8) of images `idx` (K,); each must have been tapped."""
        if self.tap is None or not bool(self.has_tap[idx].all()):
            raise ValueError("the frozen pass kept no stride-8 tap of some of these images")
        rows = torch.cumsum(self.has_tap.long(), 0) - 1  # image -> row of `tap`
        return self.tap[rows[idx]]

    def embeddings_of(self, idx: torch.Tensor, rule: PatchRule) -> torch.Tensor:
        """Patch embeddings (K, D, h8, w8) float32 of images `idx` (K,) under `rule` (`patchknn.PatchRule.embed`)."""
        return rule.embed(self.tap_of(idx).float(), self.features[idx].float())

    def patches_of(self, idx: torch.Tensor, rule: PatchRule) -> torch.Tensor:
        """Patch embeddings (P, D) float32 of images `idx` (K,), image-major: all K * h8 * w8 of them,
        or with parts only the cells on the part (padding never enters the memory)."""
        emb = self.embeddings_of(idx, rule)  # (K, D, h8, w8)
        if self.parts is None:
            return flatten_patches(emb)
        return emb.permute(0, 2, 3, 1)[self.inside_of(idx, tuple(emb.shape[-2:]))]

    def patch_images(self, idx: torch.Tensor) -> torch.Tensor:
        """(P,) the position in `idx` of the image of each row of `patches_of(idx, ...)`."""
        grid = tuple(self.tap.shape[-2:])
        if self.parts is None:
            return torch.arange(len(idx)).repeat_interleave(grid[0] * grid[1])
        return torch.nonzero(self.inside_of(idx, grid))[:, 0]


@torch.no_grad()
def frozen_pass(
    model: CAMClassifier,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    tap_images: torch.Tensor | bool = True,
    parts: torch.Tensor | None = None,
    desc: str = "Frozen layers",
    progress: bool = True,
) -> Frozen:
    """Run the frozen layers once over (N, 3, H, W) uint8 images; keep the stride-8 tap of every
    image (`tap_images` True), of none (False) or of those an (N,) bool tensor marks. Kept on the
    CPU, bf16 on the reduced-precision paths (half the memory) and fp32 otherwise. `parts` (N, 2):
    with resize="pad", where each image lies on the canvas (`dataloader.load_parts`), kept with them."""
    model.eval()
    dtype = cache_dtype(precision)
    tap_index = model.spec.taps[0]
    if isinstance(tap_images, bool):
        tap_images = torch.full((len(images),), tap_images)
    keep = tap_images.bool().cpu()
    features, taps = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=not progress):
        x = to_input(images[start:start + batch_size], mean, std, device, precision)
        chosen = keep[start:start + batch_size]
        with autocast(device, precision):
            out, tapped = model.frozen_features(x, (tap_index,) if chosen.any() else ())
        features.append(out.to("cpu", dtype).contiguous())
        if chosen.any():
            taps.append(tapped[0][chosen.to(device)].to("cpu", dtype).contiguous())
    return Frozen(torch.cat(features), torch.cat(taps) if taps else None, keep, parts, tuple(images.shape[-2:]))


def build_patch_memory(
    patches: torch.Tensor, size: int, method: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Subsample good training patches (P, D) to a (M, D) memory; returns the memory, the (M,)
    rows of `patches` it holds, and its statistics."""
    start = time.perf_counter()
    index = build_memory(patches, size, method=method, seed=seed)
    memory = patches[index].contiguous()
    info = {"n_patches": int(len(patches)), "size": int(len(memory)), "dim": int(memory.shape[1]),
            "method": method, "megabytes": memory_nbytes(memory) / 2**20,
            "seconds": time.perf_counter() - start}
    return memory, index, info


def _epoch(model, features, images, labels, *, batches, step, cache, device, precision, mean, std, augment):
    """One pass over `batches`: (summed loss, correct count)."""
    total_loss, correct = 0.0, 0
    for idx in batches:
        with autocast(device, precision):
            if cache:
                scores, _ = model.head(to_layout(features[idx], device, precision))
            else:
                batch = images[idx] if augment is None else augment(images[idx])
                scores = model(to_input(batch, mean, std, device, precision))
        loss = step(scores.float(), labels[idx])
        total_loss += loss * len(idx)
        correct += (scores.argmax(1) == labels[idx]).sum().item()
    return total_loss, correct


def _optimiser_step(model, criterion, lr, device, precision) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """A function (scores, labels) -> loss that takes one Adam step on the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates all parameters in one pass (about 10 % faster per step on CPU).
    optimizer = torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step(scores: torch.Tensor, labels: torch.Tensor) -> float:
        loss = criterion(scores, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item()

    return step


def train_model(
    model: CAMClassifier,
    images: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    epochs: int,
    lr: float,
    class_weight: Sequence[float],
    batch_size: int,
    target_train_accuracy: float | None,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
    cache: bool = True,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    features: torch.Tensor | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, float, float], None] | None = None,
) -> dict[str, Any]:
    """Train the fine-tuned layers and head with weighted cross-entropy and Adam.

    images: (N, 3, H, W) uint8, labels: (N,) int64. With `cache`, the frozen layers run once
    (or `features`, the (N, C, h, w) output of `frozen_pass`, are reused) and each step trains only
    the fine-tuned layers on them; the same computation as the plain loop, since the frozen part
    is deterministic in eval mode. An `augment` function changes the images every step, so it
    switches the cache off. Returns the history: per-epoch loss and accuracy, whether early
    stopping fired, seconds.
    """
    use_cache = cache and augment is None
    generator = torch.Generator().manual_seed(seed)
    criterion = nn.CrossEntropyLoss(weight=torch.tensor(class_weight, dtype=torch.float32, device=device))
    step = _optimiser_step(model, criterion, lr, device, precision)
    labels = labels.to(device)
    start = time.perf_counter()
    if use_cache and features is None:
        features = frozen_pass(model, images, mean, std, batch_size=batch_size, device=device,
                               precision=precision, tap_images=False, progress=progress).features
    history: dict[str, Any] = {"loss": [], "accuracy": [], "early_stopped": False,
                               "cached_features": use_cache, "precision": precision}
    for epoch in range(epochs):
        model.train()
        batches = tqdm(batch_order(len(labels), batch_size, generator), desc=f"Epoch {epoch + 1}/{epochs}",
                       leave=False, disable=not progress)
        loss, correct = _epoch(model, features, images, labels, batches=batches, step=step, cache=use_cache,
                               device=device, precision=precision, mean=mean, std=std, augment=augment)
        history["loss"].append(loss / len(labels))
        history["accuracy"].append(correct / len(labels))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history["loss"][-1], history["accuracy"][-1])
        if target_train_accuracy is not None and history["accuracy"][-1] >= target_train_accuracy:
            history["early_stopped"] = True
            break
    history["epochs_run"] = len(history["loss"])
    history["seconds"] = time.perf_counter() - start
    return history


# --- the fold pipeline ----------------------------------------------------------------------

GROUPS = 5  # groups of a training split: the evidence head's memory exclusion, cross-fit calibration
# Whether head="evidence" compares its defective training images, like its good ones, with the
# memory rows of the other groups only (True), or with the whole memory as new images are (False).
# Good images see a memory short of a group, so their distances run larger than in use; grouping
# the defective ones too gives both classes the same memory. Measured both ways on the five-fold
# study (benchmarks/study.py, variant evidence_grouped_defects; docs/evidence.md): equal or a
# little worse on pill and toothbrush, so the defective images keep the whole memory.
GROUP_DEFECTS = False
NO_TRAINING = {"loss": [], "accuracy": [], "epochs_run": 0, "early_stopped": False, "cached_features": False}


def training_length(config: dict[str, Any]) -> tuple[str, int]:
    """What one `on_epoch_end` call of the run's training counts, and at most how many there are:
    ("epoch", epochs) for the published head, ("step", evidence.STEPS) full-batch steps for the
    evidence head (which takes no `epochs`, `parameters.PUBLISHED_RECIPE`)."""
    return ("epoch", config["epochs"]) if config["head"] in ("published", FUSED) else ("step", evidence_lib.STEPS)


def new_model(config: dict[str, Any], weights: BackboneWeights | None, device: torch.device,
              precision: str) -> CAMClassifier:
    """A fresh model of the run's configuration on `device` (its dense layer drawn with the run's seed)."""
    torch.manual_seed(config["seed"])
    model = CAMClassifier(config["backbone"], pretrained=config["pretrained"], weights=weights,
                          pooling=config["pooling"])
    return prepare_model(model, device, precision)


def fresh_copy(model: CAMClassifier, seed: int) -> CAMClassifier:
    """An untrained copy of `model` for another fold: the same frozen layers (so one frozen pass
    serves every fold), its dense layer drawn anew with `seed`, no evidence head or reference."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    fresh.fc.reset_parameters()
    fresh.explain_reference = None
    fresh.evidence_head = None
    fresh.fusion = None
    return fresh


def assign_groups(types: Sequence[str], n_groups: int, seed: int) -> torch.Tensor:
    """(N,) group in 0..n_groups-1 of each of N images: each type's images shuffled with `seed` and
    dealt round-robin, one deal continuing across types, so every group holds about the same share
    of each type."""
    generator = torch.Generator().manual_seed(seed)
    groups = torch.empty(len(types), dtype=torch.long)
    dealt = 0
    for kind in sorted(set(types)):
        members = torch.tensor([i for i, t in enumerate(types) if t == kind])
        members = members[torch.randperm(len(members), generator=generator)]
        groups[members] = (torch.arange(len(members)) + dealt) % n_groups
        dealt += len(members)
    return groups


def calibration_split(labels: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (fit, calibration) within a training split of labels (N,): the calibration images
    are a seeded `share` of its good images, held back from everything the model learns."""
    good = torch.nonzero(labels == GOOD).flatten()
    n_cal = max(1, round(share * len(good)))
    if len(good) - n_cal < 1:
        raise ValueError(f"calibration='holdout' holds back {n_cal} of the {len(good)} good training images, "
                         f"leaving none to train on: lower calibration_share or add good images.")
    cal = good[torch.randperm(len(good), generator=torch.Generator().manual_seed(seed))[:n_cal]].sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[cal] = False
    return torch.nonzero(keep).flatten(), cal


@dataclass
class Fitted:
    """What one fit produced: the network (its head trained, its explanation reference or evidence
    head set), whether it classifies, the patch memory and its statistics, the training history."""

    model: CAMClassifier
    classifier: bool
    memory: torch.Tensor | None
    memory_info: dict[str, Any] | None
    history: dict[str, Any]
    patch_rule: PatchRule  # how its memory's patches were embedded, and how its patch map is blurred
    # head="auto": what was chosen and the out-of-fold evidence for it (`_fit_auto`), else None
    selection: dict[str, Any] | None = None

    def resolved(self, config: dict[str, Any]) -> dict[str, Any]:
        """`config` as this fit was trained: with head="auto", the chosen head ("auto" still when the
        patch map alone decides: no head was trained) and patch rule."""
        if self.selection is None:
            return config
        return {**config, "head": self.selection["head"] or "auto", "patch_layers": self.patch_rule.layers,
                "patch_map_sigma": self.patch_rule.sigma}


def _train_classifier(config, model, frozen, labels, fit, images, device, precision, progress, on_epoch_end):
    """Train the published head on the images `fit` (the cache, or the plain loop)."""
    cache = config["cache_features"]
    return train_model(
        model, images[fit] if not cache else None, labels[fit], mean=config["mean"], std=config["std"],
        epochs=config["epochs"], lr=config["lr"], class_weight=config["class_weight"],
        batch_size=config["batch_size"], target_train_accuracy=config["target_train_accuracy"],
        seed=config["seed"], device=device, precision=precision, cache=cache,
        features=frozen.features[fit] if cache else None, progress=progress, on_epoch_end=on_epoch_end)


def patch_memory_of(config: dict[str, Any], frozen: Frozen, good: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The patch memory of the good images `good` (K,): (memory (M, D), the position in `good` of
    each row's image (M,), its statistics), per config's patch_memory_size and _method."""
    memory, rows, info = build_patch_memory(frozen.patches_of(good, patch_rule_of(config)), config["patch_memory_size"],
                                            config["patch_memory_method"], config["seed"])
    return memory, frozen.patch_images(good)[rows], info


def evidence_training_inputs(config: dict[str, Any], frozen: Frozen, labels: torch.Tensor, fit: torch.Tensor,
                             memory: torch.Tensor, memory_images: torch.Tensor, device: torch.device):
    """The evidence head's inputs for its training images `fit` (`evidence.evidence_inputs`): the
    good ones dealt into GROUPS groups, each compared with the memory rows of the other groups only
    (memory_images (M,): the position among fit's good images of each row's image); with
    GROUP_DEFECTS the defective ones too, else they see the whole memory."""
    y = labels[fit]
    good_groups = assign_groups(["good"] * int((y == GOOD).sum()), GROUPS, config["seed"])
    image_groups = torch.full((len(fit),), -1, dtype=torch.long)
    image_groups[y == GOOD] = good_groups
    if GROUP_DEFECTS:
        image_groups[y != GOOD] = assign_groups(["defect"] * int((y != GOOD).sum()), GROUPS, config["seed"] + 1)
    rule = patch_rule_of(config)
    inputs = evidence_lib.evidence_inputs(lambda i: frozen.embeddings_of(fit[i], rule), len(fit), memory.to(device),
                                          image_groups=image_groups, memory_groups=good_groups[memory_images])
    inputs.inside = frozen.inside_of(fit, tuple(inputs.distance.shape[-2:]))
    return inputs


def _train_evidence(config, model, frozen, labels, fit, memory, memory_images, masks, device, progress,
                    on_epoch_end):
    """Train the evidence head on the images `fit` (`evidence_training_inputs`)."""
    y = labels[fit]
    inputs = evidence_training_inputs(config, frozen, labels, fit, memory, memory_images, device)
    targets = None
    if config["mask_supervision"] and masks is not None:
        has_mask = masks[fit].flatten(1).any(dim=1) & (y != GOOD)
        targets = evidence_lib.mask_targets(masks[fit], has_mask, tuple(inputs.distance.shape[-2:]))
    head = evidence_lib.EvidenceHead(memory.shape[1])
    history = evidence_lib.train_head(head, inputs, y, class_weight=config["class_weight"], device=device,
                                      targets=targets, progress=progress, on_epoch_end=on_epoch_end)
    model.evidence_head = head.eval()
    return history


def fit(
    config: dict[str, Any],
    template: CAMClassifier,
    frozen: Frozen,
    labels: torch.Tensor,
    fit_idx: torch.Tensor,
    *,
    types: Sequence[str] | None = None,
    masks: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    device: torch.device,
    precision: str,
    progress: bool = False,
    on_epoch_end: Callable[[int, float, float], None] | None = None,
    reference: torch.Tensor | None = None,
) -> Fitted:
    """Everything a model learns from the images `fit_idx` (K,): the patch memory of their good
    images, and, when they include anomalies, the run's head (`config["head"]`): the published
    fine-tuned layers and dense layer with the explanation reference, or the evidence head; with
    "auto", whichever of the two heads, both fused, and the patch map alone out-of-fold evidence
    prefers (`_fit_auto`; types (N,): each image's defect type, to stratify its groups; reference
    (R,): good images outside fit_idx, never trained on, that put the fused heads on one scale; None:
    no fused candidate)."""
    if config["head"] == "auto":
        return _fit_auto(config, template, frozen, labels, fit_idx, types=types, masks=masks, images=images,
                         device=device, precision=precision, progress=progress, on_epoch_end=on_epoch_end,
                         reference=reference)
    y = labels[fit_idx]
    classifier = bool((y != GOOD).any())
    fused = classifier and config["head"] == FUSED
    if fused and (reference is None or len(reference) < 2):
        raise ValueError("head='fused' puts its two heads on one scale with good images neither saw: pass two or "
                         "more as `reference` (helper.run_fold passes calibration='holdout''s calibration images)")
    model = fresh_copy(template, config["seed"])
    memory, memory_images, memory_info = None, None, None
    if config["patch_memory_size"]:
        memory, memory_images, memory_info = patch_memory_of(config, frozen, fit_idx[y == GOOD])
    history = NO_TRAINING
    if classifier and config["head"] in ("evidence", FUSED):
        history = _train_evidence(config, model, frozen, labels, fit_idx, memory, memory_images, masks, device,
                                  progress and not fused, None if fused else on_epoch_end)
    if classifier and config["head"] in ("published", FUSED):
        steps = history
        history = _train_classifier(config, model, frozen, labels, fit_idx, images, device, precision, progress,
                                    on_epoch_end)
        model.explain_reference = explain_lib.reference_features(frozen.features[fit_idx], y)
        if fused:  # both heads' training time; the epochs are the published head's
            history = {**history, "seconds": history["seconds"] + steps["seconds"], "evidence": steps}
            model.fusion = fusion_of(model, frozen, reference, memory, patch_rule_of(config),
                                     size=geometry.canvas(config["image_size"]), batch_size=config["batch_size"],
                                     device=device, precision=precision)
    return Fitted(model, classifier, memory, memory_info, history, patch_rule_of(config))


# --- head="auto": out-of-fold evidence inside the training split ------------------------------

@dataclass
class _Candidates:
    """The patch memory of one patch-layer choice over a fit's images and what was scored with it:
    memory (M, D), its statistics, the residuals of every fit image to the memory rows of the
    other groups (`evidence.EvidenceInputs`, (K, D, h8, w8) and (K, h8, w8))."""

    memory: torch.Tensor
    info: dict[str, Any]
    inputs: evidence_lib.EvidenceInputs
    parts: torch.Tensor | None = None  # (K, 2) with resize="pad" (`Frozen.parts`)

    def patch_scores(self) -> np.ndarray:
        """Out-of-fold patch-map image scores (K,): the maximum distance on the part at feature resolution."""
        return geometry.masked_max(self.inputs.distance, self.inputs.inside).numpy()

    def patch_maps(self, sigma: float, size: tuple[int, int]) -> torch.Tensor:
        """Out-of-fold patch maps (K, H, W), upsampled and blurred by sigma cells as inference makes them."""
        return grid_to_map(self.inputs.distance, size, self.parts, PatchRule("fine", sigma).smooth)


def _candidates(config, frozen, labels, fit_idx, groups, layers, device) -> _Candidates:
    """The memory of fit's good images under `layers` and each fit image's residuals to the rows of
    the other groups' images: a good image is never compared with itself, and defective images are
    compared as good ones are, so both see the memory a new image sees, less a group."""
    good = torch.nonzero(labels[fit_idx] == GOOD).flatten()
    rule_config = {**config, "patch_layers": layers, "patch_map_sigma": 0.0}
    memory, memory_images, info = patch_memory_of(rule_config, frozen, fit_idx[good])
    rule = patch_rule_of(rule_config)
    inputs = evidence_lib.evidence_inputs(lambda i: frozen.embeddings_of(fit_idx[i], rule), len(fit_idx),
                                          memory.to(device), image_groups=groups,
                                          memory_groups=groups[good[memory_images]])
    inputs.inside = frozen.inside_of(fit_idx, tuple(inputs.distance.shape[-2:]))
    return _Candidates(memory, info, inputs, frozen.parts_of(fit_idx))


def _oof_evidence(config, inputs, y, groups, size, parts, device) -> tuple[np.ndarray, torch.Tensor]:
    """Out-of-fold image logits (K,) and maps (K, H, W) of the evidence head: each group scored by
    a head trained on the other groups' images."""
    p, patch = torch.empty(len(y)), torch.empty_like(inputs.distance)
    for g in groups.unique().tolist():
        held = groups == g
        head = evidence_lib.EvidenceHead(inputs.residual.shape[1])
        rest = evidence_lib.EvidenceInputs(inputs.residual[~held], inputs.distance[~held],
                                           None if inputs.inside is None else inputs.inside[~held])
        evidence_lib.train_head(head, rest, y[~held], class_weight=config["class_weight"], device=device)
        for idx in torch.nonzero(held).flatten().split(evidence_lib.CHUNK):
            r, d = inputs.batch(idx)
            image, logits = evidence_lib.evidence_logits(head, r.to(device), d.to(device), inputs.inside_of(idx))
            p[idx], patch[idx] = image.detach().float().cpu(), logits.detach().cpu()
    return p.numpy(), grid_to_map(patch, size, parts)


def _oof_published(config, template, frozen, labels, fit_idx, groups, images, size, device, precision):
    """Out-of-fold image logits (K,) and CAM maps (K, H, W) (scaled by the probability, as shown) of
    the published head, each group scored by a head fitted on the other groups' images; and those
    inner fits, one per group in `groups.unique()` order, each with its explanation's good reference
    (`explain.reference_features`) from the images it was fitted on, for `_oof_explain`."""
    p, cams, models = np.empty(len(fit_idx), np.float32), None, []
    for g in groups.unique().tolist():
        held = groups == g
        rest = fit_idx[~held]
        model = fresh_copy(template, config["seed"])
        _train_classifier(config, model, frozen, labels, rest, images, device, precision, False, None)
        model.explain_reference = explain_lib.reference_features(frozen.features[rest], labels[rest])
        out = predict_frozen(model, frozen.features[fit_idx[held]], None, size=size, batch_size=config["batch_size"],
                             device=device, precision=precision, parts=frozen.parts_of(fit_idx[held]))
        cam = maps_of(out)["cam"]
        cams = np.empty((len(fit_idx), *cam.shape[1:]), np.float32) if cams is None else cams
        p[held.numpy()], cams[held.numpy()] = out["logit_published"], cam
        models.append(model)
    return p, torch.from_numpy(cams), models


def _oof_explain(config, models, frozen, fit_idx, groups, size, device, precision) -> dict[str, torch.Tensor]:
    """Out-of-fold explanations {name: (K, H, W)} of `selection.MAP_EXPLANATIONS` (scaled by the
    probability, as shown) of the published head's inner fits `models` (`_oof_published`): each
    group's images explained by the fit that never saw them. A backward pass per image, so it is
    run only where the map is chosen for a decision that has the published head."""
    shown: dict[str, np.ndarray] = {}
    for model, g in zip(models, groups.unique().tolist()):
        held = groups == g
        scored = fit_idx[held]
        out = predict_frozen(model, frozen.features[scored], frozen.tap_of(scored), size=size,
                             batch_size=config["batch_size"], device=device, precision=precision, explain=True,
                             parts=frozen.parts_of(scored))
        maps = maps_of(out)
        for name in selection_lib.MAP_EXPLANATIONS:
            m = maps[name]
            shown.setdefault(name, np.empty((len(fit_idx), *m.shape[1:]), np.float32))[held.numpy()] = m
    return {name: torch.from_numpy(m) for name, m in shown.items()}


def _in_every_group(marked: torch.Tensor, groups: torch.Tensor) -> bool:
    """Whether each inner group (groups (K,)) holds an image marked in marked (K,) bool."""
    return all(bool(marked[groups == g].any()) for g in groups.unique().tolist())


def _masked_in_every_group(masks: torch.Tensor | None, groups: torch.Tensor) -> bool:
    """Whether each inner group (groups (K,)) holds an image with defect pixels in masks (K, H, W)."""
    return masks is not None and _in_every_group(masks.flatten(1).any(dim=1), groups)


def _choose_maps(candidates, layers, decision, own_maps, masks, groups, size,
                 valid=None) -> tuple[str, float, str, dict]:
    """The patch layers, blur and map of the checkpoint, by out-of-fold pixel AUROC and AUPRO on the
    fit images' masks (K, H, W) bool (`selection.map_quality`), on their part's pixels `valid`
    (K, H, W) bool (None: all); a later candidate must lead by more than the tolerance and the
    standard error of its lead over the masked images (`selection.map_margin`). `layers`: the
    layer choices still open; own_maps ({name: (K, H, W)}): the maps of the chosen head or heads (with
    the published head's CAM, the best patch map raised by it is a candidate too, `localizers.patch_cam`);
    groups (K,): the inner groups. Unless every group holds a masked image (as for the decision, one
    image's luck would choose): the first layers, PatchCore's blur, the head's own map (the patch
    map for the published head's)."""
    report: dict[str, dict] = {}
    if not _masked_in_every_group(masks, groups):
        own = "evidence" if "evidence" in own_maps else "patch_knn"
        return layers[0], selection_lib.SIGMAS[0], own, report
    shares: dict[str, np.ndarray] = {}
    for name in layers:
        for sigma in selection_lib.SIGMAS:
            key = f"patch_knn/{name}/{sigma:g}"
            report[key], shares[key] = selection_lib.map_evidence(candidates[name].patch_maps(sigma, size), masks, valid)
    margin = selection_lib.map_margin(shares)
    best = selection_lib.choose({k: v["score"] for k, v in report.items()}, list(report), margin)
    _, best_layers, best_sigma = best.split("/")
    for name, m in own_maps.items():
        report[name], shares[name] = selection_lib.map_evidence(m, masks, valid)
    if "cam" in own_maps:  # the published head's CAM raising the patch map where it looks
        fused = patch_cam(candidates[best_layers].patch_maps(float(best_sigma), size), own_maps["cam"])
        report["patch_cam"], shares["patch_cam"] = selection_lib.map_evidence(fused, masks, valid)
    # the evidence head's map (it starts as the patch map), the patch map, then what adds the
    # published head's view to it, then that view alone, then the explanations of its decision
    # (a backward pass more, `selection.MAP_EXPLANATIONS`); each where the decision has it
    order = [k for k in ("evidence", best, "patch_cam", "cam", *selection_lib.MAP_EXPLANATIONS) if k in report]
    chosen = selection_lib.choose({k: report[k]["score"] for k in order}, order, margin)
    for name, m in report.items():  # what each map's score is known to within, against the one chosen
        m["se_against_chosen"] = None if name == chosen else selection_lib.map_difference_se(shares[name], shares[chosen])
    return best_layers, float(best_sigma), "patch_knn" if chosen == best else chosen, report


def _fit_auto(config, template, frozen, labels, fit_idx, *, types, masks, images, device, precision, progress,
              on_epoch_end, reference=None) -> Fitted:
    """head="auto": choose the decision (the patch map alone, the evidence head, the published head
    or both fused), the patch layers, the blur and the map shown from out-of-fold scores of the
    images `fit_idx` (K,) in `selection.INNER_FOLDS` groups stratified by defect type, then fit what
    was chosen on all of them. Patch layers or blur set in `config` (not None) are kept as given.
    reference (R,): good images never trained on, which scale the fused heads (`fusion_of`)."""
    y = labels[fit_idx]
    size = geometry.canvas(config["image_size"])
    n_defects, n_good = int((y != GOOD).sum()), int((y == GOOD).sum())
    layers = PATCH_LAYERS if config["patch_layers"] is None else (config["patch_layers"],)
    default = template.spec.patch_layers
    layers = tuple(sorted(layers, key=lambda name: name != default))  # the backbone's measured choice first
    if not config["patch_memory_size"]:
        raise ValueError("head='auto' chooses among the patch map and the heads that read it: set "
                         "patch_memory_size > 0 (e.g. 10000), or choose head='published'.")
    if n_good < 2:
        raise ValueError(f"head='auto' needs at least 2 good training images to score each against the others, "
                         f"got {n_good}: add good images or choose head='published'.")
    types = [str(int(v)) for v in labels.tolist()] if types is None else list(types)
    groups = assign_groups([types[i] for i in fit_idx.tolist()], min(selection_lib.INNER_FOLDS, n_good),
                           config["seed"])
    y_np = y.numpy()
    start = time.perf_counter()
    # A choice rests on out-of-fold evidence only where every group holds some: a defect image in
    # each group, so that every inner fit learns from one and every group's scores rank one (two
    # defect images at least). With fewer, one image's luck would choose the layers or a head, and
    # the good-only defaults stay (at N = 1 a layer choice made the map worse than none).
    heads = _in_every_group(y != GOOD, groups)
    if not heads:
        layers = layers[:1]  # the other layers' memory would never be used: it is not built
    candidates = {name: _candidates(config, frozen, labels, fit_idx, groups, name, device) for name in layers}
    # out-of-fold image scores (K,), every candidate's on its groups' good images' scale
    groups_np = groups.numpy()
    oof = {name: selection_lib.comparable(y_np, groups_np, c.patch_scores()) for name, c in candidates.items()}
    aurocs = {f"patch_knn/{name}": selection_lib.oof_auroc(y_np, s) for name, s in oof.items()}
    decision_layers = layers[0] if not heads else selection_lib.choose(
        {name: aurocs[f"patch_knn/{name}"] for name in layers}, layers, selection_lib.margin_of(y_np, oof))
    fit_masks = None if masks is None else masks[fit_idx]
    fit_parts = frozen.parts_of(fit_idx)
    valid = None if fit_parts is None else geometry.part_pixels(fit_parts, size)
    if decision_layers != layers[0] and _masked_in_every_group(fit_masks, groups):
        # The layers make the map as well as the decision: other layers than the backbone's must not
        # make a worse map out of fold (the default blur), and few masked images cannot show that.
        other, default_map = (
            selection_lib.map_evidence(candidates[name].patch_maps(selection_lib.SIGMAS[0], size), fit_masks, valid)
            for name in (decision_layers, layers[0]))
        if not selection_lib.shown_no_worse(other, default_map):
            decision_layers = layers[0]
    oof["patch_knn"] = oof[decision_layers]
    own: dict[str, dict[str, torch.Tensor]] = {"evidence": {}, "published": {}}
    inner_published = None  # the published head's inner fits, kept for `_oof_explain`
    decided = {"patch_knn": aurocs[f"patch_knn/{decision_layers}"]}
    # Scored cheapest first; a head is not fitted when it could not win: it would need an AUROC above 1.
    for head in ("evidence", "published") if heads else ():
        if max(v for v in decided.values() if v is not None) + selection_lib.TOLERANCE >= 1.0:
            break
        if head == "evidence":
            p, own[head]["evidence"] = _oof_evidence(config, candidates[decision_layers].inputs, y, groups, size,
                                                     fit_parts, device)
        else:
            p, own[head]["cam"], inner_published = _oof_published(config, template, frozen, labels, fit_idx, groups,
                                                                  images, size, device, precision)
        oof[head] = selection_lib.comparable(y_np, groups_np, p)
        aurocs[head] = decided[head] = selection_lib.oof_auroc(y_np, oof[head])
    fused_note = _fused_note(config, reference, oof)
    if fused_note is None:
        fused = selection_lib.fused_scores(y_np, groups_np, oof["published"], oof["evidence"])
        if fused is None:
            fused_note = "a group's good images gave a head's logits no spread"
        else:
            oof["fused"], aurocs["fused"] = fused, selection_lib.oof_auroc(y_np, fused)
            decided["fused"] = aurocs["fused"]
    decision = "patch_knn" if n_defects == 0 else selection_lib.choose(decided, selection_lib.DECISIONS,
                                                                       selection_lib.margin_of(y_np, oof))
    if decision in ("published", "fused") and _masked_in_every_group(fit_masks, groups):  # a map candidate
        own["published"].update(_oof_explain(config, inner_published, frozen, fit_idx, groups, size, device,
                                             precision))
    if decision == "fused":  # the CAM shown beside the evidence map
        own["fused"] = {**own["evidence"], **own["published"]}
    open_layers = layers if decision == "published" else (decision_layers,)
    chosen_layers, sigma, shown, map_report = _choose_maps(
        candidates, open_layers, decision, own.get(decision, {}), fit_masks, groups, size, valid)
    if config["patch_map_sigma"] is not None:
        sigma = float(config["patch_map_sigma"])
    chosen = candidates[chosen_layers]
    # the chosen memory is the fit's own (Fold.seconds["memory"]); the rest is the price of choosing
    selection_seconds = time.perf_counter() - start - chosen.info["seconds"]
    model = fresh_copy(template, config["seed"])
    history = NO_TRAINING
    if decision in ("evidence", "fused"):
        head = evidence_lib.EvidenceHead(chosen.memory.shape[1])
        fused = decision == "fused"  # then the published head's epochs are what is reported as it trains
        history = evidence_lib.train_head(head, chosen.inputs, y, class_weight=config["class_weight"], device=device,
                                          progress=progress and not fused, on_epoch_end=None if fused else on_epoch_end)
        model.evidence_head = head.eval()
    if decision in ("published", "fused"):
        steps = history
        history = _train_classifier(config, model, frozen, labels, fit_idx, images, device, precision, progress,
                                    on_epoch_end)
        model.explain_reference = explain_lib.reference_features(frozen.features[fit_idx], y)
        if decision == "fused":  # both heads' training time; the epochs are the published head's
            history = {**history, "seconds": history["seconds"] + steps["seconds"], "evidence": steps}
            model.fusion = fusion_of(model, frozen, reference, chosen.memory, PatchRule(chosen_layers, sigma),
                                     size=size, batch_size=config["batch_size"], device=device, precision=precision)
    selection = {
        "requested": "auto", "decision": decision, "head": None if decision == "patch_knn" else decision,
        "map": shown, "patch_layers": chosen_layers, "patch_map_sigma": sigma, "inner_folds": int(groups.max()) + 1,
        "n_images": len(fit_idx), "n_defects": n_defects, "heads_eligible": heads, "image_auroc": aurocs,
        "maps": map_report, "tolerance": selection_lib.TOLERANCE, "seconds": selection_seconds,
        "fused_note": fused_note,
        "fusion": None if model.fusion is None else dict(zip(("published", "evidence"), model.fusion.tolist())),
        # the standard error of each candidate's out-of-fold AUROC less the one it had to beat
        "image_auroc_se": {**{f"patch_knn/{name}": selection_lib.auroc_difference_se(y_np, oof[name], oof[layers[0]])
                              for name in layers[1:]},
                           **{name: selection_lib.auroc_difference_se(y_np, oof[name], oof["patch_knn"])
                              for name in ("evidence", "published", "fused") if name in oof}},
    }
    return Fitted(model, decision != "patch_knn", chosen.memory, chosen.info, history,
                  PatchRule(chosen_layers, sigma), selection)


def _fused_note(config, reference, oof) -> str | None:
    """Why the fused decision is not a candidate (None: it is): it needs both heads scored out of
    fold, good images its heads never saw to scale them (calibration="holdout"'s, two at least), and
    a stated false-alarm rate (its score is not a probability, so the argmax rule means nothing)."""
    if "evidence" not in oof or "published" not in oof:
        return "both heads must be scored out of fold"
    if reference is None or len(reference) < 2:
        return "it needs good images neither head saw to scale them: calibration='holdout' with two or more"
    if config["false_alarm_rate"] is None:
        return "its score is not a probability: it needs a stated false_alarm_rate, not the argmax"
    return None


def fusion_of(model: CAMClassifier, frozen: Frozen, reference: torch.Tensor, memory: torch.Tensor, rule: PatchRule,
              *, size: tuple[int, int], batch_size: int, device: torch.device, precision: str) -> torch.Tensor:
    """The fused decision's scale (2, 2) (`model.fused_logit`): the mean and standard deviation of
    the published and the evidence head's image logits over the good images `reference` (R,), which
    neither head saw. Rows (published, evidence). The model, which holds both heads, is left with a
    unit scale; the caller sets the one returned."""
    model.fusion = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # so that both heads score; their logits are what is read
    out = predict_frozen(model, frozen.features[reference], frozen.tap_of(reference), size=size, batch_size=batch_size,
                         device=device, precision=precision, patch_memory=memory, patch_rule=rule,
                         parts=frozen.parts_of(reference))
    logits = torch.from_numpy(np.stack([out["logit_published"], out["logit_evidence"]], axis=1)).double()  # (R, 2)
    # a spread of zero (identical logits) would divide by zero: the floor keeps the sum finite
    return torch.stack([logits.mean(dim=0), logits.std(dim=0).clamp_min(1e-6)], dim=1).float()


def score(fitted: Fitted, frozen: Frozen, idx: torch.Tensor, *, size: tuple[int, int], batch_size: int,
          device: torch.device, precision: str, maps: bool = True) -> dict[str, np.ndarray]:
    """`inference.predict_frozen` of the images `idx` (K,) with a fitted model: every map it offers
    (`maps`), or only what the decision needs."""
    evidence = fitted.model.evidence_head is not None
    fused = evidence and fitted.model.fusion is not None
    tapped = maps or evidence or not fitted.classifier
    return predict_frozen(fitted.model, frozen.features[idx], frozen.tap_of(idx) if tapped else None, size=size,
                          batch_size=batch_size, device=device, precision=precision,
                          patch_memory=fitted.memory if tapped else None, patch_rule=fitted.patch_rule,
                          classifier=fitted.classifier,
                          explain=maps and fitted.classifier and (fused or not evidence), parts=frozen.parts_of(idx))


def _cross_fit_scores(config, template, frozen, labels, train, types, *, masks, images, size, device, precision):
    """Scores of every good training image by a model fitted without its group (`GROUPS` groups of
    the training images, by defect type): each group's good images are scored by a model, memory
    and reference built from the other groups."""
    groups = assign_groups([types[i] for i in train.tolist()], GROUPS, config["seed"])
    parts, order = [], []
    for g in range(GROUPS):
        held = train[(groups == g) & (labels[train] == GOOD)]
        if len(held) == 0:
            continue
        rest = fit(config, template, frozen, labels, train[groups != g], types=types, masks=masks, images=images,
                   device=device, precision=precision)
        if not rest.classifier and bool((labels[train] != GOOD).any()):
            raise ValueError(f"cross-fit calibration: the training images outside group {g} hold no anomaly, so "
                             f"no classifier can be fitted without it; use calibration='holdout'.")
        parts.append(score(rest, frozen, held, size=size, batch_size=config["batch_size"], device=device,
                           precision=precision))
        order.append(held)
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}, torch.cat(order)


@dataclass
class Fold:
    """What one fold produced: the fitted model, its calibration, the held-out predictions
    (`inference.predict_frozen`'s keys), which training images calibrated it and their image scores,
    seconds per stage: memory, epochs (training the head), inputs (the rest of the fit: the evidence
    head's residuals to the memory), calibration (with the cross-fit's extra fits), test."""

    fitted: Fitted
    calibration: dict[str, Any]
    test: dict[str, np.ndarray] | None
    calibration_images: torch.Tensor
    calibration_scores: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> CAMClassifier:
        return self.fitted.model

    @property
    def classifier(self) -> bool:
        return self.fitted.classifier

    @property
    def patch_memory(self) -> torch.Tensor | None:
        return self.fitted.memory

    @property
    def memory_info(self) -> dict[str, Any] | None:
        return self.fitted.memory_info

    @property
    def history(self) -> dict[str, Any]:
        return self.fitted.history

    @property
    def selection(self) -> dict[str, Any] | None:
        """head="auto": what was chosen, with its out-of-fold evidence (`_fit_auto`); else None."""
        return self.fitted.selection

    @property
    def head(self) -> str | None:
        """The head trained ("published", "evidence" or both "fused"), None when the patch map alone decides."""
        if not self.classifier:
            return None
        if self.model.fusion is not None:
            return FUSED
        return "evidence" if self.model.evidence_head is not None else "published"

    def checkpoint(self, config: dict[str, Any], test_files: Sequence[str], n_train: int) -> dict[str, Any]:
        """The checkpoint of this fold (`checkpoint.checkpoint_dict`): the model, `config`, the held-out
        `test_files`, and beside them the calibration, the patch memory and the explanation reference."""
        extra: dict[str, Any] = {"n_train": int(n_train), "calibration": self.calibration}
        if self.fitted.selection is not None:
            extra["selection"] = self.fitted.selection
        if self.patch_memory is not None:
            extra["patch_memory"] = self.patch_memory
        if self.model.explain_reference is not None:
            extra["explain_reference"] = self.model.explain_reference
        return checkpoint_dict(self.model, self.fitted.resolved(config), test_files, extra,
                               classifier=self.classifier)


def run_fold(
    config: dict[str, Any],
    template: CAMClassifier,
    frozen: Frozen,
    labels: torch.Tensor,
    train: torch.Tensor,
    test: torch.Tensor,
    *,
    types: Sequence[str] | None = None,
    masks: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    device: torch.device,
    precision: str,
    test_maps: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, float, float], None] | None = None,
) -> Fold:
    """One fold of the run: fit (patch memory, head), calibrate on good images the model never
    trained on, score the held-out images.

    config: the run's configuration (`parameters.training_config`); template: an untrained model of
    it (`new_model`), left untouched (every fit trains a `fresh_copy`); frozen: the template's
    `frozen_pass` over all N images; labels (N,); train, test (K,) indices. types (N,): each
    image's defect type (cross-fit groups are stratified by it; default: its label); masks
    (N, H, W) bool, read with mask_supervision; images (N, 3, H, W) uint8, needed only without
    the cache (cache_features=False, the plain loop). With calibration "holdout" a share of the
    good training images is held back from the fit and calibrates it; with "cross_fit" every good
    training image is scored by a model fitted without its group. `test_maps`: score the held-out
    images with every map, not only the decision. Returns a `Fold`.
    """
    types = [str(int(v)) for v in labels.tolist()] if types is None else list(types)
    size, run = geometry.canvas(config["image_size"]), dict(device=device, precision=precision)
    seconds, clock = {}, time.perf_counter()
    method = config["calibration"]
    if method == "holdout":
        kept, held = calibration_split(labels[train], config["calibration_share"], config["seed"])
        fit_idx, cal = train[kept], train[held]
    else:
        fit_idx, cal = train, train[labels[train] == GOOD]
    fitted = fit(config, template, frozen, labels, fit_idx, types=types, masks=masks, images=images,
                 progress=progress, on_epoch_end=on_epoch_end, reference=cal if method == "holdout" else None, **run)
    fit_seconds, clock = time.perf_counter() - clock, time.perf_counter()
    seconds["memory"] = fitted.memory_info["seconds"] if fitted.memory_info else 0.0
    seconds["epochs"] = fitted.history.get("seconds", 0.0)
    # head="auto": the out-of-fold scores its choice was made from (the other memory, the inner fits)
    seconds["selection"] = fitted.selection["seconds"] if fitted.selection else 0.0
    seconds["inputs"] = fit_seconds - seconds["memory"] - seconds["epochs"] - seconds["selection"]
    if method == "holdout":
        cal_pred = score(fitted, frozen, cal, size=size, batch_size=config["batch_size"], **run)
    else:
        cal_pred, cal = _cross_fit_scores(config, template, frozen, labels, train, types, masks=masks,
                                          images=images, size=size, **run)
    cal_scores = image_score_of(cal_pred)
    cal_parts = frozen.parts_of(cal)
    calibration = calibration_lib.calibrate_all(
        maps_of(cal_pred), cal_scores, quantile=config["box_quantile"], min_area=config["box_min_area"],
        false_alarm_rate=config["false_alarm_rate"], method=method,
        valid=None if cal_parts is None else geometry.part_pixels(cal_parts, size))
    seconds["calibration"], clock = time.perf_counter() - clock, time.perf_counter()
    scored = score(fitted, frozen, test, size=size, batch_size=config["batch_size"], maps=test_maps,
                   **run) if len(test) else None
    seconds["test"] = time.perf_counter() - clock
    return Fold(fitted, calibration, scored, cal, cal_scores, seconds)


def cross_validate(
    config: dict[str, Any],
    samples: Sequence,
    model: CAMClassifier,
    frozen: Frozen,
    *,
    n_folds: int,
    masks: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    device: torch.device,
    precision: str,
    test_maps: bool = False,
    on_fold_end: Callable[[int, dict, list, Fold], None] | None = None,
) -> list[dict[str, Any]]:
    """Stratified, shuffled k-fold cross-validation over all `samples`: per fold `run_fold` fits a
    fresh copy of the untrained `model` (seed + fold) on the shared frozen pass `frozen` over all
    samples and scores the held-out images. Returns each fold's classification metrics at the
    fold's decision rule; `on_fold_end(fold, metrics, held_out_samples, Fold)` sees everything else."""
    labels = torch.tensor([s.label for s in samples])
    types = [s.defect_type for s in samples]
    results = []
    for fold, (fold_train, fold_test) in enumerate(kfold_splits(samples, n_folds, config["seed"])):
        out = run_fold({**config, "seed": config["seed"] + fold}, model, frozen, labels,
                       positions(samples, fold_train), positions(samples, fold_test), types=types, masks=masks,
                       images=images, device=device, precision=precision, test_maps=test_maps, progress=False)
        y = np.array([s.label for s in fold_test])
        score_ = image_score_of(out.test)
        decided = calibration_lib.decide(score_, out.calibration["decision"])
        results.append(classification_metrics(y, decided, score_))
        if on_fold_end is not None:
            on_fold_end(fold + 1, results[-1], fold_test, out)
    return results
