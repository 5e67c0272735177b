"""What `patchknn.first_argmin`'s run length buys PyTorch, against one argmin, in one run.

`patchknn.nearest_rows` finds each patch's nearest memory row as the first minimum of a (chunk,
rows) score matrix. `first_argmin` finds it run by run (a row minimum per run of `run` columns, the
first run holding the smallest, the first column in it): the same index as `argmin`, which PyTorch
does not vectorise on CPU. This script times `scores.argmin(dim=1)` and `first_argmin` at each
--runs length on the same random float32 scores (--queries x --rows: one chunk of `nearest_rows`
against the default memory of 10,000 rows), the ways taking turns --repeats times, and reports each
way's median milliseconds and its speed-up over argmin, and checks that every way finds argmin's
index. The scores' values do not matter to the timing, only their shape. Run on a quiet machine:

    python benchmarks/argmin_run.py --out results/reference/argmin_run.json
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

from utils.checkpoint import save_json  # noqa: E402
from utils.patchknn import argmin_run, first_argmin  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=4096, help="score rows: nearest_rows' chunk (default: %(default)s)")
    p.add_argument("--rows", type=int, default=10000, help="memory rows (default: %(default)s, the default memory)")
    p.add_argument("--runs", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    load = [round(x, 2) for x in os.getloadavg()]
    scores = torch.randn(args.queries, args.rows, generator=torch.Generator().manual_seed(0))
    reference = scores.argmin(dim=1)
    # each requested length as first_argmin gets it: the largest divisor of the row count up to it
    ways = {"argmin": 1, **{f"run {n}": argmin_run(args.rows, n) for n in args.runs}}
    same = {name: bool((first_argmin(scores, run) == reference).all()) for name, run in ways.items()}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, run in ways.items():
            start = time.perf_counter()
            first_argmin(scores, run)
            times[name].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times["argmin"])
    rows = []
    for name, run in ways.items():
        ms = statistics.median(times[name])
        rows.append({"way": name, "run": run, "ms": ms, "speedup_over_argmin": base / ms, "same_index": same[name]})
        print(f"{name:>8} (run {run:>3}): {ms:7.1f} ms, {base / ms:.2f}x argmin, same index: {same[name]}")
    report = {"command": "python benchmarks/argmin_run.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "threads": torch.get_num_threads(), "load_average_at_start": load,
              "queries": args.queries, "memory_rows": args.rows, "rows": rows}
    if args.out:
        save_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
