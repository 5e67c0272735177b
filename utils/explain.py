"""Explanations of the classifier's decision from its own weights, activations and gradients."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .constants import ANOMALY, GOOD

# Map names of `explanation_maps`: Grad-CAM and LayerCAM of the last feature map (the CAM's
# input) and of the stride-8 frozen tap (VGG16 conv4_3, MobileNetV2 block 6).
EXPLANATIONS = ("gradcam", "layercam", "gradcam_s8", "layercam_s8")
# What `localizer="explain"` shows: the explanation that points at the defect most often in the
# README's cross-validated study (the reasons are there).
EXPLAIN = "layercam_s8"


def decision_margin(scores: torch.Tensor) -> torch.Tensor:
    """Anomaly minus Good score of (B, 2) logits -> (B,): the two-class softmax depends on nothing else."""
    return scores[:, ANOMALY].float() - scores[:, GOOD].float()


def grad_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): ReLU(sum_c mean_hw(dS/dA_c) * A_c) of (B, C, h, w) -> (B, h, w)."""
    weights = gradients.float().mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    return F.relu((weights * activations.float()).sum(dim=1))


def layer_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al. 2021): ReLU(sum_c ReLU(dS/dA_c) * A_c), per position, (B, C, h, w) -> (B, h, w).

    The gradient weighs each position on its own, so the map keeps the layer's resolution instead
    of one weight per channel; that is what lets a stride-8 layer localise."""
    return F.relu((F.relu(gradients.float()) * activations.float()).sum(dim=1))


def margin_gradients(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], activations: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
    """Gradient of the decision margin with respect to `activations` (B, C, h, w).

    `forward` maps the activations to (scores (B, 2), *other outputs); returns the detached scores,
    the other outputs (detached) and dMargin/dA (B, C, h, w) float32. Every image's margin depends
    on its own activations only (eval mode), so one backward pass of the summed margin gives them all.
    """
    with torch.enable_grad():
        a = activations.detach().requires_grad_(True)
        scores, *rest = forward(a)
        (grads,) = torch.autograd.grad(decision_margin(scores).sum(), a)
    return scores.detach(), tuple(r.detach() for r in rest), grads.float()


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) float32, bilinear with align_corners=False (as the CAM is)."""
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def explanation_maps(model, tapped: torch.Tensor, tap_index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scores and the `EXPLANATIONS` of a CAMClassifier, computed from a frozen tap.

    tapped: (B, C8, h8, w8) output of frozen module `tap_index` (e.g. cached by a frozen pass);
    the rest of the frozen layers and the head run from it with gradients on. Returns scores
    (B, 2) and {name: (B, h, w) float32} at each layer's own resolution (h8 x w8 for the "_s8"
    maps), raw: each image's scale is its own (see `postprocess.localizer_maps`).
    """

    def from_tap(a: torch.Tensor):
        return model.head(model.frozen[tap_index + 1:](a))

    # One backward reaches the stride-8 tap; the last layer's gradient is the head's alone.
    scores, (maps,), grads8 = margin_gradients(from_tap, tapped)
    _, _, grads = margin_gradients(lambda m: (model.head_from_maps(m),), maps)
    return scores, {
        "gradcam": grad_cam(maps, grads),
        "layercam": layer_cam(maps, grads),
        "gradcam_s8": grad_cam(tapped, grads8),
        "layercam_s8": layer_cam(tapped, grads8),
    }
