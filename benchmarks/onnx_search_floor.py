"""The floor the nearest-neighbour search sets under an exported graph with a patch memory.

The graph's search (`onnx_export.NearestMemory`, the library's own module) exported alone, for a
memory of --rows rows and the patch widths of the checkpoints (MobileNetV2: 32 with the stride-8
layer alone, 128 with both layers, the evidence head's), run by ONNX Runtime on the 784 patches of
one 224-px image; beside it the search's matrix product alone (one MatMul of the same shapes).
Each is timed as the median of --repeats runs after a warm-up, in this process, one after the
other. Whatever else a graph holds (backbone, head, maps), its images/s cannot exceed 1000 / the
search's milliseconds. Run on a quiet machine:

    python benchmarks/onnx_search_floor.py --out results/reference/onnx_search_floor.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import onnx_export  # noqa: E402
from utils.checkpoint import save_json  # noqa: E402


class Product(torch.nn.Module):
    """The search's matrix product alone: queries (Q, D) x memory^T (D, M)."""

    def __init__(self, memory: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("cols", memory.T.contiguous())

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return queries @ self.cols


def median_ms(module: torch.nn.Module, queries: torch.Tensor, repeats: int, threads: int) -> float:
    """Median milliseconds of one ONNX Runtime run of `module` exported on `queries`."""
    with torch.no_grad():  # the exporter `onnx_export.export_graph` uses
        program = torch.onnx.export(module, (queries,), None, input_names=["queries"], dynamo=True, verbose=False)
    session = onnx_export.session_of(program.model_proto.SerializeToString(), threads)
    feed = {"queries": queries.numpy()}
    session.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10000, help="memory rows (default: %(default)s, the default memory)")
    p.add_argument("--dims", type=int, nargs="+", default=[32, 128])
    p.add_argument("--patches", type=int, default=784, help="query patches per image (28 x 28 at 224 px)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads; 0: one per core")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    load = [round(x, 2) for x in os.getloadavg()]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for dims in args.dims:
        memory = torch.randn(args.rows, dims, generator=generator)
        queries = torch.randn(args.patches, dims, generator=generator)
        search = median_ms(onnx_export.NearestMemory(memory), queries, args.repeats, args.threads)
        product = median_ms(Product(memory), queries, args.repeats, args.threads)
        gflop = 2 * args.patches * args.rows * dims / 1e9
        rows.append({"dims": dims, "memory_rows": args.rows, "patches": args.patches, "gflop_per_image": gflop,
                     "search_ms": search, "product_ms": product, "product_gflops": gflop / product * 1e3,
                     "images_per_second_at_most": 1e3 / search})
        print(f"{dims} dims x {args.rows} rows, {args.patches} patches ({gflop:.2f} GFLOP): search {search:.1f} ms "
              f"(product alone {product:.1f} ms, {rows[-1]['product_gflops']:.0f} GFLOP/s): "
              f"at most {1e3 / search:.0f} images/s")
    report = {"command": "python benchmarks/onnx_search_floor.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "onnxruntime": __import__("onnxruntime").__version__, "load_average_at_start": load,
              "rows": rows}
    if args.out:
        save_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
