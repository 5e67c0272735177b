"""Explanations of the classifier's decision from its own weights, activations and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .constants import ANOMALY, GOOD

# Map names of `explanation_maps`: Grad-CAM and LayerCAM of the last feature map (the CAM's
# input) and of the stride-8 frozen tap (VGG16 conv4_3, MobileNetV2 block 6); "gradref", the
# decision's gradient times the departure from the good reference at the frozen output (stride
# 16), needs the model's `explain_reference` (set by Training.ipynb) and is left out without it.
EXPLANATIONS = ("gradcam", "layercam", "gradcam_s8", "layercam_s8", "gradref")
REFERENCE_EXPLANATIONS = ("gradref",)  # those that need `explain_reference`
# What `localizer="explain"` shows: the explanation that points at the defect most often in the
# README's cross-validated study, on both categories and both backbones (the reasons are there).
EXPLAIN = "gradref"


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


def reference_attribution(activations: torch.Tensor, gradients: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_c dS/dA_c * (A_c - R_c)) of (B, C, h, w) activations and gradients and a (C, h, w)
    reference -> (B, h, w).

    The first-order estimate of how much the decision margin S falls when a position's features
    are replaced by the reference's (gradient times input with a baseline, as in DeepLIFT and
    Integrated Gradients): with R the mean features of good training images at that position,
    a position scores only where it departs from a normal part in a direction that pushes the
    decision to Anomaly. Normal structure that is strongly active in every image (edges, prints)
    cancels, which is what LayerCAM's ReLU(dS/dA) * A keeps.
    """
    if tuple(reference.shape) != tuple(activations.shape[1:]):
        raise ValueError(f"the explanation reference has shape {tuple(reference.shape)} but the frozen output is "
                         f"{tuple(activations.shape[1:])}: it was made at another image size or backbone; "
                         f"evaluate at the checkpoint's image_size.")
    delta = activations.float() - reference.float()[None]
    return F.relu((gradients.float() * delta).sum(dim=1))


def reference_features(frozen_out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The good reference of `reference_attribution`: the mean frozen output (N, C, h, w) of the
    images with label 0 (Good) -> (C, h, w) float32. MVTec AD objects are aligned, so a position's
    mean is a normal part at that place."""
    good = frozen_out[labels == GOOD]
    if len(good) == 0:
        raise ValueError("the explanation reference needs good training images, and there are none")
    return good.float().mean(dim=0)


def explanation_maps(model, tapped: torch.Tensor, tap_index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scores and the `EXPLANATIONS` of a CAMClassifier, computed from a frozen tap.

    tapped: (B, C8, h8, w8) output of frozen module `tap_index` (e.g. cached by a frozen pass);
    the rest of the frozen layers and the head run from it with gradients on, and one backward
    pass gives the margin's gradient at the tap, at the frozen output and at the last feature
    map. Returns scores (B, 2) and {name: (B, h, w) float32} at each layer's own resolution
    (h8 x w8 for the "_s8" maps), raw: each image's scale is its own (see
    `postprocess.localizer_maps`). "gradref" is computed only when the model has an
    `explain_reference` (C, h, w) of its frozen output.
    """
    reference = getattr(model, "explain_reference", None)
    with torch.enable_grad():
        a8 = tapped.detach().requires_grad_(True)
        frozen_out = model.frozen[tap_index + 1:](a8)
        scores, maps = model.head(frozen_out)
        # every image's margin depends on its own activations only (eval mode): one backward of the sum
        g8, g_out, g_last = torch.autograd.grad(decision_margin(scores).sum(), (a8, frozen_out, maps))
    a8, frozen_out, maps = a8.detach(), frozen_out.detach(), maps.detach()
    out = {
        "gradcam": grad_cam(maps, g_last),
        "layercam": layer_cam(maps, g_last),
        "gradcam_s8": grad_cam(a8, g8),
        "layercam_s8": layer_cam(a8, g8),
    }
    if reference is not None:
        out["gradref"] = reference_attribution(frozen_out, g_out, reference.to(frozen_out.device))
    return scores.detach(), out
