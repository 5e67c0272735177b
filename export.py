"""Export a checkpoint as one ONNX graph that ONNX Runtime runs without this repository or PyTorch.

Example:
    python export.py --checkpoint weights/pill_vgg16.pt --out model.onnx
    python deploy/onnx_predict.py --model model.onnx --images new_parts/ --out predictions/pill

The graph takes raw RGB pixels, (N, H, W, 3) uint8 on the checkpoint's canvas (S x S, or [H, W]; stretched
as training stretches: a checkpoint trained with resize="pad" is refused), and gives
per image the decision score, the label at the calibrated threshold (1 = Anomaly), the map's image
score and the map (N, H, W) in its own units: the checkpoint's default map unless --localizer names
another one a forward pass computes (cam, patch_knn, cam_knn, evidence). The thresholds, the class
names, the input size, the false-alarm rate promised and the checkpoint's sha256 are in the model's
metadata. Before the file is written, the graph is run with ONNX Runtime on --check images (or
seeded noise) and compared with predict.py's PyTorch path; the file is written atomically only when
they agree. Exit status: 0 written, 1 the check failed (nothing written), 2 the checkpoint, the
output or the arguments are unusable (nothing written).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from utils import checkpoint as checkpoints
from utils import geometry, inference, localizers, onnx_export, parameters
from utils.download import sha256_of


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by Training.ipynb")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--localizer", default=None,
                        help="the map in the graph; default: the checkpoint's own (predict.py's default); one of "
                             f"{', '.join(onnx_export.EXPORTABLE_LOCALIZERS)} "
                             "(of the explanations, 'explain' and 'layercam_s8')")
    parser.add_argument("--check", nargs="*", default=None, metavar="DIR_OR_GLOB",
                        help="images to compare the graph with predict.py's PyTorch path on (default: "
                             "--check-noise seeded noise images)")
    parser.add_argument("--check-noise", type=int, default=4,
                        help="noise images when --check names none (default: %(default)s)")
    parser.add_argument("--no-check", action="store_true",
                        help="write the graph without comparing it (no onnxruntime needed)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    args = parser.parse_args(argv)
    if args.check_noise < 1:
        parser.error(f"--check-noise {args.check_noise} must be a positive integer")
    if not args.out.endswith(".onnx"):
        parser.error(f"--out {args.out} must end in .onnx")
    return args


def check_images(args: argparse.Namespace, size: int | list[int]) -> torch.Tensor:
    """The (N, 3, H, W) uint8 images of the check on the canvas `size` (a side or [H, W]): --check's
    files decoded as predict.py decodes them (unreadable ones skipped), or seeded uniform noise."""
    if args.check:
        decoded = [d for batch in inference.decode_batches(inference.find_images(args.check), size, 16)
                   for d in batch if not d.error]
        if not decoded:
            raise ValueError(f"--check {' '.join(args.check)}: no readable image file found")
        return torch.stack([d.tensor for d in decoded])
    generator = torch.Generator().manual_seed(0)
    height, width = geometry.canvas(size)
    return torch.randint(0, 256, (args.check_noise, 3, height, width), dtype=torch.uint8, generator=generator)


def missing_packages(check: bool) -> list[str]:
    """The export extra's packages (requirements-export.txt) this run needs and cannot import."""
    names = ("onnx", "onnxscript", *(("onnxruntime",) if check else ()))
    return [name for name in names if importlib.util.find_spec(name) is None]


def agrees(args: argparse.Namespace, payload: bytes, model, checkpoint: dict, localizer: str,
           images: torch.Tensor) -> bool:
    """Run the exported graph with ONNX Runtime on `images` (N, 3, S, S) uint8 beside predict.py's
    path (`inference.score_batch`, fp32), print how they compare, and say whether they agree."""
    outputs = onnx_export.run_session(onnx_export.session_of(payload), images)
    results = inference.score_batch(images, model, checkpoint, localizer=localizer, batch_size=16)
    ties = onnx_export.near_ties(model, checkpoint, images)
    diff = onnx_export.compare(results, outputs, float(inference.decision_of(checkpoint)["threshold"]), ties)
    print(f"check on {len(images)} {'images' if args.check else 'noise images'}: {json.dumps(diff)}")
    if not diff["ok"]:
        print(f"error: the graph disagrees with predict.py beyond the targets (scores {onnx_export.SCORE_TOLERANCE}, "
              f"maps {onnx_export.map_tolerance(localizer)} away from near ties, labels equal): {args.out} not written",
              file=sys.stderr)
    return diff["ok"]


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 written, 1 the parity check failed, 2 unusable input)."""
    args = parse_args(argv)
    missing = missing_packages(not args.no_check)
    if missing:
        print(f"error: export.py needs {', '.join(missing)}: pip install -r requirements-export.txt"
              + (" (or pass --no-check to skip the check with onnxruntime)" if missing == ["onnxruntime"] else ""),
              file=sys.stderr)
        return 2
    try:
        parameters.check_output_dir(str(Path(args.out).parent), "--out")
        if Path(args.out).is_dir():
            raise ValueError(f"--out={args.out} is a folder: name the .onnx file to write")
        model, checkpoint = checkpoints.load_checkpoint(args.checkpoint)
        localizer = args.localizer or localizers.default_localizer(checkpoint)
        onnx_export.check_exportable(checkpoint, localizer, args.checkpoint)
        images = None if args.no_check else check_images(args, checkpoint["config"]["image_size"])
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    payload = onnx_export.export_checkpoint(model, checkpoint, localizer, Path(args.checkpoint).name,
                                            sha256_of(args.checkpoint), args.opset)
    if images is not None and not agrees(args, payload, model, checkpoint, localizer, images):
        return 1
    onnx_export.save_model(args.out, payload)
    print(f"wrote {args.out} ({len(payload) / 2**20:.1f} MiB): map {localizer!r}, decision "
          f"{json.dumps(inference.decision_of(checkpoint))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
