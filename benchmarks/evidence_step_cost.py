"""What one evidence-head training costs, three ways on the same residuals in one run.

- `concatenated`: the head's 1x1 convolutions read [residual x sqrt(D) / scale, distance / scale]
  concatenated channels first, each chunk of images gathered by index (how the head was first
  written; kept here as the reference);
- `channels_last_copy`: `EvidenceHead.parts` as the library runs it: the residuals stored channels
  last, the rescaling folded into the (hidden, D) weight, the distance's column added apart, one
  matrix product over the patches; training's chunks sliced, not gathered; each chunk converted
  to a fresh float32 tensor (how the library ran it before the buffer);
- `channels_last`: the library as it runs: the same, each chunk converted into one float32 buffer
  reused across the chunks and steps (`EvidenceInputs.batch(..., out=)`).

All train a head of the same initial weights for --steps full-batch steps on random residuals of
N images x D dims on the 28 x 28 grid (224 px), float16 as `evidence.evidence_inputs` stores
them; the script reports each way's seconds, the ratios, how far the final patch logits of
`concatenated` and `channels_last` differ (rounding only: the same function of the same weights),
and whether the buffer changed any trained weight (it should not: the same values, the same
layout). Run on a quiet machine:

    python benchmarks/evidence_step_cost.py --out results/reference/evidence_step_cost.json
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import evidence  # noqa: E402
from utils.checkpoint import save_json  # noqa: E402


def concatenated_parts(head: evidence.EvidenceHead, residual: torch.Tensor,
                       distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: `net` (1x1 convolutions) over the concatenated, rescaled inputs (B, D + 1, h, w)."""
    d = distance.float() / head.scale
    r = residual.float() * (math.sqrt(residual.shape[1]) / head.scale)
    correction = head.net(torch.cat([r, d[:, None]], dim=1))[:, 0]
    return head.slope * d + head.offset + correction, correction


class GatheredInputs(evidence.EvidenceInputs):
    """Inputs whose chunks are gathered by index, channels first (the reference's storage)."""

    def batch(self, idx: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.residual[idx].float(), self.distance[idx]


class CopiedInputs(evidence.EvidenceInputs):
    """The library's inputs, each chunk converted to a fresh float32 tensor instead of the buffer."""

    def batch(self, idx: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return super().batch(idx)


def train(way: str, head: evidence.EvidenceHead, residual: torch.Tensor, distance: torch.Tensor,
          labels: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """Seconds of `steps` training steps the given way, and the trained head's patch logits of the first chunk."""
    original = evidence.EvidenceHead.parts
    if way == "concatenated":
        evidence.EvidenceHead.parts = concatenated_parts
        inputs = GatheredInputs(residual.contiguous(), distance)
    else:
        stored = residual.contiguous(memory_format=torch.channels_last)
        inputs = (CopiedInputs if way == "channels_last_copy" else evidence.EvidenceInputs)(stored, distance)
    try:
        start = time.perf_counter()
        evidence.train_head(head, inputs, labels, class_weight=[1, 3], device=torch.device("cpu"), steps=steps)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            logits, _ = head.parts(*inputs.batch(torch.arange(min(8, len(labels)))))
    finally:
        evidence.EvidenceHead.parts = original
    return seconds, logits


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=98, help="training images (default: %(default)s, half a pill fit)")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 768],
                   help="residual widths: MobileNetV2's and VGG16's two layers (default: %(default)s)")
    p.add_argument("--steps", type=int, default=evidence.STEPS)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    load = [round(x, 2) for x in os.getloadavg()]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for dims in args.dims:
        residual = (torch.randn(args.images, dims, 28, 28, generator=generator) * 0.1).half()
        distance = residual.float().norm(dim=1)
        labels = torch.zeros(args.images, dtype=torch.long)
        labels[: max(2, args.images // 7)] = 1
        torch.manual_seed(1)
        start_head = evidence.EvidenceHead(dims)
        result, heads = {}, {}
        for way in ("concatenated", "channels_last_copy", "channels_last"):
            heads[way] = copy.deepcopy(start_head)
            result[way] = train(way, heads[way], residual, distance, labels, args.steps)
        (slow, ref), (copied, _), (fast, logits) = (result[w] for w in ("concatenated", "channels_last_copy",
                                                                         "channels_last"))
        same = all(torch.equal(a, b) for a, b in zip(heads["channels_last_copy"].state_dict().values(),
                                                     heads["channels_last"].state_dict().values()))
        rows.append({"images": args.images, "dims": dims, "steps": args.steps, "concatenated_seconds": slow,
                     "channels_last_copy_seconds": copied, "channels_last_seconds": fast, "ratio": slow / fast,
                     "buffer_ratio": copied / fast, "buffer_weights_identical": same,
                     "largest_logit_difference": float((ref - logits).abs().max())})
        print(f"{args.images} images x {dims} dims, {args.steps} steps: concatenated {slow:.2f} s, "
              f"channels last with a fresh copy per chunk {copied:.2f} s, with the buffer {fast:.2f} s: "
              f"{slow / fast:.2f}x and {copied / fast:.2f}x; weights identical with and without the buffer: "
              f"{same}; final logits differ from the reference's by at most "
              f"{rows[-1]['largest_logit_difference']:.1e}")
    report = {"command": "python benchmarks/evidence_step_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "threads": torch.get_num_threads(), "load_average_at_start": load, "rows": rows}
    if args.out:
        save_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
