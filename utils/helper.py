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
from . import explain as explain_lib
from .checkpoint import checkpoint_dict
from .constants import ANOMALY, GOOD
from .dataloader import batch_order, kfold_splits, positions
from .inference import predict_frozen
from .localizers import maps_of
from .metrics import classification_metrics
from .model import BackboneWeights, CAMClassifier
from .patchknn import build_memory, flatten_patches, leave_one_image_out_maps, memory_nbytes, patch_embeddings
from .postprocess import upsample_maps
from .runtime import autocast, cache_dtype, prepare_model, to_input, to_layout


@dataclass
class Frozen:
    """The frozen layers' outputs of N images, computed once (`frozen_pass`).

    features (N, C, h, w): the frozen output, the training cache and the coarse half of the patch
    embeddings; tap (N, C8, h8, w8) or None: the stride-8 tap (the fine half of the patch
    embeddings, where the explanations start), kept for the images `has_tap` (N,) bool marks.
    """

    features: torch.Tensor
    tap: torch.Tensor | None = None
    has_tap: torch.Tensor | None = None

    def tap_of(self, idx: torch.Tensor) -> torch.Tensor:
        """The stride-8 taps (K, C8, h8, w8) of images `idx` (K,); each must have been tapped."""
        if self.tap is None or not bool(self.has_tap[idx].all()):
            raise ValueError("the frozen pass kept no stride-8 tap of some of these images")
        rows = torch.cumsum(self.has_tap.long(), 0) - 1  # image -> row of `tap`
        return self.tap[rows[idx]]

    def patches_of(self, idx: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (K * h8 * w8, D) float32 of images `idx` (K,), image-major."""
        return flatten_patches(patch_embeddings(self.tap_of(idx).float(), self.features[idx].float()))


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
    desc: str = "Frozen layers",
    progress: bool = True,
) -> Frozen:
    """Run the frozen layers once over (N, 3, H, W) uint8 images; keep the stride-8 tap of every
    image (`tap_images` True), of none (False) or of those an (N,) bool tensor marks. Kept on the
    CPU, bf16 on the reduced-precision paths (half the memory) and fp32 otherwise."""
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
    return Frozen(torch.cat(features), torch.cat(taps) if taps else None, keep)


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


def _epoch(model, features, images, labels, *, batches, step, flip, cache, device, precision, mean, std, augment):
    """One pass over `batches`: (summed loss, correct count)."""
    total_loss, correct = 0.0, 0
    for idx in batches:
        with autocast(device, precision):
            if cache:
                x = features[idx]
                if flip is not None:
                    x = torch.where(flip(len(idx))[:, None, None, None], flip.features[idx], x)
                scores, _ = model.head(to_layout(x, device, precision))
            else:
                batch = images[idx] if augment is None else augment(images[idx])
                scores = model(to_input(batch, mean, std, device, precision))
        loss = step(scores.float(), labels[idx])
        total_loss += loss * len(idx)
        correct += (scores.argmax(1) == labels[idx]).sum().item()
    return total_loss, correct


class _Flip:
    """Flip augmentation on the cache: each step takes an image's flipped features with probability 1/2."""

    def __init__(self, features: torch.Tensor, generator: torch.Generator) -> None:
        self.features, self.generator = features, generator

    def __call__(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self.generator) < 0.5


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
    flipped_features: torch.Tensor | None = None,
    progress: bool = True,
    on_epoch_end: Callable[[int, float, float], None] | None = None,
) -> dict[str, Any]:
    """Train the fine-tuned layers and head with weighted cross-entropy and Adam.

    images: (N, 3, H, W) uint8, labels: (N,) int64. With `cache`, the frozen layers run once
    (or `features`, the (N, C, h, w) output of `frozen_pass`, are reused) and each step trains only
    the fine-tuned layers on them; the same computation as the plain loop, since the frozen part
    is deterministic in eval mode. An `augment` function changes the images every step, so it
    switches the cache off. `flipped_features`, the cache of the horizontally flipped images, is
    flip augmentation that keeps the cache. Returns the history: per-epoch loss and accuracy,
    whether early stopping fired, seconds.
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
    flip = _Flip(flipped_features, generator) if flipped_features is not None else None
    history: dict[str, Any] = {"loss": [], "accuracy": [], "early_stopped": False,
                               "cached_features": use_cache, "precision": precision}
    for epoch in range(epochs):
        model.train()
        batches = tqdm(batch_order(len(labels), batch_size, generator), desc=f"Epoch {epoch + 1}/{epochs}",
                       leave=False, disable=not progress)
        loss, correct = _epoch(model, features, images, labels, batches=batches, step=step, flip=flip,
                               cache=use_cache, device=device, precision=precision, mean=mean, std=std,
                               augment=augment)
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


def new_model(config: dict[str, Any], weights: BackboneWeights | None, device: torch.device,
              precision: str) -> CAMClassifier:
    """A fresh model of the run's configuration on `device` (its dense layer drawn with the run's seed)."""
    torch.manual_seed(config["seed"])
    model = CAMClassifier(config["backbone"], pretrained=config["pretrained"], weights=weights,
                          pooling=config["pooling"])
    return prepare_model(model, device, precision)


def fresh_copy(model: CAMClassifier, seed: int) -> CAMClassifier:
    """An untrained copy of `model` for another fold: the same frozen layers (so one frozen pass
    serves every fold), its dense layer drawn anew with `seed`."""
    fresh = copy.deepcopy(model)
    torch.manual_seed(seed)
    fresh.fc.reset_parameters()
    fresh.explain_reference = None
    return fresh


@dataclass
class Fold:
    """What one fold produced: the trained model, what its checkpoint stores beside it, the held-out
    predictions (`inference.predict_frozen`'s keys) and seconds per stage."""

    model: CAMClassifier
    classifier: bool
    history: dict[str, Any]
    patch_memory: torch.Tensor | None
    memory_info: dict[str, Any] | None
    calibration: dict[str, Any]
    test: dict[str, np.ndarray] | None
    seconds: dict[str, float] = field(default_factory=dict)

    def checkpoint(self, config: dict[str, Any], test_files: Sequence[str], n_train: int) -> dict[str, Any]:
        """The checkpoint of this fold (`checkpoint.checkpoint_dict`): the model, `config`, the held-out
        `test_files`, and beside them the calibration, the patch memory and the explanation reference."""
        extra: dict[str, Any] = {"n_train": int(n_train), "calibration": self.calibration}
        if self.patch_memory is not None:
            extra["patch_memory"] = self.patch_memory
        if self.model.explain_reference is not None:
            extra["explain_reference"] = self.model.explain_reference
        return checkpoint_dict(self.model, config, test_files, extra, classifier=self.classifier)


NO_TRAINING = {"loss": [], "accuracy": [], "epochs_run": 0, "early_stopped": False, "cached_features": False}


def _train_classifier(config, model, frozen, labels, train, images, device, precision, progress, on_epoch_end):
    """Train the run's classifier on the fold's training images (the cache, or the plain loop)."""
    cache = config["cache_features"]
    return train_model(
        model, images[train] if not cache else None, labels[train], mean=config["mean"], std=config["std"],
        epochs=config["epochs"], lr=config["lr"], class_weight=config["class_weight"],
        batch_size=config["batch_size"], target_train_accuracy=config["target_train_accuracy"],
        seed=config["seed"], device=device, precision=precision, cache=cache,
        features=frozen.features[train] if cache else None, progress=progress, on_epoch_end=on_epoch_end)


def calibration_maps(model, frozen: Frozen, good: torch.Tensor, memory: torch.Tensor | None,
                     memory_images: torch.Tensor | None, *, classifier: bool, size: tuple[int, int],
                     batch_size: int, device: torch.device, precision: str) -> dict[str, np.ndarray]:
    """Every map (`localizers.localizer_maps`) of the good calibration images `good` (K,), each made
    without them: the classifier's maps as it sees them, the patch map against the memory without
    the rows of that image (`memory_images` (M,): the image of each memory row)."""
    pred: dict[str, np.ndarray] = {}
    if classifier:
        pred = predict_frozen(model, frozen.features[good], frozen.tap_of(good), size=size, batch_size=batch_size,
                              device=device, precision=precision, explain=True)
    if memory is not None:
        h8, w8 = frozen.tap.shape[-2:]
        held_out = leave_one_image_out_maps(frozen.patches_of(good), memory, memory_images, (h8, w8))
        pred["patch_map"] = upsample_maps(held_out, size).numpy()
    return maps_of(pred)


def run_fold(
    config: dict[str, Any],
    template: CAMClassifier,
    frozen: Frozen,
    labels: torch.Tensor,
    train: torch.Tensor,
    test: torch.Tensor,
    *,
    images: torch.Tensor | None = None,
    device: torch.device,
    precision: str,
    test_maps: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[int, float, float], None] | None = None,
) -> Fold:
    """One fold of the run: train, build the patch memory, calibrate, score the held-out images.

    config: the run's configuration (`parameters.training_config`); template: an untrained model of
    it (`new_model`), left untouched: the fold trains a `fresh_copy` seeded with config["seed"];
    frozen: the template's `frozen_pass` over all N images; labels (N,); train, test (K,) indices. `images` (N, 3, H, W) uint8 are needed only without the cache
    (cache_features=False, the plain loop). The classifier trains only when the training images
    include anomalies. `test_maps`: score the held-out images with every map, not just the
    decision. Returns a `Fold`.
    """
    seconds, clock = {}, time.perf_counter()
    model = fresh_copy(template, config["seed"])
    size = (config["image_size"], config["image_size"])
    classifier = bool((labels[train] == ANOMALY).any())
    history = NO_TRAINING
    if classifier:
        history = _train_classifier(config, model, frozen, labels, train, images, device, precision, progress,
                                    on_epoch_end)
        model.explain_reference = explain_lib.reference_features(frozen.features[train], labels[train])
    seconds["epochs"], clock = time.perf_counter() - clock, time.perf_counter()
    good = train[labels[train] == GOOD]
    memory, memory_images, memory_info = None, None, None
    if config["patch_memory_size"]:
        memory, rows, memory_info = build_patch_memory(frozen.patches_of(good), config["patch_memory_size"],
                                                       config["patch_memory_method"], config["seed"])
        memory_images = rows // frozen.tap.shape[-2:].numel()  # (M,) position in `good` of each row's image
    seconds["memory"], clock = time.perf_counter() - clock, time.perf_counter()
    maps = calibration_maps(model, frozen, good, memory, memory_images, classifier=classifier, size=size,
                            batch_size=config["batch_size"], device=device, precision=precision)
    calibration = calibration_lib.calibrate(maps, config["box_quantile"], config["box_min_area"])
    seconds["calibration"], clock = time.perf_counter() - clock, time.perf_counter()
    scored = None
    if len(test) and (classifier or test_maps):
        scored = predict_frozen(model, frozen.features[test], frozen.tap_of(test) if test_maps else None,
                                size=size, batch_size=config["batch_size"], device=device, precision=precision,
                                patch_memory=memory if test_maps else None, classifier=classifier,
                                explain=test_maps and classifier)
    seconds["test"] = time.perf_counter() - clock
    return Fold(model, classifier, history, memory, memory_info, calibration, scored, seconds)


def cross_validate(
    config: dict[str, Any],
    samples: Sequence,
    model: CAMClassifier,
    frozen: Frozen,
    *,
    n_folds: int,
    images: torch.Tensor | None = None,
    device: torch.device,
    precision: str,
    test_maps: bool = False,
    on_fold_end: Callable[[int, dict, list, Fold], None] | None = None,
) -> list[dict[str, Any]]:
    """Stratified, shuffled k-fold cross-validation over all `samples`: per fold `run_fold` trains a
    fresh copy of the untrained `model` (seed + fold) on the shared frozen pass `frozen` over all
    samples and scores the held-out images. Returns each fold's classification metrics;
    `on_fold_end(fold, metrics, held_out_samples, Fold)` sees everything else."""
    labels = torch.tensor([s.label for s in samples])
    results = []
    for fold, (fold_train, fold_test) in enumerate(kfold_splits(samples, n_folds, config["seed"])):
        seed = config["seed"] + fold
        out = run_fold({**config, "seed": seed}, model, frozen, labels,
                       positions(samples, fold_train), positions(samples, fold_test), images=images,
                       device=device, precision=precision, test_maps=test_maps, progress=False)
        y = np.array([s.label for s in fold_test])
        p = out.test["p_anomaly"]
        results.append(classification_metrics(y, (p >= 0.5).astype(int), p))
        if on_fold_end is not None:
            on_fold_end(fold + 1, results[-1], fold_test, out)
    return results
