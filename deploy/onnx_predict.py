"""Score new images with an exported model (export.py) using ONNX Runtime, NumPy and Pillow alone.

Example:
    python deploy/onnx_predict.py --model model.onnx --images new_parts/ --out predictions/pill

Writes what predict.py writes for the model's map: OUT/predictions.csv (one row per image file
found: path, label, p_anomaly, image_score, n_boxes, boxes, width, height, overlay, error),
OUT/predictions.json (the same, plus the model's and its checkpoint's names and sha256 and the
settings) and OUT/overlays/<image>.png. Every file is written atomically. A file that cannot be
scored is reported in the `error` column and the run goes on; the exit status is 1 when any file
failed, 2 when the model, the output folder or the arguments are unusable (nothing is written then).

This file is self-contained on purpose: a line PC copies it beside the .onnx file and installs
`onnxruntime numpy pillow`. It repeats, with NumPy alone, the few rules of the repository it
needs (image decoding, the box rule, the display scale); tests/test_onnx_export.py checks each
against the repository's own.
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import io
import itertools
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

ONNX_FORMAT = "cam-defect-detector/onnx/1"  # the only model format this runner reads
METADATA_KEYS = ("input_size", "class_names", "decision", "localizer", "box_threshold", "box_floor", "box_min_area",
                 "heatmap_thres", "classifier", "backbone", "checkpoint")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")  # as training reads
PREDICTION_COLUMNS = ("path", "label", "p_anomaly", "image_score", "n_boxes", "boxes", "width", "height",
                      "overlay", "error")
DISPLAY_LEVEL = 2 / 3  # where the box threshold sits on the overlay's colour scale
BOX_COLOUR = "red"
# matplotlib's "jet" colour map as (position, value) segments per channel: the overlays' colours
JET = {"red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
       "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
       "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0))}


# --- the model -------------------------------------------------------------------------------


class UnusableModel(ValueError):
    """A model file this runner cannot use; the message names it and says what to do."""


@dataclass
class Model:
    """An exported model: its ONNX Runtime session, metadata (values decoded from JSON), file path and sha256."""

    session: Any
    meta: dict[str, Any]
    path: Path
    sha256: str

    @property
    def size(self) -> int | tuple[int, int]:
        """The input size: a side S (S x S), or (H, W) for a canvas that is not square."""
        size = self.meta["input_size"]
        return int(size) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs of the graph for (N, S, S, 3) uint8 RGB: decision_score (N,), label (N,),
        image_score (N,), map (N, S, S)."""
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, {"pixels": np.ascontiguousarray(pixels, np.uint8)})))


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_metadata(raw: dict[str, str], where: str) -> dict[str, Any]:
    """The model's metadata with each value decoded from JSON; an UnusableModel naming `where` when
    it is not this repository's format or lacks a key the runner reads."""
    try:
        meta = {key: json.loads(value) for key, value in raw.items()}
    except json.JSONDecodeError as err:
        raise UnusableModel(f"{where}: its metadata is not the JSON export.py writes ({err}); "
                            f"export it again.") from err
    if meta.get("format") != ONNX_FORMAT:
        raise UnusableModel(f"{where} is not a model exported by export.py (metadata 'format' is "
                            f"{meta.get('format')!r}, not {ONNX_FORMAT!r}): export the checkpoint with "
                            f"`python export.py --checkpoint CHECKPOINT --out {Path(where).name}`.")
    missing = [key for key in METADATA_KEYS if key not in meta]
    if missing:
        raise UnusableModel(f"{where}: its metadata lacks {', '.join(missing)}; export it again with export.py.")
    return meta


def load_model(path: str | Path, threads: int = 0) -> Model:
    """Open an exported model with ONNX Runtime on the CPU (`threads` intra-op threads, 0: one per core)."""
    import onnxruntime as ort  # imported here so that --help and the pure functions work without it

    path = Path(path)
    if not path.is_file():
        raise UnusableModel(f"model {path} {'is a folder, not a file' if path.is_dir() else 'does not exist'}: "
                            f"point --model at the .onnx file export.py wrote.")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ONNX Runtime raises its own types for a file that is not a model
        raise UnusableModel(f"ONNX Runtime cannot load {path} ({str(err).splitlines()[0]}): the file is damaged or "
                            f"not an ONNX model; export it again.") from err
    meta = read_metadata(session.get_modelmeta().custom_metadata_map, str(path))
    return Model(session, meta, path, sha256_of(path))


# --- finding and decoding images (utils/inference.py, utils/dataloader.py) ----------------------


def is_image_file(path: Path) -> bool:
    """A visible file with one of the image extensions training reads."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def find_images(specs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(path, name) of the image files `specs` name, each a folder (searched recursively, hidden
    files and folders skipped), a glob pattern (`**` recursive) or a file (kept whatever it is, so
    a broken one is reported). `name` is the path relative to its folder or to the pattern's fixed
    prefix, made unique with "~2", "~3"; a file named twice is kept once. FileNotFoundError for a
    spec that names nothing."""
    found: list[tuple[Path, str]] = []
    for spec in specs:
        spec_path = Path(spec)
        if spec_path.is_dir():
            files = sorted(p for p in spec_path.rglob("*") if is_image_file(p)
                           and not any(part.startswith(".") for part in p.relative_to(spec_path).parts))
            found += [(p, p.relative_to(spec_path).as_posix()) for p in files]
        elif spec_path.is_file():
            found.append((spec_path, spec_path.name))
        elif glob.has_magic(str(spec)):
            fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), Path(str(spec)).parts))
            root = Path(*fixed) if fixed else Path(".")
            files = sorted(Path(p) for p in glob.glob(str(spec), recursive=True) if is_image_file(Path(p)))
            found += [(p, os.path.relpath(p, root)) for p in files]
        else:
            raise FileNotFoundError(f"{spec} is neither a folder, a file nor a glob pattern that exists.")
    seen, names, out = set(), set(), []
    for path, name in found:
        if os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        unique, k = name, 2
        while unique in names:
            unique, k = f"{name}~{k}", k + 1
        names.add(unique)
        out.append((path, unique))
    return out


def _scaled_grey(image: Image.Image, name: str) -> Image.Image:
    """16/32-bit integer grey (0..65535 -> /257) or float grey (0..1 -> *255) as 8-bit "L"."""
    a = np.asarray(image)
    lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if a.size else (0.0, 0.0)
    if image.mode == "F":
        if not np.isfinite(a).all() or lo < 0 or hi > 1:
            raise ValueError(f"Image {name} is a floating-point image with values {lo:g}..{hi:g}; only values "
                             f"in [0, 1] have a defined grey level. Save it as an 8- or 16-bit image.")
        out = np.round(a * 255.0)
    else:
        if lo < 0 or hi > 65535:
            raise ValueError(f"Image {name} is a 32-bit integer image with values {lo:g}..{hi:g}, outside the "
                             f"16-bit range 0..65535: save it as an 8- or 16-bit image.")
        out = np.round(a / 257.0)
    return Image.fromarray(out.astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """`image` as a viewer shows it, 8-bit RGB (training's `dataloader.to_rgb`): EXIF orientation
    applied, 16-bit and float grey scaled, palettes shown, alpha dropped with the colour under it kept."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = _scaled_grey(image, name)
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"Image {name} has pixel mode {image.mode!r}, which cannot be read as RGB ({err}): "
                         f"save it as an 8-bit RGB or grey image.") from err


def open_image(path: Path) -> Image.Image:
    """Decode one file as 8-bit RGB at full size; a ValueError naming it when it cannot be read."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img, str(path))
    except (OSError, UnidentifiedImageError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise ValueError(f"Cannot read image {path} ({err}). The file is truncated or not an image: "
                         f"replace it or delete it.") from err


@dataclass
class Decoded:
    """One file decoded for scoring: the model input (S, S, 3) uint8, the full-size RGB image
    (H, W, 3) uint8 for the overlay, or the error that stopped it."""

    path: Path
    name: str
    pixels: np.ndarray | None = None
    display: np.ndarray | None = None
    error: str = ""


def hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(H, W) of an input size: a side S -> (S, S), [H, W] -> (H, W)."""
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def decode(path: Path, name: str, size: int | Sequence[int]) -> Decoded:
    """Decode one file as training does (RGB, Pillow's bilinear resize stretching it to the input
    size, a side or (H, W)); any failure becomes `error`."""
    try:
        rgb = open_image(path)
        height, width = hw(size)
        pixels = np.asarray(rgb.resize((width, height), Image.BILINEAR))
        return Decoded(path, name, pixels, np.asarray(rgb))
    except Exception as err:  # one bad file is reported in its row; the run goes on
        return Decoded(path, name, error=f"{type(err).__name__}: {err}")


def decode_batches(files: Sequence[tuple[Path, str]], size: int | Sequence[int],
                   batch_size: int) -> Iterator[list[Decoded]]:
    """Decode `files` batch by batch on a thread per core (Pillow releases the GIL while decoding)."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(files), batch_size):
            yield list(pool.map(lambda f: decode(f[0], f[1], size), files[start:start + batch_size]))


# --- boxes (utils/postprocess.py: calibrated_boxes, strongest_region, label_boxes) ---------------


def runs_of(hot: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The horizontal runs of True in a bool (H, W) map, in raster order: rows (R,), starts (R,)
    and exclusive ends (R,)."""
    padded = np.zeros((hot.shape[0], hot.shape[1] + 2), np.int8)
    padded[:, 1:-1] = hot
    step = np.diff(padded, axis=1)  # (H, W + 1): +1 where a run starts, -1 one past where it ends
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)
    return rows, starts, ends


def components(hot: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """8-connected regions of a bool (H, W) map as groups of runs: the region (R,) of each run of
    `runs_of(hot)`, numbered 0.. in raster order of each region's first pixel (scipy.ndimage.label's
    order), and the runs. Runs in neighbouring rows join when they touch, diagonals included."""
    rows, starts, ends = runs_of(hot)
    parent = np.arange(len(rows))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_of_row = np.searchsorted(rows, np.arange(hot.shape[0] + 1))  # runs of row r: [first[r], first[r+1])
    for r in range(hot.shape[0] - 1):
        a, a_end = first_of_row[r], first_of_row[r + 1]
        b, b_end = first_of_row[r + 1], first_of_row[r + 2]
        while a < a_end and b < b_end:
            if starts[a] <= ends[b] and starts[b] <= ends[a]:  # touching, a diagonal neighbour included
                ra, rb = root(a), root(b)
                parent[max(ra, rb)] = min(ra, rb)  # the root is the region's first run in raster order
            if ends[a] < ends[b]:
                a += 1
            else:
                b += 1
    roots = np.array([root(i) for i in range(len(rows))], dtype=np.int64)
    return np.unique(roots, return_inverse=True)[1].reshape(-1), (rows, starts, ends)


def region_boxes(values: np.ndarray, hot: np.ndarray, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """One box per 8-connected region of `hot` (H, W) with at least min_area pixels, scored by the
    maximum of `values` (H, W) inside it, by score descending (ties in region order). Boxes (K, 4)
    float32 x1, y1, x2, y2 with exclusive x2, y2; scores (K,) float32."""
    region, (rows, starts, ends) = components(hot)
    if not len(region):
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    lengths = ends - starts
    # the hot pixels in raster order are the runs one after another: each run's maximum at once
    run_max = np.maximum.reduceat(values[hot], np.concatenate([[0], np.cumsum(lengths)[:-1]]))
    order = np.argsort(region, kind="stable")  # runs grouped by region, regions in raster order
    first = np.flatnonzero(np.r_[True, region[order][1:] != region[order][:-1]])
    boxes = np.stack([np.minimum.reduceat(starts[order], first), np.minimum.reduceat(rows[order], first),
                      np.maximum.reduceat(ends[order], first), np.maximum.reduceat(rows[order], first) + 1], axis=1)
    scores = np.maximum.reduceat(run_max[order], first).astype(np.float32)
    keep = np.add.reduceat(lengths[order], first) >= min_area
    boxes, scores = boxes[keep].astype(np.float32), scores[keep]
    by_score = np.argsort(-scores, kind="stable")
    return boxes[by_score], scores[by_score]


def minmax_normalise(map_hw: np.ndarray) -> np.ndarray:
    """A map (H, W) min-max normalised to [0, 1] in float32; a constant map all zeros."""
    map_hw = map_hw.astype(np.float32)
    lo = map_hw.min()
    span = map_hw.max() - lo
    return (map_hw - lo) / (span if span > 0 else np.float32(1.0))


def strongest_region(map_hw: np.ndarray, heatmap_thres: float) -> tuple[np.ndarray, np.ndarray]:
    """The box (1, 4) of the 8-connected region at or above `heatmap_thres` of the map's own range
    that holds its maximum, and that maximum (1,); a constant map's box is the whole map."""
    peak = np.unravel_index(int(np.argmax(map_hw)), map_hw.shape)
    hot = minmax_normalise(map_hw) >= heatmap_thres
    if not hot[peak]:
        box = [0, 0, map_hw.shape[1], map_hw.shape[0]]
    else:
        region, (rows, starts, ends) = components(hot)
        at_peak = np.nonzero((rows == peak[0]) & (starts <= peak[1]) & (ends > peak[1]))[0][0]
        mine = np.nonzero(region == region[at_peak])[0]
        box = [starts[mine].min(), rows[mine].min(), ends[mine].max(), rows[mine].max() + 1]
    return np.asarray([box], np.float32), np.asarray([map_hw[peak]], np.float32)


def label_boxes(map_hw: np.ndarray, anomalous: bool, threshold: float, min_area: int,
                heatmap_thres: float) -> tuple[np.ndarray, np.ndarray]:
    """predict.py's calibrated box rule on one map (H, W): no box on an image labelled Good; on an
    Anomaly the regions above `threshold` of at least min_area pixels, else its strongest region."""
    if not anomalous:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    map_hw = np.asarray(map_hw, np.float32)
    boxes, scores = region_boxes(map_hw, map_hw > threshold, int(min_area))
    return (boxes, scores) if len(boxes) else strongest_region(map_hw, heatmap_thres)


# --- rows, overlays, files -------------------------------------------------------------------


def calibrated_display(maps: np.ndarray, floor: float, threshold: float) -> np.ndarray:
    """Maps on one colour scale in [0, 1]: 0 at `floor`, DISPLAY_LEVEL at the box `threshold`."""
    maps = np.asarray(maps, np.float32)
    span = float(threshold) - float(floor)
    if not span > 0:  # a degenerate calibration: keep the threshold where it belongs on the scale
        span = abs(float(threshold)) or 1.0
    return np.clip((maps - float(floor)) / span * DISPLAY_LEVEL, 0.0, 1.0)


def jet(values: np.ndarray) -> np.ndarray:
    """RGB (..., 3) float in [0, 255] of values in [0, 1] through a 256-entry jet table (as matplotlib colours)."""
    grid = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(grid, [p for p, _ in JET[c]], [v for _, v in JET[c]])
                      for c in ("red", "green", "blue")], axis=1)
    index = (np.clip(values, 0.0, 1.0).astype(np.float32) * 256).astype(int).clip(0, 255)
    return table[index] * 255.0


def overlay_image(image: np.ndarray, heatmap: np.ndarray, boxes: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, 2W, 3) uint8: the image (H, W, 3) with its boxes, beside the same with the heatmap (h, w)
    in [0, 1] blended in; boxes (K, 4) x1, y1, x2, y2 (exclusive x2, y2) in pixels of the image."""
    height, width = image.shape[:2]
    heat = np.asarray(Image.fromarray(np.ascontiguousarray(heatmap, np.float32)).resize((width, height),
                                                                                          Image.BILINEAR))
    blended = ((1 - alpha) * image + alpha * jet(heat)).round().astype(np.uint8)
    panels = [Image.fromarray(image), Image.fromarray(blended)]
    line = max(1, round(min(height, width) / 150))
    for panel in panels:
        draw = ImageDraw.Draw(panel)
        for x1, y1, x2, y2 in np.asarray(boxes, np.float32).reshape(-1, 4):
            draw.rectangle([float(x1), float(y1), max(float(x1), float(x2) - 1), max(float(y1), float(y2) - 1)],
                           outline=BOX_COLOUR, width=line)
    return np.concatenate([np.asarray(p) for p in panels], axis=1)


def overlay_name(name: str) -> str:
    """Overlay file of an image, relative to OUT: overlays/<name>, ending in .png."""
    return f"overlays/{name if name.lower().endswith('.png') else name + '.png'}"


def prediction_row(path: str, result: dict[str, Any] | None, width: int | None = None, height: int | None = None,
                   size: int | Sequence[int] | None = None, error: str = "") -> dict[str, Any]:
    """One row of predictions.csv, as predict.py writes it: boxes scaled from the input size (a side
    or (H, W)) to the W x H original ([x1, y1, x2, y2] rounded to 0.1 px, then the box's score)."""
    if result is None:
        return {"path": path, "label": "", "p_anomaly": None, "image_score": None, "n_boxes": None,
                "boxes": [], "width": None, "height": None, "error": error}
    size_h, size_w = hw(size)
    factors = np.array([width / size_w, height / size_h, width / size_w, height / size_h], np.float32)
    boxes = np.asarray(result["boxes"], np.float32).reshape(-1, 4) * factors
    listed = [[round(float(v), 1) for v in box] + [float(s)] for box, s in zip(boxes, result["box_scores"])]
    return {"path": path, "label": result["label"], "p_anomaly": result["p_anomaly"],
            "image_score": result["image_score"], "n_boxes": len(listed), "boxes": listed,
            "width": width, "height": height, "error": error}


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write a file through `write(fileobj)` into a temporary sibling, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def predictions_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text of the rows: PREDICTION_COLUMNS, boxes as JSON, empty cells for missing values."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PREDICTION_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({**{k: "" if v is None else v for k, v in row.items()}, "boxes": json.dumps(row["boxes"])})
    return buffer.getvalue()


def check_output_dir(out: str | Path) -> None:
    """Refuse an --out that is a file, or that lies below one, before anything is scored."""
    for folder in (Path(out), *Path(out).parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"--out={out}: {folder} is a file, not a folder; choose another --out.")
            if not os.access(folder, os.W_OK):
                raise ValueError(f"--out={out}: {folder} is not writable; choose another --out.")
            return


# --- scoring ---------------------------------------------------------------------------------


def results_of(outputs: dict[str, np.ndarray], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Per image of one batch of graph outputs: label, p_anomaly (None without a classifier),
    decision_score, image_score, map (S, S), heatmap (the display scale), boxes (K, 4) and box
    scores (K,) in pixels of the S x S input (`label_boxes`), as `inference.results_from_predictions`."""
    names = meta["class_names"]
    shown = calibrated_display(outputs["map"], meta["box_floor"], meta["box_threshold"])
    results = []
    for i, map_hw in enumerate(outputs["map"]):
        anomalous = bool(outputs["label"][i])
        boxes, scores = label_boxes(map_hw, anomalous, meta["box_threshold"], meta["box_min_area"],
                                    meta["heatmap_thres"])
        score = float(outputs["decision_score"][i])
        results.append({"label": names[1] if anomalous else names[0],
                        "p_anomaly": score if meta["classifier"] else None, "decision_score": score,
                        "image_score": float(outputs["image_score"][i]), "map": map_hw, "heatmap": shown[i],
                        "boxes": boxes, "box_scores": scores})
    return results


def score_files(files: Sequence[tuple[Path, str]], model: Model, batch_size: int, out: Path,
                overlays: bool = True) -> list[dict[str, Any]]:
    """Decode, score and draw `files` batch by batch; one row per file, failures included."""
    rows = []
    for batch in decode_batches(files, model.size, batch_size):
        good = [d for d in batch if not d.error]
        results = results_of(model.run(np.stack([d.pixels for d in good])), model.meta) if good else []
        by_path = dict(zip((d.path for d in good), results))
        for d in batch:
            if d.error:
                rows.append({**prediction_row(str(d.path), None, error=d.error), "overlay": ""})
                continue
            height, width = d.display.shape[:2]
            row = prediction_row(str(d.path), by_path[d.path], width, height, model.size)
            row["overlay"] = overlay_name(d.name) if overlays else ""
            if overlays:
                boxes = np.array([b[:4] for b in row["boxes"]], np.float32).reshape(-1, 4)
                picture = Image.fromarray(overlay_image(d.display, by_path[d.path]["heatmap"], boxes))
                atomic_write(out / row["overlay"], lambda f: picture.save(f, format="PNG"))
            rows.append(row)
    return rows


def settings(args: argparse.Namespace, meta: dict[str, Any]) -> dict[str, Any]:
    """What predictions.json records about how the images were scored (predict.py's keys)."""
    return {
        "images": [str(s) for s in args.images], "localizer": meta["localizer"], "box_threshold": "calibrated",
        "threshold": meta["box_threshold"], "min_area": meta["box_min_area"], "box_mode": "components",
        "box_note": "", "decision": meta["decision"], "batch_size": args.batch_size,
        "device": "cpu (onnxruntime)", "precision": "fp32", "backbone": meta["backbone"],
        "image_size": meta["input_size"], "resize": "stretch", "trained_on": meta.get("trained_on"),
        "class_names": list(meta["class_names"]),
        "boxes": "[x1, y1, x2, y2, score] in pixels of the original image, x2 and y2 exclusive",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .onnx file written by export.py")
    parser.add_argument("--images", required=True, nargs="+", metavar="DIR_OR_GLOB",
                        help="folders (searched recursively), glob patterns (quote them; ** is recursive) or files")
    parser.add_argument("--out", required=True, help="folder for predictions.csv, predictions.json and overlays/")
    parser.add_argument("--batch-size", type=int, default=10, help="images per run of the graph (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime's intra-op threads; 0: one per core (default: %(default)s)")
    parser.add_argument("--no-overlays", action="store_true",
                        help="write no overlay pictures (the overlay column is empty)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} must be a positive integer")
    if args.threads < 0:
        parser.error(f"--threads {args.threads} must be 0 or a positive integer")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 all scored, 1 some files failed, 2 unusable input)."""
    args = parse_args(argv)
    try:
        check_output_dir(args.out)
        model = load_model(args.model, args.threads)
        files = find_images(args.images)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not files:
        print(f"error: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {' '.join(map(str, args.images))}.",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    rows = score_files(files, model, args.batch_size, out, overlays=not args.no_overlays)
    report = {
        "model": {"path": str(model.path), "name": model.path.name, "sha256": model.sha256},
        "checkpoint": model.meta["checkpoint"],
        "settings": settings(args, model.meta),
        "n_images": len(rows), "n_failed": sum(bool(r["error"]) for r in rows),
        "n_anomaly": sum(r["label"] == model.meta["class_names"][1] for r in rows),
        "predictions": rows,
    }
    text = predictions_csv(rows).encode()
    atomic_write(out / "predictions.csv", lambda f: f.write(text))
    atomic_write(out / "predictions.json", lambda f: f.write(json.dumps(report, indent=2).encode()))
    print(f"{report['n_images']} images: {report['n_anomaly']} Anomaly, {report['n_failed']} failed; wrote "
          f"{out / 'predictions.csv'}, {out / 'predictions.json'}"
          + ("" if args.no_overlays else f" and {out / 'overlays'}/"))
    for row in rows:
        if row["error"]:
            print(f"failed: {row['path']}: {row['error']}", file=sys.stderr)
    return 1 if report["n_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
