"""The floor the nearest-neighbour search sets under an exported graph with a patch memory.

The graph's search (`onnx_export.NearestMemory`, the library's own module) exported alone, for a
memory of --rows rows and the patch widths of the checkpoints (MobileNetV2: 32 with the stride-8
layer alone, 128 with both layers, the evidence head's), run by ONNX Runtime on the 784 patches of
one 224-px image; beside it the search's matrix product alone (one MatMul of the same shapes) and
the form the graph held before (`PlainSearch`: a Gemm with the squared norms as its bias, one
ArgMin per block, the nearest rows gathered from the transposed blocks), which finds the same rows.
Each is timed as the median of --repeats runs in this process, the three taking turns in blocks
of 10 runs (`median_ms`) so that the machine's drift falls on all of them alike. Whatever else a
graph holds (backbone, head, maps), its images/s cannot exceed 1000 / the search's milliseconds.
Run on a quiet machine:

    python benchmarks/onnx_search_floor.py --out results/reference/onnx_search_floor.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

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


class PlainSearch(torch.nn.Module):
    """The search as the graph held it before `onnx_export.NearestMemory`'s measured form: per
    block, ||m||^2 - 2 q.m as one addmm (a Gemm whose bias is broadcast into the scores first) and
    one ArgMin over the block's columns; the nearest rows gathered column by column from the
    transposed blocks and merged with one Where per block. The same rows, residuals and lengths."""

    def __init__(self, memory: torch.Tensor, block: int = onnx_export.MEMORY_BLOCK) -> None:
        super().__init__()
        mean = memory.mean(dim=0)
        centred = memory - mean
        self.register_buffer("mean", mean)
        self.blocks = len(range(0, len(memory), block))
        for i, start in enumerate(range(0, len(memory), block)):
            part = centred[start:start + block]
            self.register_buffer(f"cols{i}", part.T.contiguous())  # (D, m_i)
            self.register_buffer(f"sq{i}", (part * part).sum(dim=1))  # (m_i,)

    def forward(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries - self.mean
        best, index = [], []
        for i in range(self.blocks):
            scores = torch.addmm(getattr(self, f"sq{i}"), q, getattr(self, f"cols{i}"), alpha=-2.0)
            at = scores.argmin(dim=1)
            best.append(scores.gather(1, at[:, None])[:, 0])
            index.append(at)
        block = torch.stack(best, dim=1).argmin(dim=1)
        nearest = torch.zeros_like(q)
        for i in range(self.blocks):
            rows = getattr(self, f"cols{i}").index_select(1, index[i]).T
            nearest = torch.where((block == i)[:, None], rows, nearest)
        residual = q - nearest
        return residual, torch.linalg.vector_norm(residual, dim=1)


def session_for(module: torch.nn.Module, queries: torch.Tensor, threads: int):
    """An ONNX Runtime session of `module` exported on `queries` (the exporter `onnx_export.export_graph` uses)."""
    with torch.no_grad():
        program = torch.onnx.export(module, (queries,), None, input_names=["queries"], dynamo=True, verbose=False)
    return onnx_export.session_of(program.model_proto.SerializeToString(), threads)


def median_ms(sessions: dict[str, Any], queries: torch.Tensor, repeats: int, block: int = 10) -> dict[str, float]:
    """Median milliseconds of one run of each session on `queries`: blocks of `block` runs of each
    session in turn, each block after a pause and a warm-up run, until each has `repeats` runs.
    Blocks, not single runs, take turns: ONNX Runtime's threads spin for a moment after a run, and
    one session's spinning threads slow the next session's run (by 2-3x measured here)."""
    feed = {"queries": queries.numpy()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    while min(len(values) for values in times.values()) < repeats:
        for name, session in sessions.items():
            time.sleep(0.1)  # the previous session's threads go idle
            session.run(None, feed)
            for _ in range(min(block, repeats - len(times[name]))):
                start = time.perf_counter()
                session.run(None, feed)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


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
        modules = {"search": onnx_export.NearestMemory(memory), "plain": PlainSearch(memory), "product": Product(memory)}
        sessions = {name: session_for(module, queries, args.threads) for name, module in modules.items()}
        same = [session.run(None, {"queries": queries.numpy()})[1] for session in (sessions["search"], sessions["plain"])]
        ms = median_ms(sessions, queries, args.repeats)
        search, plain, product = ms["search"], ms["plain"], ms["product"]
        gflop = 2 * args.patches * args.rows * dims / 1e9
        rows.append({"dims": dims, "memory_rows": args.rows, "patches": args.patches, "gflop_per_image": gflop,
                     "search_ms": search, "plain_search_ms": plain, "plain_over_search": plain / search,
                     "same_lengths": bool(abs(same[0] - same[1]).max() <= 1e-4),
                     "product_ms": product, "product_gflops": gflop / product * 1e3,
                     "images_per_second_at_most": 1e3 / search})
        print(f"{dims} dims x {args.rows} rows, {args.patches} patches ({gflop:.2f} GFLOP): search {search:.1f} ms, "
              f"the plain form {plain:.1f} ms ({plain / search:.2f}x), product alone {product:.1f} ms "
              f"({rows[-1]['product_gflops']:.0f} GFLOP/s): at most {1e3 / search:.0f} images/s")
    report = {"command": "python benchmarks/onnx_search_floor.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "onnxruntime": __import__("onnxruntime").__version__, "load_average_at_start": load,
              "rows": rows}
    if args.out:
        save_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
