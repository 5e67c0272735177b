"""Tests of utils.dataloader: indexing MVTec-format folders, splits, image/mask reading and bad input."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.model_selection import StratifiedKFold

from utils.constants import ANOMALY, GOOD
from utils.dataloader import (
    Sample,
    batch_order,
    check_both_classes,
    index_subset,
    kfold_splits,
    load_images,
    load_masks,
    normalise,
    read_image,
    read_mask,
    split_samples,
    split_subset,
    summarise,
)
from utils.synthetic import generate_synthetic_subset

# The hand-built subset "widget" below, indexed by hand: train before test, type folders and files sorted.
WIDGET_SAMPLES = [
    Sample("widget/train/good/a.png", GOOD, "good", None),
    Sample("widget/train/good/b.png", GOOD, "good", None),
    Sample("widget/test/crack/000.png", ANOMALY, "crack", "widget/ground_truth/crack/000_mask.png"),
    Sample("widget/test/good/c.png", GOOD, "good", None),
    Sample("widget/test/scratch/000.png", ANOMALY, "scratch", "widget/ground_truth/scratch/000_mask.png"),
    Sample("widget/test/scratch/001.JPG", ANOMALY, "scratch", "widget/ground_truth/scratch/001_mask.png"),
]


@pytest.fixture
def widget(tmp_path: Path, png) -> Path:
    """A tiny MVTec-format subset `tmp_path/widget`, files created out of order, with junk that must be ignored."""
    root = tmp_path / "widget"
    for rel in ("train/good/b.png", "train/good/a.png", "test/good/c.png", "test/scratch/001.JPG",
                "test/scratch/000.png", "test/crack/000.png"):
        if rel.endswith(".JPG"):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(root / rel, format="JPEG")
        else:
            png(root / rel)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:6] = 255
    for rel in ("ground_truth/scratch/000_mask.png", "ground_truth/scratch/001_mask.png",
                "ground_truth/crack/000_mask.png"):
        png(root / rel, array=mask)
    # Junk a real folder collects: none of it is an image sample.
    (root / "train/good/notes.txt").write_text("not an image")
    (root / "train/good/.DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "test/scratch/Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    png(root / "train/good/.hidden.png")
    png(root / "test/.ipynb_checkpoints/x.png")
    (root / "test/crack/.~lock.png#").write_text("")
    return tmp_path


# --------------------------------------------------------------------------- indexing


def test_index_hand_built_folder_exact(widget: Path) -> None:
    assert index_subset(widget, "widget") == WIDGET_SAMPLES


def test_index_is_deterministic_and_accepts_str_paths(widget: Path) -> None:
    assert index_subset(str(widget), "widget") == index_subset(widget, "widget") == WIDGET_SAMPLES


def test_index_paths_are_relative_to_data_dir(widget: Path) -> None:
    for s in index_subset(widget, "widget"):
        assert not Path(s.path).is_absolute()
        assert (widget / s.path).is_file()
        if s.mask_path is not None:
            assert (widget / s.mask_path).is_file()


def test_index_without_ground_truth_has_no_masks(tmp_path: Path, png) -> None:
    png(tmp_path / "plain/train/good/0.png")
    png(tmp_path / "plain/test/dent/0.png")
    assert index_subset(tmp_path, "plain") == [
        Sample("plain/train/good/0.png", GOOD, "good", None),
        Sample("plain/test/dent/0.png", ANOMALY, "dent", None),
    ]


def test_index_synthetic_subset_counts(tmp_path: Path) -> None:
    generate_synthetic_subset(tmp_path / "synthetic", seed=0, n_train_good=3, n_test_good=1,
                              n_per_defect=2, image_size=64)
    samples = index_subset(tmp_path, "synthetic")
    assert summarise(samples) == {"crack": 2, "good": 4, "scratch": 2, "spot": 2}
    assert all((s.mask_path is None) == (s.label == GOOD) for s in samples)


def test_real_toothbrush(real_mvtec_dir: Path) -> None:
    root = real_mvtec_dir / "toothbrush"
    if not root.is_dir():
        pytest.skip(f"{real_mvtec_dir}/toothbrush is absent")
    # Counted from the folder, so a partial copy and the full MVTec category both pass.
    n_good = len(list((root / "train/good").glob("*.png"))) + len(list((root / "test/good").glob("*.png")))
    n_defective = len(list((root / "test/defective").glob("*.png")))
    assert n_good and n_defective
    samples = index_subset(real_mvtec_dir, "toothbrush")
    assert summarise(samples) == {"defective": n_defective, "good": n_good}
    n_train_good = len(list((root / "train/good").glob("*.png")))
    # train/ is indexed before test/: train/good, then test/defective (then test/good, if present)
    assert all(s.path.startswith("toothbrush/train/good/") for s in samples[:n_train_good])
    defective = [s for s in samples if s.label == ANOMALY]
    assert len(defective) == n_defective
    assert {s.label for s in samples if s.defect_type == "good"} == {GOOD}
    for s in defective:
        assert s.mask_path == f"toothbrush/ground_truth/defective/{Path(s.path).stem}_mask.png"
        assert (real_mvtec_dir / s.mask_path).is_file()
    paths = [s.path for s in samples[:n_train_good]]
    assert paths == sorted(paths)
    masks = load_masks(real_mvtec_dir, defective[:3], 64)
    assert masks.shape == (3, 64, 64) and masks.dtype == torch.bool
    assert all(m.any() for m in masks)  # every MVTec defect mask marks some pixels


# --------------------------------------------------------------------------- splits


def _category(counts: dict[str, int]) -> list[Sample]:
    """An in-memory category: `counts[type]` samples of each type (no files needed)."""
    return [Sample(f"cat/test/{t}/{i:03d}.png", GOOD if t == "good" else ANOMALY, t, None)
            for t, n in counts.items() for i in range(n)]


CATEGORY_501 = {"good": 400, "crack": 41, "hole": 30, "print": 30}


def test_split_counts_round_test_share_up() -> None:
    samples = _category(CATEGORY_501)
    train, test = split_samples(samples, test_size=0.2, seed=42)
    assert (len(train), len(test)) == (400, 101)  # ceil(0.2 * 501) = 101
    assert sorted(train + test, key=lambda s: s.path) == sorted(samples, key=lambda s: s.path)
    assert not {s.path for s in train} & {s.path for s in test}


def test_split_is_stratified_by_defect_type() -> None:
    samples = _category(CATEGORY_501)
    _, test = split_samples(samples, test_size=0.2, seed=42)
    per_type = Counter(s.defect_type for s in test)
    for t, n in CATEGORY_501.items():
        assert abs(per_type[t] - n * 101 / 501) < 1, (t, per_type[t])


def test_split_seeded() -> None:
    samples = _category(CATEGORY_501)

    def held_out(seed: int) -> list[str]:
        return [s.path for s in split_samples(samples, 0.2, seed=seed)[1]]

    assert held_out(1) == held_out(1)
    assert set(held_out(1)) != set(held_out(2))


@pytest.mark.parametrize("test_size", [0.0, 1.0, 1.5, -0.1])
def test_split_rejects_bad_test_size(test_size: float) -> None:
    with pytest.raises(ValueError, match="test_size"):
        split_samples(_category(CATEGORY_501), test_size=test_size, seed=0)


def test_split_rejects_type_with_one_image() -> None:
    with pytest.raises(ValueError, match=r"rare \(1\)"):
        split_samples(_category({"good": 10, "crack": 5, "rare": 1}), 0.2, seed=0)


def test_kfold_partitions_stratified_and_shuffled() -> None:
    counts = {"good": 20, "crack": 10, "hole": 5}
    samples = _category(counts)
    folds = list(kfold_splits(samples, n_folds=5, seed=0))
    assert len(folds) == 5
    all_paths = sorted(s.path for s in samples)
    test_sets = [[s.path for s in test] for _, test in folds]
    assert sorted(p for t in test_sets for p in t) == all_paths  # test folds partition the samples
    for train, test in folds:
        assert sorted(s.path for s in train + test) == all_paths
        assert Counter(s.defect_type for s in test) == {"good": 4, "crack": 2, "hole": 1}
    types = [s.defect_type for s in samples]
    unshuffled = [sorted(samples[i].path for i in idx)
                  for _, idx in StratifiedKFold(5).split(np.zeros(len(types)), types)]
    assert [sorted(t) for t in test_sets] != unshuffled
    again = [[s.path for s in test] for _, test in kfold_splits(samples, n_folds=5, seed=0)]
    assert again == test_sets


def test_kfold_needs_enough_images_per_type() -> None:
    with pytest.raises(ValueError, match=r"hole \(2\)"):
        list(kfold_splits(_category({"good": 10, "hole": 2}), n_folds=3, seed=0))


def test_batch_order_is_a_seeded_permutation() -> None:
    batches = batch_order(10, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    again = batch_order(10, 4, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_normalise_known_values() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = normalise(images, mean=(0.0, 0.1, 0.5), std=(1.0, 0.5, 0.25))
    assert out.dtype == torch.float32 and out.shape == (1, 3, 2, 2)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, (0.2 - 0.1) / 0.5, (1.0 - 0.5) / 0.25]))


# --------------------------------------------------------------------------- bad input: folders


def test_missing_subset_lists_present_ones(tmp_path: Path) -> None:
    for name in ("alpha", "beta", ".hidden"):
        (tmp_path / name).mkdir()
    with pytest.raises(FileNotFoundError, match="gamma") as info:
        index_subset(tmp_path, "gamma")
    assert "alpha, beta" in str(info.value) and ".hidden" not in str(info.value)


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="none"):
        index_subset(tmp_path / "nowhere", "hazelnut")


def test_subset_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty/train/good").mkdir(parents=True)
    (tmp_path / "empty/test").mkdir()
    (tmp_path / "empty/train/good/readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="No images"):
        index_subset(tmp_path, "empty")


def test_empty_subset_folder(tmp_path: Path) -> None:
    (tmp_path / "bare").mkdir()
    with pytest.raises(ValueError, match="bare"):
        index_subset(tmp_path, "bare")


def test_empty_test_folder_is_fine(tmp_path: Path, png) -> None:
    png(tmp_path / "s/train/good/0.png")
    (tmp_path / "s/test").mkdir()
    assert index_subset(tmp_path, "s") == [Sample("s/train/good/0.png", GOOD, "good", None)]


def test_check_both_classes() -> None:
    good_only = _category({"good": 3})
    bad_only = _category({"crack": 2, "hole": 1})
    with pytest.raises(ValueError, match=r"train split has no Good images \(0 Good, 3 Anomaly\)"):
        check_both_classes(bad_only, "train split")
    with pytest.raises(ValueError, match="no Anomaly images"):
        check_both_classes(good_only, "train split")
    check_both_classes(good_only + bad_only, "train split")


def test_missing_mask_names_expected_path(widget: Path) -> None:
    expected = widget / "widget/ground_truth/crack/000_mask.png"
    expected.unlink()
    with pytest.raises(FileNotFoundError) as info:
        index_subset(widget, "widget")
    assert str(expected) in str(info.value)


# --------------------------------------------------------------------------- bad input: files


def test_truncated_png_names_file(tmp_path: Path, png) -> None:
    path = png(tmp_path / "cut.png", array=np.random.default_rng(0).integers(0, 256, (64, 64, 3)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        read_image(path, 64)


def test_not_an_image_with_png_extension(tmp_path: Path) -> None:
    path = tmp_path / "fake.png"
    path.write_text("this is text, not a PNG")
    with pytest.raises(ValueError, match="fake.png"):
        read_image(path, 64)


def test_load_images_names_bad_file(tmp_path: Path, png) -> None:
    png(tmp_path / "s/train/good/0.png")
    (tmp_path / "s/train/good/1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    samples = index_subset(tmp_path, "s")
    with pytest.raises(ValueError, match="1.png"):
        load_images(tmp_path, samples, 64)


def test_grayscale_and_rgba_load_as_rgb(tmp_path: Path, png) -> None:
    gray = read_image(png(tmp_path / "gray.png", size=16, value=77, channels=1), 64)
    assert gray.shape == (3, 64, 64) and gray.dtype == torch.uint8
    assert (gray == 77).all()
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[...] = (10, 20, 30, 0)  # fully transparent: convert("RGB") keeps the colour
    out = read_image(png(tmp_path / "rgba.png", array=rgba), 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert out[:, 0, 0].tolist() == [10, 20, 30] and (out == out[:, :1, :1]).all()


def test_read_image_resizes_and_keeps_orientation(tmp_path: Path, png) -> None:
    array = np.zeros((128, 128, 3), np.uint8)
    array[:64, :, 0] = 255  # top half red
    out = read_image(png(tmp_path / "half.png", array=array), 64)
    assert out.shape == (3, 64, 64)
    assert (out[0, :30] == 255).all() and (out[0, 34:] == 0).all() and (out[1:] == 0).all()


def test_read_mask_nearest_and_bool(tmp_path: Path, png) -> None:
    image = png(tmp_path / "img.png", size=128)
    mask = np.zeros((128, 128), np.uint8)
    mask[32:64, 64:96] = 255
    out = read_mask(png(tmp_path / "img_mask.png", array=mask), image, 64)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[16:32, 32:48] = True
    assert out.dtype == torch.bool and torch.equal(out, expected)


def test_mask_of_other_size_names_both_files(tmp_path: Path, png) -> None:
    image = png(tmp_path / "big_image.png", size=32)
    mask = png(tmp_path / "small_mask.png", size=16, channels=1, value=255)
    with pytest.raises(ValueError) as info:
        read_mask(mask, image, 64)
    assert str(image) in str(info.value) and str(mask) in str(info.value)


def test_load_masks_zero_for_good_and_none_without_masks(widget: Path) -> None:
    samples = index_subset(widget, "widget")
    masks = load_masks(widget, samples, 16)
    assert masks.shape == (6, 16, 16)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:10, 6:12] = True  # the 8 px masks' square, scaled by 2
    assert all(torch.equal(m, expected) for m, s in zip(masks, samples) if s.label == ANOMALY)
    assert not masks[[s.label == GOOD for s in samples]].any()
    plain = [s for s in samples if s.label == GOOD]
    assert load_masks(widget, plain, 16) is None


# --------------------------------------------------------------------------- official split


def test_official_split_is_the_train_and_test_folders(widget: Path) -> None:
    train, test = split_subset(index_subset(widget, "widget"), "official", test_size=0.2, seed=0)
    assert train == WIDGET_SAMPLES[:2] and test == WIDGET_SAMPLES[2:]
    assert {s.label for s in train} == {GOOD} and ANOMALY in {s.label for s in test}


def test_pooled_split_is_the_published_one(widget: Path) -> None:
    samples = [s for s in index_subset(widget, "widget")] * 2  # two of each type to stratify
    assert split_subset(samples, "pooled", test_size=0.5, seed=3) == split_samples(samples, 0.5, 3)


def test_official_split_without_test_folder_names_it(widget: Path) -> None:
    samples = [s for s in index_subset(widget, "widget") if "/train/" in s.path]
    with pytest.raises(ValueError, match=r"widget/test/.*split='pooled'"):
        split_subset(samples, "official", test_size=0.2, seed=0)


def test_unknown_split_is_a_clear_error(widget: Path) -> None:
    with pytest.raises(ValueError, match="split='mvtec' must be one of"):
        split_subset(index_subset(widget, "widget"), "mvtec", test_size=0.2, seed=0)
