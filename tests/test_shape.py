"""Parts that are not square: image_size as [height, width], resize="pad", and padding kept out of
everything that judges the part.

The thin-defect subset is 1:3 strips (96 x 288 px) of the synthetic texture; defect images carry one
2 px wide dark line across the strip, at a known place. A pretrained MobileNetV2 patch memory (the
map of a checkpoint without a classifier) must find the line on a canvas that keeps the strip's
shape, and its box must sit around the line in the strip's own pixels. Each test's docstring names
the mutations it was seen to fail under.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from utils import calibration, dataloader, evidence, geometry, helper, inference, metrics, parameters, postprocess
from utils.checkpoint import load_checkpoint
from utils.synthetic import image_generator, make_texture

CPU = torch.device("cpu")
HEIGHT, WIDTH = 96, 288  # a 1:3 strip
LINE = (200, 202)  # the defect's columns [x1, x2) in the strip's pixels
ROWS = (12, 84)  # and its rows [y1, y2)


def strip(seed: int, index: int, defect: bool) -> tuple[np.ndarray, np.ndarray]:
    """A (96, 288, 3) uint8 strip of the synthetic texture and its (96, 288) defect mask: with
    `defect`, a 2 px wide dark line across it at LINE, ROWS."""
    image = make_texture(image_generator(seed, "train/good", index), WIDTH)[:HEIGHT].copy()
    mask = np.zeros((HEIGHT, WIDTH), bool)
    if defect:
        mask[ROWS[0]:ROWS[1], LINE[0]:LINE[1]] = True
        image[mask] = 25
    return image, mask


@pytest.fixture(scope="module")
def strips(tmp_path_factory) -> Path:
    """A subset of strips in MVTec layout: 12 good ones to train, 3 good and 3 with the line to test."""
    root = tmp_path_factory.mktemp("strips") / "strips"
    (root / "train" / "good").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(strip(0, i, False)[0]).save(root / "train" / "good" / f"{i:03d}.png")
    for i in range(3):
        for kind, defect in (("good", False), ("line", True)):
            image, mask = strip(1, i + 10 * defect, defect)
            (root / "test" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / "test" / kind / f"{i:03d}.png")
            if defect:
                (root / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root.parent


def config_of(tmp: Path, image_size, resize: str, **extra) -> dict:
    return parameters.training_config(
        data_dir=str(tmp), subset_name="strips", download=False, backbone="mobilenet_v2", pretrained=True,
        image_size=image_size, batch_size=10, epochs=10, lr=1e-4, class_weight=[1, 3], target_train_accuracy=0.98,
        test_size=0.2, seed=0, heatmap_thres=0.7, n_cv_folds=0, weights_dir=str(tmp / "weights"),
        results_dir=str(tmp / "results"), device="cpu", precision="fp32", patch_memory_size=100000,
        patch_memory_method="random", head="published", resize=resize, **extra)


def train(tmp: Path, image_size, resize: str):
    """The official split of the strips (good training images only: the patch memory alone), as
    Training.ipynb runs it. Returns (config, fold, samples, test positions, frozen)."""
    config = config_of(tmp, image_size, resize)
    samples = dataloader.index_subset(tmp, "strips")
    train_samples, test_samples = dataloader.split_subset(samples, "official", test_size=0.2, seed=0)
    images = dataloader.load_images(tmp, samples, image_size, resize=resize)
    parts = dataloader.load_parts(tmp, samples, image_size, resize)
    labels = torch.tensor([s.label for s in samples])
    template = helper.new_model(config, None, CPU, "fp32")
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=10, device=CPU,
                                precision="fp32", parts=parts, progress=False)
    test = dataloader.positions(samples, test_samples)
    fold = helper.run_fold(config, template, frozen, labels, dataloader.positions(samples, train_samples), test,
                           device=CPU, precision="fp32", progress=False)
    return config, fold, samples, test, frozen


def box_around_line(box) -> bool:
    """Whether a box [x1, y1, x2, y2] in the strip's pixels holds the line and little else across it:
    within 32 px of its columns (two 8 px patch cells at the canvas's 2/3 scale, the blur included),
    and its rows to within 12 px (one patch cell) at each end, inside the strip."""
    x1, y1, x2, y2 = box[:4]
    return x1 <= LINE[0] + 1 and x2 >= LINE[1] - 1 and x1 >= LINE[0] - 32 and x2 <= LINE[1] + 32 \
        and 0 <= y1 <= ROWS[0] + 12 and ROWS[1] - 12 <= y2 <= HEIGHT


# --- the parameters -----------------------------------------------------------------------------


def test_image_size_and_resize_refuse_wrong_values_by_name(tmp_path):
    """Mutations seen to fail it: a pair check that accepts one value ([224] passed); a side check
    without the multiple of 32 ([225, 224] passed); resize not checked ("crop" passed); pad with
    pooling "topk" accepted; the pair recorded as a tuple or the side as a list."""
    for value in ([224], [225, 224], [224, 576, 3], "224", 224.0, [32, 64]):
        with pytest.raises(ValueError, match=r"image_size=.*is invalid.*\[height, width\]") as err:
            config_of(tmp_path, value, "stretch")
        assert repr(value) in str(err.value)
    with pytest.raises(ValueError, match=r"resize='crop' is invalid: expected one of \('stretch', 'pad'\)"):
        config_of(tmp_path, 224, "crop")
    with pytest.raises(ValueError, match=r"pooling='topk' is invalid: expected 'avg' with resize='pad'"):
        config_of(tmp_path, 224, "pad", pooling="topk")
    pair = config_of(tmp_path, (224, 576), "pad")
    assert pair["image_size"] == [224, 576] and pair["resize"] == "pad"
    side = config_of(tmp_path, 224, "stretch")
    assert side["image_size"] == 224 and isinstance(side["image_size"], int) and side["resize"] == "stretch"
    assert "resize" not in parameters.TRAINING_PARAMETERS  # optional: older callers still run


def test_stretch_at_a_side_is_the_published_resize(tmp_path):
    """The square default decodes exactly as before: Pillow's bilinear resize to S x S, no parts.
    Mutations seen to fail it: fit_image resizing to (H, W) swapped for a non-square canvas; load_parts
    returning the whole canvas instead of None for "stretch"."""
    image, _ = strip(0, 0, False)
    path = tmp_path / "strip.png"
    Image.fromarray(image).save(path)
    expected = np.asarray(Image.fromarray(image).resize((64, 64), Image.BILINEAR))
    assert np.array_equal(dataloader.read_image(path, 64).permute(1, 2, 0).numpy(), expected)
    wide = np.asarray(Image.fromarray(image).resize((192, 64), Image.BILINEAR))  # (W, H) for Pillow
    assert np.array_equal(dataloader.read_image(path, [64, 192]).permute(1, 2, 0).numpy(), wide)
    samples = [dataloader.Sample(path.name, 0, "good", None)]
    assert dataloader.load_parts(tmp_path, samples, 64, "stretch") is None
    assert dataloader.load_parts(tmp_path, samples, 192, "pad").tolist() == [[64, 192]]


def test_pad_keeps_the_shape_and_the_mask_follows(tmp_path):
    """A 1:3 strip padded on a square canvas covers its top third, scaled as a whole; its mask lands
    on the same pixels. Mutations seen to fail it: the scale taken as max instead of min (the strip
    cropped); the mask stretched while the image is padded."""
    image, mask = strip(1, 10, True)
    Image.fromarray(image).save(tmp_path / "x.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "x_mask.png")
    x = dataloader.read_image(tmp_path / "x.png", 192, "pad")
    m = dataloader.read_mask(tmp_path / "x_mask.png", tmp_path / "x.png", 192, "pad")
    assert x.shape == (3, 192, 192) and m.shape == (192, 192)
    assert int(x[:, 64:].max()) == 0 and not m[64:].any()  # the padding: black, never defect
    expected = np.asarray(Image.fromarray(image).resize((192, 64), Image.BILINEAR))
    assert np.array_equal(x[:, :64].permute(1, 2, 0).numpy(), expected)
    cols = np.flatnonzero(m.any(dim=0).numpy())
    assert cols.min() == pytest.approx(LINE[0] * 2 / 3, abs=1) and cols.max() <= LINE[1] * 2 / 3 + 1
    darkest = int(x[:, 30].float().mean(dim=0).argmin())  # the line's column in the image is the mask's
    assert bool(m[30, darkest])


# --- padding kept out --------------------------------------------------------------------------


def test_padding_never_enters_the_memory_or_the_pooling():
    """Memory rows come from the part's cells only, and the top-k pooling of the evidence head sees
    the part's cells only, however hot the padding is. Mutations seen to fail it: patches_of keeping
    every cell; cells_inside counting a cell that is partly padding (rows or columns); topk_mean
    ignoring `inside` or taking k from the whole grid."""
    torch.manual_seed(0)
    size, parts = (64, 192), torch.tensor([[44, 192], [64, 100]])  # (h, w) of two images at the top-left
    frozen = helper.Frozen(torch.randn(2, 8, 4, 12), torch.randn(2, 4, 8, 24), torch.ones(2, dtype=torch.bool),
                           parts, size)
    rule = helper.PatchRule("fine", 0.0)
    emb = frozen.embeddings_of(torch.arange(2), rule)  # (2, D, 8, 24)
    # whole 8 px cells on the part: 44 px -> 5 rows, 100 px -> 12 columns
    expected = torch.cat([emb[0, :, :5, :].permute(1, 2, 0).reshape(-1, emb.shape[1]),
                          emb[1, :, :, :12].permute(1, 2, 0).reshape(-1, emb.shape[1])])
    assert torch.equal(frozen.patches_of(torch.arange(2), rule), expected)
    assert frozen.patch_images(torch.arange(2)).tolist() == [0] * (5 * 24) + [1] * (8 * 12)
    logits = torch.randn(2, 8, 24)
    inside = geometry.cells_inside(parts, size, (8, 24))
    hot = torch.where(inside, logits, torch.full_like(logits, 1e6))  # padding far hotter than the part
    pooled = evidence.topk_mean(hot, 0.05, inside)
    alone = [evidence.topk_mean(logits[:1, :5, :], 0.05), evidence.topk_mean(logits[1:, :, :12], 0.05)]
    assert torch.allclose(pooled, torch.cat(alone))


def test_padding_is_cold_on_the_maps_and_out_of_the_metrics_and_boxes():
    """A map whose padding is hotter than the part: after `grid_to_map` the padding sits at the
    part's minimum, the metrics counted on the part equal those of the part cut out, and boxes are
    cut to the part. Mutations seen to fail it: cold_padding skipped; the padding's cells not spread
    over from the part before upsampling (they bleed onto its edge); the pixel metrics or the
    pointing game ignoring `valid`; the display floor counting the padding; boxes_for_rule not
    clipping to the part."""
    size, parts = (64, 192), torch.tensor([[64, 96], [40, 192]])
    grid = torch.rand(2, 8, 24)
    grid[0, :, 12:] = 50.0  # padding cells of image 0 far hotter than the part
    maps = postprocess.grid_to_map(grid, size, parts)
    pixels = geometry.part_pixels(parts, size)
    for i in range(2):
        assert float(maps[i][~pixels[i]].max()) <= float(maps[i][pixels[i]].min())
    assert float(maps[0, :, :96].max()) < 2.0  # the hot padding did not bleed onto the part's edge
    masks = torch.zeros(2, *size, dtype=torch.bool)
    masks[0, 10:20, 30:40] = True
    hot_pad = torch.rand(2, *size)
    hot_pad[~pixels] = 10.0  # if padding counted, it would be the hottest "good" pixels of all
    part0, part1 = (hot_pad[0, :, :96], masks[0, :, :96]), (hot_pad[1, :40], masks[1, :40])
    cut = np.concatenate([part0[0].numpy().ravel(), part1[0].numpy().ravel()])
    truth = np.concatenate([part0[1].numpy().ravel(), part1[1].numpy().ravel()])
    assert metrics.pixel_auroc(hot_pad, masks, pixels) == pytest.approx(
        metrics.pixel_auroc(cut[None, None], truth[None, None]))
    assert metrics.aupro(hot_pad[:1], masks[:1], valid=pixels[:1]) == pytest.approx(
        metrics.aupro(part0[0][None], part0[1][None]))
    hot_pad[0, 15, 35] = 5.0  # the part's peak, on the defect
    assert metrics.pointing_game(hot_pad, masks, pixels) == 1.0
    floor = calibration.floors({"m": hot_pad.numpy()}, pixels)["m"]  # figures' cold level: the parts' median
    assert floor == pytest.approx(float(np.median([hot_pad[0, :, :96].median(), hot_pad[1, :40].median()])), abs=1e-3)
    everything = {"m": np.ones((2, *size), np.float32)}  # a flat map: the whole canvas is one region
    boxes = postprocess.boxes_for_rule(everything, "minmax", labels=[1, 1], heatmap_thres=0.0, parts=parts)["m"]
    assert boxes[0].tolist() == [[0, 0, 96, 64]] and boxes[1].tolist() == [[0, 0, 192, 40]]


# --- the thin defect ---------------------------------------------------------------------------


@pytest.mark.parametrize("image_size, resize", [([64, 192], "stretch"), (192, "pad")],
                         ids=["canvas-1x3", "square-padded"])
def test_a_thin_line_on_a_1x3_part_is_found_and_boxed_in_its_own_pixels(strips, image_size, resize):
    """The 2 px line across a 1:3 strip, on a canvas that keeps its shape (a 1:3 canvas, or a square
    one padded): every strip with the line scores above every good one, and its box in the strip's
    own 288 x 96 pixels sits around the line. With padding, the memory holds the part's cells only.
    Mutations seen to fail it (the padded case): boxes scaled by the canvas instead of the part (y by
    96/192); the padding's cells in the memory (the count); the parts not passed to scoring."""
    config, fold, samples, test, frozen = train(strips, image_size, resize)
    h, w = geometry.canvas(image_size)
    part_cells = (h // 8 if resize == "stretch" else 64 // 8) * (w // 8)
    n_fit = 12 - len(fold.calibration_images)  # the good training strips the memory was built from
    assert fold.memory_info["n_patches"] == n_fit * part_cells
    labels = np.array([samples[i].label for i in test.tolist()])
    score = fold.test["patch_score"]
    assert score[labels == 1].min() > score[labels == 0].max()
    checkpoint = fold.checkpoint(config, [samples[i].path for i in test.tolist()], n_train=12)
    rule = inference.box_rule(checkpoint, "patch_knn")
    results = inference.results_from_predictions(fold.test, "patch_knn", rule, inference.decision_of(checkpoint),
                                                 frozen.parts_of(test))
    for i, result in zip(test.tolist(), results):
        if samples[i].label:
            row = inference.prediction_row(samples[i].path, result, WIDTH, HEIGHT)
            assert row["label"] == "Anomaly" and box_around_line(row["boxes"][0]), row["boxes"]


def test_predict_draws_boxes_on_the_original_strips(strips, tmp_path):
    """predict.py with a padded checkpoint on the 288 x 96 strips: one overlay per strip at its own
    size, every line found and boxed around it in the strip's pixels, no box on a good strip. A
    square checkpoint saved before `resize` existed (no such key) scores the same files as one that
    says "stretch". Mutations seen to fail it: decode ignoring the checkpoint's resize (strips
    stretched onto the padded model); prediction_row scaling by the canvas size; resize_of (or the
    default) giving "pad" to a checkpoint without the key."""
    config, fold, samples, test, _ = train(strips, 192, "pad")
    padded = tmp_path / "strips_mobilenet_v2.pt"
    torch.save(fold.checkpoint(config, [samples[i].path for i in test.tolist()], n_train=12), padded)
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(padded), "--images", str(strips / "strips" / "test"), "--out", str(out),
                         "--precision", "fp32"]) == 0
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    for row in rows:
        assert (int(row["width"]), int(row["height"])) == (WIDTH, HEIGHT)
        assert Image.open(out / row["overlay"]).size == (2 * WIDTH, HEIGHT)
        boxes = json.loads(row["boxes"])
        assert all(0 <= b[0] < b[2] <= WIDTH and 0 <= b[1] < b[3] <= HEIGHT for b in boxes)
        if Path(row["path"]).parent.name == "line":
            assert row["label"] == "Anomaly" and box_around_line(boxes[0]), boxes
    # (two calibration images set no useful threshold for the good strips; their scores rank below)
    line = [float(r["image_score"]) for r in rows if Path(r["path"]).parent.name == "line"]
    assert min(line) > max(float(r["image_score"]) for r in rows if Path(r["path"]).parent.name == "good")
    assert json.loads((out / "predictions.json").read_text())["settings"]["resize"] == "pad"

    square_config, square_fold, samples, test, _ = train(strips, 64, "stretch")
    saved = square_fold.checkpoint(square_config, [samples[i].path for i in test.tolist()], n_train=12)
    stated, older = tmp_path / "stated.pt", tmp_path / "older.pt"
    torch.save(saved, stated)
    saved["config"] = {k: v for k, v in saved["config"].items() if k != "resize"}  # as written before
    torch.save(saved, older)
    _, loaded = load_checkpoint(older)  # weights_only=True
    assert "resize" not in loaded["config"] and geometry.resize_of(loaded["config"]) == "stretch"
    for name, path in (("stated", stated), ("older", older)):
        assert predict.main(["--checkpoint", str(path), "--images", str(strips / "strips" / "test"),
                             "--out", str(tmp_path / name), "--precision", "fp32"]) == 0
    read = lambda name: (tmp_path / name / "predictions.csv").read_text()  # noqa: E731
    assert read("older") == read("stated")


def test_training_sees_the_images_shapes_and_a_canvas_that_keeps_them():
    """Strips of 1240 x 500 (aspect 2.48) at the default 224 px: the summary says how squashed they
    are and suggests [height, width] canvases near their aspect, multiples of 32, one side at 224;
    tall images get tall canvases; square images get no suggestion. Mutations seen to fail it: the
    suggestion's height and width swapped; the short side not rounded to 32; the square images
    reported as squashed."""
    for keep in ("long", "short"):
        h, w = geometry.suggest_canvas(1240 / 500, 224, keep)
        assert h % 32 == 0 and w % 32 == 0 and (max(h, w) if keep == "long" else min(h, w)) == 224
        assert 1 / geometry.SQUARE_ENOUGH < (w / h) / (1240 / 500) < geometry.SQUARE_ENOUGH
        assert geometry.suggest_canvas(500 / 1240, 224, keep) == [w, h]  # the same part turned upright
    text = geometry.describe_canvas([(1240, 500)] * 5 + [(1000, 500)], 224, "stretch")
    assert "1240x500 (5)" in text and "median 2.48" in text and "100% of the images" in text
    assert f"image_size={geometry.suggest_canvas(1240 / 500, 224, 'long')}" in text
    square = geometry.describe_canvas([(300, 300)] * 4, 224, "stretch")
    assert len(square.splitlines()) == 2 and "squashed" not in square


def test_the_notebooks_train_and_evaluate_a_padded_canvas(strips, tmp_path):
    """Training.ipynb then Evaluation.ipynb on the strips with image_size=192 and resize="pad" (the
    official split: good training strips, the patch memory alone): Training prints the strips'
    shape against the canvas, the checkpoint and metrics.json record the canvas and the mode, the
    pixel metrics exist, and predictions.csv boxes each line in the strip's own pixels. Mutations
    seen to fail it: Evaluation scaling boxes by image_size instead of each image's part; Evaluation
    decoding without the checkpoint's resize."""
    pm = pytest.importorskip("papermill")
    root = Path(__file__).resolve().parents[1]
    dirs = {"data_dir": str(strips), "weights_dir": str(tmp_path / "weights"), "results_dir": str(tmp_path / "results")}
    pm.execute_notebook(root / "Training.ipynb", tmp_path / "Training.ipynb", cwd=str(root), progress_bar=False,
                        parameters={"subset_name": "strips", "download": False, "backbone": "mobilenet_v2",
                                    "image_size": 192, "resize": "pad", "split": "official", "head": "published",
                                    "patch_memory_size": 100000, "patch_memory_method": "random", **dirs})
    pm.execute_notebook(root / "Evaluation.ipynb", tmp_path / "Evaluation.ipynb", cwd=str(root), progress_bar=False,
                        parameters={"subset_name": "strips", "backbone": "mobilenet_v2", "n_samples": 2,
                                    "precision": "fp32", **dirs})
    printed = json.dumps(json.loads((tmp_path / "Training.ipynb").read_text()))
    assert "288x96 (18)" in printed and "padded, they keep their shape" in printed
    ckpt = torch.load(tmp_path / "weights" / "strips_mobilenet_v2.pt", weights_only=True)
    assert ckpt["config"]["image_size"] == 192 and ckpt["config"]["resize"] == "pad"
    report = json.loads((tmp_path / "results" / "strips_mobilenet_v2" / "metrics.json").read_text())
    assert report["image_size"] == 192 and report["resize"] == "pad" and report["pixel_auroc"] is not None
    with open(tmp_path / "results" / "strips_mobilenet_v2" / "predictions.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if "/line/" in r["path"]]
    assert len(rows) == 3
    for row in rows:
        boxes = json.loads(row["boxes"])
        assert row["label"] == "Anomaly" and box_around_line(boxes[0]), boxes
