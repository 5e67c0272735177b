"""Training, inference, precision choice, seeding and checkpoints of the CAM classifier."""

from __future__ import annotations

import glob
import json
import numbers
import os
import random
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from . import explain as explain_lib
from .constants import CLASS_NAMES
from .dataloader import SPLITS, batch_order, kfold_splits, normalise, positions
from .metrics import classification_metrics
from .model import POOLINGS, BackboneWeights, CAMClassifier, check_input_size, get_spec, load_backbone_weights, normalisation
from .patchknn import (MEMORY_METHODS, build_memory, flatten_patches, leave_one_image_out_maps, memory_nbytes,
                       patch_anomaly_maps, patch_embeddings)
from .postprocess import calibrate, localizer_maps, upsample_maps

CHECKPOINT_FORMAT = "cam-defect-detector/1"
FROZEN_PREFIX = "frozen."  # state_dict keys of the frozen layers (all a patch-memory-only checkpoint holds)
CHECKPOINT_KEYS = ("state_dict", "config", "test_files")  # what load_checkpoint needs
CONFIG_KEYS = ("backbone", "image_size", "pretrained")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SEED_RANGE = "an integer from 0 to 2**32 - 1"  # NumPy's seed range
# A temporary file of the atomic writer untouched this long belongs to a killed save.
STALE_TMP_SECONDS = 300


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (call once at the start of a notebook, after the parameter
    checks); a seed NumPy cannot take raises a ValueError naming it first."""
    _check(_is_seed(seed), "seed", seed, SEED_RANGE)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """"auto" picks CUDA when present, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device={device!r} is not a torch device; use 'auto', 'cpu' or 'cuda'.") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but CUDA is not available; use 'auto' or 'cpu'.")
    return resolved


def cpu_supports_bf16() -> bool:
    """True when oneDNN has fast bf16 kernels on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """Pick the autocast precision: "auto" is bf16 on CUDA or bf16-capable CPUs, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}.")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision='fp16' is for CUDA only; on CPU use 'bf16' or 'fp32'.")
    return precision


def autocast(device: torch.device, precision: str):
    """Autocast context for `precision` ("fp32" disables it)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_model(model: CAMClassifier, device: torch.device, precision: str) -> CAMClassifier:
    """Move to `device`; the reduced-precision paths run channels-last (faster oneDNN/cuDNN)."""
    model = model.to(device)
    if precision != "fp32":
        model = model.to(memory_format=torch.channels_last)
    return model


def _to_input(images: torch.Tensor, mean, std, device, precision) -> torch.Tensor:
    x = normalise(images.to(device, non_blocking=True), mean, std)
    return x.contiguous(memory_format=torch.channels_last) if precision != "fp32" else x


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
    patch_images: torch.Tensor | None = None,
    desc: str = "Frozen layers",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the frozen layers once over (N, 3, H, W) uint8 images.

    Returns the cache (N, C, h, w) on the CPU, bf16 for the reduced-precision paths (half the
    memory) and fp32 otherwise, and, for the images where the (N,) bool `patch_images` is True,
    their patch embeddings flattened to (P, D) float32 (the same pass feeds the patch memory).
    """
    model.eval()
    cache_dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    taps = model.spec.taps if patch_images is not None else ()
    cache, patches = [], []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=not progress):
        x = _to_input(images[start:start + batch_size], mean, std, device, precision)
        with autocast(device, precision):
            out, tapped = model.frozen_features(x, taps)
        cache.append(out.to("cpu", cache_dtype).contiguous())
        if taps:
            keep = patch_images[start:start + batch_size].to(device)
            if keep.any():
                emb = patch_embeddings(*(t[keep].float() for t in tapped))  # (b, D, h8, w8)
                patches.append(flatten_patches(emb).cpu())
    return torch.cat(cache), (torch.cat(patches) if patches else None)


def build_patch_memory(
    patches: torch.Tensor, size: int, method: str, seed: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Subsample good training patches (P, D) to a (M, D) memory; also returns its statistics."""
    start = time.perf_counter()
    memory = build_memory(patches, size, method=method, seed=seed).contiguous()
    info = {"n_patches": int(len(patches)), "size": int(len(memory)), "dim": int(memory.shape[1]),
            "method": method, "megabytes": memory_nbytes(memory) / 2**20,
            "seconds": time.perf_counter() - start}
    return memory, info


def train_model(
    model: CAMClassifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    mean: Sequence[float],
    std: Sequence[float],
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
    (or `features` from `frozen_pass` are reused) and each step trains only the fine-tuned
    layers on the cached activations; this is the same computation as the plain loop since
    the frozen part is deterministic in eval mode. An `augment` function changes the images
    every step, so it switches the cache off (stale features would be wrong). `flipped_features`,
    the cache of the horizontally flipped images (same order), is flip augmentation that keeps the
    cache: each step takes every image's flipped features with probability 1/2.
    Returns the history: per-epoch loss and accuracy, whether early stopping fired, seconds.
    """
    use_cache = cache and augment is None
    generator = torch.Generator().manual_seed(seed)
    criterion = nn.CrossEntropyLoss(weight=torch.tensor(class_weight, dtype=torch.float32, device=device))
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates all parameters in one pass (about 10 % faster per step on CPU).
    optimizer = torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    labels = labels.to(device)
    start = time.perf_counter()
    if use_cache and features is None:
        features, _ = frozen_pass(model, images, mean, std, batch_size=batch_size,
                                  device=device, precision=precision, progress=progress)
    history: dict[str, Any] = {"loss": [], "accuracy": [], "early_stopped": False,
                               "cached_features": use_cache, "precision": precision}
    for epoch in range(epochs):
        model.train()
        total_loss, correct = 0.0, 0
        batches = batch_order(len(labels), batch_size, generator)
        for idx in tqdm(batches, desc=f"Epoch {epoch + 1}/{epochs}", leave=False, disable=not progress):
            with autocast(device, precision):
                if use_cache:
                    x = features[idx]
                    if flipped_features is not None:
                        flip = torch.rand(len(idx), generator=generator) < 0.5
                        x = torch.where(flip[:, None, None, None], flipped_features[idx], x)
                    x = x.to(device, non_blocking=True)
                    if precision != "fp32":
                        x = x.contiguous(memory_format=torch.channels_last)
                    scores, _ = model.head(x)
                else:
                    batch = images[idx] if augment is None else augment(images[idx])
                    scores = model(_to_input(batch, mean, std, device, precision))
                loss = criterion(scores.float(), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.item() * len(idx)
            correct += (scores.argmax(1) == labels[idx]).sum().item()
        history["loss"].append(total_loss / len(labels))
        history["accuracy"].append(correct / len(labels))
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, history["loss"][-1], history["accuracy"][-1])
        if target_train_accuracy is not None and history["accuracy"][-1] >= target_train_accuracy:
            history["early_stopped"] = True
            break
    history["epochs_run"] = len(history["loss"])
    history["seconds"] = time.perf_counter() - start
    return history


@torch.no_grad()
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
    classifier: bool = True,
    explain: bool = False,
    desc: str = "Predicting",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Score (N, 3, H, W) uint8 images in one pass through the network.

    Returns "p_anomaly" (N,), "cam" (N, H, W) raw CAM heatmaps (not normalised), with a
    `patch_memory` (M, D) "patch_map" (N, H, W) nearest-neighbour distances and "patch_score" (N,),
    and with `explain` one raw (N, H, W) map per name of `explain_lib.EXPLANATIONS` (gradients of
    the decision from the stride-8 tap up; the frozen layers below it run once, without them).
    With classifier=False (a model trained without one) only the frozen layers run: no
    "p_anomaly", "cam" or explanations, so a patch_memory is required.
    """
    if not classifier and patch_memory is None:
        raise ValueError("predict(classifier=False) needs a patch_memory: without a classifier it is the only map")
    model.eval()
    size = tuple(images.shape[-2:])
    check_input_size(size[1], size[0])
    tap8 = model.spec.taps[0]
    taps = model.spec.taps if patch_memory is not None else ()
    if explain:
        taps = tuple(sorted(set(taps) | {tap8}))
    memory = patch_memory.to(device) if patch_memory is not None else None
    out: dict[str, list] = {"p_anomaly": [], "cam": [], "patch_map": [], "patch_score": []}
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=not progress):
        x = _to_input(images[start:start + batch_size], mean, std, device, precision)
        with autocast(device, precision):
            frozen, tapped = model.frozen_features(x, taps)
            if classifier:
                scores, maps = model.head(frozen)
                if explain:
                    _, explanations = explain_lib.explanation_maps(model, tapped[taps.index(tap8)], tap8)
                    for name, m in explanations.items():
                        out.setdefault(name, []).append(explain_lib.upsample(m, size).cpu())
            tapped = [t for i, t in zip(taps, tapped) if i in model.spec.taps]  # the patch memory's
        if classifier:
            out["p_anomaly"].append(scores.float().softmax(dim=1)[:, 1].cpu())
            out["cam"].append(model.cam(maps, size).cpu())
        if memory is not None:
            emb = patch_embeddings(*(t.float() for t in tapped))  # (B, D, h8, w8)
            patch_map, patch_score = patch_anomaly_maps(emb, memory, out_size=size)
            out["patch_map"].append(patch_map.cpu())
            out["patch_score"].append(patch_score.cpu())
    return {k: torch.cat(v).numpy() for k, v in out.items() if v}


def calibrate_boxes(
    model: CAMClassifier,
    good_images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    quantile: float,
    min_area: int,
    good_patches: torch.Tensor | None = None,
    patch_memory: torch.Tensor | None = None,
    batch_size: int,
    device: torch.device,
    precision: str,
    progress: bool = True,
    classifier: bool = True,
) -> dict[str, Any]:
    """The checkpoint's "calibration" (see `postprocess.calibrate`) from good training images.

    classifier=False (no classifier trained): only the patch map is calibrated.

    good_images (N, 3, S, S) uint8 are good images the classifier trained on; with a patch memory,
    good_patches (N*h*w, D) are the patches of these same images that built it (`frozen_pass`
    order), and each image's patch map leaves its own memory rows out, so no map is calibrated
    on the images that built its reference.
    """
    if len(good_images) == 0:
        raise ValueError("calibration needs good training images, and the training split has none")
    if not classifier and patch_memory is None:
        raise ValueError("calibration without a classifier needs the patch memory: it is the only map")
    out = {"cam": None, "p_anomaly": None}
    if classifier:
        out = predict(model, good_images, mean, std, batch_size=batch_size, device=device,
                      precision=precision, explain=True, desc="Calibration images", progress=progress)
    patch_map = None
    if patch_memory is not None:
        size = tuple(good_images.shape[-2:])
        grid = (size[0] // 8, size[1] // 8)  # the stride-8 tap of both backbones
        held_out = leave_one_image_out_maps(good_patches, patch_memory, grid)  # (N, h, w)
        patch_map = upsample_maps(held_out, size).numpy()  # as patch_anomaly_maps upsamples
    maps = localizer_maps(out["cam"], out["p_anomaly"], patch_map,
                          explanations={name: out[name] for name in explain_lib.EXPLANATIONS if name in out}
                          if classifier else None)
    return calibrate(maps, quantile=quantile, min_area=min_area)


def save_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def remove_stale_temporaries(path: str | Path, older_than: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete `.<name>.*.tmp` files of `atomic_write_bytes` next to `path` that nothing has written
    for `older_than` seconds (left by a killed save); returns what it removed."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than:
                tmp.unlink()
                removed.append(tmp)
        except FileNotFoundError:  # another process cleaned it first
            pass
    return removed


def _write_temporary(path: Path, write: Callable[[Any], None]) -> Path:
    """Write through `write(fileobj)` into a new temporary sibling of `path` and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: str | Path, write: Callable[[Any], None]) -> None:
    """Write a file through `write(fileobj)` into a temporary sibling, then rename it into place,
    so an interrupted run never leaves a half-written file where a good one was. Temporary files
    of earlier killed saves of the same file are removed."""
    path = Path(path)
    tmp = _write_temporary(path, write)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def checkpoint_dict(
    model: CAMClassifier, config: dict[str, Any], test_files: Sequence[str], extra: dict[str, Any] | None = None,
    classifier: bool = True,
) -> dict[str, Any]:
    """The checkpoint `save_checkpoint` writes: only tensors and plain Python values.

    classifier=False (no classifier was trained, e.g. good training images only): the state_dict
    holds the frozen layers alone, which the patch memory's features come from, and the
    checkpoint's "classifier" flag is False.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "classifier": bool(classifier),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                       if classifier or k.startswith(FROZEN_PREFIX)},
        "config": dict(config),
        "class_names": list(CLASS_NAMES),
        "test_files": list(test_files),
        **(extra or {}),
    }


def save_checkpoint(
    path: str | Path,
    model: CAMClassifier,
    config: dict[str, Any],
    test_files: Sequence[str],
    extra: dict[str, Any] | None = None,
    classifier: bool = True,
) -> None:
    """Save state_dict, configuration, class names and held-out test files, atomically.

    Only tensors and plain Python values, so `torch.load(path, weights_only=True)` reads it.
    classifier=False (no classifier was trained, e.g. good training images only): the state_dict
    holds the frozen layers alone, which the patch memory's features come from, and the
    checkpoint's "classifier" flag is False.
    """
    checkpoint = checkpoint_dict(model, config, test_files, extra, classifier)
    atomic_write_bytes(path, lambda f: torch.save(checkpoint, f))


def save_run(
    weights_path: str | Path,
    model: CAMClassifier,
    config: dict[str, Any],
    test_files: Sequence[str],
    extra: dict[str, Any] | None,
    log_path: str | Path,
    log: Any,
    classifier: bool = True,
) -> None:
    """Write a run's checkpoint and its JSON log so that they never disagree.

    Both are first written in full to temporary files; only then is the old log removed, the
    checkpoint renamed into place and the log after it. A failure while writing changes nothing;
    one between the renames leaves a checkpoint without a log, never a log of another checkpoint.
    """
    weights_path, log_path = Path(weights_path), Path(log_path)
    checkpoint = checkpoint_dict(model, config, test_files, extra, classifier)
    temporaries = [_write_temporary(weights_path, lambda f: torch.save(checkpoint, f))]
    try:
        temporaries.append(_write_temporary(log_path, lambda f: f.write(json.dumps(log, indent=2).encode())))
        log_path.unlink(missing_ok=True)
        os.replace(temporaries[0], weights_path)
        os.replace(temporaries[1], log_path)
    finally:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)


def load_checkpoint(
    path: str | Path, backbone: str | None = None, image_size: int | None = None
) -> tuple[CAMClassifier, dict[str, Any]]:
    """Load a checkpoint written by `save_checkpoint` (safely: weights_only=True).

    `backbone` / `image_size`, when given, must match the checkpoint's configuration.
    Returns the model (on CPU, eval mode) and the checkpoint dictionary.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt"))
        raise IsADirectoryError(
            f"Checkpoint path {path} is a folder, not a file: point weights_path at the .pt file"
            + (f" (this folder holds: {', '.join(inside)})." if inside else " (this folder holds no .pt file).")
        )
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist: run Training.ipynb first or set weights_path.")
    if path.stat().st_size == 0:
        raise ValueError(f"Checkpoint {path} is empty (0 bytes): a save or a copy was interrupted. "
                         f"Run Training.ipynb again, or copy the file again.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as err:
        raise ValueError(f"Cannot read checkpoint {path}: permission denied. Give this user read access.") from err
    except Exception as err:  # any unreadable file: a pickle refused, truncated, or not torch's
        raise ValueError(
            f"{path} is not a checkpoint of this repository (it could not be read with "
            f"torch.load(weights_only=True), which refuses arbitrary pickles): {str(err) or type(err).__name__}"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a checkpoint of this repository (no '{CHECKPOINT_FORMAT}' format "
            f"marker). Train with Training.ipynb to get one."
        )
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"Checkpoint {path} lacks {', '.join(missing)}: it is incomplete or was not written "
                         f"by Training.ipynb. Train again to get a complete one.")
    config = ckpt["config"]
    missing = [k for k in CONFIG_KEYS if not isinstance(config, dict) or k not in config]
    if missing:
        raise ValueError(f"Checkpoint {path} has a config without {', '.join(missing)}: it was not written "
                         f"by Training.ipynb. Train again to get a complete one.")
    if backbone is not None and backbone != config["backbone"]:
        raise ValueError(
            f"{path} holds a {config['backbone']} model but backbone={backbone!r} was asked for: "
            f"set backbone={config['backbone']!r} or point weights_path at a {backbone} checkpoint."
        )
    if image_size is not None and image_size != config["image_size"]:
        raise ValueError(
            f"{path} was trained at image_size={config['image_size']} but {image_size} was asked "
            f"for; evaluate at the training size."
        )
    get_spec(config["backbone"])
    model = CAMClassifier(config["backbone"], pretrained=False, pooling=config.get("pooling", "avg"))
    try:
        if has_classifier(ckpt):
            model.load_state_dict(ckpt["state_dict"])
        else:
            missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
            if unexpected or any(k.startswith(FROZEN_PREFIX) for k in missing):
                raise RuntimeError(f"unexpected {unexpected[:3]}, missing frozen layers "
                                   f"{[k for k in missing if k.startswith(FROZEN_PREFIX)][:3]}")
    except RuntimeError as err:
        raise ValueError(f"Checkpoint {path}: its state_dict does not fit a {config['backbone']} model "
                         f"({str(err).splitlines()[0]}). It is damaged or was edited; train again.") from err
    reference = ckpt.get("explain_reference")
    if reference is not None:
        if not isinstance(reference, torch.Tensor) or reference.dim() != 3 or not torch.isfinite(reference).all():
            raise ValueError(f"Checkpoint {path}: its explain_reference is not a finite (C, h, w) tensor. "
                             f"It is damaged or was edited; train again.")
        model.explain_reference = reference.float()
    return model.eval(), ckpt


def has_classifier(checkpoint: dict[str, Any]) -> bool:
    """Whether a checkpoint holds a trained classifier (older checkpoints always do)."""
    return bool(checkpoint.get("classifier", True))


def _check(condition: bool, name: str, value: Any, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}.")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_seed(v: Any) -> bool:
    return _is_int(v) and 0 <= v < 2**32


def check_output_dir(folder: Any, name: str) -> None:
    """Raise a ValueError naming `name` unless `folder` is a writable folder or can be created as
    one; creates nothing (checks run before anything is written)."""
    _check(isinstance(folder, (str, Path)) and str(folder) != "", name, folder, "a folder path")
    probe = Path(folder)
    while not probe.exists() and probe.parent != probe:  # the nearest part that exists
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{name}={str(folder)!r} cannot be used: {probe} is a file, not a folder. "
                         f"Choose another {name}, or move the file.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{name}={str(folder)!r} cannot be written: permission denied on {probe}. "
                         f"Choose a folder this user can write to.")


def check_evaluation_parameters(
    *, batch_size: int, n_samples: int, heatmap_thres: float, results_dir: str | None = None
) -> None:
    """Check Evaluation.ipynb's numeric parameters (and that results_dir can be written) before
    anything is loaded; a bad one raises a ValueError naming it."""
    _check(_is_int(batch_size) and batch_size >= 1, "batch_size", batch_size, "a positive integer")
    _check(_is_int(n_samples) and n_samples >= 0, "n_samples", n_samples, "0 or a positive integer")
    _check(_is_number(heatmap_thres) and 0 <= heatmap_thres <= 1, "heatmap_thres", heatmap_thres,
           "a number in [0, 1]")
    if results_dir is not None:
        check_output_dir(results_dir, "results_dir")


def training_config(
    *, data_dir: str, subset_name: str, download: bool, backbone: str, pretrained: bool,
    image_size: int, batch_size: int, epochs: int, lr: float, class_weight: Sequence[float],
    target_train_accuracy: float | None, test_size: float, seed: int, heatmap_thres: float,
    n_cv_folds: int, weights_dir: str, results_dir: str, device: str, precision: str = "auto",
    cache_features: bool = True, patch_memory_size: int = 10000, patch_memory_method: str = "coreset",
    backbone_weights: str | None = None, pooling: str = "avg",
    split: str = "pooled",
) -> dict[str, Any]:
    """Check the Training.ipynb parameters and return them as the run's configuration.

    A wrong type or value raises a ValueError that names the parameter and what it accepts. A
    `backbone_weights` file is read and checked here (see `model.load_backbone_weights`), so a bad
    file stops the run before anything is trained; the configuration records its name, sha256 and
    source, and the input `mean`/`std` of the run (the file's, or those of torchvision's weights).
    """
    get_spec(backbone)
    _check(isinstance(data_dir, (str, Path)), "data_dir", data_dir, "a folder path")
    _check(isinstance(subset_name, str) and subset_name != "", "subset_name", subset_name, "a subset name")
    for name, value in (("download", download), ("pretrained", pretrained), ("cache_features", cache_features)):
        _check(isinstance(value, bool), name, value, "True or False")
    _check(_is_int(image_size) and image_size >= 64 and image_size % 32 == 0, "image_size",
           image_size, "an integer multiple of 32, at least 64")
    _check(_is_int(batch_size) and batch_size >= 1, "batch_size", batch_size, "a positive integer")
    _check(_is_int(epochs) and epochs >= 1, "epochs", epochs, "a positive integer")
    _check(_is_number(lr) and lr > 0, "lr", lr, "a positive number")
    _check(isinstance(class_weight, (list, tuple)) and len(class_weight) == 2
           and all(_is_number(w) and w > 0 for w in class_weight),
           "class_weight", class_weight, "two positive numbers [Good, Anomaly]")
    _check(target_train_accuracy is None or (_is_number(target_train_accuracy) and 0 < target_train_accuracy <= 1),
           "target_train_accuracy", target_train_accuracy, "None or a number in (0, 1]")
    _check(_is_number(test_size) and 0 < test_size < 1, "test_size", test_size, "a fraction in (0, 1)")
    _check(_is_seed(seed), "seed", seed, SEED_RANGE)
    _check(_is_number(heatmap_thres) and 0 <= heatmap_thres <= 1, "heatmap_thres", heatmap_thres, "a number in [0, 1]")
    _check(_is_int(n_cv_folds) and (n_cv_folds == 0 or n_cv_folds >= 2), "n_cv_folds", n_cv_folds,
           "0 (skip) or an integer of at least 2")
    _check(precision in PRECISIONS, "precision", precision, f"one of {PRECISIONS}")
    _check(_is_int(patch_memory_size) and patch_memory_size >= 0, "patch_memory_size", patch_memory_size,
           "0 (no patch memory) or a positive integer")
    _check(split in SPLITS, "split", split, f"one of {SPLITS}")
    _check(patch_memory_method in MEMORY_METHODS, "patch_memory_method", patch_memory_method,
           f"one of {MEMORY_METHODS}")
    resolve_device(device)
    check_output_dir(weights_dir, "weights_dir")
    check_output_dir(results_dir, "results_dir")
    run = run_name(subset_name, backbone)
    if (Path(weights_dir) / f"{run}.pt").is_dir():
        raise ValueError(f"weights_dir={str(weights_dir)!r}: {Path(weights_dir) / f'{run}.pt'} is a folder, "
                         f"where the checkpoint would be written: move it away.")
    if (Path(results_dir) / run).exists() and not (Path(results_dir) / run).is_dir():
        raise ValueError(f"results_dir={str(results_dir)!r}: {Path(results_dir) / run} is a file, where the "
                         f"run's results folder would be: move it away.")
    _check(pooling in POOLINGS, "pooling", pooling, f"one of {POOLINGS} ('avg' is the published head)")
    _check(backbone_weights is None or isinstance(backbone_weights, (str, Path)), "backbone_weights",
           backbone_weights, "None or the path of a backbone weights file")
    weights_info, (mean, std) = None, normalisation(backbone, pretrained)
    if backbone_weights is not None:
        _check(pretrained, "pretrained", pretrained, "True when backbone_weights is given "
               "(pretrained=False means random init; set backbone_weights=None for that)")
        weights = load_backbone_weights(backbone_weights, backbone)
        weights_info, mean, std = weights.describe(), weights.mean, weights.std
    return {
        "data_dir": str(data_dir), "subset_name": subset_name, "download": download,
        "backbone": backbone, "pretrained": pretrained, "image_size": int(image_size),
        "batch_size": int(batch_size), "epochs": int(epochs), "lr": float(lr),
        "class_weight": [float(w) for w in class_weight],
        "target_train_accuracy": None if target_train_accuracy is None else float(target_train_accuracy),
        "test_size": float(test_size), "seed": int(seed), "heatmap_thres": float(heatmap_thres),
        "n_cv_folds": int(n_cv_folds), "weights_dir": str(weights_dir), "results_dir": str(results_dir),
        "device": device, "precision": precision, "cache_features": cache_features,
        "patch_memory_size": int(patch_memory_size), "patch_memory_method": patch_memory_method,
        "pooling": pooling, "backbone_weights": weights_info, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
        "split": split,
    }


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


def run_name(subset_name: str, backbone: str) -> str:
    """The name of a run's checkpoint and results folder: `{subset}_{backbone}`."""
    return f"{subset_name}_{backbone}"


def score_image(
    image: str | Path | Image.Image | np.ndarray,
    model: CAMClassifier,
    config: dict[str, Any],
    *,
    heatmap_thres: float | None = None,
    box_mode: str = "components",
    calibration: dict[str, Any] | None = None,
    device: torch.device = torch.device("cpu"),
    precision: str = "fp32",
    **kwargs: Any,
) -> dict[str, Any]:
    """Score one image (a path, PIL image or uint8 array) with a trained model: kept for existing
    code, `utils.inference.score_image` with a checkpoint made of `config` and `calibration`
    (keyword arguments such as `localizer` and `box_threshold` pass through). Pass the whole
    checkpoint to `inference.score_image` for the patch maps.

    Returns "label" ("Good"/"Anomaly"), "p_anomaly", "heatmap" (S, S) in [0, 1] (the per-image
    min-max CAM), "boxes" (K, 4) x1, y1, x2, y2 (exclusive x2, y2, in pixels of the S x S input)
    and the other keys of `inference.results_from_predictions`. With the published "minmax"
    rule the boxes surround the parts above `heatmap_thres` (default: the configuration's) and
    are empty when the label is Good.
    """
    from .inference import score_image as _score_image  # inference builds on this module

    checkpoint = {"config": config, "calibration": calibration}
    return _score_image(image, model, checkpoint, heatmap_thres=heatmap_thres, box_mode=box_mode,
                        device=device, precision=precision, **kwargs)


def cross_validate(
    samples: Sequence,
    images: torch.Tensor,
    *,
    n_folds: int,
    backbone: str,
    pretrained: bool,
    seed: int,
    device: torch.device,
    precision: str,
    weights: BackboneWeights | None = None,
    pooling: str = "avg",
    on_fold_end: Callable[[int, dict], None] | None = None,
    **train_kwargs: Any,
) -> list[dict[str, Any]]:
    """Stratified, shuffled k-fold cross-validation over all `samples` (images (N, 3, H, W) uint8,
    decoded once): a fresh model per fold, trained like the main one (`train_kwargs` are
    train_model's; `weights` a backbone weights file as in the main run), scored on the fold's
    held-out images. Returns each fold's classification metrics."""
    mean, std = (weights.mean, weights.std) if weights is not None else normalisation(backbone, pretrained)
    results = []
    for fold, (fold_train, fold_test) in enumerate(kfold_splits(samples, n_folds, seed)):
        net = prepare_model(CAMClassifier(backbone, pretrained=pretrained, weights=weights, pooling=pooling),
                            device, precision)
        x_train, x_test = images[positions(samples, fold_train)], images[positions(samples, fold_test)]
        y_test = np.array([s.label for s in fold_test])
        train_model(net, x_train, torch.tensor([s.label for s in fold_train]), mean=mean, std=std,
                    seed=seed + fold, device=device, precision=precision, progress=False, **train_kwargs)
        p = predict(net, x_test, mean, std, batch_size=train_kwargs["batch_size"], device=device,
                    precision=precision, progress=False)["p_anomaly"]
        results.append(classification_metrics(y_test, (p >= 0.5).astype(int), p))
        if on_fold_end is not None:
            on_fold_end(fold + 1, results[-1])
    return results
