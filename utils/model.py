"""The CAM classifier: a frozen/fine-tuned CNN backbone, a GAP + dense head and its heatmap."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models import MobileNet_V2_Weights, VGG16_Weights, WeightsEnum

from .constants import ANOMALY, CLASS_NAMES, GOOD, IMAGENET_MEAN, IMAGENET_STD, SIZE_MULTIPLE
from .download import sha256_of
from .postprocess import upsample_maps

# The small file format of `backbone_weights`: the backbone's convolutional state dict plus the
# input normalisation those weights expect and where they came from (plain tensors and strings,
# so torch.load(weights_only=True) reads it).
BACKBONE_WEIGHTS_FORMAT = "cam-defect-detector/backbone-weights/1"


# How the head pools the last feature map: "avg" is the published global average pooling;
# "max" and "topk" pool per-position class scores (multiple-instance learning), so the decision
# rests on the most anomalous positions and the CAM's maximum is the evidence it used.
POOLINGS = ("avg", "max", "topk")
# The classifier head: "published" (the fine-tuned last block, pooling and dense layer, whose CAM
# and explanations show the evidence after the fact) or "evidence" (utils/evidence.py: the decision
# is computed from a map of per-patch evidence, which is then its explanation by construction);
# "auto", the default, chooses one of them, both ("fused") or none (the patch map alone) from
# out-of-fold scores of the training split (helper._fit_auto), and its checkpoint records the head
# it chose.
# "fused" keeps both heads and decides on their image logits, each standardised by good images
# neither head saw (calibration="holdout"'s), summed (`fused_logit`).
FUSED = "fused"
HEADS = ("auto", "published", "evidence", FUSED)  # also what a checkpoint's config may record
EVIDENCE_HEADS = ("evidence", FUSED)  # checkpoint heads with the evidence head (which reads the patch memory)
PUBLISHED_HEADS = ("published", FUSED)  # checkpoint heads with the published head (its CAM, its explanations)
TOPK_FRACTION = 0.1  # "topk": the mean of the top 10 % of positions (20 of 196 at 224 px)


@dataclass(frozen=True)
class BackboneSpec:
    """How one torchvision network becomes a CAM classifier."""

    builder: Callable[..., nn.Module]
    weights: WeightsEnum
    features: Callable[[nn.Module], nn.Sequential]  # the convolutional part we keep
    channels: int  # channels of the last feature map, the CAM's input
    n_frozen: int  # leading modules of `features` that never train (cached by the fast path)
    # (stride 8, stride 16) frozen module outputs for the patch memory; the second is the last
    # frozen module, so a frozen pass that keeps the first tap has both (`helper.Frozen`)
    taps: tuple[int, int]
    head_maxpool: bool  # VGG16's published head max-pools 2x2 before the global average
    fine_tuned: str  # for the README and printouts
    # The taps whose patch map localises best, measured on the official split of pill and
    # toothbrush (benchmarks/official_split.py): "fine" (stride 8 alone) or "both" (patchknn.PATCH_LAYERS)
    patch_layers: str


BACKBONES: dict[str, BackboneSpec] = {
    # features[:-1] drops the last max-pool so conv5_3 keeps 14x14 at 224 px. Modules 0-22
    # (conv1_1 .. conv4_3 + ReLU) are frozen as published; 23 is pool4, without parameters, so
    # the frozen pass includes it and the cache stores (512, 14, 14) instead of (512, 28, 28).
    "vgg16": BackboneSpec(
        builder=models.vgg16,
        weights=VGG16_Weights.IMAGENET1K_V1,
        features=lambda net: net.features[:-1],
        channels=512,
        n_frozen=24,
        taps=(22, 23),  # conv4_3 (stride 8) and pool4 (stride 16)
        head_maxpool=True,
        fine_tuned="conv5_1, conv5_2, conv5_3 + dense",
        patch_layers="both",  # pool4 has conv4_3's 512 channels: it adds context, pixel AUROC falls without it
    ),
    # Blocks 0-13 (through the stride-16, 96-channel stage) frozen; blocks 14-18 (the 160- and
    # 320-channel inverted residuals and the 1x1 conv to 1280) fine-tune.
    "mobilenet_v2": BackboneSpec(
        builder=models.mobilenet_v2,
        weights=MobileNet_V2_Weights.IMAGENET1K_V1,
        features=lambda net: net.features,
        channels=1280,
        n_frozen=14,
        taps=(6, 13),  # end of the stride-8 (32 ch) and stride-16 (96 ch) stages
        head_maxpool=False,
        fine_tuned="features[14:] (blocks 14-18) + dense",
        patch_layers="fine",  # the stride-16 stage's 96 channels outweigh the stride-8 stage's 32 and blur the map
    ),
}


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights could neither be found in torch's cache nor downloaded."""


def weights_file(backbone: str) -> Path:
    """Where torchvision's weights API looks for the backbone's ImageNet file."""
    url = get_spec(backbone).weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def get_spec(backbone: str) -> BackboneSpec:
    """The registry entry of `backbone`, or a ValueError listing the supported names."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone={backbone!r} is not supported; use one of {sorted(BACKBONES)}.")
    return BACKBONES[backbone]


def normalisation(backbone: str, pretrained: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std: those that belong to the weights (ImageNet's for random init too)."""
    if not pretrained:
        return IMAGENET_MEAN, IMAGENET_STD
    preset = get_spec(backbone).weights.transforms()
    return tuple(preset.mean), tuple(preset.std)


def checkpoint_normalisation(config: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std a checkpoint was trained with: its recorded `mean`/`std` (a backbone
    weights file brings its own), else the rule of `normalisation` (checkpoints that predate them)."""
    if config.get("mean") is not None and config.get("std") is not None:
        return tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"])
    return normalisation(config["backbone"], config["pretrained"])


@dataclass(frozen=True)
class BackboneWeights:
    """A checked backbone weights file: the state dict of `features`, its normalisation and origin."""

    path: str
    sha256: str
    state_dict: dict[str, torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def describe(self) -> dict[str, Any]:
        """What a checkpoint and training.json record of the file (no tensors)."""
        return {"name": Path(self.path).name, "path": self.path, "sha256": self.sha256, "source": self.source}


def _weights_error(path: Path, what: str) -> ValueError:
    return ValueError(
        f"backbone_weights={str(path)!r}: {what}. Expected a file written by torch.save holding "
        f"{{'format': '{BACKBONE_WEIGHTS_FORMAT}', 'backbone', 'state_dict', 'mean', 'std', 'source'}} "
        f"(e.g. made by `python -m utils.offline_weights --vgg16-oxford PATH`), or backbone_weights=None."
    )


def _check_normalisation(path: Path, name: str, values: Any) -> tuple[float, ...]:
    ok = isinstance(values, (list, tuple)) and len(values) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not ok or (name == "std" and min(values) <= 0):
        raise _weights_error(path, f"'{name}' must be three numbers{' > 0' if name == 'std' else ''}, got {values!r}")
    return tuple(float(v) for v in values)


def load_backbone_weights(path: str | Path, backbone: str) -> BackboneWeights:
    """Read and check a backbone weights file for `backbone` (torch.load with weights_only=True).

    Its state dict must have exactly the parameter names and shapes of the backbone's `features`
    (the layers CAMClassifier keeps). Any problem raises a ValueError naming the file.
    """
    path = Path(path)
    spec = get_spec(backbone)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise _weights_error(path, what)
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle of objects is refused here, as is a truncated or foreign file
        raise _weights_error(path, f"it cannot be read with torch.load(weights_only=True), which loads "
                                   f"only plain tensors and values ({type(err).__name__}: {err})") from err
    if not isinstance(content, dict) or content.get("format") != BACKBONE_WEIGHTS_FORMAT:
        raise _weights_error(path, f"it has no '{BACKBONE_WEIGHTS_FORMAT}' format marker")
    if content.get("backbone") != backbone:
        raise _weights_error(path, f"it holds weights for backbone {content.get('backbone')!r}, not {backbone!r}")
    state = content.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _weights_error(path, "'state_dict' must map layer names to tensors")
    expected = spec.features(spec.builder(weights=None)).state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise _weights_error(path, f"its layer names do not match {backbone}'s features: missing "
                                   f"{missing[:4]}{'...' if len(missing) > 4 else ''}, unexpected "
                                   f"{unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    wrong = [f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise _weights_error(path, f"wrong shapes: {', '.join(wrong[:3])}")
    mean = _check_normalisation(path, "mean", content.get("mean"))
    std = _check_normalisation(path, "std", content.get("std"))
    return BackboneWeights(str(path), sha256_of(path), {k: v.float() for k, v in state.items()},
                           mean, std, str(content.get("source", "")))


def build_backbone(backbone: str, pretrained: bool, weights: BackboneWeights | None = None) -> nn.Sequential:
    """The backbone's feature layers: ImageNet weights through torchvision's weights enum, the
    state dict of a checked weights file (`weights`), or random init (`pretrained=False`)."""
    spec = get_spec(backbone)
    if weights is not None:
        features = spec.features(spec.builder(weights=None))
        features.load_state_dict(weights.state_dict)
        return features
    if not pretrained:
        return spec.features(spec.builder(weights=None))
    try:
        net = spec.builder(weights=spec.weights)
    except (URLError, OSError, RuntimeError) as err:
        target = weights_file(backbone)
        raise WeightsUnavailableError(
            f"ImageNet weights for {backbone} are not available: {target} is missing and "
            f"downloading {spec.weights.url} failed ({err}). Offline, copy the file "
            f"{target.name} into {target.parent} (or set TORCH_HOME to a folder whose "
            f"hub/checkpoints holds it), run with pretrained=False for random weights"
            + (", or use backbone_weights (see the README's Offline weights)." if backbone == "vgg16" else ".")
        ) from err
    return spec.features(net)


def class_activation_map(feature_maps: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """CAM: (B, C, h, w) feature maps weighted by a (C,) dense-layer row, summed -> (B, h, w)."""
    return torch.einsum("bchw,c->bhw", feature_maps, class_weights)


class CAMClassifier(nn.Module):
    """Good/Anomaly classifier whose eval-mode forward also returns the Anomaly CAM.

    Train mode: `forward(x)` -> (B, 2) scores. Eval mode: -> (probabilities (B, 2),
    raw CAM (B, H, W) upsampled bilinearly to the input size, not normalised).
    """

    def __init__(
        self, backbone: str = "vgg16", pretrained: bool = True, weights: BackboneWeights | None = None,
        pooling: str = "avg",
    ) -> None:
        super().__init__()
        spec = get_spec(backbone)
        self.pooling = check_pooling(pooling)
        self.backbone_name = backbone
        self.spec = spec
        features = build_backbone(backbone, pretrained, weights)
        self.frozen = features[: spec.n_frozen]
        self.trainable = features[spec.n_frozen:]
        self.pool = nn.MaxPool2d(2) if spec.head_maxpool else nn.Identity()
        self.fc = nn.Linear(spec.channels, len(CLASS_NAMES))
        self.frozen.requires_grad_(False)
        # (C, h, w) mean frozen output of the good training images, the baseline of the "gradref"
        # explanation (`utils.explain`); set by Training.ipynb and load_checkpoint, None before.
        # A plain attribute, not a buffer: state_dicts stay those of the published network.
        self.explain_reference: torch.Tensor | None = None
        # The evidence head (`utils.evidence.EvidenceHead`) of head="evidence", set by training or
        # load_checkpoint; a submodule once set, so it moves with the model.
        self.evidence_head: nn.Module | None = None
        # The fused decision (FUSED): the (mean, std) of the published and the evidence head's image
        # logits over good images neither saw, rows in that order, (2, 2); None otherwise. A plain
        # attribute like explain_reference: the checkpoint carries it beside the state_dict.
        self.fusion: torch.Tensor | None = None

    def train(self, mode: bool = True) -> "CAMClassifier":
        """Switch mode, keeping every BatchNorm on its ImageNet statistics.

        The frozen part never trains; fine-tuned BatchNorms keep running statistics too, since
        batches of 10 from one category estimate them poorly, and so the cached (frozen) features
        and the plain loop see exactly the same network.
        """
        super().train(mode)
        self.frozen.eval()  # never trains: no layer there may switch to training behaviour
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def frozen_features(self, x: torch.Tensor, taps: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the frozen layers; return their output and the outputs of the modules in `taps`."""
        tapped = []
        for i, layer in enumerate(self.frozen):
            x = layer(x)
            if i in taps:
                tapped.append(x)
        return x, tapped

    def head(self, frozen_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine-tuned layers and dense head: -> scores (B, 2) and last feature maps (B, C, h, w)."""
        maps = self.trainable(frozen_out)  # (B, 512, 14, 14) conv5_3 for VGG16 at 224 px
        return self.head_from_maps(maps), maps

    def head_from_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """Scores (B, 2) of the last feature maps (B, C, h, w) under the model's `pooling`.

        "avg" is the published head, dense(GAP(maps)). The others apply the dense layer at every
        position (the two classes' CAMs, (B, 2, h, w)) and average both classes' scores over the
        positions where the margin Anomaly - Good is largest: "max" the single most anomalous
        position, "topk" the top `TOPK_FRACTION` of them (multiple-instance pooling: an image is
        as anomalous as its most anomalous parts). Averaging over all positions would equal "avg"
        exactly, since the dense layer is linear.
        """
        maps = self.pool(maps)
        if self.pooling == "avg":
            return self.fc(F.adaptive_avg_pool2d(maps, 1).flatten(1))
        cams = torch.einsum("bchw,kc->bkhw", maps, self.fc.weight).flatten(2) + self.fc.bias[None, :, None]
        k = 1 if self.pooling == "max" else max(1, math.ceil(TOPK_FRACTION * cams.shape[2]))
        top = (cams[:, ANOMALY] - cams[:, GOOD]).topk(k, dim=1).indices  # (B, k) most anomalous positions
        return cams.gather(2, top[:, None].expand(-1, cams.shape[1], -1)).mean(dim=2)

    def cam(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Anomaly CAM of (B, C, h, w) maps, upsampled bilinearly to `size` -> (B, H, W) float32."""
        cam = class_activation_map(maps.float(), self.fc.weight[ANOMALY].float())
        return upsample_maps(cam, size)

    def forward(self, x: torch.Tensor):
        check_input_size(x.shape[-1], x.shape[-2])
        scores, maps = self.head(self.frozen_features(x)[0])
        if self.training:
            return scores
        return scores.float().softmax(dim=1), self.cam(maps, tuple(x.shape[-2:]))


def check_pooling(pooling: str) -> str:
    """`pooling` if it is one of `POOLINGS`, else a ValueError listing them."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} must be one of {POOLINGS}: 'avg' is the published "
                         f"global average; 'max' and 'topk' pool the per-position class scores.")
    return pooling


def check_input_size(width: int, height: int) -> None:
    """Both backbones downsample by 32 before the head: other sizes would lose border pixels."""
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE or min(width, height) < SIZE_MULTIPLE * 2:
        raise ValueError(
            f"Input size {width}x{height} must be a multiple of {SIZE_MULTIPLE} and at least "
            f"{SIZE_MULTIPLE * 2} px (e.g. 64, 224, 256)."
        )


def fused_logit(published: torch.Tensor, evidence: torch.Tensor, fusion: torch.Tensor) -> torch.Tensor:
    """The fused decision's score (N,): the published head's image logit (N,) (log p(Anomaly) /
    p(Good)) and the evidence head's (N,), each in standard deviations above its mean over good
    images neither head saw (fusion (2, 2): rows (mean, std) of published, evidence), summed. Each
    head's scale is its own (the published head's logits run to tens, the evidence head's to a few),
    so summing them raw would let the larger drown the other; standardised, an image either head
    finds unusual among good parts scores high. Not a probability: its threshold is calibrated."""
    stacked = torch.stack([published, evidence], dim=-1).float()  # (N, 2)
    return ((stacked - fusion[:, 0]) / fusion[:, 1]).sum(dim=-1)
