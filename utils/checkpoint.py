"""Checkpoints and result files: atomic writes, save, load with weights_only=True, validation."""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .constants import CLASS_NAMES
from .evidence import EvidenceHead
from .model import EVIDENCE_HEADS, FUSED, PUBLISHED_HEADS, CAMClassifier, get_spec

CHECKPOINT_FORMAT = "cam-defect-detector/1"
FROZEN_PREFIX = "frozen."  # state_dict keys of the frozen layers (all a patch-memory-only checkpoint holds)
EVIDENCE_PREFIX = "evidence_head."  # state_dict keys of the evidence head
CHECKPOINT_KEYS = ("state_dict", "config", "test_files")  # what load_checkpoint needs
CONFIG_KEYS = ("backbone", "image_size", "pretrained")
# A temporary file of the atomic writer untouched this long belongs to a killed save.
STALE_TMP_SECONDS = 300


# --- atomic files ---------------------------------------------------------------------------


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


def save_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_bytes(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


# --- writing --------------------------------------------------------------------------------


def checkpoint_dict(
    model: CAMClassifier, config: dict[str, Any], test_files: Sequence[str], extra: dict[str, Any] | None = None,
    classifier: bool = True,
) -> dict[str, Any]:
    """The checkpoint `save_checkpoint` writes: only tensors and plain Python values.

    The state_dict holds the layers the model uses: with the published head, the whole network;
    with the evidence head (config "head"), the frozen layers (the patch features come from them)
    and the evidence head; with both ("fused") all of it, and "fusion" holds the (2, 2) scale of
    their logits (`model.fused_logit`); with classifier=False (no classifier was trained, e.g. good
    training images only) the frozen layers alone, and the checkpoint's "classifier" flag is False.
    """
    head = config.get("head", "published")
    fused = classifier and head == FUSED
    if fused and model.fusion is None:
        raise ValueError("a fused checkpoint needs the model's fusion (the scale of its heads' logits); it is None")

    def keep(key: str) -> bool:
        if not classifier:
            return key.startswith(FROZEN_PREFIX)
        if head == "evidence":
            return key.startswith((FROZEN_PREFIX, EVIDENCE_PREFIX))
        return fused or not key.startswith(EVIDENCE_PREFIX)

    if fused:
        extra = {**(extra or {}), "fusion": model.fusion.detach().cpu().float().clone()}
    return {
        "format": CHECKPOINT_FORMAT,
        "classifier": bool(classifier),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if keep(k)},
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
    """Save state_dict, configuration, class names and held-out test files (`checkpoint_dict`),
    atomically; `torch.load(path, weights_only=True)` reads it."""
    checkpoint = checkpoint_dict(model, config, test_files, extra, classifier)
    atomic_write_bytes(path, lambda f: torch.save(checkpoint, f))


def save_run(
    weights_path: str | Path,
    checkpoint: dict[str, Any],
    log_path: str | Path,
    log: Any,
) -> None:
    """Write a run's checkpoint (a `checkpoint_dict`) and its JSON log so that they never disagree.

    Both are first written in full to temporary files; only then is the old log removed, the
    checkpoint renamed into place and the log after it. A failure while writing changes nothing;
    one between the renames leaves a checkpoint without a log, never a log of another checkpoint.
    """
    weights_path, log_path = Path(weights_path), Path(log_path)
    temporaries = [_write_temporary(weights_path, lambda f: torch.save(checkpoint, f))]
    try:
        temporaries.append(_write_temporary(log_path, lambda f: f.write(json.dumps(log, indent=2).encode())))
        log_path.unlink(missing_ok=True)
        os.replace(temporaries[0], weights_path)
        os.replace(temporaries[1], log_path)
    finally:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)


# --- reading --------------------------------------------------------------------------------


def _read(path: Path) -> Any:
    """torch.load(weights_only=True) of `path`, every failure a ValueError that names the file."""
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
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as err:
        raise ValueError(f"Cannot read checkpoint {path}: permission denied. Give this user read access.") from err
    except Exception as err:  # any unreadable file: a pickle refused, truncated, or not torch's
        raise ValueError(
            f"{path} is not a checkpoint of this repository (it could not be read with "
            f"torch.load(weights_only=True), which refuses arbitrary pickles): {str(err) or type(err).__name__}"
        ) from err


def _validate(path: Path, ckpt: Any, backbone: str | None, image_size: int | None) -> None:
    """Raise a ValueError naming `path` unless `ckpt` is a complete checkpoint of the asked kind."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this repository (no '{CHECKPOINT_FORMAT}' format "
                         f"marker). Train with Training.ipynb to get one.")
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
        raise ValueError(f"{path} holds a {config['backbone']} model but backbone={backbone!r} was asked for: "
                         f"set backbone={config['backbone']!r} or point weights_path at a {backbone} checkpoint.")
    if image_size is not None and image_size != config["image_size"]:
        raise ValueError(f"{path} was trained at image_size={config['image_size']} but {image_size} was asked "
                         f"for; evaluate at the training size.")
    get_spec(config["backbone"])


def _model_of(path: Path, ckpt: dict[str, Any]) -> CAMClassifier:
    """The network of a validated checkpoint, its weights loaded and its explanation reference set."""
    config = ckpt["config"]
    model = CAMClassifier(config["backbone"], pretrained=False, pooling=config.get("pooling", "avg"))
    state = ckpt["state_dict"]
    head = config.get("head", "published") if has_classifier(ckpt) else None
    try:
        evidence_head = None
        if head in EVIDENCE_HEADS:
            evidence_head = EvidenceHead.from_state_dict(
                {k[len(EVIDENCE_PREFIX):]: v for k, v in state.items() if k.startswith(EVIDENCE_PREFIX)})
            state = {k: v for k, v in state.items() if not k.startswith(EVIDENCE_PREFIX)}
        if head in PUBLISHED_HEADS:
            model.load_state_dict(state)
        else:
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or any(k.startswith(FROZEN_PREFIX) for k in missing):
                raise RuntimeError(f"unexpected {unexpected[:3]}, missing frozen layers "
                                   f"{[k for k in missing if k.startswith(FROZEN_PREFIX)][:3]}")
        model.evidence_head = evidence_head
    except (RuntimeError, KeyError) as err:
        raise ValueError(f"Checkpoint {path}: its state_dict does not fit a {config['backbone']} model "
                         f"({str(err).splitlines()[0]}). It is damaged or was edited; train again.") from err
    if head == FUSED:
        fusion = ckpt.get("fusion")
        if not isinstance(fusion, torch.Tensor) or tuple(fusion.shape) != (2, 2) or \
                not bool(torch.isfinite(fusion).all()) or not bool((fusion[:, 1] > 0).all()):
            raise ValueError(f"Checkpoint {path}: its head is 'fused' but its fusion is not a finite (2, 2) tensor "
                             f"of (mean, std > 0) rows. It is damaged or was edited; train again.")
        model.fusion = fusion.float()
    reference = ckpt.get("explain_reference")
    if reference is not None:
        if not isinstance(reference, torch.Tensor) or reference.dim() != 3 or not torch.isfinite(reference).all():
            raise ValueError(f"Checkpoint {path}: its explain_reference is not a finite (C, h, w) tensor. "
                             f"It is damaged or was edited; train again.")
        model.explain_reference = reference.float()
    return model


def load_checkpoint(
    path: str | Path, backbone: str | None = None, image_size: int | None = None
) -> tuple[CAMClassifier, dict[str, Any]]:
    """Load a checkpoint written by `save_checkpoint` (safely: weights_only=True).

    `backbone` / `image_size`, when given, must match the checkpoint's configuration.
    Returns the model (on CPU, eval mode) and the checkpoint dictionary.
    """
    path = Path(path)
    ckpt = _read(path)
    _validate(path, ckpt, backbone, image_size)
    return _model_of(path, ckpt).eval(), ckpt


def has_classifier(checkpoint: dict[str, Any]) -> bool:
    """Whether a checkpoint holds a trained classifier (older checkpoints always do)."""
    return bool(checkpoint.get("classifier", True))
