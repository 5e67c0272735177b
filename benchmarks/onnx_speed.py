"""Speed and peak memory of scoring new images: predict.py's PyTorch path against the exported ONNX
graph with deploy/onnx_predict.py, on the same CPU in one run.

For each backbone and kind of checkpoint (published head, evidence head, patch memory alone, and
the default head, `head="auto"`, whatever it chose; each with its default map), each way scores
the same real images (MVTec AD pill test images) at batch 1 and batch 16, each in its own process
(its peak memory, VmHWM, is its own; the ONNX process never imports torch):

- `torch_fp32`: predict.py's path (`inference.score_batch`) in fp32;
- `torch_auto`: the same at predict.py's default precision (bf16 autocast on CPUs with AVX512-BF16
  or AMX, else fp32);
- `onnx`: the exported graph under ONNX Runtime with the runner's post-processing (`results_of`).

Decoding excluded: the images are decoded beforehand, the clock covers the forward pass, the map,
the label and the boxes. Decoding included: the same from the files (read, RGB, resize) with each
way's own decoder. Overlays and CSV writing are left out of both. One warm-up batch, then one timed
pass over --n-images. Run from the repository root, on a quiet machine:

    python benchmarks/onnx_speed.py --vgg16-weights /tmp/vgg16_oxford.pth --work-dir /tmp/onnx-speed \\
        --out results/reference/onnx_speed.json
    python benchmarks/onnx_speed.py --quick        # smoke run: MobileNetV2 evidence head, 8 images

Checkpoints and models are trained and exported by benchmarks/onnx_parity.py's code into --work-dir
(kept there and reused by a later run with the same --work-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `deploy` and `utils` import when run as `python benchmarks/onnx_speed.py`

WAYS = ("torch_fp32", "torch_auto", "onnx")
KINDS = ("published", "evidence", "patch_only", "auto")  # auto: the default head, whatever it chose
MOBILENET_TARGET = 50.0  # images/s through ONNX Runtime, MobileNetV2 at 224 px, 2 cores, decoding excluded
DEFAULT_DATA_DIR = os.environ.get("MVTEC_AD_DIR") or REPO_ROOT.parent / "shared" / "data" / "mvtec_anomaly_detection"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="MVTec AD folder (default: %(default)s)")
    p.add_argument("--subset", default="pill")
    p.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "vgg16"])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--ways", nargs="+", default=list(WAYS), choices=WAYS)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--n-images", type=int, default=64, help="timed images per way and batch (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="threads of each way; 0: one per core (default)")
    p.add_argument("--vgg16-weights", default=None, help="VGG16 backbone weights file for the checkpoints")
    p.add_argument("--work-dir", default=None, help="checkpoints and models (default: a temporary folder)")
    p.add_argument("--out", default=None, help="JSON file for the full output")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: MobileNetV2, evidence head, 8 images, batches 1 and 4")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one way in its own process
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.backbones, args.kinds, args.n_images, args.batches = ["mobilenet_v2"], ["evidence"], 8, [1, 4]
    return args


def peak_rss_mib() -> float:
    """Peak resident memory of this process, MiB (VmHWM; `runtime.peak_rss_mib` without importing torch)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# --- one way in its own process ---------------------------------------------------------------


def onnx_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """The runner's path: decode (Pillow), ONNX Runtime, post-processing (numpy). Never imports torch."""
    from deploy import onnx_predict as runner

    model = runner.load_model(spec["model"], spec["threads"])
    files = [(Path(f), Path(f).name) for f in spec["files"]]
    decoded = [runner.decode(path, name, model.size) for path, name in files]
    pixels = np.stack([d.pixels for d in decoded])  # (N, S, S, 3)
    step = spec["batch"]
    runner.results_of(model.run(pixels[:step]), model.meta)  # warm-up
    start = time.perf_counter()
    n_anomaly = 0
    for i in range(0, len(pixels), step):
        n_anomaly += sum(r["label"] == "Anomaly" for r in runner.results_of(model.run(pixels[i:i + step]), model.meta))
    excluded = time.perf_counter() - start
    start = time.perf_counter()
    for chunk in runner.decode_batches(files, model.size, step):
        runner.results_of(model.run(np.stack([d.pixels for d in chunk])), model.meta)
    included = time.perf_counter() - start
    import onnxruntime

    return {"seconds_excluded": excluded, "seconds_included": included, "n_anomaly": n_anomaly,
            "runtime": f"onnxruntime {onnxruntime.__version__}", "precision": "fp32"}


def torch_worker(spec: dict[str, Any], precision: str) -> dict[str, Any]:
    """predict.py's path: training's decoding, `inference.score_batch` at `precision`, boxes."""
    import torch

    from utils import inference, runtime
    from utils.checkpoint import load_checkpoint

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device("cpu")
    precision = runtime.resolve_precision(precision, device)
    model, checkpoint = load_checkpoint(spec["checkpoint"])
    model = runtime.prepare_model(model, device, precision)
    size = checkpoint["config"]["image_size"]
    files = [(Path(f), Path(f).name) for f in spec["files"]]
    images = torch.stack([inference.decode(path, name, size).tensor for path, name in files])
    step = spec["batch"]
    score = lambda x: inference.score_batch(x, model, checkpoint, batch_size=step, device=device,  # noqa: E731
                                            precision=precision)
    score(images[:step])  # warm-up
    start = time.perf_counter()
    n_anomaly = sum(r["label"] == "Anomaly" for i in range(0, len(images), step) for r in score(images[i:i + step]))
    excluded = time.perf_counter() - start
    start = time.perf_counter()
    for chunk in inference.decode_batches(files, size, step):
        score(torch.stack([d.tensor for d in chunk]))
    included = time.perf_counter() - start
    return {"seconds_excluded": excluded, "seconds_included": included, "n_anomaly": n_anomaly,
            "runtime": f"torch {torch.__version__}, {torch.get_num_threads()} threads", "precision": precision}


def run_worker(args: argparse.Namespace) -> None:
    """Entry of a worker process: print its result as the last line of JSON."""
    spec = json.loads(Path(args.spec).read_text())
    result = onnx_worker(spec) if args.worker == "onnx" else torch_worker(spec, args.worker.split("_", 1)[1])
    n = len(spec["files"])
    result.update(images_per_second_excluded=n / result["seconds_excluded"],
                  images_per_second_included=n / result["seconds_included"], peak_rss_mib=peak_rss_mib())
    print(json.dumps(result))


def spawn(way: str, spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run one way in a fresh process and return its result."""
    path = folder / f"spec_{way}_{spec['batch']}_{Path(spec['checkpoint']).stem}.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, __file__, "--worker", way, "--spec", str(path)], capture_output=True,
                          text=True, cwd=REPO_ROOT)
    if done.returncode:
        raise RuntimeError(f"{way} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- the run ---------------------------------------------------------------------------------


def prepared(args: argparse.Namespace, backbone: str, work: Path) -> dict[str, tuple[Path, Path]]:
    """{kind: (checkpoint, model)}: trained and exported by onnx_parity's code unless --work-dir has them."""
    import onnx_parity  # beside this script
    from utils import inference, onnx_export
    from utils.checkpoint import load_checkpoint
    from utils.download import sha256_of

    paths = {kind: work / f"{args.subset}_{backbone}_{kind}.pt" for kind in args.kinds}
    missing = [kind for kind, path in paths.items() if not path.is_file()]
    if missing:
        options = ["--data-dir", args.data_dir, "--subset", args.subset, "--kinds", *missing]
        options += ["--vgg16-weights", args.vgg16_weights] if args.vgg16_weights else []
        onnx_parity.make_checkpoints(onnx_parity.parse_args(options + (["--quick"] if args.quick else [])),
                                     backbone, work)
    out = {}
    for kind, checkpoint in paths.items():
        model = checkpoint.with_suffix(".onnx")
        if not model.is_file():
            net, ckpt = load_checkpoint(checkpoint)
            onnx_export.save_model(model, onnx_export.export_checkpoint(
                net, ckpt, inference.default_localizer(ckpt), checkpoint.name, sha256_of(checkpoint)))
        out[kind] = (checkpoint, model)
    return out


def test_files(args: argparse.Namespace) -> list[str]:
    """The first --n-images image files of the category's test/ folder (sorted), cycled when fewer."""
    root = Path(args.data_dir) / args.subset / "test"
    files = sorted(str(p) for p in root.rglob("*.png"))
    if not files:
        raise SystemExit(f"error: no test images under {root}: set --data-dir")
    return [files[i % len(files)] for i in range(args.n_images)]


def cpu_facts() -> dict[str, Any]:
    """The CPU the timings belong to, whether it has native bf16, and how busy the machine is."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    model = names[0] if names else "unknown"
    flags = set(text.split())
    return {"cpu": model, "logical_cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags, "avx512f": "avx512f" in flags,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ONNX Runtime's images/s over each PyTorch way's, per backbone, kind and batch, decoding excluded and included."""
    out = []
    by_key = {(r["backbone"], r["kind"], r["batch"], r["way"]): r for r in rows}
    for (backbone, kind, batch, way), row in by_key.items():
        onnx = by_key.get((backbone, kind, batch, "onnx"))
        if way == "onnx" or onnx is None:
            continue
        out.append({"backbone": backbone, "kind": kind, "batch": batch, "against": way,
                    "excluded": onnx["images_per_second_excluded"] / row["images_per_second_excluded"],
                    "included": onnx["images_per_second_included"] / row["images_per_second_included"]})
    return out


def print_table(rows: list[dict[str, Any]], facts: dict[str, Any]) -> None:
    print(f"\nCPU: {facts['cpu']}, {facts['logical_cpus']} logical CPUs, avx512_bf16: {facts['avx512_bf16']}")
    print("| backbone | kind | way | precision | batch | images/s, decoding excluded | "
          "images/s, decoding included | peak MiB |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backbone']} | {r['kind']} | {r['way']} | {r['precision']} | {r['batch']} | "
              f"{r['images_per_second_excluded']:.1f} | {r['images_per_second_included']:.1f} | "
              f"{r['peak_rss_mib']:.0f} |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="onnx-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    files = test_files(args)
    facts = {"start": cpu_facts()}
    rows = []
    for backbone in args.backbones:
        for kind, (checkpoint, model) in prepared(args, backbone, work).items():
            for batch in args.batches:
                spec = {"checkpoint": str(checkpoint), "model": str(model), "files": files, "batch": batch,
                        "threads": args.threads}
                for way in args.ways:
                    rows.append({"backbone": backbone, "kind": kind, "batch": batch, "way": way,
                                 **spawn(way, spec, work)})
                    print(json.dumps(rows[-1]), flush=True)
    facts["end_load_average"] = [round(x, 2) for x in os.getloadavg()]
    report = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": facts["start"],
              "load_average_at_end": facts["end_load_average"], "n_images": args.n_images,
              "images": f"the first {args.n_images} files of {args.subset}/test (sorted)", "rows": rows,
              "ratios": ratios(rows),
              "mobilenet_target": {"images_per_second": MOBILENET_TARGET, "met": {
                  f"{r['kind']}, batch {r['batch']}": r["images_per_second_excluded"] >= MOBILENET_TARGET
                  for r in rows if r["backbone"] == "mobilenet_v2" and r["way"] == "onnx"}}}
    print_table(rows, facts["start"])
    for r in report["ratios"]:
        print(f"{r['backbone']} {r['kind']} batch {r['batch']}: onnx / {r['against']} = {r['excluded']:.2f}x "
              f"(decoding excluded), {r['included']:.2f}x (included)")
    if args.out:
        from utils.checkpoint import save_json

        save_json(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
