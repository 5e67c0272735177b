"""Messy data and parameters: every image read as a viewer shows it or refused by name, every mask
read by one documented rule, every skipped file reported, every check before the first epoch.

The numbers in the section titles are the cases of the data audit they reproduce.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import torch
from PIL import Image

from utils import runtime
from utils import parameters
from utils.checkpoint import CHECKPOINT_FORMAT, atomic_write_bytes, checkpoint_dict, load_checkpoint, save_run
from utils import dataloader, download, inference
from utils.constants import ANOMALY, GOOD
from utils.dataloader import Sample

ROOT = Path(__file__).resolve().parents[1]
ORIENTATION = 0x0112  # the EXIF tag viewers rotate by


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _subset(data_dir: Path, png, name: str = "widget") -> Path:
    """A tiny MVTec-format subset: 6 good (4 train, 2 test) and 4 crack images with masks, 32 px."""
    root = data_dir / name
    for i in range(4):
        png(root / f"train/good/{i}.png", array=_noise(32, 32, i))
    for i in range(2):
        png(root / f"test/good/{i}.png", array=_noise(32, 32, 10 + i))
    for i in range(4):
        png(root / f"test/crack/{i}.png", array=_noise(32, 32, 20 + i))
        mask = np.zeros((32, 32), np.uint8)
        mask[8:16, 8:16] = 255
        png(root / f"ground_truth/crack/{i}_mask.png", array=mask)
    return root


# --------------------------------------------------------------------------- 1. bit depth and modes


def test_16bit_grayscale_is_scaled_not_white(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    path = tmp_path / "camera16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    out = dataloader.read_image(path, 64)
    expected = torch.from_numpy((ramp / 257.0).round().astype(np.uint8))  # 16 -> 8 bits, full range
    assert (out[0].int() - expected.int()).abs().max() <= 1
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_32bit_integer_image_in_16bit_range(tmp_path: Path) -> None:
    values = np.full((16, 16), 32896, np.int32)  # 32896 / 257 = 128
    path = tmp_path / "int32.tif"
    Image.fromarray(values, mode="I").save(path)
    assert (dataloader.read_image(path, 16) == 128).all()


def test_float_image_in_unit_range(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.full((16, 16), 0.5, np.float32), mode="F").save(path)
    assert (dataloader.read_image(path, 16) == 128).all()


@pytest.mark.parametrize("value", [3.5, -0.5, np.nan])
def test_float_image_out_of_range_is_refused_by_name(tmp_path: Path, value: float) -> None:
    path = tmp_path / "depth.tif"
    array = np.zeros((16, 16), np.float32)
    array[0, 0] = value
    Image.fromarray(array, mode="F").save(path)
    with pytest.raises(ValueError, match="depth.tif"):
        dataloader.read_image(path, 16)


def test_integer_image_beyond_16_bits_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "wide.tif"
    Image.fromarray(np.full((16, 16), 70000, np.int32), mode="I").save(path)
    with pytest.raises(ValueError, match="wide.tif"):
        dataloader.read_image(path, 16)


def test_palette_and_grey_alpha_read_as_shown(tmp_path: Path) -> None:
    palette = Image.new("P", (8, 8))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.paste(1, (0, 0, 8, 8))
    palette.save(tmp_path / "p.png")
    assert dataloader.read_image(tmp_path / "p.png", 8)[:, 0, 0].tolist() == [200, 100, 50]
    Image.new("LA", (8, 8), (90, 255)).save(tmp_path / "la.png")
    assert (dataloader.read_image(tmp_path / "la.png", 8) == 90).all()
    Image.new("1", (8, 8), 1).save(tmp_path / "bw.png")
    assert (dataloader.read_image(tmp_path / "bw.png", 8) == 255).all()


def test_uint16_array_is_scaled_like_the_file(tmp_path: Path) -> None:
    array = np.full((16, 16), 65535, np.uint16)
    assert (dataloader.image_to_tensor(array, 16) == 255).all()
    array[:] = 257 * 40
    assert (dataloader.image_to_tensor(array, 16) == 40).all()


# --------------------------------------------------------------------------- 2. EXIF orientation


def _rotated_jpeg(path: Path) -> Path:
    """A 40 x 20 (W x H) sensor image, left half red, stored with EXIF orientation 6: viewers rotate
    it 90 degrees clockwise and show a 20 x 40 image whose top half is red."""
    array = np.zeros((20, 40, 3), np.uint8)
    array[:, :20, 0] = 255
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(array).save(path, format="JPEG", quality=95, exif=exif)
    return path


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    out = dataloader.read_image(_rotated_jpeg(tmp_path / "phone.jpg"), 32)
    assert (out[0, :14] > 200).all() and (out[0, 18:] < 50).all()  # top half red, as a viewer shows


def test_mask_of_a_rotated_image_aligns(tmp_path: Path, png) -> None:
    image = _rotated_jpeg(tmp_path / "phone.jpg")
    mask = np.zeros((40, 20), np.uint8)  # drawn on the image as shown: 20 wide, 40 high
    mask[:20] = 255
    out = dataloader.read_mask(png(tmp_path / "phone_mask.png", array=mask), image, 32)
    assert out[:16].all() and not out[16:].any()


def test_score_image_applies_orientation(tmp_path: Path, make_model) -> None:
    path = _rotated_jpeg(tmp_path / "phone.jpg")
    model = make_model("mobilenet_v2").eval()
    config = {"backbone": "mobilenet_v2", "pretrained": False, "image_size": 64, "heatmap_thres": 0.7}
    shown = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))  # what a viewer shows
    from_file = inference.score_image(path, model, {"config": config})
    from_pixels = inference.score_image(shown, model, {"config": config})
    np.testing.assert_allclose(from_file["heatmap"], from_pixels["heatmap"], atol=1e-6)


def test_rotated_mask_in_sensor_orientation_is_explained(tmp_path: Path, png) -> None:
    image = _rotated_jpeg(tmp_path / "phone.jpg")
    mask = png(tmp_path / "phone_mask.png", array=np.full((20, 40), 255, np.uint8))
    with pytest.raises(ValueError, match="orientation"):
        dataloader.read_mask(mask, image, 32)


# --------------------------------------------------------------------------- 3. masks


def _mask_of(tmp_path: Path, array: np.ndarray, mode: str | None = None) -> torch.Tensor:
    image = tmp_path / "img.png"
    Image.fromarray(_noise(*array.shape[:2])).save(image)
    path = tmp_path / "img_mask.png"
    Image.fromarray(array, mode=mode).save(path)
    return dataloader.read_mask(path, image, array.shape[0])


def _square(fill, shape=(16, 16), dtype=np.uint8) -> np.ndarray:
    array = np.zeros(shape, dtype)
    array[4:8, 4:8] = fill
    return array


@pytest.mark.parametrize("array,mode", [
    pytest.param(_square(1), None, id="0/1 label mask"),
    pytest.param(_square(2), None, id="label map value 2"),
    pytest.param(_square((255, 0, 0), (16, 16, 3)), None, id="pure red on black"),
    pytest.param(_square((0, 0, 1), (16, 16, 3)), None, id="blue 1 on black"),
    pytest.param(_square(1, dtype=np.uint16), None, id="16-bit 0/1"),
])
def test_any_nonzero_pixel_is_defect(tmp_path: Path, array: np.ndarray, mode) -> None:
    out = _mask_of(tmp_path, array, mode)
    assert torch.equal(out, torch.from_numpy(_square(True, dtype=bool)))


def test_transparent_pixels_of_a_mask_are_background(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, as paint tools leave it under transparency
    rgba[4:8, 4:8, 3] = 255  # only the defect is opaque
    out = _mask_of(tmp_path, rgba)
    assert torch.equal(out, torch.from_numpy(_square(True, dtype=bool)))


def test_masks_are_checked_before_training_train_split_too(tmp_path: Path, png) -> None:
    _subset(tmp_path, png)
    png(tmp_path / "widget/ground_truth/crack/2_mask.png", size=16, channels=1, value=255)
    samples = dataloader.index_subset(tmp_path, "widget")
    with pytest.raises(ValueError, match="2_mask.png.*16x16.*32x32"):
        dataloader.check_masks(tmp_path, samples)


def test_empty_and_full_masks_are_reported(tmp_path: Path, png) -> None:
    _subset(tmp_path, png)
    png(tmp_path / "widget/ground_truth/crack/1_mask.png", size=32, channels=1, value=0)
    png(tmp_path / "widget/ground_truth/crack/3_mask.png", size=32, channels=1, value=255)
    with pytest.raises(ValueError) as info:
        dataloader.check_masks(tmp_path, dataloader.index_subset(tmp_path, "widget"))
    message = str(info.value)
    assert "1_mask.png" in message and "no pixel" in message
    assert "3_mask.png" in message and "every pixel" in message
    assert "0_mask.png" not in message


# --------------------------------------------------------------------------- 4. layouts and skipped files


def test_nested_defect_folders_are_indexed_with_mirrored_masks(tmp_path: Path, png) -> None:
    _subset(tmp_path, png)
    png(tmp_path / "widget/test/crack/line2/7.png", size=32)
    png(tmp_path / "widget/ground_truth/crack/line2/7_mask.png", size=32, channels=1, value=255)
    samples = dataloader.index_subset(tmp_path, "widget")
    assert Sample("widget/test/crack/line2/7.png", ANOMALY, "crack",
                  "widget/ground_truth/crack/line2/7_mask.png") in samples


def test_webp_is_read(tmp_path: Path, png) -> None:
    _subset(tmp_path, png)
    Image.fromarray(_noise(32, 32)).save(tmp_path / "widget/test/good/9.webp", lossless=True)
    samples = dataloader.index_subset(tmp_path, "widget")
    assert Sample("widget/test/good/9.webp", GOOD, "good", None) in samples
    assert torch.equal(dataloader.read_image(tmp_path / "widget/test/good/9.webp", 32),
                       torch.from_numpy(_noise(32, 32)).permute(2, 0, 1))


@pytest.mark.parametrize("folder", ["Good", "GOOD"])
def test_good_folder_is_case_insensitive(tmp_path: Path, png, folder: str) -> None:
    _subset(tmp_path, png)
    png(tmp_path / f"widget/test/{folder}/5.png", size=32)
    sample = next(s for s in dataloader.index_subset(tmp_path, "widget") if s.path.endswith("/5.png"))
    assert (sample.label, sample.defect_type, sample.mask_path) == (GOOD, "good", None)


@pytest.mark.parametrize("folder", ["OK", "ok", "normal", "Normal"])
def test_good_synonym_is_refused_not_taken_as_defect(tmp_path: Path, png, folder: str) -> None:
    _subset(tmp_path, png)
    png(tmp_path / f"widget/test/{folder}/5.png", size=32)
    with pytest.raises(ValueError, match=f"test/{folder}.*good"):
        dataloader.index_subset(tmp_path, "widget")


def test_skipped_files_are_reported_with_reasons(tmp_path: Path, png) -> None:
    _subset(tmp_path, png)
    png(tmp_path / "widget/train/loose.png", size=32)
    png(tmp_path / "widget/val/good/v.png", size=32)
    (tmp_path / "widget/test/crack/notes.txt").write_text("no image")
    (tmp_path / "widget/test/good/link.png").symlink_to(tmp_path / "gone.png")
    samples, skipped = dataloader.scan_subset(tmp_path, "widget")
    assert len(samples) == 10
    reasons = {s.path: s.reason for s in skipped}
    assert set(reasons) == {"widget/train/loose.png", "widget/val", "widget/test/crack/notes.txt",
                            "widget/test/good/link.png"}
    assert "type folder" in reasons["widget/train/loose.png"]
    assert "train" in reasons["widget/val"] and "test" in reasons["widget/val"]
    assert "broken link" in reasons["widget/test/good/link.png"]
    line = dataloader.describe_skipped(skipped)
    assert "\n" not in line and "4" in line and "widget/val" in line


def test_nothing_skipped_says_so(tmp_path: Path, png) -> None:
    _subset(tmp_path, png)
    samples, skipped = dataloader.scan_subset(tmp_path, "widget")
    assert skipped == [] and "nothing skipped" in dataloader.describe_skipped(skipped)


# --------------------------------------------------------------------------- 5. checks before training, consistent files


def test_cv_folds_the_data_cannot_support_fail_before_training(tmp_path: Path, png) -> None:
    _subset(tmp_path, png)
    samples = dataloader.index_subset(tmp_path, "widget")
    with pytest.raises(ValueError, match=r"n_cv_folds=5.*crack \(4\)"):
        dataloader.check_splits(samples, test_size=0.2, n_cv_folds=5)
    dataloader.check_splits(samples, test_size=0.2, n_cv_folds=4)


@pytest.mark.parametrize("name", ["weights_dir", "results_dir"])
def test_unwritable_output_folder_is_refused_by_training_config(tmp_path: Path, name: str) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=f"{name}=.*a_file"):
        parameters.training_config(**{**_TRAIN_DEFAULTS, name: str(blocker / "out")})
    with pytest.raises(ValueError, match=f"{name}=.*a_file"):
        parameters.training_config(**{**_TRAIN_DEFAULTS, name: str(blocker)})
    assert blocker.read_text() == "" and not (tmp_path / "weights").exists()


@pytest.mark.parametrize("name, value, expected", [
    ("patch_layers", "all", "patch_layers='all' is invalid: expected None (head='auto' chooses; else the measured "
                            "choice for the backbone and head) or one of ('fine', 'both')"),
    ("patch_map_sigma", -0.5, "patch_map_sigma=-0.5 is invalid: expected None (head='auto' chooses it, otherwise "
                              "0.5) or a blur in patch cells"),
    ("patch_map_sigma", "4px", "patch_map_sigma='4px' is invalid"),
])
def test_bad_patch_rule_is_named_before_anything_is_read(name: str, value, expected: str) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        parameters.training_config(**{**_TRAIN_DEFAULTS, name: value})
    # None stays open for head="auto" (it chooses from the training split), else resolves by head and
    # backbone, and the checkpoint records the layers its memory was built from
    mobilenet = {**_TRAIN_DEFAULTS, "backbone": "mobilenet_v2"}
    config = parameters.training_config(**mobilenet)
    assert (config["head"], config["patch_layers"], config["patch_map_sigma"]) == ("auto", None, None)
    config = parameters.training_config(**mobilenet, head="published")
    assert (config["patch_layers"], config["patch_map_sigma"]) == ("fine", 0.5)
    assert parameters.training_config(**_TRAIN_DEFAULTS, head="published")["patch_layers"] == "both"  # VGG16
    assert parameters.training_config(**mobilenet, head="evidence")["patch_layers"] == "both"
    assert parameters.training_config(**mobilenet, head="evidence", patch_layers="fine")["patch_layers"] == "fine"


def test_failed_save_keeps_checkpoint_and_log_in_agreement(tmp_path: Path, make_model) -> None:
    model = make_model("mobilenet_v2")
    config = parameters.training_config(**{**_TRAIN_DEFAULTS, "backbone": "mobilenet_v2"})
    ckpt, log = tmp_path / "w" / "run.pt", tmp_path / "r" / "training.json"
    save_run(ckpt, checkpoint_dict(model, config, ["a.png"], {"n_train": 1}), log, {"run": 1})
    before = ckpt.read_bytes(), log.read_bytes()
    with pytest.raises(TypeError):  # the log cannot be written: nothing is replaced
        save_run(ckpt, checkpoint_dict(model, config, ["b.png"], {"n_train": 2}), log, {"run": 2, "bad": object()})
    assert (ckpt.read_bytes(), log.read_bytes()) == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["run.pt"]
    assert sorted(p.name for p in log.parent.iterdir()) == ["training.json"]
    save_run(ckpt, checkpoint_dict(model, config, ["b.png"], {"n_train": 2}), log, {"run": 2})
    assert torch.load(ckpt, weights_only=True)["test_files"] == ["b.png"]
    assert json.loads(log.read_text()) == {"run": 2}


def test_stale_temporary_files_of_the_atomic_writer_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".run.pt.k2j3h4.tmp"
    stale.write_bytes(b"half of a checkpoint from a killed save")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / ".run.pt.live.tmp"  # another process may be writing this one right now
    fresh.write_bytes(b"in progress")
    other = tmp_path / ".notes.txt.tmp"  # not the writer's pattern for this file
    other.write_bytes(b"")
    os.utime(other, (old, old))
    atomic_write_bytes(tmp_path / "run.pt", lambda f: f.write(b"new"))
    assert (tmp_path / "run.pt").read_bytes() == b"new"
    assert not stale.exists() and fresh.exists() and other.exists()


# --------------------------------------------------------------------------- 6. errors that name the value or file


_TRAIN_DEFAULTS = dict(
    data_dir="data/mvtec_anomaly_detection", subset_name="hazelnut", download=True, backbone="vgg16",
    pretrained=False, image_size=64, batch_size=10, epochs=10, lr=0.0001, class_weight=[1, 3],
    target_train_accuracy=0.98, test_size=0.2, seed=42, heatmap_thres=0.7, n_cv_folds=0,
    weights_dir="weights", results_dir="results", device="auto",
)


@pytest.mark.parametrize("seed", ["abc", -1, 2**32, 1.5])
def test_bad_seed_is_named_before_use(seed) -> None:
    with pytest.raises(ValueError, match="seed="):
        runtime.set_seed(seed)
    with pytest.raises(ValueError, match="seed="):
        parameters.training_config(**{**_TRAIN_DEFAULTS, "seed": seed})


def test_decompression_bomb_names_the_file(tmp_path: Path, png, monkeypatch) -> None:
    path = png(tmp_path / "huge.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 * 64 = 4096 > 2 x 1000: PIL refuses it
    with pytest.raises(ValueError, match="huge.png.*MAX_IMAGE_PIXELS"):
        dataloader.read_image(path, 32)
    with pytest.raises(ValueError, match="huge.png"):
        dataloader.load_images(tmp_path, [Sample("huge.png", GOOD, "good", None)], 32)


@pytest.mark.parametrize("name,value", [("batch_size", 0), ("batch_size", 2.5), ("n_samples", -1),
                                        ("heatmap_thres", 1.5)])
def test_evaluation_parameters_are_checked(name: str, value) -> None:
    params = {"batch_size": 10, "n_samples": 8, "heatmap_thres": 0.7, name: value}
    with pytest.raises(ValueError, match=f"{name}="):
        parameters.check_evaluation_parameters(**params)


def test_too_small_test_size_is_explained(tmp_path: Path, png) -> None:
    _subset(tmp_path, png)
    samples = dataloader.index_subset(tmp_path, "widget")
    with pytest.raises(ValueError, match=r"test_size=0.05.*1 of 10.*2 defect types"):
        dataloader.split_samples(samples, test_size=0.05, seed=0)
    with pytest.raises(ValueError, match=r"test_size=0.95"):
        dataloader.check_splits(samples, test_size=0.95, n_cv_folds=0)


def test_empty_checkpoint_says_empty(tmp_path: Path) -> None:
    (tmp_path / "run.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="run.pt.*empty"):
        load_checkpoint(tmp_path / "run.pt")


def test_checkpoint_without_keys_names_them(tmp_path: Path) -> None:
    torch.save({"format": CHECKPOINT_FORMAT, "config": {"backbone": "vgg16"}}, tmp_path / "k.pt")
    with pytest.raises(ValueError, match="k.pt.*state_dict.*test_files"):
        load_checkpoint(tmp_path / "k.pt")
    torch.save({"format": CHECKPOINT_FORMAT, "config": {}, "state_dict": {}, "test_files": []},
               tmp_path / "c.pt")
    with pytest.raises(ValueError, match="c.pt.*backbone"):
        load_checkpoint(tmp_path / "c.pt")


# --------------------------------------------------------------------------- 7. messages that say what is wrong


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    data_file = tmp_path / "data.zip"
    data_file.write_bytes(b"PK")
    for call in (lambda: dataloader.prepare_subset(data_file, "toothbrush", download=False, seed=0),
                 lambda: dataloader.index_subset(data_file, "toothbrush")):
        with pytest.raises((ValueError, FileNotFoundError, NotADirectoryError), match="data.zip.*is a file"):
            call()


def test_unknown_subset_says_own_folders_are_valid(tmp_path: Path) -> None:
    (tmp_path / "gears").mkdir()
    with pytest.raises(ValueError) as info:
        download.ensure_subset(tmp_path, "gaskets", download=False)
    assert "gears" in str(info.value) and "your own" in str(info.value)


def test_permission_denied_is_reported_as_such(tmp_path: Path, png, monkeypatch) -> None:
    path = png(tmp_path / "locked.png")

    def denied(fp, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(fp))

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(ValueError) as info:
        dataloader.read_image(path, 8)
    assert "locked.png" in str(info.value) and "permission" in str(info.value).lower()
    assert "truncated" not in str(info.value)


def test_weights_path_that_is_a_folder(tmp_path: Path) -> None:
    with pytest.raises((ValueError, IsADirectoryError), match="is a folder"):
        load_checkpoint(tmp_path)


# --------------------------------------------------------------------------- 8. Evaluation reads only the checkpoint's images


def test_new_image_without_mask_does_not_stop_evaluation(tmp_path: Path, png) -> None:
    _subset(tmp_path, png)
    listed = ["widget/test/crack/1.png", "widget/test/good/0.png"]
    png(tmp_path / "widget/test/crack/new_from_line3.png", size=32)  # added after training, no mask
    assert dataloader.select_samples(tmp_path, "widget", listed) == [
        Sample("widget/test/crack/1.png", ANOMALY, "crack", "widget/ground_truth/crack/1_mask.png"),
        Sample("widget/test/good/0.png", GOOD, "good", None),
    ]
    (tmp_path / "widget/test/crack/1.png").unlink()
    with pytest.raises(FileNotFoundError, match="crack/1.png"):
        dataloader.select_samples(tmp_path, "widget", listed)


# --------------------------------------------------------------------------- the notebooks stop before the first epoch


def _run_training(tmp_path: Path, png, **params) -> tuple[str, Path]:
    """Run Training.ipynb on the tiny subset (made unless already there); returns the error text and
    the executed notebook."""
    if not (tmp_path / "data" / "widget").is_dir():
        _subset(tmp_path / "data", png)
    dirs = {"data_dir": str(tmp_path / "data"), "weights_dir": str(tmp_path / "weights"),
            "results_dir": str(tmp_path / "results")}
    out = tmp_path / "Training.ipynb"
    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(ROOT / "Training.ipynb", out, cwd=str(ROOT), progress_bar=False, parameters={
            "subset_name": "widget", "download": False, "backbone": "mobilenet_v2", "pretrained": False,
            "image_size": 64, "epochs": 1, "batch_size": 4, "patch_memory_size": 0, "head": "published", **dirs,
            **params})
    return str(info.value), out


# One bad parameter checked in the first cell (seed, before it is used) and one bad mask of the
# training split (checked right after indexing, after the split and n_cv_folds checks); the other
# checks of those two cells are tested on their functions above.
@pytest.mark.parametrize("case", ["seed", "mask"])
def test_training_stops_before_the_first_epoch_and_writes_nothing(tmp_path: Path, png, case: str) -> None:
    params = {"seed": {"seed": "abc"}, "mask": {}}[case]
    if case == "mask":
        _subset(tmp_path / "data", png)
        png(tmp_path / "data/widget/ground_truth/crack/0_mask.png", size=16, channels=1, value=255)
    error, executed = _run_training(tmp_path, png, **params)
    expected = {"seed": "seed=", "mask": "0_mask.png"}[case]
    assert expected in error
    outputs = json.dumps([c.get("outputs", []) for c in json.loads(executed.read_text())["cells"]])
    assert "epoch  1/" not in outputs and "Decoding" not in outputs
    assert not (tmp_path / "weights").exists() and not (tmp_path / "results").exists()


def test_evaluation_refuses_batch_size_zero_first(tmp_path: Path) -> None:
    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(ROOT / "Evaluation.ipynb", tmp_path / "Evaluation.ipynb", cwd=str(ROOT),
                            progress_bar=False, parameters={
                                "batch_size": 0, "weights_dir": str(tmp_path / "none"),
                                "results_dir": str(tmp_path / "results")})
    assert "batch_size=0" in str(info.value)


def test_grid_maps_takes_one_name_or_a_list_and_names_a_bad_value():
    assert parameters.map_names("patch_knn") == ["patch_knn"]  # papermill -p grid_maps patch_knn
    assert parameters.map_names(["patch_knn", "cam"]) == ["patch_knn", "cam"]
    assert parameters.map_names([]) == []
    for bad in (3, ["patch_knn", 2], None):
        with pytest.raises(ValueError, match="grid_maps"):
            parameters.map_names(bad)
