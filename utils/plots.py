"""Figures: prediction grid with heatmaps and boxes, confusion matrix, ROC, per-image overlays."""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.patches import Rectangle
from PIL import Image, ImageDraw
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

from .constants import ANOMALY, CLASS_NAMES, GOOD, GOOD_FOLDER
from .checkpoint import atomic_write_bytes
from .postprocess import to_numpy

MASK_COLOUR = "lime"  # ground-truth contour; not in the jet colour map's hot end, visible on most images
BOX_COLOUR = "red"
CELL_INCHES = 2.8  # side of one grid cell; wide enough for the first column's title at TITLE_SIZE
TITLE_SIZE = 7
TITLE_WRAP = 52  # characters that fit one cell width at TITLE_SIZE; longer titles break before "pred"
CONFUSION_KEYS = ("TP", "FN", "FP", "TN")


def _labels(y, name: str) -> np.ndarray:
    """Validate a vector of 0/1 labels (N,) and return it as int64."""
    y = to_numpy(y).reshape(-1)
    if y.size and not np.isin(y, (GOOD, ANOMALY)).all():
        raise ValueError(f"{name} must hold only {GOOD} (Good) and {ANOMALY} (Anomaly), got {np.unique(y)}")
    return y.astype(np.int64)


def select_grid_samples(y_true, y_pred, n: int, seed: int = 0) -> np.ndarray:
    """Indices (min(n, N),) int64 of test images to show, spread over the outcomes (labels (N,)).

    Each outcome group (false negatives, false positives, true positives, true negatives) is
    shuffled with a seeded generator; picks go round-robin over the groups in that order, so
    errors are picked first and every outcome present gets a row. The result lists the picks
    group by group in the same order: errors at the top of the grid.
    """
    y_true, y_pred = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels and y_pred {len(y_pred)}: need one each per image")
    if n < 0:
        raise ValueError(f"n={n} must be a non-negative number of images")
    rng = np.random.default_rng(seed)
    outcomes = [(ANOMALY, GOOD), (GOOD, ANOMALY), (ANOMALY, ANOMALY), (GOOD, GOOD)]  # (true, pred): FN FP TP TN
    groups = [rng.permutation(np.flatnonzero((y_true == t) & (y_pred == p))) for t, p in outcomes]
    taken = [0] * len(groups)
    for _ in range(min(n, len(y_true))):
        # next group in round-robin order that still has images left
        g = min((taken[i], i) for i in range(len(groups)) if taken[i] < len(groups[i]))[1]
        taken[g] += 1
    return np.concatenate([group[:k] for group, k in zip(groups, taken)]).astype(np.int64)


def _images_hwc(images) -> np.ndarray:
    """Images (N, C, H, W) with C = 1 or 3, tensor or array -> (N, H, W, 3) for imshow."""
    images = to_numpy(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 3, H, W) or (N, 1, H, W), got {images.shape}")
    if images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    return images.transpose(0, 2, 3, 1)


def _per_image(values, n: int, name: str) -> list | np.ndarray:
    """Check that a per-image sequence has n entries."""
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries for {n} images: need one per image")
    return values


def _title(true: int, pred: int, score: float, defect: str | None) -> str:
    """'true Anomaly/crack · pred Good · score=0.31'; the defect type is left out when it is the good folder."""
    truth = CLASS_NAMES[true] if defect in (None, GOOD_FOLDER) else f"{CLASS_NAMES[true]}/{defect}"
    title = f"true {truth} · pred {CLASS_NAMES[pred]} · score={score:.2f}"
    # long defect names (e.g. manipulated_front) would run into the next column
    return title if len(title) <= TITLE_WRAP else title.replace(" · pred", "\npred", 1)


def _draw_mask(ax, mask: np.ndarray | None) -> None:
    """Outline a bool mask (H, W) on ax; empty or full masks have no edge, so nothing is drawn."""
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=MASK_COLOUR, linewidths=1.0)


def _draw_boxes(ax, boxes) -> None:
    """Draw boxes (K, 4) x1, y1, x2, y2 with exclusive x2, y2 in pixel coordinates on an imshow axis."""
    for x1, y1, x2, y2 in to_numpy(boxes).reshape(-1, 4):
        # imshow puts pixel (i, j) centred on (j, i): its edges lie half a pixel either side
        rect = Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, edgecolor=BOX_COLOUR, linewidth=1.2)
        ax.add_patch(rect)


def _check_grid(images: np.ndarray, maps: dict, y_true, y_pred, scores, masks, boxes, defect_types) -> dict:
    """The prediction grid's inputs checked against the images (N, H, W, 3); returns them as arrays."""
    n, height, width = images.shape[:3]
    if n == 0:
        raise ValueError("images is empty: select at least one image to plot")
    if not maps:
        raise ValueError("maps is empty: pass at least one heatmap, e.g. {'cam': cam_maps}")
    maps = {name: to_numpy(m) for name, m in maps.items()}
    for name, m in maps.items():
        if m.shape != (n, height, width):
            raise ValueError(f"map {name!r} has shape {m.shape}; need (N, H, W) = {(n, height, width)} like images")
    if masks is not None:
        masks = to_numpy(masks).astype(bool)
        if masks.shape != (n, height, width):
            raise ValueError(f"masks has shape {masks.shape}; need (N, H, W) = {(n, height, width)} like images")
    for name, values in (("boxes", boxes), ("defect_types", defect_types)):
        if values is not None:
            _per_image(values, n, name)
    return {"maps": maps, "y_true": _per_image(_labels(y_true, "y_true"), n, "y_true"),
            "y_pred": _per_image(_labels(y_pred, "y_pred"), n, "y_pred"),
            "scores": _per_image(to_numpy(scores).reshape(-1), n, "scores"), "masks": masks}


def _scale_bar(fig: Figure, axes, threshold_level: float | None) -> None:
    """One colour bar for every map; with a calibrated scale, the box threshold marked on it."""
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap="jet"), ax=axes, shrink=min(0.6, 3 / len(axes)),
                       aspect=30)
    if threshold_level is None:
        bar.set_label("each map min-max normalised per image", fontsize=TITLE_SIZE)
        return
    bar.ax.axhline(threshold_level, color="white", linewidth=2)
    bar.set_ticks([0.0, threshold_level, 1.0], labels=["good parts", "box threshold", "1.5x"], fontsize=TITLE_SIZE)


def plot_prediction_grid(
    images,
    maps: dict[str, np.ndarray],
    y_true,
    y_pred,
    scores,
    masks=None,
    boxes: list | None = None,
    defect_types: list[str] | None = None,
    heatmap_alpha: float = 0.5,
    threshold_level: float | None = None,
) -> Figure:
    """One row per image: the image with its title, mask contour and boxes, then one map per column.

    images (N, 3, H, W) uint8; maps {name: (N, H, W) in [0, 1]}, the first the chosen one, on one
    display scale (`inference.BoxRule.display`); y_true, y_pred (N,) 0/1, the decided labels;
    scores (N,) the scores they were decided on; masks (N, H, W) bool or None; boxes a list of N
    arrays (K, 4) x1, y1, x2, y2 (exclusive x2, y2) of the first map; defect_types N folder names
    or None. threshold_level: where the box threshold sits on the display scale (marked on the
    colour bar), None for per-image min-max maps. Titles of misclassified images are red.
    """
    images = _images_hwc(images)
    if not 0.0 <= heatmap_alpha <= 1.0:
        raise ValueError(f"heatmap_alpha={heatmap_alpha} must lie in [0, 1]")
    g = _check_grid(images, maps, y_true, y_pred, scores, masks, boxes, defect_types)
    n, cols = len(images), 1 + len(g["maps"])
    fig, axes = plt.subplots(n, cols, figsize=(CELL_INCHES * cols + 1.0, CELL_INCHES * n), squeeze=False,
                             layout="constrained")  # room for the titles and the colour bar, no gaps
    for i in range(n):
        mask = None if g["masks"] is None else g["masks"][i]
        axes[i, 0].imshow(images[i])
        _draw_mask(axes[i, 0], mask)
        if boxes is not None and g["y_pred"][i] == ANOMALY:  # boxes agree with the label
            _draw_boxes(axes[i, 0], boxes[i])
        defect = None if defect_types is None else defect_types[i]
        axes[i, 0].set_title(_title(g["y_true"][i], g["y_pred"][i], float(g["scores"][i]), defect), fontsize=TITLE_SIZE,
                             color="red" if g["y_true"][i] != g["y_pred"][i] else "black")
        for ax, (name, m) in zip(axes[i, 1:], g["maps"].items()):
            ax.imshow(images[i])
            ax.imshow(m[i], cmap="jet", alpha=heatmap_alpha, vmin=0.0, vmax=1.0)
            _draw_mask(ax, mask)
            ax.set_title(name, fontsize=TITLE_SIZE)
    for ax in axes.flat:
        ax.set_axis_off()
    legend = [f"{MASK_COLOUR} contour: ground-truth mask"] if g["masks"] is not None else []
    if boxes is not None:
        legend.append(f"{BOX_COLOUR} boxes: from {next(iter(g['maps']))!r}, on images labelled Anomaly")
    if legend:
        fig.suptitle(" · ".join(legend), fontsize=TITLE_SIZE)
    _scale_bar(fig, axes, threshold_level)
    return fig


def plot_confusion_matrix(confusion: dict) -> Figure:
    """Confusion matrix from counts {"TP", "FN", "FP", "TN"} (Anomaly positive); rows true, columns predicted."""
    missing = [k for k in CONFUSION_KEYS if k not in confusion]
    if missing:
        raise ValueError(f"confusion lacks {missing}: pass the dict of utils.metrics.confusion_counts")
    if any(int(confusion[k]) < 0 for k in CONFUSION_KEYS):
        raise ValueError(f"confusion counts must be non-negative, got {confusion}")
    # order [Good, Anomaly] on both axes, as CLASS_NAMES
    matrix = np.array([[confusion["TN"], confusion["FP"]], [confusion["FN"], confusion["TP"]]], dtype=np.int64)
    fig, ax = plt.subplots(figsize=(4, 3.5))
    ConfusionMatrixDisplay(matrix, display_labels=list(CLASS_NAMES)).plot(ax=ax, values_format="d", colorbar=False)
    fig.tight_layout()
    return fig


def plot_roc_curves(y_true, scores: dict[str, np.ndarray]) -> Figure:
    """ROC curves of image scores {name: (N,)} against labels y_true (N,) on one axis, AUROC in the legend."""
    y_true = _labels(y_true, "y_true")
    if not scores:
        raise ValueError("scores is empty: pass at least one score, e.g. {'classifier': p_anomaly}")
    scores = {name: to_numpy(s).reshape(-1) for name, s in scores.items()}
    for name, s in scores.items():
        _per_image(s, len(y_true), f"scores[{name!r}]")
    fig, ax = plt.subplots(figsize=(4.5, 4))
    if len(np.unique(y_true)) < 2:
        # a ROC curve needs both classes; a test split with one class still gets a figure
        ax.text(0.5, 0.5, "ROC undefined:\ny_true holds one class only",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("False positive rate")
        ax.set_ylabel("True positive rate")
    else:
        for k, (name, s) in enumerate(scores.items()):
            RocCurveDisplay.from_predictions(y_true, s, pos_label=ANOMALY, name=name, ax=ax,
                                             plot_chance_level=k == len(scores) - 1)
    ax.set_title("ROC, Anomaly positive", fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path) -> None:
    """Write fig to path as PNG (dpi 100, tight box) atomically, creating folders, then close fig.

    In a notebook, display the figure before saving it: a closed figure is no longer shown inline.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path} must end in .png: figures are saved as PNG")
    # a temporary file in the same folder, renamed when complete: readers never see half a PNG
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def overlay_image(image, heatmap, boxes, alpha: float = 0.5) -> np.ndarray:
    """The picture to check one prediction: (H, 2W, 3) uint8, the image (H, W, 3) uint8 with its
    boxes on the left, the same with the heatmap blended in (jet) and the boxes on the right.

    heatmap (h, w) in [0, 1] at any resolution (resized bilinearly to H x W); boxes (K, 4)
    x1, y1, x2, y2 with exclusive x2, y2 in pixels of the image.
    """
    image = to_numpy(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    heatmap = to_numpy(heatmap).astype(np.float32)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must have shape (h, w), got {heatmap.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1]")
    height, width = image.shape[:2]
    heat = np.asarray(Image.fromarray(np.ascontiguousarray(heatmap)).resize((width, height), Image.BILINEAR))
    colour = plt.get_cmap("jet")(np.clip(heat, 0.0, 1.0))[..., :3] * 255.0  # (H, W, 3)
    blended = ((1 - alpha) * image + alpha * colour).round().astype(np.uint8)
    panels = [Image.fromarray(image), Image.fromarray(blended)]
    line = max(1, round(min(height, width) / 150))  # visible on a 1024 px image, thin on 64 px
    for panel in panels:
        draw = ImageDraw.Draw(panel)
        for x1, y1, x2, y2 in to_numpy(boxes).reshape(-1, 4):
            # exclusive x2, y2: the last covered pixel is x2 - 1; PIL's rectangle includes both ends
            draw.rectangle([float(x1), float(y1), max(float(x1), float(x2) - 1), max(float(y1), float(y2) - 1)],
                           outline=BOX_COLOUR, width=line)
    return np.concatenate([np.asarray(p) for p in panels], axis=1)


def save_png(array: np.ndarray, path) -> None:
    """Write an (H, W, 3) uint8 array to path as PNG, atomically, creating folders."""
    image = Image.fromarray(to_numpy(array))
    atomic_write_bytes(path, lambda f: image.save(f, format="PNG"))
