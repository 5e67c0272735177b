"""The evidence head: an image decision made of local evidence, so that its map is the explanation.

For every patch of the stride-8 grid: the residual between its embedding (the patch memory's
features) and its nearest good patch in the memory, and that distance. A per-patch network of
1x1 convolutions gives each patch a logit, started as an affine function of the distance (the
patch map, rescaled) plus a learned correction initialised to zero; the image logit is the mean
of the top 1 % of the patch logits (multiple-instance pooling: an image is as anomalous as its
most anomalous parts). Pure tensors in and out; `helper.run_fold` trains it on cached features.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn
from tqdm.auto import tqdm

from .constants import GOOD
from .patchknn import nearest_rows

TOPK_FRACTION = 0.01  # the image logit: mean of the top 1 % of patch logits (8 of 784 at 224 px)
HIDDEN = 64  # channels of the per-patch network's hidden layer
# Full-batch Adam: STEPS steps, each on every training image. The head learns the decision in the
# first 10-20 steps; trained for hundreds it raises the margins of training images by lighting
# normal patches of defective ones, and its map falls below the patch map it started from (pixel
# AUROC 0.99 -> 0.90 on toothbrush after 200 steps without the penalty, docs/evidence.md).
STEPS = 40
LR = 1e-3
CORRECTION_PENALTY = 1.0  # weight of the mean squared correction: it must pay for departing from the patch map
MASK_WEIGHT = 1.0  # weight of the per-patch mask loss beside the image loss (mask_supervision)
CHUNK = 32  # images per forward pass; their gradients add up to one full-batch step


def topk_mean(patch_logits: torch.Tensor, fraction: float, inside: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the top ceil(fraction * h * w) values of each (B, h, w) map -> (B,). With `inside`
    (B, h, w) bool (the cells on the part, resize="pad"), of the top ceil(fraction * n) of each
    map's n inside cells only: padding never enters the pooling."""
    flat = patch_logits.flatten(1)
    if inside is None:
        k = max(1, math.ceil(fraction * flat.shape[1]))
        return flat.topk(k, dim=1).values.mean(dim=1)
    inside = inside.flatten(1).to(flat.device)
    k = torch.clamp(torch.ceil(fraction * inside.sum(dim=1)), min=1)  # (B,) per image: its own part's share
    ordered = torch.where(inside, flat, torch.full_like(flat, -math.inf)).sort(dim=1, descending=True).values
    taken = torch.arange(flat.shape[1], device=flat.device)[None] < k[:, None]  # (B, h * w)
    return torch.where(taken, ordered, torch.zeros_like(ordered)).sum(dim=1) / k


class EvidenceHead(nn.Module):
    """Per-patch logits from residuals to the patch memory, and their top-k image logit.

    forward(residual (B, D, h, w), distance (B, h, w)) -> (image logits (B,), patch logits (B, h, w)),
    both the margin Anomaly - Good. `scale` (a buffer, set before training) is the mean
    nearest-neighbour distance of good training patches: distances are divided by it, and the
    residual's dimensions rescaled to about unit size, whatever the backbone's activation scale.
    """

    def __init__(self, dim: int, hidden: int = HIDDEN, topk_fraction: float = TOPK_FRACTION) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("topk_fraction", torch.tensor(float(topk_fraction)))
        self.net = nn.Sequential(nn.Conv2d(dim + 1, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, 1, 1))
        # the correction starts at zero: before training the patch logits are the rescaled patch map
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)
        self.slope = nn.Parameter(torch.tensor(1.0))
        self.offset = nn.Parameter(torch.tensor(-1.0))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "EvidenceHead":
        """A head shaped like the one that wrote `state` (dims read from its weights), loaded."""
        hidden, inputs = state["net.0.weight"].shape[:2]
        head = cls(int(inputs) - 1, int(hidden), float(state["topk_fraction"]))
        head.load_state_dict(state)
        return head

    def parts(self, residual: torch.Tensor, distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch logits (B, h, w) and the learned correction (B, h, w) within them: `net` applied
        to each patch's [residual rescaled to dims about 1, distance / scale]."""
        d = distance.float() / self.scale  # (B, h, w), about 1 for a good patch
        first, last = self.net[0], self.net[2]
        weight = first.weight.flatten(1)  # (hidden, D + 1): the residual's dims, then the distance
        # The 1x1 convolutions as matrix products over the patches, channels last: the rescaling goes
        # into the (hidden, D) weight rather than the (B * h * w, D) residual, and the distance's column
        # is added apart, so no scaled or concatenated copy of the residual is made (2.3-2.9x faster
        # training, benchmarks/evidence_step_cost.py).
        r = residual.float().permute(0, 2, 3, 1)  # (B, h, w, D); a view when stored channels last
        hidden = F.linear(r, weight[:, :-1] * (math.sqrt(residual.shape[1]) / self.scale), first.bias)
        hidden = F.relu(hidden + d[..., None] * weight[:, -1])  # (B, h, w, hidden)
        correction = F.linear(hidden, last.weight.flatten(1), last.bias)[..., 0]
        return self.slope * d + self.offset + correction, correction

    def forward(self, residual: torch.Tensor, distance: torch.Tensor,
                inside: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z, _ = self.parts(residual, distance)
        return topk_mean(z, float(self.topk_fraction), inside), z


@dataclass
class EvidenceInputs:
    """What the head reads for N images: residual (N, D, h, w), each patch's embedding minus its
    nearest memory row (float16 to halve the memory: the head reads residuals at a precision far
    below that), and distance (N, h, w) float32, that residual's length; inside (N, h, w) bool or
    None: with resize="pad" the cells on the part, the only ones pooled, penalised or supervised."""

    residual: torch.Tensor
    distance: torch.Tensor
    inside: torch.Tensor | None = None

    def inside_of(self, idx: torch.Tensor) -> torch.Tensor | None:
        """The inside cells (K, h, w) of images `idx` (K,), None when every cell is."""
        return None if self.inside is None else self.inside[idx]

    def __len__(self) -> int:
        return len(self.distance)

    def batch(self, idx: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Residuals (K, D, h, w) float32 and distances (K, h, w) of images `idx` (K,). out: a float32
        buffer (>= K, D, h, w), channels last, that the residuals are converted into and returned
        from (its first K images); reuse one across a loop: a fresh float32 copy of a chunk (77 MB
        for 32 images of VGG16's 768 dims) costs its page faults on every chunk (training with one
        buffer: 1.65x faster at 768 dims, benchmarks/evidence_step_cost.py)."""
        if len(idx) and bool((idx.diff() == 1).all()):
            idx = slice(int(idx[0]), int(idx[-1]) + 1)  # a run of images (training's chunks): no gathered copy
        if out is None:
            return self.residual[idx].float(), self.distance[idx]
        residual = self.residual[idx]
        return out[:len(residual)].copy_(residual), self.distance[idx]

    def buffer(self, n_images: int) -> torch.Tensor:
        """An empty float32 buffer for `batch(..., out=)`: n_images residuals (n_images, D, h, w), channels last."""
        return torch.empty((n_images, *self.residual.shape[1:]), memory_format=torch.channels_last)


def residuals(emb: torch.Tensor, memory: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual (B, D, h, w) of each patch embedding of emb (B, D, h, w) to its nearest memory row
    (M, D) (among `rows` (M,) bool when given), and its length (B, h, w)."""
    b, _, h, w = emb.shape
    bank = memory if rows is None else memory[rows]
    nearest, distance = nearest_rows(emb.permute(0, 2, 3, 1).reshape(b * h * w, -1), bank)
    residual = emb - bank[nearest].view(b, h, w, -1).permute(0, 3, 1, 2)
    return residual, distance.view(b, h, w)


def evidence_inputs(
    embed: Callable[[torch.Tensor], torch.Tensor],
    n_images: int,
    memory: torch.Tensor,
    *,
    image_groups: torch.Tensor | None = None,
    memory_groups: torch.Tensor | None = None,
    batch_size: int = 16,
) -> EvidenceInputs:
    """The head's inputs for N images (`embed(idx)` -> their patch embeddings (K, D, h, w)).

    With image_groups (N,) and memory_groups (M,), an image is compared only with memory rows of
    other groups: a good training image whose own patches are in the memory would otherwise find
    itself at distance 0, and the head would never see normal variation. Use -1 for an image
    outside every group (a defective or a new image): it sees the whole memory.
    """
    image_groups = torch.full((n_images,), -1) if image_groups is None else image_groups
    residual, distance = None, None
    for group in image_groups.unique().tolist():
        members = torch.nonzero(image_groups == group).flatten()
        rows = None if group < 0 else memory_groups.to(memory.device) != group
        if rows is not None and not bool(rows.any()):
            raise ValueError(f"group {group} holds every memory row: nothing is left to compare its images with")
        for start in range(0, len(members), batch_size):
            idx = members[start:start + batch_size]
            r, d = residuals(embed(idx).float().to(memory.device), memory, rows)
            if residual is None:  # channels last: the head reads each patch's residual as a row
                residual = torch.empty((n_images, *r.shape[1:]), dtype=torch.float16,
                                       memory_format=torch.channels_last)
                distance = torch.empty((n_images, *d.shape[1:]))
            residual[idx], distance[idx] = r.cpu().half(), d.cpu()
    return EvidenceInputs(residual, distance)


@dataclass
class MaskTargets:
    """Per-patch targets of mask supervision: the defect share of each patch's cell, fraction (N, h, w),
    for the images `has` (N,) bool marks (defect images with a mask)."""

    fraction: torch.Tensor
    has: torch.Tensor


def mask_targets(masks: torch.Tensor, has_mask: torch.Tensor, grid: tuple[int, int]) -> MaskTargets:
    """Targets from (N, H, W) bool masks on the (h, w) patch grid: each patch's share of defect pixels."""
    fraction = F.adaptive_avg_pool2d(masks[:, None].float(), grid)[:, 0]
    return MaskTargets(fraction, has_mask.bool())


def start_as_patch_map(head: EvidenceHead, inputs: EvidenceInputs, labels: torch.Tensor,
                       class_weight: Sequence[float]) -> None:
    """Set the head's starting point from the training images: `scale`, the mean distance of good
    patches, and slope and offset, a weighted logistic regression of the labels on each image's
    top-k mean distance, so that before any step the head is the patch map's best classifier (its
    correction is zero) and its logit 0 is a sensible decision."""
    good = labels == GOOD
    if inputs.inside is None:
        head.scale.fill_(float(inputs.distance[good].mean()) if good.any() else float(inputs.distance.mean()))
    else:  # the part's cells only
        chosen = inputs.inside & good[:, None, None] if good.any() else inputs.inside
        head.scale.fill_(float(inputs.distance[chosen].mean()))
    if len(labels.unique()) < 2:
        return
    score = topk_mean(inputs.distance / head.scale, float(head.topk_fraction), inputs.inside).numpy()[:, None]  # (N, 1)
    weight = {GOOD: float(class_weight[0]), 1 - GOOD: float(class_weight[1])}
    fitted = LogisticRegression(class_weight=weight).fit(score, labels.numpy())
    with torch.no_grad():
        head.slope.fill_(float(fitted.coef_[0, 0]))
        head.offset.fill_(float(fitted.intercept_[0]))


def _chunk_loss(head, inputs, idx, labels, weights, targets, device, buffer=None) -> tuple[torch.Tensor, int]:
    """This chunk's share of the full-batch loss, and how many of its images the head gets right:
    weighted cross-entropy over all images, the correction penalty over all patches, the mask loss
    over all masked patches (each a sum here, divided by the whole set's total). buffer: what the
    chunk's residuals are converted into (`EvidenceInputs.batch`); the caller runs backward before
    it is refilled."""
    residual, distance = inputs.batch(idx, out=buffer)
    patch, correction = head.parts(residual.to(device), distance.to(device))
    inside = inputs.inside_of(idx)
    image = topk_mean(patch, float(head.topk_fraction), inside)
    y = labels[idx].to(device)
    logits = torch.stack([torch.zeros_like(image), image], dim=1)  # (K, 2): [Good, Anomaly]
    loss = F.cross_entropy(logits, y, weight=weights, reduction="sum") / weights[labels].sum()
    if inside is None:
        loss = loss + CORRECTION_PENALTY * correction.pow(2).sum() / (len(labels) * correction[0].numel())
    else:  # over the part's cells: padding's residuals are nothing to learn from
        inside = inside.to(device)
        loss = loss + CORRECTION_PENALTY * (correction.pow(2) * inside).sum() / int(inputs.inside.sum())
    if targets is not None and bool(targets.has[idx].any()):
        keep = targets.has[idx]
        if inside is None:
            bce = F.binary_cross_entropy_with_logits(patch[keep.to(device)], targets.fraction[idx][keep].to(device),
                                                     reduction="sum")
            loss = loss + MASK_WEIGHT * bce / (int(targets.has.sum()) * patch[0].numel())
        else:
            bce = F.binary_cross_entropy_with_logits(patch[keep.to(device)], targets.fraction[idx][keep].to(device),
                                                     reduction="none") * inside[keep.to(device)]
            loss = loss + MASK_WEIGHT * bce.sum() / int(inputs.inside[targets.has].sum())
    return loss, int(((image > 0).long() == y).sum())


def train_head(
    head: EvidenceHead,
    inputs: EvidenceInputs,
    labels: torch.Tensor,
    *,
    class_weight: Sequence[float],
    device: torch.device,
    steps: int = STEPS,
    lr: float = LR,
    targets: MaskTargets | None = None,
    progress: bool = False,
    on_epoch_end: Callable[[int, float, float], None] | None = None,
) -> dict[str, Any]:
    """Train the head with full-batch Adam: each of `steps` steps on the loss over every image
    (`_chunk_loss`: cross-entropy with class weights [Good, Anomaly] on the image logits, the
    correction penalty, with `targets` the per-patch mask loss). Sets `scale` from the good images
    first. labels (N,) 0/1. Returns the history: per-step loss and train accuracy, seconds."""
    start_as_patch_map(head, inputs, labels, class_weight)
    head.to(device).train()
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    weights = torch.tensor(class_weight, dtype=torch.float32, device=device)
    history: dict[str, Any] = {"loss": [], "accuracy": []}
    start = time.perf_counter()
    # every chunk's residuals are converted into one float32 buffer: each chunk's backward has run
    # (and freed what it saved) before the next chunk refills it
    buffer = inputs.buffer(min(CHUNK, len(labels)))
    for step in tqdm(range(steps), desc="Evidence head", leave=False, disable=not progress):
        optimizer.zero_grad(set_to_none=True)
        total, correct = 0.0, 0
        for idx in torch.arange(len(labels)).split(CHUNK):
            loss, right = _chunk_loss(head, inputs, idx, labels, weights, targets, device, buffer)
            loss.backward()
            total, correct = total + loss.item(), correct + right
        optimizer.step()
        history["loss"].append(total)
        history["accuracy"].append(correct / len(labels))
        if on_epoch_end is not None:
            on_epoch_end(step + 1, history["loss"][-1], history["accuracy"][-1])
    history.update(epochs_run=steps, early_stopped=False, seconds=time.perf_counter() - start)
    return history


@torch.no_grad()
def evidence_scores(head: EvidenceHead, residual: torch.Tensor, distance: torch.Tensor,
                    inside: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's Anomaly probability (B,) and its map (B, h, w): each patch's logit, the evidence
    it adds to the margin Anomaly - Good. Logits, not probabilities: the sigmoid flattens the
    hottest patches of a confident image to 1.0 in float32, and the map would lose its peak.
    `inside` (B, h, w) bool: the cells pooled (resize="pad"; None: all)."""
    image, patch = evidence_logits(head, residual, distance, inside)
    return torch.sigmoid(image), patch


def evidence_logits(head: EvidenceHead, residual: torch.Tensor, distance: torch.Tensor,
                    inside: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`evidence_scores` before the sigmoid: the image logit (B,) and the map (B, h, w)."""
    head.eval()
    return head(residual, distance, inside)
