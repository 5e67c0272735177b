"""Export a checkpoint as one ONNX graph: raw RGB pixels in, the decision, the image score and the map out.

The graph holds everything `inference.score_batch` computes for the checkpoint's decision and one
map: the normalisation, the frozen backbone, the head (the published one with its CAM, or the
evidence head), the patch memory with its nearest-neighbour search, the map's upsampling and blur
(`PatchRule.smooth`) and the calibrated decision. What is left outside is what needs no network:
decoding and resizing the image, and cutting boxes from the map (`deploy/onnx_predict.py` does
both with numpy and Pillow alone). The thresholds and everything a reader needs go into the
model's metadata (`metadata`), each value JSON-encoded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CHECKPOINT_FORMAT, atomic_write_bytes, has_classifier
from .constants import ANOMALY, CLASS_NAMES, GOOD
from .dataloader import normalise
from .evidence import EvidenceHead
from .explain import EXPLAIN, EXPLANATIONS, decision_margin, layer_cam, reference_attribution
from .geometry import canvas, resize_of
from .inference import decision_of
from .localizers import (LOCALIZERS, MEMORY_LOCALIZERS, check_checkpoint_localizer, default_localizer, head_of,
                         patch_cam)
from .model import (HEADS, EVIDENCE_HEADS, PUBLISHED_HEADS, CAMClassifier, checkpoint_normalisation,
                    check_input_size, fused_logit)
from .patchknn import PATCH_STRIDE, argmin_run, first_argmin, flatten_patches, patch_rule_of
from .postprocess import gaussian_smooth, upsample_maps

ONNX_FORMAT = "cam-defect-detector/onnx/1"  # the metadata's "format": what deploy/onnx_predict.py reads
INPUT_NAME = "pixels"
OUTPUT_NAMES = ("decision_score", "label", "image_score", "map")
# The explanations a graph can hold, each made of the gradient of the published head's decision,
# which the graph computes in forward operations (`DecisionGradient`): `explain` (`explain.EXPLAIN`,
# the gradient times the departure from the good reference at the frozen output) and the stride-8
# LayerCAM (`layercam_s8`, the gradient at the stride-8 tap, so the frozen layers after the tap are
# differentiated too). The others (Grad-CAM and kin) are not candidates of head="auto" and are not
# exported.
TAP_GRADIENT_LOCALIZERS = ("layercam_s8",)  # differentiated from the stride-8 tap
GRADIENT_LOCALIZERS = ("explain", EXPLAIN, *TAP_GRADIENT_LOCALIZERS)
# The maps a graph can hold.
EXPORTABLE_LOCALIZERS = ("cam", "patch_knn", "cam_knn", "patch_cam", "evidence", *GRADIENT_LOCALIZERS)
# Memory rows per block of the nearest-neighbour search: the (patches x rows) score matrix of one
# block is all the search holds at once (at batch 16 and 224 px, 12544 x 2048 floats = 103 MB,
# against 500 MB for 10 000 rows in one block).
MEMORY_BLOCK = 2048
# Columns per run of the graph's argmin (`patchknn.first_argmin`): under ONNX Runtime the run-wise
# argmin of 784 x 2048 scores took 0.6 ms with runs of 32, 0.9 with 64, 1.3 with 16 (one ArgMin:
# 2.2 ms), and runs of 128 raised the evidence graph's peak memory at batch 16 by 120 MiB.
ONNX_ARGMIN_RUN = 32


class ExportError(ValueError):
    """A checkpoint, or a map of it, that cannot become an ONNX graph; the message says why and what to do."""


def check_exportable(checkpoint: dict[str, Any], localizer: str, where: str = "the checkpoint") -> None:
    """Raise an ExportError naming `where` and what to do when `checkpoint` with map `localizer`
    cannot be exported: another format, an unknown head, a map that needs gradients or that the
    checkpoint lacks, no calibrated decision or box threshold, a non-square or padded input."""
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ExportError(f"{where} has format {checkpoint.get('format')!r}, not {CHECKPOINT_FORMAT!r}: only "
                          f"checkpoints written by Training.ipynb export; train again.")
    head = head_of(checkpoint)
    if has_classifier(checkpoint) and head not in HEADS:
        raise ExportError(f"{where} holds the head {head!r}, which the exporter does not know (it knows "
                          f"{', '.join(HEADS)}): update this repository, or export a checkpoint of a known head.")
    if localizer in EXPLANATIONS and localizer not in GRADIENT_LOCALIZERS:
        raise ExportError(f"localizer={localizer!r} needs the gradient of the decision at a layer the exported "
                          f"graph does not differentiate (it does the frozen output's, for 'explain', and the "
                          f"stride-8 tap's, for 'layercam_s8'): export the "
                          f"checkpoint's default map ({default_localizer(checkpoint)!r}, leave --localizer out) "
                          f"or one of {', '.join(EXPORTABLE_LOCALIZERS)}.")
    if localizer not in EXPORTABLE_LOCALIZERS:
        raise ExportError(f"localizer={localizer!r} is not a map this repository exports; use one of "
                          f"{', '.join(EXPORTABLE_LOCALIZERS)} (known maps: {', '.join(LOCALIZERS)}).")
    try:
        check_checkpoint_localizer(localizer, checkpoint, where)
    except ValueError as err:
        raise ExportError(str(err)) from err
    _check_calibration(checkpoint, localizer, where)
    _check_input(checkpoint["config"], where)
    if _needs_memory(checkpoint, localizer) and checkpoint.get("patch_memory") is None:
        raise ExportError(f"{where} has no patch memory, which its decision or map {localizer!r} needs: train "
                          f"again with patch_memory_size > 0.")


def _check_calibration(checkpoint: dict[str, Any], localizer: str, where: str) -> None:
    """The graph's label and the runner's boxes need the calibrated decision and the map's box threshold."""
    calibration = checkpoint.get("calibration") or {}
    if "decision" not in calibration:
        raise ExportError(f"{where} predates the calibrated decision (its calibration has no 'decision'): the "
                          f"exported label would not be the one predict.py gives. Train again with Training.ipynb.")
    missing = [key for key, table in (("thresholds", calibration.get("thresholds")),
                                      ("floors", calibration.get("floors"))) if localizer not in (table or {})]
    if missing or "min_area" not in calibration:
        raise ExportError(f"{where} has no calibrated {' or '.join(missing) or 'min_area'} for the map "
                          f"{localizer!r}: its boxes cannot be cut as predict.py cuts them. Train again with "
                          f"Training.ipynb, or export a map it calibrated "
                          f"({', '.join(sorted(calibration.get('thresholds') or {})) or 'none'}).")


def _check_input(config: dict[str, Any], where: str) -> None:
    """The runner stretches every image to the canvas, as training does with resize="stretch": a
    square side or [height, width]. Padding is refused: the graph would need each image's part."""
    size = config.get("image_size")
    pair = isinstance(size, (list, tuple)) and len(size) == 2
    if not pair and (isinstance(size, bool) or not isinstance(size, int)):
        raise ExportError(f"{where} has image_size={size!r}: the exporter handles a square side (an int) or "
                          f"[height, width]. Train again with one of them.")
    if resize_of(config) != "stretch":
        raise ExportError(f"{where} resizes with {config['resize']!r}: the runner stretches images to the input "
                          f"size only (a padded part would need its place on the canvas in the graph, to keep the "
                          f"padding out of the scores). Score it with predict.py, or train with resize='stretch' "
                          f"to export.")
    try:
        h, w = canvas(size)
        check_input_size(w, h)
    except (ValueError, TypeError) as err:
        raise ExportError(f"{where}: {err}") from err


def _needs_memory(checkpoint: dict[str, Any], localizer: str) -> bool:
    """Whether the graph holds the patch memory: for the patch maps, the evidence head, or the
    decision of a checkpoint without a classifier (`inference.needs`)."""
    return localizer in MEMORY_LOCALIZERS or not has_classifier(checkpoint) or head_of(checkpoint) in EVIDENCE_HEADS


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1] of (N, H, W), a constant map all zeros (`postprocess.minmax_normalise`)."""
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    return (maps - lo) / torch.where(span > 0, span, torch.ones_like(span))


class NearestMemory(nn.Module):
    """The patch memory (M, D) and its nearest-neighbour search, as `patchknn.nearest_rows` does it:
    the nearest row by the matrix-product expansion on mean-centred rows (the first at a tie, found
    run by run as `patchknn.first_argmin` finds it), then the residual to that row and its exact
    length. The memory is searched in blocks of MEMORY_BLOCK rows whose minima are combined, so
    that only one block's score matrix exists at a time.

    What ONNX Runtime makes of each form was measured (docs/export.md, "Speed"): each block is held
    as one (D + 1, m_i) matrix [-2 m; ||m||^2] that a query row [q, 1] multiplies straight into
    ||m||^2 - 2 q.m (a bias would cost a pass over the scores before the product); the argmin goes
    run by run in runs of at most ONNX_ARGMIN_RUN columns (a row minimum is vectorised, an ArgMin
    is not); and the nearest rows are looked up in a row-major copy of the memory with one gather
    (a column gather from the transposed blocks took longer than the argmin)."""

    def __init__(self, memory: torch.Tensor, block: int | None = None) -> None:
        super().__init__()
        block = MEMORY_BLOCK if block is None else block
        memory = memory.float()
        mean = memory.mean(dim=0)
        centred = memory - mean
        self.register_buffer("mean", mean)  # (D,)
        self.register_buffer("rows", centred.contiguous())  # (M, D): the lookup's copy
        self.starts = list(range(0, len(memory), block))
        for i, start in enumerate(self.starts):
            part = centred[start:start + block]  # (m_i, D)
            # -2 m is exact (a power of two); only where ||m||^2 enters the sum differs from addmm's rounding
            self.register_buffer(f"cols{i}", torch.cat([-2.0 * part.T, (part * part).sum(dim=1)[None]]).contiguous())

    def forward(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual (Q, D) of each query row (Q, D) to its nearest memory row, and its length (Q,)."""
        q = queries - self.mean
        ones = torch.ones_like(q[:, :1])
        augmented = torch.cat([q, ones], dim=1)  # (Q, D + 1)
        best, index = [], []
        for i, start in enumerate(self.starts):
            cols = getattr(self, f"cols{i}")
            # ||q||^2 is the same for every row, so the argmin needs only ||m||^2 - 2 q.m: (Q, m_i)
            scores = augmented @ cols
            at = first_argmin(scores, argmin_run(cols.shape[1], ONNX_ARGMIN_RUN))  # (Q,)
            best.append(scores.gather(1, at[:, None])[:, 0])  # the minimum, gathered, not reduced again
            index.append(at + start)
        # the first block holding the overall minimum, as one argmin over all rows takes the first;
        # no keepdim: with keepdim=True ONNX Runtime 1.32's peak at batch 16 rose from 314 to 1002 MiB
        block = torch.stack(best, dim=1).argmin(dim=1)  # (Q,)
        nearest = self.rows.index_select(0, torch.stack(index, dim=1).gather(1, block[:, None])[:, 0])  # (Q, D)
        residual = q - nearest  # (Q, D) = query - its nearest memory row
        return residual, torch.linalg.vector_norm(residual, dim=1)


def _convolution_input_gradient(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                                output_padding, groups, output_mask):
    """`aten.convolution_backward` for the input alone (the weights are constants here): the
    transposed convolution of the output's gradient (N, C_out, h, w) with the same weights, its
    output padding chosen so that the result has the input's (N, C_in, H, W) shape. torch.onnx has
    no translation of the backward operator; ONNX has ConvTranspose."""
    if transposed or len(weight.shape) != 4:
        raise ExportError("the published head's gradient is exported for 2-d convolutions only")
    kernel = weight.shape[2:]
    extra = [input.shape[2 + i] - ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
                                   + dilation[i] * (kernel[i] - 1) + 1) for i in range(2)]
    grad_input = F.conv_transpose2d(grad_output, weight, None, stride, padding, extra, groups, dilation)
    return grad_input, None, None


class DecisionGradient(nn.Module):
    """The published head from the frozen output (N, C, h, w), or with `tap` from the output of
    frozen module `tap` (N, C8, h8, w8) through the frozen layers after it: its scores (N, 2), its
    last feature maps (N, C', h', w'), the gradient of its decision margin
    (`explain.decision_margin`) at the input, which `explain.explanation_maps` takes with autograd,
    and the frozen output (the input itself without `tap`). An ONNX graph has no autograd, so the
    forward and backward pass are traced once into operators (make_fx, the batch symbolic), the
    convolution's backward, which torch.onnx cannot translate, as `_convolution_input_gradient`."""

    def __init__(self, model: CAMClassifier, example: torch.Tensor, tap: int | None = None) -> None:
        super().__init__()
        from torch.fx.experimental.proxy_tensor import make_fx

        self.tap = tap
        rest = model.frozen[tap + 1:] if tap is not None else None
        # torch.onnx decomposes the ReLU's, BatchNorm's and max pooling's backward operators itself
        decompositions = {torch.ops.aten.convolution_backward.default: _convolution_input_gradient}

        def head_and_gradient(x: torch.Tensor):
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                frozen = x if rest is None else rest(x)
                scores, maps = model.head(frozen)
                gradient, = torch.autograd.grad(decision_margin(scores).sum(), (x,))
            if rest is None:  # the frozen output is the input: `forward` returns it beside the trace's
                return scores.detach(), maps.detach(), gradient
            return scores.detach(), maps.detach(), gradient, frozen.detach()

        trainable = [p for p in model.parameters() if p.requires_grad]
        model.requires_grad_(False)  # the weights are constants of the graph: no gradient of theirs is traced
        try:
            self.traced = make_fx(head_and_gradient, decomposition_table=decompositions, tracing_mode="symbolic",
                                  _allow_non_fake_inputs=True)(example)
        finally:
            for p in trainable:
                p.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.traced(x)
        return (*out, x) if self.tap is None else tuple(out)


class ScoringGraph(nn.Module):
    """What the ONNX graph computes for one checkpoint and one map.

    forward(pixels (N, H, W, 3) uint8 RGB on the checkpoint's canvas, stretched as training
    stretches) -> decision_score (N,) float32 (the Anomaly probability, or the patch map's image
    score without a classifier), label (N,) int64 (1 = Anomaly under the calibrated decision),
    image_score (N,) float32 (the map's image score, `localizers.localizer_image_scores`), map
    (N, H, W) float32 (the map in its own units, `localizers.localizer_maps`).
    """

    def __init__(self, model: CAMClassifier, checkpoint: dict[str, Any], localizer: str) -> None:
        super().__init__()
        config = checkpoint["config"]
        self.model = model.eval()
        self.localizer = localizer
        self.size = canvas(config["image_size"])  # (H, W)
        self.classifier = has_classifier(checkpoint)
        head = head_of(checkpoint)
        self.evidence = self.classifier and head in EVIDENCE_HEADS
        self.published = self.classifier and head in PUBLISHED_HEADS
        self.fused = self.evidence and self.published  # the decision on both heads' logits (`fused_logit`)
        if self.fused:
            self.register_buffer("fusion", model.fusion.detach().float().clone())
        self.rule = patch_rule_of(config)
        mean, std = checkpoint_normalisation(config)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.memory = NearestMemory(checkpoint["patch_memory"]) if _needs_memory(checkpoint, localizer) else None
        decision = decision_of(checkpoint)
        self.calibrated = decision["rule"] == "calibrated"
        self.threshold = float(decision["threshold"])
        self.tap = model.spec.taps[0]  # the stride-8 tap: the patch map's and `layercam_s8`'s layer
        self.gradient = None
        if localizer in GRADIENT_LOCALIZERS:  # the gradient at the stride-8 tap, or at the frozen output
            tap = self.tap if localizer in TAP_GRADIENT_LOCALIZERS else None
            with torch.no_grad():
                zeros = torch.zeros(2, 3, *self.size)
                example = model.frozen[:tap + 1](zeros) if tap is not None else model.frozen_features(zeros)[0]
            self.gradient = DecisionGradient(model, example, tap)
            if tap is None:  # `explain.reference_attribution` of the frozen output
                self.register_buffer("reference", model.explain_reference.detach().float().clone())
        if self.evidence:
            head: EvidenceHead = model.evidence_head
            h8, w8 = self.size[0] // PATCH_STRIDE, self.size[1] // PATCH_STRIDE  # the stride-8 patch grid
            # the head's top-k, fixed by the input size (`evidence.topk_mean`): k patches of h8 * w8
            self.topk = max(1, math.ceil(float(head.topk_fraction) * h8 * w8))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = (pixels.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std  # (N, 3, H, W), `dataloader.normalise`
        if self.gradient is not None and self.gradient.tap is not None:  # differentiated from the tap on
            tap8 = self.model.frozen[:self.tap + 1](x)
            frozen, out = self._published(tap8)
        else:
            frozen, tapped = self.model.frozen_features(x, (self.tap,) if self.memory is not None else ())
            tap8 = tapped[0] if tapped else None
            out = self._published(frozen)[1] if self.published else {}
        if self.memory is not None:
            out.update(self._patches(tap8, frozen))
        if self.fused:  # the CAM stays scaled by its own head's probability, as `localizers.maps_of` scales it
            out["p_published"] = out["p_anomaly"]
            out["p_anomaly"] = torch.sigmoid(fused_logit(out["logit_published"], out["logit_evidence"], self.fusion))
        decision_score = out["p_anomaly"] if self.classifier else out["patch_score"]
        map_, image_score = self._chosen(out)
        # compared in float64 as `calibration.decide` compares; the argmax rule is p >= 0.5
        score64, threshold = decision_score.double(), torch.tensor(self.threshold, dtype=torch.float64)
        label = (score64 > threshold) if self.calibrated else (score64 >= 0.5)
        return decision_score, label.long(), image_score, map_

    def _published(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The published head from the frozen output x, or from the stride-8 tap x when its
        gradient is taken there: the frozen output, and the Anomaly probability (N,), the logit
        and the raw CAM (N, H, W); with the gradient, the raw explanation "gradient_map" (N, H, W),
        upsampled (`explain.reference_attribution` at the frozen output, `explain.layer_cam` at the tap)."""
        if self.gradient is None:
            frozen = x
            scores, maps = self.model.head(frozen)  # (N, 2), (N, C, h, w)
        else:
            scores, maps, gradient, frozen = self.gradient(x)
        out = {"p_anomaly": scores.softmax(dim=1)[:, ANOMALY], "logit_published": scores[:, ANOMALY] - scores[:, GOOD],
               "cam": self.model.cam(maps, self.size)}
        if self.gradient is not None:
            raw = (reference_attribution(frozen, gradient, self.reference) if self.gradient.tap is None
                   else layer_cam(x, gradient))
            out["gradient_map"] = upsample_maps(raw, self.size)
        return frozen, out

    def _patches(self, tap8: torch.Tensor, frozen: torch.Tensor) -> dict[str, torch.Tensor]:
        """The patch map (N, S, S), blurred as the checkpoint's rule says, its image score (N,) (the
        maximum at feature resolution, before upsampling and blur); the evidence head's image logit
        (N,), its probability (not when fused) and its map (N, S, S) of patch logits."""
        emb = self.rule.embed(tap8, frozen)  # (N, D, h8, w8)
        n, d, h, w = emb.shape
        residual, distance = self.memory(emb.permute(0, 2, 3, 1).reshape(-1, d))
        residual = residual.reshape(n, h, w, d).permute(0, 3, 1, 2)  # (N, D, h8, w8)
        distance = distance.reshape(n, h, w)
        size = self.size
        patch_map = gaussian_smooth(upsample_maps(distance, size), self.rule.sigma * PATCH_STRIDE)
        out = {"patch_map": patch_map, "patch_score": distance.amax(dim=(1, 2))}
        if self.evidence:
            patch, _ = self.model.evidence_head.parts(residual, distance)  # (N, h8, w8) logits
            image = patch.reshape(n, -1).topk(self.topk, dim=1).values.mean(dim=1)
            out.update(logit_evidence=image, evidence=upsample_maps(patch, size))
            if not self.fused:
                out["p_anomaly"] = torch.sigmoid(image)
        return out

    def _chosen(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The exported map (N, S, S) and its image score (N,), as `localizers.localizer_maps` and
        `localizer_image_scores` make them."""
        if self.localizer in ("cam", "patch_cam"):  # the CAM as shown: min-max per image times its head's probability
            cam = minmax(out["cam"]) * out.get("p_published", out["p_anomaly"])[:, None, None]
        if self.localizer == "cam":
            return cam, out["p_anomaly"]
        if self.localizer in GRADIENT_LOCALIZERS:  # scaled as the CAM is
            shown = minmax(out["gradient_map"]) * out.get("p_published", out["p_anomaly"])[:, None, None]
            return shown, out["p_anomaly"]
        if self.localizer == "evidence":
            return out["evidence"], out["p_anomaly"]
        if self.localizer == "patch_knn":
            return out["patch_map"], out["patch_score"]
        if self.localizer == "patch_cam":
            fused = patch_cam(out["patch_map"], cam)
        else:
            fused = out["patch_map"] * minmax(out["cam"])  # cam_knn
        return fused, fused.amax(dim=(1, 2))


def metadata(checkpoint: dict[str, Any], localizer: str, checkpoint_name: str,
             checkpoint_sha256: str) -> dict[str, Any]:
    """Everything a reader of the graph needs, by key: what goes in, what comes out, the decision
    and box rules with their thresholds, and which checkpoint it came from."""
    config, calibration = checkpoint["config"], checkpoint["calibration"]
    decision = decision_of(checkpoint)
    h, w = canvas(config["image_size"])
    mean, std = checkpoint_normalisation(config)
    rule = patch_rule_of(config)
    memory = checkpoint.get("patch_memory") if _needs_memory(checkpoint, localizer) else None
    return {
        "format": ONNX_FORMAT,
        "input": {"name": INPUT_NAME, "shape": ["N", h, w, 3], "dtype": "uint8", "colour": "RGB",
                  "preparation": "decoded as a viewer shows it (EXIF orientation, 8-bit RGB), stretched to "
                                 "the input size with Pillow's bilinear resize"},
        "outputs": {"decision_score": "(N,) float32: the Anomaly probability (head 'fused': the sigmoid of the "
                                      "heads' standardised logits summed), or without a classifier the patch "
                                      "map's image score; the label is decided on it",
                    "label": "(N,) int64: 1 = Anomaly (class_names[1]) under the decision",
                    "image_score": "(N,) float32: the map's image score",
                    "map": f"(N, {h}, {w}) float32: the map {localizer!r} in its own units"},
        # a side for a square canvas (what runners before non-square canvases read), else [height, width]
        "input_size": h if h == w else [h, w],
        "class_names": list(checkpoint.get("class_names", CLASS_NAMES)),
        "decision": decision,
        "decision_rule": decision["rule"],
        "decision_threshold": float(decision["threshold"]),
        "false_alarm_rate": decision.get("false_alarm_rate"),
        "expected_false_alarms": decision.get("expected_false_alarms"),
        "localizer": localizer,
        "box_rule": "calibrated",
        "box_threshold": float(calibration["thresholds"][localizer]),
        "box_floor": float(calibration["floors"][localizer]),
        "box_min_area": int(calibration["min_area"]),
        "heatmap_thres": float(config["heatmap_thres"]),
        "classifier": has_classifier(checkpoint),
        "head": head_of(checkpoint) if has_classifier(checkpoint) else None,
        "pooling": config.get("pooling", "avg"),
        "backbone": config["backbone"],
        "mean": list(mean), "std": list(std),
        "patch_rule": {"layers": rule.layers, "sigma": rule.sigma} if memory is not None else None,
        "memory_rows": None if memory is None else int(memory.shape[0]),
        "trained_on": config.get("subset_name"),
        "checkpoint": {"name": checkpoint_name, "sha256": checkpoint_sha256},
        "exported_with": {"torch": torch.__version__},
    }


def export_graph(graph: ScoringGraph, meta: dict[str, Any], opset: int | None = None) -> bytes:
    """The ONNX model of `graph` (dynamic batch) as bytes, traced by torch.onnx's exporter, with
    `meta` as the model's metadata (each value JSON-encoded) and the weights inside."""
    example = torch.zeros((2, *graph.size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        program = torch.onnx.export(graph, (example,), None, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                    dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False)
    proto = program.model_proto
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    proto.doc_string = (f"Defect detector of {meta['trained_on']!r} ({meta['backbone']}): pixels (N, H, W, 3) "
                        f"uint8 RGB -> decision_score, label, image_score, map ({meta['localizer']}). "
                        f"Metadata values are JSON.")
    return proto.SerializeToString()


def export_checkpoint(model: CAMClassifier, checkpoint: dict[str, Any], localizer: str, checkpoint_name: str,
                      checkpoint_sha256: str, opset: int | None = None) -> bytes:
    """The ONNX model (bytes) of a loaded checkpoint with map `localizer` (`check_exportable` first)."""
    check_exportable(checkpoint, localizer, checkpoint_name)
    graph = ScoringGraph(model, checkpoint, localizer).eval()
    return export_graph(graph, metadata(checkpoint, localizer, checkpoint_name, checkpoint_sha256), opset)


def save_model(path: str | Path, payload: bytes) -> None:
    """Write an exported model's bytes to `path` atomically."""
    atomic_write_bytes(path, lambda f: f.write(payload))


# --- parity with predict.py's PyTorch path ----------------------------------------------------

# The parity targets: scores in fp32 within 1e-4, maps within 1e-3 (in the map's units), the same
# labels. Values above 1 are held to the same share of their size: float32 keeps 7 significant
# digits, and a VGG16 patch distance of 1600 is stored in steps of 1.2e-4.
SCORE_TOLERANCE = 1e-4
MAP_TOLERANCE = 1e-3
# The explanations are gradients, and a gradient jumps where an activation crosses its ReLU's kink:
# a unit whose input lies within rounding of 0 (of 0 or 6 for ReLU6) passes its gradient in one
# runtime and not in the other. Set on real pill (MobileNetV2, 11 images), where `explain` departed
# by at most 0.0041 of its [0, 1] scale; `layercam_s8`, checked after, by 0.0072 (docs/export.md),
# with the same labels and boxes.
GRADIENT_MAP_TOLERANCE = 1e-2


def map_tolerance(localizer: str) -> float:
    """The parity target of a map: MAP_TOLERANCE, or GRADIENT_MAP_TOLERANCE for the explanation."""
    return GRADIENT_MAP_TOLERANCE if localizer in GRADIENT_LOCALIZERS else MAP_TOLERANCE


def beyond(values: np.ndarray, reference: np.ndarray, tolerance: float) -> np.ndarray:
    """Where `values` depart from `reference` (same shape) by more than tolerance x max(1, |reference|)."""
    return np.abs(values - reference) > tolerance * np.maximum(1.0, np.abs(reference))


def session_of(payload: bytes | str | Path, threads: int = 0):
    """An ONNX Runtime CPU session of an exported model (bytes or a file)."""
    import onnxruntime as ort  # an optional extra (requirements-export.txt): only the check needs it

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = payload if isinstance(payload, bytes) else str(payload)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_session(session, images: torch.Tensor) -> dict[str, Any]:
    """The graph's outputs for (N, 3, S, S) uint8 images, as numpy arrays by output name."""
    pixels = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, S, S, 3), the graph's layout
    return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {INPUT_NAME: pixels})))


# Two memory rows whose distances to a patch differ by less than this share are a near tie: the
# rounding of the backbone (1e-6 of a feature between PyTorch and ONNX Runtime) decides which is nearest.
NEAR_TIE = 1e-4


@torch.no_grad()
def near_ties(model: CAMClassifier, checkpoint: dict[str, Any], images: torch.Tensor,
              batch_size: int = 2) -> np.ndarray | None:
    """(N, h8, w8) bool: the patches of (N, 3, S, S) uint8 images whose two nearest memory rows lie
    within NEAR_TIE (relative) of each other, for the one map that jumps there: the evidence
    head's, whose per-patch logit reads the residual to the nearest row (at a tie either row may be
    nearest, and their residuals differ). None for the other maps: a distance is the same from
    either row, so they are continuous at a tie. Exact distances in float64, `batch_size` images at
    a time (each needs h8 * w8 x M doubles)."""
    if not (has_classifier(checkpoint) and head_of(checkpoint) in EVIDENCE_HEADS):
        return None
    config = checkpoint["config"]
    mean, std = checkpoint_normalisation(config)
    rule, memory = patch_rule_of(config), checkpoint["patch_memory"].double()
    model = model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        frozen, taps = model.frozen_features(normalise(images[start:start + batch_size], mean, std),
                                             (model.spec.taps[0],))
        emb = rule.embed(taps[0], frozen)  # (B, D, h8, w8)
        two = torch.cdist(flatten_patches(emb).double(), memory).topk(2, dim=1, largest=False).values  # (B*h8*w8, 2)
        out.append(((two[:, 1] - two[:, 0]) <= NEAR_TIE * two[:, 0]).view(emb.shape[0], *emb.shape[2:]))
    return torch.cat(out).numpy()


def tie_pixels(ties: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(N, H, W) bool: the pixels a near-tie patch of (N, h8, w8) reaches in the upsampled map of
    the canvas `size` (a side or (H, W)): its own cell and, through the bilinear upsampling, its 8
    neighbouring cells."""
    size_h, size_w = canvas(size)
    padded = np.pad(ties, ((0, 0), (1, 1), (1, 1)))
    h, w = ties.shape[1:]
    near = np.zeros_like(ties)
    for dy in range(3):
        for dx in range(3):
            near |= padded[:, dy:dy + h, dx:dx + w]
    return near.repeat(size_h // h, axis=1).repeat(size_w // w, axis=2)


def compare(results: list[dict[str, Any]], outputs: dict[str, Any], threshold: float,
            ties: np.ndarray | None = None) -> dict[str, Any]:
    """How the graph's outputs for N images agree with `inference.score_batch`'s results for the same
    images: the largest absolute differences of the decision score, the image score and the map;
    how many values lie beyond the targets (`beyond`), map pixels outside the reach of the near-tie
    patches `ties` (N, h8, w8) (`near_ties`) counted apart; how many labels differ (and how many
    images score within SCORE_TOLERANCE of the decision `threshold`, where rounding alone can flip
    a label); and whether all are within the targets ("ok": no score or label off, no map pixel off
    away from a near tie; the map's target is `map_tolerance` of the results' localizer)."""
    torch_score = np.array([r["decision_score"] for r in results], np.float32)
    torch_image = np.array([r["image_score"] for r in results], np.float32)
    torch_label = np.array([r["label"] == CLASS_NAMES[ANOMALY] for r in results])
    torch_map = np.stack([r["map"] for r in results])
    off_map = beyond(outputs["map"], torch_map, map_tolerance(results[0]["localizer"]))  # (N, S, S)
    at_tie = np.zeros_like(off_map) if ties is None else tie_pixels(ties, tuple(torch_map.shape[-2:]))
    diff = {"n_images": len(results),
            "decision_score": float(np.abs(outputs["decision_score"] - torch_score).max()),
            "image_score": float(np.abs(outputs["image_score"] - torch_image).max()),
            "map": float(np.abs(outputs["map"] - torch_map).max()),
            "map_away_from_ties": float(np.where(at_tie, 0.0, np.abs(outputs["map"] - torch_map)).max()),
            "map_range": [float(torch_map.min()), float(torch_map.max())],
            "scores_beyond": int(beyond(outputs["decision_score"], torch_score, SCORE_TOLERANCE).sum()
                                 + beyond(outputs["image_score"], torch_image, SCORE_TOLERANCE).sum()),
            "map_pixels_beyond": int(off_map.sum()),
            "map_pixels_beyond_away_from_ties": int((off_map & ~at_tie).sum()),
            "near_tie_patches": None if ties is None else int(ties.sum()),
            "labels_differ": int((outputs["label"].astype(bool) != torch_label).sum()),
            "at_threshold": int((np.abs(torch_score.astype(np.float64) - threshold) <= SCORE_TOLERANCE).sum()),
            "n_anomaly": int(torch_label.sum())}
    diff["ok"] = not (diff["scores_beyond"] or diff["map_pixels_beyond_away_from_ties"] or diff["labels_differ"])
    return diff
