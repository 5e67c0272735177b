"""export.py and deploy/onnx_predict.py: the ONNX graph of each kind of checkpoint gives predict.py's
answers under ONNX Runtime, the runner writes what predict.py writes, and what cannot be exported is
refused with a message.

Three checkpoints are trained here as Training.ipynb trains them (`helper.run_fold`), on a 44-image
synthetic subset at 64 px with pretrained MobileNetV2 (install.sh installs its weights): the published
head, the evidence head, both fused, and no classifier (good training images only: the patch map decides). The
graphs are exported with memory blocks of 300 rows, so the blocked nearest-neighbour search combines
several blocks. The numbers are plumbing checks, not MVTec results; benchmarks/onnx_parity.py
checks real pill.

Each check was seen to fail under a mutation of the code it guards (the mutation is named in the
test's docstring: "Fails when ...").
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import export
import predict
from deploy import onnx_predict as runner
from utils import dataloader, explain, helper, inference, onnx_export, parameters, plots, postprocess
from utils.checkpoint import load_checkpoint
from utils.constants import GOOD, IMAGE_EXTENSIONS
from utils.model import CAMClassifier, weights_file
from utils.patchknn import PatchRule, nearest_rows
from utils.synthetic import generate_synthetic_subset

ort = pytest.importorskip("onnxruntime",
                          reason="the export extra is not installed: pip install -r requirements-export.txt")

CPU = torch.device("cpu")
SIZE = 64
KINDS = ("published", "evidence", "patch_only", "auto", "fused")  # auto: the default head, whatever it chose
ROOT = Path(__file__).resolve().parents[1]




def _train(root: Path, kind: str, out: Path, image_size: int | list[int] = SIZE) -> list[dataloader.Sample]:
    """Train a checkpoint of `kind` on the synthetic subset at `root` and save it at `out`; returns
    the held-out test samples (never in the memory nor in the calibration)."""
    # the evidence head refuses the published head's knobs other than their defaults
    recipe = ({k: v for k, v in parameters.PUBLISHED_RECIPE.items() if k != "pooling"} if kind == "evidence"
              else dict(epochs=3, lr=1e-3, target_train_accuracy=None))
    config = parameters.training_config(
        data_dir=str(root), subset_name="synthetic", download=False, backbone="mobilenet_v2", pretrained=True,
        image_size=image_size, batch_size=8, class_weight=[1, 3], **recipe,
        test_size=0.3, seed=0, heatmap_thres=0.7, n_cv_folds=0, weights_dir=str(out.parent),
        results_dir=str(out.parent),
        device="cpu", precision="fp32", patch_memory_size=1000, patch_memory_method="random", calibration="holdout",
        box_min_area=4, head=kind if kind in ("evidence", "auto", "fused") else "published")
    samples = dataloader.index_subset(root, "synthetic")
    train, test = dataloader.split_samples(samples, test_size=0.3, seed=0)
    if kind == "patch_only":  # good training images alone: no classifier is trained
        train = [s for s in train if s.label == GOOD]
    images = dataloader.load_images(root, samples, image_size)
    labels = torch.tensor([s.label for s in samples])
    template = helper.new_model(config, None, CPU, "fp32")
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=16, device=CPU,
                                precision="fp32", progress=False)
    fold = helper.run_fold(config, template, frozen, labels, dataloader.positions(samples, train),
                           dataloader.positions(samples, test), device=CPU, precision="fp32", progress=False)
    torch.save(fold.checkpoint(config, [s.path for s in test], n_train=len(train)), out)
    return test


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{kind: (checkpoint path, model path, test image paths)} and the data folder."""
    if not weights_file("mobilenet_v2").is_file():
        pytest.skip("MobileNetV2's ImageNet weights are not installed: run bash install.sh")
    tmp = tmp_path_factory.mktemp("onnx")
    root = tmp / "data"
    generate_synthetic_subset(root / "synthetic", seed=0, n_train_good=20, n_test_good=6, n_per_defect=6,
                              image_size=SIZE)
    torch.manual_seed(0)
    made = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "MEMORY_BLOCK", 300)  # several blocks of the memory's rows
        for kind in KINDS:
            checkpoint, model = tmp / f"{kind}.pt", tmp / f"{kind}.onnx"
            test = _train(root, kind, checkpoint)
            assert export.main(["--checkpoint", str(checkpoint), "--out", str(model), "--no-check"]) == 0
            made[kind] = (checkpoint, model, [root / s.path for s in test])
    return made, root


def _torch_and_onnx(exported, kind):
    """predict.py's results (`inference.score_batch`), the graph's outputs and the near-tie patches
    (`onnx_export.near_ties`) of the kind's test images."""
    made, _ = exported
    checkpoint, model, files = made[kind]
    net, ckpt = load_checkpoint(checkpoint)
    images = torch.stack([dataloader.read_image(f, SIZE) for f in files])
    results = inference.score_batch(images, net, ckpt)
    outputs = onnx_export.run_session(onnx_export.session_of(model), images)
    return ckpt, results, outputs, onnx_export.near_ties(net, ckpt, images)


@pytest.mark.parametrize("kind", KINDS)
def test_the_graph_gives_predicts_scores_labels_maps_and_boxes(exported, kind):
    """Scores within 1e-4, the same labels, maps within 1e-3 and within 1e-4 of the map's own scale
    (the synthetic maps are small) away from near-tie patches of the evidence head (`near_ties`),
    the same boxes from the runner's rule on the graph's map.
    Fails when: the graph drops the patch map's blur, skips the normalisation, upsamples the evidence
    map with align_corners=True, takes squared distances (no square root), combines the memory's
    blocks by the last block's minimum, or decides on the map's box threshold."""
    ckpt, results, outputs, ties = _torch_and_onnx(exported, kind)
    threshold = float(inference.decision_of(ckpt)["threshold"])
    diff = onnx_export.compare(results, outputs, threshold, ties)
    assert diff["ok"], diff
    assert 0 < diff["n_anomaly"] < diff["n_images"]  # both labels occur: the decision is exercised
    torch_maps = np.stack([r["map"] for r in results])
    scale = float(np.abs(torch_maps).max())
    away = ~onnx_export.tie_pixels(ties, SIZE) if ties is not None else np.ones(torch_maps.shape, bool)
    assert ties is None or ties.mean() < 0.01  # near ties are rare: the exemption leaves the map checked
    np.testing.assert_allclose(outputs["map"][away], torch_maps[away], atol=1e-4 * scale, rtol=0)
    meta = runner.read_metadata({k: json.dumps(v) for k, v in onnx_export.metadata(ckpt, results[0]["localizer"],
                                                                                      "x.pt", "0").items()}, "x")
    for i, result in enumerate(results):
        boxes, scores = runner.label_boxes(outputs["map"][i], bool(outputs["label"][i]), meta["box_threshold"],
                                           meta["box_min_area"], meta["heatmap_thres"])
        np.testing.assert_array_equal(boxes, result["boxes"])
        np.testing.assert_allclose(scores, result["box_scores"], atol=onnx_export.MAP_TOLERANCE)


@pytest.mark.parametrize("kind, shown", [("published", "patch_knn"), ("published", "patch_cam"),
                                         ("published", "explain"), ("published", "layercam_s8"),
                                         ("fused", "layercam_s8")])
def test_a_published_decision_shown_on_the_patch_map_exports_as_auto_writes_it(exported, tmp_path, kind, shown):
    """head="auto" may decide with the published head (or both heads fused) and show the patch map,
    the patch map raised by the CAM, or an explanation of the decision (the synthetic subset's auto
    checkpoint decides with the patch map alone): such a checkpoint exports its chosen map, and the
    graph gives predict.py's scores, labels, maps and boxes (fused: the patch memory and the
    evidence head read the tap and the frozen output that the stride-8 gradient's pass computes).
    Fails when: the export ignores the checkpoint's chosen map, the graph's patch map beside the
    published head drops the blur, its patch_cam takes the raw CAM instead of the scaled one, its
    explanation drops the good reference or is not scaled by the probability, or the stride-8
    LayerCAM takes the gradient's negative part or is not upsampled as predict.py upsamples it; fused,
    when the explanation is scaled by the fused decision's probability instead of its own head's."""
    made, _ = exported
    checkpoint, _, files = made[kind]
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["selection"] = {"requested": "auto", "decision": kind, "head": kind, "map": shown}
    chosen, model = tmp_path / f"{kind}_{shown}.pt", tmp_path / f"{kind}_{shown}.onnx"
    torch.save(ckpt, chosen)
    assert export.main(["--checkpoint", str(chosen), "--out", str(model), "--no-check"]) == 0
    meta = runner.load_model(model).meta
    assert meta["localizer"] == shown and meta["classifier"]
    net, ckpt = load_checkpoint(chosen)
    images = torch.stack([dataloader.read_image(f, SIZE) for f in files])
    results = inference.score_batch(images, net, ckpt)
    assert {r["localizer"] for r in results} == {shown}
    outputs = onnx_export.run_session(onnx_export.session_of(model), images)
    diff = onnx_export.compare(results, outputs, float(inference.decision_of(ckpt)["threshold"]), None)
    assert diff["ok"], diff
    for i, result in enumerate(results):
        boxes, _ = runner.label_boxes(outputs["map"][i], bool(outputs["label"][i]), meta["box_threshold"],
                                      meta["box_min_area"], meta["heatmap_thres"])
        np.testing.assert_array_equal(boxes, result["boxes"])


def test_metadata_carries_the_checkpoints_thresholds(exported):
    """Fails when: the metadata's decision threshold is the box threshold, or its sha256 is not the
    checkpoint's."""
    made, _ = exported
    for kind, (checkpoint, model, _) in made.items():
        ckpt = torch.load(checkpoint, weights_only=True)
        meta = runner.load_model(model).meta
        calibration, localizer = ckpt["calibration"], inference.default_localizer(ckpt)
        assert meta["localizer"] == localizer == {"published": "cam", "evidence": "evidence", "patch_only": "patch_knn",
                                                  "auto": ckpt.get("selection", {}).get("map"), "fused": "evidence"}[kind]
        assert meta["decision"] == calibration["decision"]
        assert meta["decision_threshold"] == calibration["decision"]["threshold"]
        assert meta["false_alarm_rate"] == calibration["decision"]["false_alarm_rate"] == 0.05
        assert meta["box_threshold"] == calibration["thresholds"][localizer]
        assert meta["box_floor"] == calibration["floors"][localizer]
        assert meta["box_min_area"] == calibration["min_area"] == 4
        assert meta["heatmap_thres"] == 0.7 and meta["input_size"] == SIZE
        assert meta["class_names"] == ["Good", "Anomaly"] and meta["classifier"] == (kind != "patch_only" and
                                                                                  ckpt["classifier"])
        assert meta["checkpoint"] == {"name": checkpoint.name,
                                      "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}
        assert meta["input"]["shape"] == ["N", SIZE, SIZE, 3] and meta["input"]["dtype"] == "uint8"


def test_a_canvas_that_is_not_square_exports_and_runs_as_predict_scores_it(exported, tmp_path):
    """An evidence-head checkpoint on a 64 x 160 canvas (image_size=[64, 160], stretched: its top-k
    takes 2 of 8 x 20 patches, where 8 x 8 would give 1): export.py's own check passes, the metadata
    says (N, 64, 160, 3), the graph gives predict.py's scores, labels
    and maps, and the runner's rows (labels, boxes in the original's pixels) are predict.py's.
    Fails when: the graph's top-k counts h8 * h8 patches (scores depart), the runner resizes to
    (H, W) in Pillow's (W, H) order, or scales boxes by the height alone."""
    _, root = exported
    checkpoint, model = tmp_path / "wide.pt", tmp_path / "wide.onnx"
    test = _train(root, "evidence", checkpoint, image_size=[64, 160])
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(model)]) == 0  # with its parity check
    meta = runner.load_model(model).meta
    assert meta["input"]["shape"] == ["N", 64, 160, 3] and meta["input_size"] == [64, 160]
    net, ckpt = load_checkpoint(checkpoint)
    files = [root / s.path for s in test]
    images = torch.stack([dataloader.read_image(f, [64, 160]) for f in files])  # (N, 3, 64, 160)
    results = inference.score_batch(images, net, ckpt)
    outputs = onnx_export.run_session(onnx_export.session_of(model), images)
    assert outputs["map"].shape == (len(files), 64, 160)
    np.testing.assert_allclose(outputs["decision_score"], [r["p_anomaly"] for r in results], atol=1e-4)
    assert outputs["label"].tolist() == [int(r["label"] == "Anomaly") for r in results]
    ours, theirs = tmp_path / "onnx", tmp_path / "torch"
    folder = files[0].parents[1]  # the synthetic test folder
    assert runner.main(["--model", str(model), "--images", str(folder), "--out", str(ours)]) == 0
    assert predict.main(["--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(theirs),
                         "--precision", "fp32"]) == 0
    mine, reference = _rows(ours), _rows(theirs)
    assert len(mine) == len(reference) > 0 and any(r["label"] == "Anomaly" for r in mine)
    for a, b in zip(mine, reference):
        for key in ("path", "label", "n_boxes", "width", "height"):
            assert a[key] == b[key], (key, a, b)
        assert [box[:4] for box in json.loads(a["boxes"])] == [box[:4] for box in json.loads(b["boxes"])], a["path"]


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("kind", ("evidence", "patch_only"))
def test_the_runner_writes_what_predict_writes(exported, kind, tmp_path):
    """The same files, columns, rows, labels and boxes for the test images plus odd files (grey,
    RGBA, another size, a truncated file, a text file named .png), the same exit status.
    Fails when: the runner's boxes use the box floor as their threshold, or are not scaled to the
    original image's size."""
    made, _ = exported
    checkpoint, model, files = made[kind]
    folder = tmp_path / "line"
    for f in files:
        target = folder / f.relative_to(f.parents[2])
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f.read_bytes())
    picture = np.asarray(Image.open(files[-1]))
    (folder / "odd").mkdir()
    Image.fromarray(picture[..., 0]).save(folder / "odd" / "grey.png")
    Image.fromarray(picture).convert("RGBA").save(folder / "odd" / "rgba.png")
    Image.fromarray(picture).resize((150, 90)).save(folder / "odd" / "other_size.jpg")
    (folder / "odd" / "truncated.png").write_bytes((folder / "odd" / "grey.png").read_bytes()[:100])
    (folder / "odd" / "text.png").write_text("not an image")
    ours, theirs = tmp_path / "onnx", tmp_path / "torch"
    assert runner.main(["--model", str(model), "--images", str(folder), "--out", str(ours), "--batch-size", "4"]) == 1
    assert predict.main(["--checkpoint", str(checkpoint), "--images", str(folder), "--out", str(theirs),
                         "--precision", "fp32", "--batch-size", "4"]) == 1
    mine, reference = _rows(ours), _rows(theirs)
    assert list(mine[0]) == list(reference[0]) == list(inference.PREDICTION_COLUMNS)
    assert len(mine) == len(files) + 5 and sum(r["label"] == "Anomaly" for r in mine) > 0
    for a, b in zip(mine, reference):
        for key in ("path", "label", "n_boxes", "width", "height", "overlay"):
            assert a[key] == b[key], (key, a, b)
        assert bool(a["error"]) == bool(b["error"])
        for key in ("p_anomaly", "image_score"):
            assert (a[key] == "") == (b[key] == "") and (a[key] == "" or abs(float(a[key]) - float(b[key])) <= 1e-4)
        assert [box[:4] for box in json.loads(a["boxes"])] == [box[:4] for box in json.loads(b["boxes"])], a["path"]
        if a["overlay"]:
            assert Image.open(ours / a["overlay"]).size == Image.open(theirs / b["overlay"]).size
    report = json.loads((ours / "predictions.json").read_text())
    expected = json.loads((theirs / "predictions.json").read_text())
    assert set(report["settings"]) == set(expected["settings"])
    assert report["checkpoint"]["sha256"] == expected["checkpoint"]["sha256"]
    assert report["settings"]["decision"] == expected["settings"]["decision"]
    counts = ("n_images", "n_failed", "n_anomaly")
    assert {k: report[k] for k in counts} == {k: expected[k] for k in counts}
    assert not list(ours.rglob("*.tmp"))


def test_the_runner_repeats_the_repositorys_rules_on_hand_made_input(tmp_path, png):
    """Boxes (blobs touching diagonally, min_area, ties, a constant map, the strongest-region fallback),
    the display scale, the jet colours, file discovery and decoding, against utils' own.
    Fails when: the runner's regions are 4-connected, ignore min_area, order tied boxes against the
    region order, skip the strongest-region fallback, its jet table is off by a segment, or decoding
    ignores EXIF orientation or converts 16-bit grey with Pillow's convert."""
    rng = np.random.default_rng(0)
    maps = [np.zeros((9, 9), np.float32), np.full((6, 5), 3.0, np.float32)]
    blob = np.zeros((12, 12), np.float32)
    blob[1:3, 1:3], blob[3, 3], blob[8:11, 6:11] = 2.0, 2.0, 2.0  # a diagonal touch and a tie of maxima
    maps += [blob, rng.random((30, 20)).astype(np.float32), rng.integers(0, 3, (16, 16)).astype(np.float32)]
    for m in maps:
        for threshold in (0.5, 1.5, float(m.max())):
            for min_area in (1, 3, 9):
                for anomalous in (True, False):
                    ours = runner.label_boxes(m, anomalous, threshold, min_area, 0.7)
                    theirs = postprocess.label_boxes(m, anomalous, threshold, min_area, 0.7)
                    np.testing.assert_array_equal(ours[0], theirs[0])
                    np.testing.assert_array_equal(ours[1], theirs[1])
    for trial in range(300):  # random sizes, thresholds and areas; noise, small integers (ties), smooth blobs
        h, w = rng.integers(1, 40, 2)
        m = [rng.random((h, w)), rng.integers(0, 4, (h, w)) * 1.0,
             postprocess.gaussian_smooth(torch.from_numpy(rng.random((1, h, w))), 1.5)[0].numpy()][trial % 3].astype(np.float32)
        threshold, min_area = float(np.quantile(m, rng.random())), int(rng.integers(1, 6))
        ours = runner.label_boxes(m, True, threshold, min_area, 0.7)
        theirs = postprocess.label_boxes(m, True, threshold, min_area, 0.7)
        np.testing.assert_array_equal(ours[0], theirs[0])
        np.testing.assert_array_equal(ours[1], theirs[1])
    np.testing.assert_array_equal(runner.calibrated_display(maps[3], 0.2, 0.6),
                                  postprocess.calibrated_display(maps[3], 0.2, 0.6))
    levels = np.linspace(0, 1, 1001, dtype=np.float32)
    np.testing.assert_allclose(runner.jet(levels), plots.plt.get_cmap("jet")(levels)[:, :3] * 255.0, atol=1e-9)
    assert runner.IMAGE_EXTENSIONS == IMAGE_EXTENSIONS and runner.PREDICTION_COLUMNS == inference.PREDICTION_COLUMNS
    picture = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    png(tmp_path / "in" / "rgb.png", array=picture)
    Image.fromarray(picture).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "in" / "palette.png")
    (tmp_path / "in" / "deep").mkdir()
    Image.fromarray(picture[..., 0].astype(np.uint16) * 257).save(tmp_path / "in" / "deep" / "grey16.png")
    rotated = Image.fromarray(picture)
    exif = rotated.getexif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    rotated.save(tmp_path / "in" / "rotated.jpg", exif=exif)
    (tmp_path / "in" / ".hidden.png").write_bytes(b"")
    found = runner.find_images([tmp_path / "in", str(tmp_path / "in" / "*.png")])
    assert found == inference.find_images([tmp_path / "in", str(tmp_path / "in" / "*.png")])
    for path, name in found:
        theirs = inference.decode(path, name, SIZE)
        ours = runner.decode(path, name, SIZE)
        np.testing.assert_array_equal(ours.pixels, theirs.tensor.permute(1, 2, 0).numpy(), err_msg=name)
        np.testing.assert_array_equal(ours.display, theirs.display, err_msg=name)


def test_the_runner_needs_neither_torch_nor_this_repository():
    """deploy/onnx_predict.py imported in a fresh interpreter loads no torch, no utils, no scipy or
    matplotlib (a line PC installs onnxruntime, numpy and pillow alone).
    Fails when: the runner imports torch or anything from utils/."""
    code = ("import sys; sys.path.insert(0, 'deploy'); import onnx_predict; "
            "print([m for m in ('torch', 'utils', 'scipy', 'matplotlib') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("backbone, pooling, at_tap", [("vgg16", "avg", False), ("vgg16", "topk", False),
                                                       ("mobilenet_v2", "avg", False), ("mobilenet_v2", "max", False),
                                                       ("vgg16", "topk", True), ("mobilenet_v2", "avg", True)])
def test_the_exported_decision_gradient_is_autograds(backbone, pooling, at_tap):
    """The published head's gradient at the frozen output (`onnx_export.DecisionGradient`, what the
    graph's `explain` map is made of), and at the stride-8 tap through the frozen layers after it
    (`layercam_s8`'s), is the one `explain.explanation_maps` takes with autograd, in PyTorch and
    under ONNX Runtime: through VGG16's ReLUs and max pooling and MobileNetV2's BatchNorms, ReLU6s,
    depthwise convolutions and residuals, under each pooling, on a canvas that is not square, for a
    batch of another size than the one traced (random weights: plumbing, not results).
    Fails when: the convolution's input gradient ignores its groups or its output padding (a
    stride-2 convolution's output has half the rows of its input: which size it came from is lost),
    the trace fixes the batch size, or the tap's gradient skips the frozen layers after the tap."""
    torch.manual_seed(0)
    model = CAMClassifier(backbone, pretrained=False, pooling=pooling).eval()
    tap = model.spec.taps[0] if at_tap else None
    zeros = torch.zeros(2, 3, 64, 96)
    with torch.no_grad():
        example = model.frozen[:tap + 1](zeros) if at_tap else model.frozen_features(zeros)[0]
    traced = onnx_export.DecisionGradient(model, example, tap).eval()
    assert all(p.requires_grad for p in model.trainable.parameters())  # the model is left as it was
    assert not any(p.requires_grad for p in model.frozen.parameters())
    x = torch.randn(3, *example.shape[1:]).abs()
    with torch.enable_grad():
        leaf = x.clone().requires_grad_(True)
        frozen = model.frozen[tap + 1:](leaf) if at_tap else leaf
        scores, maps = model.head(frozen)
        expected, = torch.autograd.grad(explain.decision_margin(scores).sum(), (leaf,))
    got = traced(x)
    torch.testing.assert_close(got[0], scores.detach(), rtol=0, atol=0)
    torch.testing.assert_close(got[2], expected, rtol=0, atol=0)
    torch.testing.assert_close(got[3], frozen.detach(), rtol=0, atol=0)
    scale = float(expected.abs().max())
    assert scale > 0
    program = torch.onnx.export(traced, (example,), None, dynamo=True, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    session = onnx_export.session_of(program.model_proto.SerializeToString())
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(outputs[2], expected.numpy(), rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("rows, block", [(50, 7), (300, 256)])  # one argmin per block; runs of 32 in a block
def test_the_blocked_nearest_neighbour_search_is_patchknns(rows, block):
    """Nearest rows over several blocks, duplicate rows across blocks included (the first one wins,
    as one argmin over all rows): the residual and the distance of `patchknn.nearest_rows`.
    Fails when: the blocks are combined by the last block's minimum, or the lookup ignores the block."""
    generator = torch.Generator().manual_seed(0)
    memory = torch.randn(rows, 6, generator=generator) * 3
    memory[41] = memory[3]  # the same row in two blocks
    queries = torch.cat([torch.randn(40, 6, generator=generator) * 3, memory[[3, 17, 45]]])
    search = onnx_export.NearestMemory(memory, block=block)
    residual, distance = search(queries)
    index, expected = nearest_rows(queries, memory)
    torch.testing.assert_close(distance, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(residual, queries - memory[index], atol=1e-5, rtol=1e-5)
    assert float(distance[-3:].abs().max()) < 1e-5  # a memory row finds itself


def test_the_exported_search_keeps_the_form_onnx_runtime_runs_fast():
    """The graph's search, exported alone over 4096 rows (two blocks of 2048): no Gemm (its bias is
    broadcast into the score matrix before the product), no ArgMin reads more than 64 columns (one
    ArgMin over a block's 2048 scores took 3-4x the run-wise search's time), none keeps its reduced
    axis (`keepdims=1` over the blocks' minima tripled batch 16's peak memory), and one Gather looks
    the nearest rows up. docs/export.md ("The floor the search sets") has the measurements.
    Fails when: the blocks go back to addmm with a bias, to one argmin per block, to argmin with
    keepdim=True, or to the column-by-column lookup from the transposed blocks."""
    onnx = pytest.importorskip("onnx")
    generator = torch.Generator().manual_seed(0)
    memory, queries = torch.randn(4096, 16, generator=generator), torch.randn(50, 16, generator=generator)
    with torch.no_grad():
        program = torch.onnx.export(onnx_export.NearestMemory(memory), (queries,), None, input_names=["queries"],
                                    dynamo=True, verbose=False)
    model = onnx.shape_inference.infer_shapes(program.model_proto)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    nodes = model.graph.node
    assert not [n for n in nodes if n.op_type == "Gemm"]
    argmins = [n for n in nodes if n.op_type == "ArgMin"]
    assert len(argmins) == 2 * 2 + 1  # per block: over the runs, within the run; then over the blocks
    for n in argmins:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs.get("keepdims", 1) == 0, n.name
        assert shapes[n.input[0]][attrs.get("axis", 0)] <= 64, (n.name, shapes[n.input[0]])
    lookups = [n for n in nodes if n.op_type == "Gather" and any(len(shapes.get(o, [])) == 2 and shapes[o][1] == 16
                                                                for o in n.output)]
    assert len(lookups) == 1


def test_map_departures_are_excused_only_next_to_a_near_tie():
    """A near-tie patch excuses its own cell and the 8 cells around it (the bilinear upsampling's
    reach), nothing else; a departing score is never excused. The explanation is held to its own target.
    Fails when: `tie_pixels` forgets the neighbouring cells, excuses every pixel of an image with a
    tie, or the looser target of the explanation is given to every map."""
    ties = np.zeros((1, 4, 4), bool)
    ties[0, 1, 2] = True  # cell (1, 2) of a 4 x 4 grid of 8 px cells
    expected = np.zeros((1, 32, 32), bool)
    expected[0, 0:24, 8:32] = True
    np.testing.assert_array_equal(onnx_export.tie_pixels(ties, 32), expected)
    results = [{"decision_score": 0.5, "image_score": 0.5, "label": "Good", "map": np.zeros((32, 32), np.float32),
                "localizer": "evidence"}]
    outputs = {"decision_score": np.array([0.5], np.float32), "image_score": np.array([0.5], np.float32),
               "label": np.array([0]), "map": np.zeros((1, 32, 32), np.float32)}
    outputs["map"][0, 20, 30] = 1.0  # next to the tie
    diff = onnx_export.compare(results, outputs, 0.9, ties)
    assert diff["ok"] and diff["map_pixels_beyond"] == 1 and diff["map_pixels_beyond_away_from_ties"] == 0
    outputs["map"][0, 31, 0] = 1.0  # far from it
    assert not onnx_export.compare(results, outputs, 0.9, ties)["ok"]
    assert not onnx_export.compare(results, {**outputs, "map": np.zeros((1, 32, 32), np.float32),
                                             "decision_score": np.array([0.5002], np.float32)}, 0.9, ties)["ok"]
    # the explanation's target is looser (a gradient jumps where a unit crosses its ReLU's kink):
    # a departure of 0.005 is within it, not within the CAM's
    near = {**outputs, "map": np.full((1, 32, 32), 0.005, np.float32)}
    assert onnx_export.compare([{**results[0], "localizer": "explain"}], near, 0.9)["ok"]
    assert not onnx_export.compare([{**results[0], "localizer": "cam"}], near, 0.9)["ok"]


def test_what_cannot_be_exported_is_refused_with_a_message(exported, tmp_path, capsys):
    """Fails when: the exporter accepts an explanation map other than `explain`, an unknown head or a checkpoint without
    the calibrated decision, or starts without the export extra's packages."""
    made, _ = exported
    published, evidence = made["published"][0], made["evidence"][0]
    ckpt = torch.load(published, weights_only=True)
    cases = {
        "gradient": (published, ["--localizer", "gradcam_s8"], "needs the gradient of the decision at a layer"),
        "explanation": (published, ["--localizer", "gradcam"], "export the checkpoint's default map ('cam'"),
        "unknown map": (published, ["--localizer", "heat"], "not a map this repository exports"),
        "evidence map of a published head": (published, ["--localizer", "evidence"], "has no evidence head"),
    }
    edits = {
        "older format": (lambda c: c.pop("format"), "not a checkpoint of this repository"),
        "no decision": (lambda c: c["calibration"].pop("decision"), "predates the calibrated decision"),
        "no box threshold": (lambda c: c["calibration"]["thresholds"].pop("cam"),
                             "no calibrated thresholds for the map 'cam'"),
        "unknown head": (lambda c: c["config"].update(head="mystery"),
                         "head 'mystery', which the exporter does not know"),
        "padded input": (lambda c: c["config"].update(resize="pad"), "the runner stretches images"),
    }
    for name, (edit, message) in edits.items():
        edited = {**ckpt, "config": dict(ckpt["config"]),
                  "calibration": {**ckpt["calibration"], "thresholds": dict(ckpt["calibration"]["thresholds"])}}
        edit(edited)
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(edited, path)
        cases[name] = (path, [], message)
    for name, (checkpoint, extra, message) in cases.items():
        out = tmp_path / "refused.onnx"
        status = export.main(["--checkpoint", str(checkpoint), "--out", str(out), "--no-check", *extra])
        err = capsys.readouterr().err
        assert status == 2 and message in err, (name, err)
        assert not out.exists(), name
    real_find_spec = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as patch:  # a machine without the export extra's onnxruntime
        patch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "onnxruntime" else real_find_spec(name, *a))
        assert export.main(["--checkpoint", str(published), "--out", str(tmp_path / "x.onnx")]) == 2
        assert "needs onnxruntime: pip install -r requirements-export.txt" in capsys.readouterr().err
    with pytest.raises(onnx_export.ExportError, match="image_size=\\[64\\]"):
        onnx_export.check_exportable({**ckpt, "config": {**ckpt["config"], "image_size": [64]}}, "cam")
    evidence_ckpt = torch.load(evidence, weights_only=True)
    with pytest.raises(onnx_export.ExportError, match="no patch memory"):
        onnx_export.check_exportable({k: v for k, v in evidence_ckpt.items() if k != "patch_memory"}, "evidence")


def test_export_checks_the_graph_and_the_runner_refuses_other_models(exported, tmp_path, capsys, monkeypatch):
    """export.py's own check passes on real files and stops a graph that disagrees (nothing written);
    the runner refuses an ONNX file without this repository's metadata.
    Fails when: export.py's check lets a disagreeing graph through (another checkpoint's graph), or
    the runner scores a foreign model."""
    made, root = exported
    checkpoint, model, files = made["evidence"]
    out = tmp_path / "checked.onnx"
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(out), "--check", *map(str, files[:6])]) == 0
    assert "check on 6 images" in capsys.readouterr().out and out.is_file()
    # a graph that disagrees: the published head's, in place of the evidence head's
    other = made["published"][1].read_bytes()
    monkeypatch.setattr(onnx_export, "export_checkpoint", lambda *args, **kwargs: other)
    bad = tmp_path / "bad.onnx"
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(bad), "--check", *map(str, files)]) == 1
    assert "disagrees with predict.py" in capsys.readouterr().err and not bad.exists()
    import onnx
    foreign = onnx.load(str(model))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    status = runner.main(["--model", str(tmp_path / "foreign.onnx"), "--images", str(files[0]),
                          "--out", str(tmp_path / "o")])
    assert status == 2 and "not a model exported by export.py" in capsys.readouterr().err
    assert runner.main(["--model", str(tmp_path / "missing.onnx"), "--images", str(files[0]),
                        "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_real_pill_parity_of_every_kind(real_mvtec_dir, tmp_path):
    """benchmarks/onnx_parity.py --quick --explain on real pill (MobileNetV2, 224 px, each kind trained
    on 17 images and checked on 11 held-out ones, the published head with its two exported explanations too): scores within 1e-4, maps within 1e-3 away from near
    ties, the same labels and boxes, from the graph and end to end from the files. About a minute on
    2 cores; skipped without the real images. The full check of both backbones is the script's
    default run (docs/export.md)."""
    if not (real_mvtec_dir / "pill").is_dir():
        pytest.skip(f"{real_mvtec_dir / 'pill'} not found: this test needs the real MVTec AD pill images")
    if not weights_file("mobilenet_v2").is_file():
        pytest.skip("MobileNetV2's ImageNet weights are not installed: run bash install.sh")
    spec = importlib.util.spec_from_file_location("onnx_parity_under_test", ROOT / "benchmarks" / "onnx_parity.py")
    parity = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = parity
    spec.loader.exec_module(parity)
    report = parity.main(["--quick", "--explain", "--data-dir", str(real_mvtec_dir), "--work-dir", str(tmp_path)])
    assert [r["kind"] for r in report["results"]] == [*KINDS, "published", "published"]
    assert [r["localizer"] for r in report["results"][-2:]] == ["explain", "layercam_s8"]
    assert report["all_ok"], json.dumps(report["results"], indent=1)
