"""Tests of checkpoints (round trip, format, atomic writing, unsafe or foreign files) and of training_config."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.constants import CLASS_NAMES
from utils.checkpoint import CHECKPOINT_FORMAT, has_classifier, load_checkpoint, save_checkpoint
from utils.inference import predict
from utils.patchknn import PatchRule, patch_rule_of
from utils import parameters
from utils.parameters import trains_classifier, training_config

# The Training.ipynb defaults from CONTRACT.md, shrunk to a tiny run.
DEFAULTS = dict(
    data_dir="data/mvtec_anomaly_detection", subset_name="hazelnut", download=True, backbone="vgg16",
    pretrained=False, image_size=64, batch_size=10, epochs=10, lr=0.0001, class_weight=[1, 3],
    target_train_accuracy=0.98, test_size=0.2, seed=42, heatmap_thres=0.7, n_cv_folds=0,
    weights_dir="weights", results_dir="results", device="auto", head="published",
)
TEST_FILES = ["hazelnut/test/crack/000.png", "hazelnut/train/good/001.png"]


def _config(**overrides) -> dict:
    return training_config(**{**DEFAULTS, **overrides})


def _predict(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.eval()(x)


class _Pwn:
    """Unpickling this object runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def vgg16_checkpoint(tmp_path_factory, _model_templates) -> Path:
    """A VGG16 checkpoint trained (nominally) at 64 px, written once for the module."""
    path = tmp_path_factory.mktemp("ckpt") / "hazelnut_vgg16.pt"
    save_checkpoint(path, _model_templates["vgg16"], training_config(**DEFAULTS), TEST_FILES)
    return path


# --------------------------------------------------------------------------- round trip and format


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "vgg16"])
def test_round_trip(tmp_path: Path, make_model, backbone: str) -> None:
    model = make_model(backbone)
    with torch.no_grad():  # move the head off its init so a freshly built model would differ
        model.fc.weight.uniform_(-1, 1)
    path = tmp_path / "weights" / f"synthetic_{backbone}.pt"
    config = _config(backbone=backbone, subset_name="synthetic")
    save_checkpoint(path, model, config, TEST_FILES, extra={"history": {"loss": [0.5, 0.25]}})
    loaded, ckpt = load_checkpoint(path, backbone=backbone, image_size=64)
    assert not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    (p1, c1), (p2, c2) = _predict(model, x), _predict(loaded, x)
    assert torch.equal(p1, p2) and torch.equal(c1, c2)
    assert ckpt["config"] == config and ckpt["test_files"] == TEST_FILES
    assert ckpt["history"] == {"loss": [0.5, 0.25]}


def test_file_loads_with_plain_weights_only(vgg16_checkpoint: Path) -> None:
    ckpt = torch.load(vgg16_checkpoint, weights_only=True)
    assert {"format", "state_dict", "config", "class_names", "test_files"} <= ckpt.keys()
    assert ckpt["format"] == CHECKPOINT_FORMAT
    assert ckpt["class_names"] == ["Good", "Anomaly"] == list(CLASS_NAMES)
    assert ckpt["test_files"] == TEST_FILES
    assert ckpt["config"]["backbone"] == "vgg16" and ckpt["config"]["image_size"] == 64
    assert "fc.weight" in ckpt["state_dict"] and ckpt["state_dict"]["fc.weight"].shape == (2, 512)
    assert all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values())


def test_save_is_atomic(tmp_path: Path, make_model, monkeypatch) -> None:
    model = make_model("mobilenet_v2")
    path = tmp_path / "run.pt"
    save_checkpoint(path, model, _config(backbone="mobilenet_v2"), TEST_FILES)
    good = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        handle = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        handle.write(b"half a checkpoint")  # some bytes reach the file, then the disk fills up
        handle.flush()
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, model, _config(backbone="mobilenet_v2"), ["other.png"])
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temporary file left
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "new.pt", model, _config(backbone="mobilenet_v2"), TEST_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]


# --------------------------------------------------------------------------- bad checkpoints


def test_other_backbone_is_a_clear_error(vgg16_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="vgg16.*backbone='mobilenet_v2'") as info:
        load_checkpoint(vgg16_checkpoint, backbone="mobilenet_v2")
    assert "size mismatch" not in str(info.value) and "state_dict" not in str(info.value)


def test_other_image_size_is_a_clear_error(vgg16_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="image_size=64.*224"):
        load_checkpoint(vgg16_checkpoint, image_size=224)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_plain_dict_without_marker(tmp_path: Path, make_model) -> None:
    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": make_model("mobilenet_v2").state_dict(), "config": {"backbone": "mobilenet_v2"}}, path)
    with pytest.raises(ValueError, match="format marker"):
        load_checkpoint(path)


def test_bare_state_dict(tmp_path: Path, make_model) -> None:
    path = tmp_path / "bare.pt"
    torch.save(make_model("mobilenet_v2").state_dict(), path)
    with pytest.raises(ValueError, match="not a checkpoint of this repository"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [
    pytest.param(b"just text", id="text"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01", id="cut-pickle"),
    pytest.param(None, id="truncated-checkpoint"),
])
def test_not_a_readable_checkpoint(tmp_path: Path, vgg16_checkpoint: Path, content: bytes | None) -> None:
    path = tmp_path / "broken.pt"
    if content is None:  # an interrupted copy of a real checkpoint
        data = vgg16_checkpoint.read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken.pt"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_malicious_pickle_is_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned.txt"
    payload = _Pwn(f"echo pwned > {marker}")
    path = tmp_path / "evil.pt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:  # inside a real torch zip file, next to a valid-looking marker
        torch.save({"format": CHECKPOINT_FORMAT, "config": payload}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran code from it"


# --------------------------------------------------------------------------- training_config


def test_training_config_accepts_contract_defaults() -> None:
    config = _config()
    assert {k: config[k] for k in DEFAULTS} == {**DEFAULTS, "class_weight": [1.0, 3.0]}
    assert config["lr"] == 1e-4 and isinstance(config["class_weight"][0], float)


@pytest.mark.parametrize("name,value", [
    ("backbone", "resnet"), ("test_size", 1.5), ("test_size", 0), ("image_size", 100), ("image_size", 32),
    ("image_size", 224.0), ("epochs", 0), ("epochs", 2.5), ("class_weight", [1]), ("class_weight", [1, -3]),
    ("download", "yes"), ("pretrained", 1), ("device", "tpu"), ("batch_size", 0), ("lr", -1e-4),
    ("target_train_accuracy", 1.5), ("heatmap_thres", 2), ("n_cv_folds", 1), ("seed", "42"),
    ("seed", True), ("subset_name", ""), ("precision", "fp64"), ("split", "mvtec"),
])
def test_training_config_names_bad_parameter(name: str, value) -> None:
    with pytest.raises(ValueError, match=name):
        _config(**{name: value})


@pytest.mark.parametrize("name, value", [("epochs", 3), ("lr", 0.001), ("target_train_accuracy", None),
                                         ("pooling", "max")])
def test_the_evidence_head_refuses_the_published_recipe_it_has_no_use_for(name: str, value) -> None:
    """The evidence head trains its own full-batch steps: a recipe value it would ignore is refused.
    Catches: training_config without `_check_evidence_recipe` (the value was then dropped silently)."""
    with pytest.raises(ValueError, match=rf"{name}={value!r} is invalid: expected .* with head='evidence'"):
        _config(head="evidence", **{name: value})
    assert _config(head="published", **{name: value})[name] == value
    assert _config(head="evidence")[name] == parameters.PUBLISHED_RECIPE[name]  # the defaults pass


# --------------------------------------------------------------------------- checkpoints without a classifier


def test_patch_only_checkpoint_keeps_the_frozen_layers_and_their_patch_map(tmp_path: Path, make_model) -> None:
    model = make_model("mobilenet_v2")
    with torch.no_grad():  # frozen weights a fresh model would not have
        for p in model.frozen.parameters():
            p.add_(0.01)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    memory = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))  # the stride-8 layer's 32 channels
    path = tmp_path / "pill_mobilenet_v2.pt"
    config = _config(backbone="mobilenet_v2", split="official")
    save_checkpoint(path, model, config, TEST_FILES, extra={"patch_memory": memory}, classifier=False)

    raw = torch.load(path, weights_only=True)
    assert raw["classifier"] is False
    assert raw["state_dict"] and all(k.startswith("frozen.") for k in raw["state_dict"])
    loaded, ckpt = load_checkpoint(path, backbone="mobilenet_v2")
    assert not has_classifier(ckpt) and ckpt["config"]["split"] == "official"
    kwargs = dict(batch_size=2, device=torch.device("cpu"), precision="fp32", progress=False)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    before = predict(model, images, mean, std, patch_memory=memory, patch_rule=PatchRule(), **kwargs)
    after = predict(loaded, images, mean, std, patch_memory=ckpt["patch_memory"], classifier=False,
                    patch_rule=patch_rule_of(ckpt["config"]), **kwargs)
    assert set(after) == {"patch_map", "patch_score"}
    assert np.array_equal(before["patch_map"], after["patch_map"])
    with pytest.raises(ValueError, match="needs a patch_memory"):
        predict(loaded, images, mean, std, classifier=False, **kwargs)
    with pytest.raises(ValueError, match="needs the patch_rule it was built with"):
        predict(loaded, images, mean, std, patch_memory=memory, classifier=False, **kwargs)


def test_older_checkpoints_have_a_classifier(vgg16_checkpoint: Path) -> None:
    ckpt = torch.load(vgg16_checkpoint, weights_only=True)
    del ckpt["classifier"]
    assert has_classifier(ckpt)


def test_good_only_training_builds_the_memory_or_says_why_not() -> None:
    assert trains_classifier(_config(), n_train_anomalies=3)
    assert not trains_classifier(_config(), n_train_anomalies=0)
    with pytest.raises(ValueError, match="patch_memory_size=0 builds no patch memory"):
        trains_classifier(_config(patch_memory_size=0), n_train_anomalies=0)
    with pytest.raises(ValueError, match="n_cv_folds=5 cross-validates the classifier"):
        trains_classifier(_config(n_cv_folds=5), n_train_anomalies=0)
