"""Tests of the synthetic MVTec-format subset generator."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from utils import synthetic
from utils.synthetic import (
    SYNTHETIC_DEFECT_TYPES,
    draw_defect,
    generate_synthetic_subset,
    image_generator,
    make_texture,
)

SMALL = dict(n_train_good=4, n_test_good=2, n_per_defect=2, image_size=64)
EXPECTED_FILES = {
    "train/good/000.png", "train/good/001.png", "train/good/002.png", "train/good/003.png",
    "test/good/000.png", "test/good/001.png",
    "test/crack/000.png", "test/crack/001.png",
    "test/scratch/000.png", "test/scratch/001.png",
    "test/spot/000.png", "test/spot/001.png",
    "ground_truth/crack/000_mask.png", "ground_truth/crack/001_mask.png",
    "ground_truth/scratch/000_mask.png", "ground_truth/scratch/001_mask.png",
    "ground_truth/spot/000_mask.png", "ground_truth/spot/001_mask.png",
    ".synthetic.json",
}


@pytest.fixture(scope="module")
def small_subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_subset(tmp_path_factory.mktemp("small") / "synthetic", seed=0, **SMALL)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_public_constants_and_defaults():
    assert SYNTHETIC_DEFECT_TYPES == ("crack", "scratch", "spot")
    defaults = generate_synthetic_subset.__defaults__
    assert defaults == (42, 60, 20, 20, 256, False)


def test_layout_and_counts(small_subset: Path):
    assert set(_files(small_subset)) == EXPECTED_FILES
    for path in small_subset.glob("t*/*/*.png"):
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (64, 64), path
    for kind in SYNTHETIC_DEFECT_TYPES:
        for index in range(2):
            with Image.open(small_subset / "ground_truth" / kind / f"{index:03d}_mask.png") as mask:
                assert mask.mode == "L" and mask.size == (64, 64)
                values = np.asarray(mask)
            assert set(np.unique(values)) <= {0, 255}
            assert (values == 255).sum() > 0
    assert not (small_subset / "ground_truth" / "good").exists()
    marker = json.loads((small_subset / ".synthetic.json").read_text())
    assert marker["seed"] == 0 and marker["n_train_good"] == 4 and marker["image_size"] == 64


def test_same_seed_gives_identical_bytes_other_seed_differs(small_subset: Path, tmp_path: Path):
    again = generate_synthetic_subset(tmp_path / "again" / "synthetic", seed=0, **SMALL)
    assert _files(again) == _files(small_subset)
    other = _files(generate_synthetic_subset(tmp_path / "other" / "synthetic", seed=1, **SMALL))
    for name, content in _files(small_subset).items():
        if name.endswith(".png"):
            assert other[name] != content, name


def test_more_images_leave_earlier_ones_unchanged(small_subset: Path, tmp_path: Path):
    larger = generate_synthetic_subset(tmp_path / "synthetic", seed=0, n_train_good=6, n_test_good=3,
                                       n_per_defect=3, image_size=64)
    larger_files = _files(larger)
    for name, content in _files(small_subset).items():
        if name.endswith(".png"):
            assert larger_files[name] == content, name


def test_mask_is_exactly_the_changed_pixels(small_subset: Path):
    for kind in SYNTHETIC_DEFECT_TYPES:
        for index in range(2):
            image = _load(small_subset / "test" / kind / f"{index:03d}.png").astype(int)
            mask = _load(small_subset / "ground_truth" / kind / f"{index:03d}_mask.png") > 0
            texture = make_texture(image_generator(0, f"test/{kind}", index), 64).astype(int)
            changed = (image != texture).any(axis=2)
            np.testing.assert_array_equal(changed, mask)
            # Defects are near-black or near-white on a mid-tone surface (texture values 70..200).
            grey = image.mean(axis=2)
            assert abs(grey[mask].mean() - grey[~mask].mean()) > 60


def test_good_images_are_plain_textures(small_subset: Path):
    image = _load(small_subset / "test" / "good" / "001.png")
    np.testing.assert_array_equal(image, make_texture(image_generator(0, "test/good", 1), 64))


def test_make_texture_is_a_moderate_mid_tone_surface():
    texture = make_texture(np.random.default_rng(3), 256)
    assert texture.shape == (256, 256, 3) and texture.dtype == np.uint8
    assert texture.min() >= 70 and texture.max() <= 200
    assert 2 < texture.astype(float).std() < 25  # textured, yet far below the ~100 grey levels of a defect
    np.testing.assert_array_equal(texture, make_texture(np.random.default_rng(3), 256))


@pytest.mark.parametrize("kind", SYNTHETIC_DEFECT_TYPES)
def test_draw_defect_on_flat_grey(kind: str):
    grey = np.full((64, 64, 3), 128, dtype=np.uint8)
    image, mask = draw_defect(grey, kind, np.random.default_rng(5))
    assert mask.shape == (64, 64) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}
    np.testing.assert_array_equal((image != 128).any(axis=2), mask > 0)
    painted = image[mask > 0]  # (N, 3)
    assert ((painted <= 45).all(axis=1) | (painted >= 220).all(axis=1)).all()
    if kind == "crack":
        assert (painted <= 45).all()
    np.testing.assert_array_equal(grey, 128)  # the input is not modified


@pytest.mark.parametrize("kind", SYNTHETIC_DEFECT_TYPES)
def test_defects_are_large_enough_at_256_px(kind: str):
    for index in range(5):
        rng = np.random.default_rng([9, index])
        _, mask = draw_defect(make_texture(rng, 256), kind, rng)
        small = np.asarray(Image.fromarray(mask).resize((64, 64), Image.BOX)) > 127
        assert small.mean() >= 0.005 and (mask > 0).mean() >= 0.01, (kind, index)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="defect type"):
        draw_defect(np.zeros((64, 64, 3), np.uint8), "dent", np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_per_defect"):
        generate_synthetic_subset(Path("unused"), n_per_defect=0)
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic_subset(Path("unused"), image_size=16)
    assert not Path("unused").exists()


def test_second_call_does_no_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = generate_synthetic_subset(tmp_path / "synthetic", seed=0, **SMALL)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def fail(*args, **kwargs):
        raise AssertionError("regenerated an up-to-date subset")

    monkeypatch.setattr(synthetic, "write_png", fail)
    assert generate_synthetic_subset(tmp_path / "synthetic", seed=0, **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    assert os.listdir(tmp_path) == ["synthetic"]  # no temporary folder left behind


def test_other_settings_raise_unless_overwrite(tmp_path: Path):
    root = generate_synthetic_subset(tmp_path / "synthetic", seed=0, **SMALL)
    with pytest.raises(ValueError, match="overwrite=True") as error:
        generate_synthetic_subset(root, seed=1, **SMALL)
    assert "'seed': 0" in str(error.value) and "'seed': 1" in str(error.value)
    generate_synthetic_subset(root, seed=1, overwrite=True, **SMALL)
    assert json.loads((root / ".synthetic.json").read_text())["seed"] == 1
    fresh = generate_synthetic_subset(tmp_path / "fresh" / "synthetic", seed=1, **SMALL)
    assert _files(root) == _files(fresh)
    assert sorted(os.listdir(tmp_path)) == ["fresh", "synthetic"]


def test_foreign_folder_raises_and_empty_folder_is_used(tmp_path: Path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a synthetic subset")
    with pytest.raises(ValueError, match="no synthetic marker"):
        generate_synthetic_subset(foreign, **SMALL)
    assert os.listdir(foreign) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_synthetic_subset(empty, **SMALL)
    assert set(_files(empty)) == EXPECTED_FILES


def _fail_after(count: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the image writer raise once it has written `count` files."""
    real_write = synthetic.write_png
    calls = []

    def flaky(array: np.ndarray, path: Path) -> None:
        if len(calls) == count:
            raise RuntimeError("disk full")
        calls.append(path)
        real_write(array, path)

    monkeypatch.setattr(synthetic, "write_png", flaky)


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _fail_after(5, monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_synthetic_subset(tmp_path / "synthetic", seed=0, **SMALL)
    assert os.listdir(tmp_path) == []


def test_interrupted_overwrite_keeps_the_old_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = generate_synthetic_subset(tmp_path / "synthetic", seed=0, **SMALL)
    old = _files(root)
    _fail_after(5, monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        generate_synthetic_subset(root, seed=1, overwrite=True, **SMALL)
    assert _files(root) == old
    assert os.listdir(tmp_path) == ["synthetic"]


def test_a_trivial_classifier_separates_good_from_defective(tmp_path: Path):
    """Learnability proxy: after a 4x downsizing (like 256 -> 64 px) defects still stand out."""
    root = generate_synthetic_subset(tmp_path / "synthetic", seed=7, n_train_good=30, n_test_good=1,
                                     n_per_defect=10, image_size=64)
    paths = sorted(root.glob("train/good/*.png")) + sorted(root.glob("test/[!g]*/*.png"))
    labels = np.array([int(p.parent.name != "good") for p in paths])
    assert labels.tolist().count(0) == 30 and labels.tolist().count(1) == 30
    features = []
    for path in paths:
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L").resize((16, 16), Image.BOX), dtype=float)
        deviation = np.abs(grey - np.median(grey))  # (16, 16) distance from the surface's own tone
        features.append(np.histogram(deviation, bins=8, range=(0, 128))[0] / deviation.size)
    x_fit, x_held, y_fit, y_held = train_test_split(np.array(features), labels, test_size=0.3,
                                                    stratify=labels, random_state=0)
    classifier = make_pipeline(StandardScaler(), LogisticRegression()).fit(x_fit, y_fit)
    assert classifier.score(x_held, y_held) >= 0.9
