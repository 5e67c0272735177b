"""Run Training.ipynb and Evaluation.ipynb for several subsets and backbones, then tabulate.

Example:
    python sweep.py --subsets hazelnut leather --backbones vgg16 mobilenet_v2   # head="auto", the default
    python sweep.py --subsets hazelnut --train head=evidence      # the evidence head
    python sweep.py --subsets toothbrush --backbones mobilenet_v2 \
        --data-dir ../shared/data/mvtec_anomaly_detection --eval localizer=patch_knn

Executed notebooks go to runs/{subset}_{backbone}/; every metrics.json is collected into
results/summary.csv and results/summary.md. A run that fails is reported in the table with its
error and the sweep goes on.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import papermill as pm

from utils.checkpoint import atomic_write_bytes
from utils.parameters import run_name

ROOT = Path(__file__).resolve().parent

# Image-level columns read from metrics.json; localisation columns come per localiser.
COLUMNS = ("n_train", "n_test", "accuracy", "balanced_accuracy", "image_auroc", "image_ap")
DECISION_COLUMNS = ("false_alarm_rate", "false_alarms", "recall")
LOCALISATION_KEYS = ("pixel_auroc", "aupro", "pointing_game", "box_iou")


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """["epochs=3", "pretrained=false"] -> {"epochs": 3, "pretrained": False}; values are JSON,
    or plain strings when they are not valid JSON."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not name=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def summary_row(subset: str, backbone: str, metrics: dict | None, error: str | None) -> dict[str, Any]:
    """One table row: image-level metrics and each localiser's localisation metrics."""
    row: dict[str, Any] = {"subset": subset, "backbone": backbone}
    metrics = metrics or {}
    for column in COLUMNS:
        row[column] = metrics.get(column)
    # what head="auto" chose to decide with (empty for a head given by hand)
    row["decided_by"] = (metrics.get("selection") or {}).get("decision")
    decision = metrics.get("decision") or {}
    for column in DECISION_COLUMNS:  # the calibrated decision users act on
        row[column] = decision.get(column)
    for name, loc in sorted(metrics.get("localizers", {}).items()):
        for key in LOCALISATION_KEYS:
            row[f"{name}_{key}"] = loc.get(key)
    row["error"] = error or ""
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows (dicts) -> a Markdown table over the union of their columns, in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    columns = [c for c in columns if c != "error"] + ["error"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows (dicts) -> CSV text over the union of their columns."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def run_one(subset: str, backbone: str, common: dict, train: dict, evaluate: dict, runs_dir: Path) -> str | None:
    """Execute both notebooks for one subset/backbone; return None, or the error's last line."""
    out = runs_dir / run_name(subset, backbone)
    out.mkdir(parents=True, exist_ok=True)
    params = {**common, "subset_name": subset, "backbone": backbone}
    try:
        pm.execute_notebook(ROOT / "Training.ipynb", out / "Training.ipynb", cwd=str(ROOT),
                            parameters={**params, **train})
        pm.execute_notebook(ROOT / "Evaluation.ipynb", out / "Evaluation.ipynb", cwd=str(ROOT),
                            parameters={**params, **evaluate})
    except pm.PapermillExecutionError as err:  # reported in the table; the sweep goes on
        return f"{err.ename}: {err.evalue}"
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subsets", nargs="+", required=True, help="MVTec AD categories or 'synthetic'")
    parser.add_argument("--backbones", nargs="+", default=["vgg16"], help="vgg16 and/or mobilenet_v2")
    parser.add_argument("--data-dir", default="data/mvtec_anomaly_detection", help="folder of subset folders")
    parser.add_argument("--results-dir", default="results", help="where metrics.json files and the summary go")
    parser.add_argument("--weights-dir", default="weights", help="where checkpoints go")
    parser.add_argument("--runs-dir", default="runs", help="where executed notebooks go")
    parser.add_argument("--train", nargs="*", default=[], metavar="NAME=VALUE",
                        help="extra Training.ipynb parameters, e.g. epochs=3 pretrained=false")
    parser.add_argument("--eval", nargs="*", default=[], metavar="NAME=VALUE",
                        help="extra Evaluation.ipynb parameters, e.g. localizer=patch_knn")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    parser.add_argument("--backbone-weights", default=None, metavar="PATH",
                        help="Training.ipynb's backbone_weights: a backbone weights file (e.g. the offline "
                             "VGG16 file of `python -m utils.offline_weights --vgg16-oxford PATH`)")
    args = parser.parse_args(argv)
    common = {"data_dir": args.data_dir, "results_dir": args.results_dir,
              "weights_dir": args.weights_dir, "device": args.device}
    train, evaluate = parse_assignments(args.train), parse_assignments(args.eval)
    if args.backbone_weights is not None:
        train["backbone_weights"] = args.backbone_weights
    rows = []
    for subset in args.subsets:
        for backbone in args.backbones:
            print(f"== {subset} / {backbone}", flush=True)
            error = run_one(subset, backbone, common, train, evaluate, Path(args.runs_dir))
            path = Path(args.results_dir) / run_name(subset, backbone) / "metrics.json"
            metrics = json.loads(path.read_text()) if error is None and path.is_file() else None
            rows.append(summary_row(subset, backbone, metrics, error))
            print(f"   {'failed: ' + error if error else 'ok'}", flush=True)
    results = Path(args.results_dir)
    atomic_write_bytes(results / "summary.csv", lambda f: f.write(csv_text(rows).encode()))
    atomic_write_bytes(results / "summary.md", lambda f: f.write(markdown_table(rows).encode()))
    print(f"wrote {results / 'summary.csv'} and {results / 'summary.md'}")
    return rows


if __name__ == "__main__":
    failed = [r for r in main() if r["error"]]
    for row in failed:
        print(f"{row['subset']} / {row['backbone']} failed: {row['error']}", file=sys.stderr)
    sys.exit(1 if failed else 0)
