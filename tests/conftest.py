"""Shared fixtures: the real MVTec AD folder (or a skip), tiny PNG writers and randomly initialised models."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # so `import utils` works whatever folder pytest starts in
    sys.path.insert(0, str(REPO_ROOT))

from utils.constants import MVTEC_DIR_ENV  # noqa: E402
from utils.dataloader import index_subset, load_images, load_masks  # noqa: E402
from utils.model import CAMClassifier  # noqa: E402

# The tests run tiny tensors: one intra-op thread avoids OpenMP stalls when the 2 cores are shared.
torch.set_num_threads(1)

# Where the real MVTec AD images live next to the repository (read-only, never written to).
DEFAULT_MVTEC_DIR = REPO_ROOT.parent / "shared" / "data" / "mvtec_anomaly_detection"


@pytest.fixture(scope="session")
def real_mvtec_dir() -> Path:
    """The real MVTec AD root (one folder per category): $MVTEC_AD_DIR, else ../shared/data/... ; skips when absent."""
    configured = os.environ.get(MVTEC_DIR_ENV)
    root = Path(configured) if configured else DEFAULT_MVTEC_DIR
    if not root.is_dir():
        source = f"${MVTEC_DIR_ENV}" if configured else f"the default location (set ${MVTEC_DIR_ENV} to override)"
        pytest.skip(f"real MVTec AD folder {root} not found ({source}); these tests need real images")
    return root


@pytest.fixture(scope="session")
def real_subset(real_mvtec_dir: Path) -> Callable[[str, int], tuple]:
    """`real_subset(name, size)`: a real category decoded once per test run, whichever tests ask for
    it: (samples, images (N, 3, size, size) uint8, masks (N, size, size) bool or None, labels (N,)).
    Skips when the category is absent."""
    decoded: dict[tuple[str, int], tuple] = {}

    def get(name: str, size: int) -> tuple:
        if not (real_mvtec_dir / name).is_dir():
            pytest.skip(f"{real_mvtec_dir / name} not found: these tests need the real MVTec AD {name} images")
        if (name, size) not in decoded:
            samples = index_subset(real_mvtec_dir, name)
            decoded[(name, size)] = (samples, load_images(real_mvtec_dir, samples, size),
                                     load_masks(real_mvtec_dir, samples, size),
                                     torch.tensor([s.label for s in samples]))
        return decoded[(name, size)]

    return get


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Write a uint8 array ((H, W) or (H, W, C)) as a PNG at `path`, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)
    return path


@pytest.fixture
def png() -> Callable[..., Path]:
    """`png(path, size=8, value=128, channels=3)` writes a constant PNG; `png(path, array=a)` writes `a`."""

    def make(path: Path, size: int = 8, value: int = 128, channels: int = 3, array: np.ndarray | None = None) -> Path:
        if array is None:
            shape = (size, size) if channels == 1 else (size, size, channels)
            array = np.full(shape, value, dtype=np.uint8)
        return write_png(Path(path), array)

    return make


@pytest.fixture(scope="session")
def _model_templates() -> dict[str, CAMClassifier]:
    """One randomly initialised model per backbone, built once (VGG16's constructor takes seconds)."""
    templates = {}
    for i, backbone in enumerate(("vgg16", "mobilenet_v2")):
        torch.manual_seed(i)
        templates[backbone] = CAMClassifier(backbone, pretrained=False)
    return templates


@pytest.fixture
def make_model(_model_templates) -> Callable[[str], CAMClassifier]:
    """`make_model(backbone)`: a fresh copy of the session's random-init model (same weights every call)."""
    return lambda backbone: copy.deepcopy(_model_templates[backbone])
