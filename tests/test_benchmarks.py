"""The benchmark of the whole Training.ipynb compares like with like: its plain loop trains on the
images the notebook trains on, and the notebook reads a folder holding exactly the chosen images."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from utils.dataloader import index_subset, split_subset
from utils.synthetic import generate_synthetic_subset

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str = "benchmark"):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_mirror_holds_exactly_the_chosen_images_and_the_split_matches_the_notebooks(tmp_path):
    bench = load_benchmark()
    data = tmp_path / "data"
    generate_synthetic_subset(data / "synth", seed=0, n_train_good=6, n_test_good=3, n_per_defect=3, image_size=32)
    samples = index_subset(data, "synth")
    chosen = samples[: len(samples) - 4]  # the first N, as --n-images picks them
    mirror = tmp_path / "mirror"
    bench.mirror_samples(data, chosen, mirror)

    seen = index_subset(mirror, "synth")  # what Training.ipynb indexes in the mirrored folder
    assert [s.path for s in seen] == [s.path for s in chosen]
    assert [s.mask_path for s in seen] == [s.mask_path for s in chosen]
    assert all((mirror / s.mask_path).is_file() for s in seen if s.mask_path)

    # the plain loop's images are the training split Training.ipynb draws from the mirror (test_size 0.2, seed)
    args = SimpleNamespace(seed=3)
    notebook_train, _ = split_subset(seen, "pooled", test_size=0.2, seed=3)
    assert [s.path for s in bench.notebook_train_split(chosen, args)] == [s.path for s in notebook_train]
    assert len(notebook_train) < len(chosen)


def test_official_split_study_measures_the_rules_the_library_runs():
    """The lever study's own embedding code is the library's for the rule before it and the default
    since: its table describes the map Training builds."""
    import torch

    from utils.patchknn import PatchRule

    study = load_benchmark("official_split")
    g = torch.Generator().manual_seed(0)
    taps = {6: torch.randn(2, 32, 8, 8, generator=g), 13: torch.randn(2, 96, 4, 4, generator=g)}
    before, default = study.BEFORE, study.DEFAULT
    torch.testing.assert_close(study.embed(taps, before.layers, before.aggregation),
                               PatchRule("both").embed(taps[6], taps[13]))
    torch.testing.assert_close(study.embed(taps, default.layers, default.aggregation),
                               PatchRule().embed(taps[6], taps[13]))
    assert default.sigma == PatchRule().sigma and before.sigma == 0
    # PatchCore's aggregation keeps each position's 3x3 neighbourhood: a one-cell change moves 9 rows
    moved = dict(taps)
    moved[6] = taps[6].clone()
    moved[6][0, :, 4, 4] += 1
    diff = (study.embed(moved, (6, 13), "patchcore") - study.embed(taps, (6, 13), "patchcore")).abs().sum(dim=1)
    assert int((diff[0] > 0).sum()) == 9 and not bool((diff[1] > 0).any())


def test_the_cost_breakdown_of_auto_times_every_stage_of_the_choice(tmp_path):
    """auto_cost.py times the functions head="auto" calls, not copies of them: the candidate
    memories with their nearest-row search, both heads' out-of-fold fits and the map metrics each
    count their calls, and the selection's seconds are at least those of its stages.
    Fails when: a stage is wrapped where the caller does not look it up (its calls stay 0), or the
    report drops the fold's stage seconds."""
    import shutil

    root = generate_synthetic_subset(tmp_path / "synth", seed=0, n_train_good=8, n_test_good=4, n_per_defect=4,
                                     image_size=64)
    # Two defect images of each type among the good training images: their patches enter the memory,
    # the patch map misses their kind, and auto fits both heads (a perfect patch map would skip them).
    for kind in sorted(p for p in (root / "test").iterdir() if p.name != "good"):
        for image in sorted(kind.glob("*.png"))[:2]:
            shutil.move(image, root / "train" / "good" / f"{kind.name}_{image.name}")
    cost = load_benchmark("auto_cost")
    out = tmp_path / "cost.json"
    report = cost.main(["--data-dir", str(tmp_path), "--subset", "synth", "--n-images", "60", "--backbone",
                        "mobilenet_v2", "--epochs", "1", "--precision", "fp32", "--out", str(out)])
    functions = report["functions"]
    for name in ("_candidates", "nearest_rows", "_oof_evidence", "train_head", "_oof_published", "map_evidence",
                 "image_shares"):
        assert functions[name]["calls"] > 0, name
    stages = functions["_candidates"]["seconds"] + functions["_oof_evidence"]["seconds"]
    assert report["stage_seconds"]["selection"] >= stages - functions["build_patch_memory"]["seconds"]
    assert out.is_file() and report["decision"] in ("patch_knn", "evidence", "published")


def test_the_evidence_step_benchmark_trains_the_same_head_every_way():
    """The ways evidence_step_cost.py times are one function: trained from the same start on the
    same residuals they end at the same patch logits (rounding apart), and with or without the
    buffer at the same weights (40 images: a short last chunk).
    Fails when: the reference form drifts from `EvidenceHead.parts` (its timing would compare
    different work), the buffer trains other weights than fresh copies (a chunk not copied into
    it), or a way leaves the library's `parts` patched after it."""
    from utils import evidence

    original = evidence.EvidenceHead.parts
    report = load_benchmark("evidence_step_cost").main(["--images", "40", "--dims", "12", "--steps", "3"])
    assert report["rows"][0]["largest_logit_difference"] < 1e-4
    assert report["rows"][0]["buffer_weights_identical"] is True
    assert evidence.EvidenceHead.parts is original


def test_the_argmin_run_benchmark_times_ways_that_find_argmins_index():
    """Fails when: a run length of first_argmin finds another index than argmin (the timing would
    compare different answers), or a requested length is not turned into a divisor of the rows."""
    report = load_benchmark("argmin_run").main(["--queries", "40", "--rows", "300", "--runs", "16", "128",
                                                "--repeats", "2"])
    assert [(r["way"], r["run"]) for r in report["rows"]] == [("argmin", 1), ("run 16", 15), ("run 128", 100)]
    assert all(r["same_index"] for r in report["rows"])


def test_the_search_floor_benchmark_times_the_exported_search():
    """Fails when: onnx_search_floor.py stops exporting the library's search (or its figures do not
    bound the images/s), or the plain form it compares against finds other rows."""
    pytest.importorskip("onnxruntime")
    report = load_benchmark("onnx_search_floor").main(["--rows", "256", "--dims", "8", "--repeats", "2"])
    row = report["rows"][0]
    assert row["images_per_second_at_most"] == pytest.approx(1e3 / row["search_ms"])
    assert row["gflop_per_image"] == pytest.approx(2 * 784 * 256 * 8 / 1e9)
    assert row["same_lengths"] and row["plain_over_search"] == pytest.approx(row["plain_search_ms"] / row["search_ms"])


def test_the_map_fusion_benchmark_measures_the_maps_the_library_makes():
    """The forms map_fusion.py compares, on hand-made maps: the CAM and patch_cam are the library's
    (`localizers`), and the scaled forms divide by the good images' 99th percentile.
    Fails when: the benchmark's patch_cam or CAM drifts from what predict.py shows (its figures would
    describe another map), or the scale is taken from the defective images."""
    import numpy as np

    from utils import localizers

    fusion = load_benchmark("map_fusion")
    cam_raw = np.array([[[0.0, 4.0], [2.0, 4.0]], [[1.0, 3.0], [3.0, 1.0]]], dtype=np.float32)
    p = np.array([0.5, 0.1], dtype=np.float32)
    patch = np.array([[[1.0, 2.0], [3.0, 4.0]], [[0.5, 1.0], [1.0, 2.0]]], dtype=np.float32)
    good = np.array([False, True])
    out = fusion.forms(cam_raw, p, patch, good)
    np.testing.assert_allclose(out["cam"], localizers.localizer_maps(cam_raw, p, patch)["cam"])
    np.testing.assert_allclose(out["patch_cam"], localizers.localizer_maps(cam_raw, p, patch)["patch_cam"])
    # by hand: image 0's CAM peak (min-max 1, p = 0.5) raises its patch by half
    np.testing.assert_allclose(out["patch_cam"][0], [[1.0, 3.0], [3.75, 6.0]])
    scale = np.quantile(patch[1], 0.99)  # the good image's pixels only
    # image 0's top-left pixel: its CAM is 0 there, so the scaled sum is the patch's 1 over that scale
    np.testing.assert_allclose(out["scaled patch + 1 x scaled cam"][0][0, 0], 1.0 / scale, rtol=1e-6)


def test_the_notebook_ways_run_with_the_weights_file_they_are_given(tmp_path, monkeypatch):
    """`--vgg16-weights` reaches the notebook in every way's own process: the parent forwards it to
    the child it spawns, and the child hands it to Training.ipynb as `backbone_weights` with
    `pretrained=True` (a flag dropped on either hop would time random weights under the file's name)."""
    import json
    import subprocess

    import papermill

    bench = load_benchmark()
    weights = tmp_path / "vgg16.pth"
    weights.write_bytes(b"")
    args = bench.parse_args(["--ways", "notebook_auto", "--vgg16-weights", str(weights)])

    spawned = []

    def fake_child(cmd, **kwargs):
        spawned.append(cmd)
        Path(cmd[cmd.index("--child-out") + 1]).write_text("{}")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", fake_child)
    bench.spawn_way("notebook_auto", args, tmp_path, "synth")
    child_args = bench.parse_args(spawned[0][2:])
    assert child_args.only == "notebook_auto" and Path(child_args.vgg16_weights) == weights.resolve()

    given = {}

    def fake_notebook(source, output, parameters, **kwargs):
        given.update(parameters)
        results = Path(parameters["results_dir"]) / "run"
        results.mkdir(parents=True)
        (results / "training.json").write_text(json.dumps(
            {"stage_seconds": {"decode": 0.0, "frozen_pass": 0.0, "epochs": 0.0}, "peak_rss_mib": 0,
             "frozen_cache_mib": 0}))

    monkeypatch.setattr(papermill, "execute_notebook", fake_notebook)
    data = tmp_path / "data"
    generate_synthetic_subset(data / "synth", seed=0, n_train_good=2, n_test_good=1, n_per_defect=1, image_size=32)
    bench.run_training_notebook(child_args, data, index_subset(data, "synth"), head="auto")
    assert given["backbone_weights"] == str(weights.resolve()) and given["pretrained"] is True
    assert given["head"] == "auto"

    bench.run_training_notebook(bench.parse_args([]), data, index_subset(data, "synth"))
    assert given["backbone_weights"] is None and given["pretrained"] is False  # random weights, as before
