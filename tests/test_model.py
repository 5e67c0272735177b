"""Tests of utils.model (frozen/trainable split, outputs, CAM known answers) and of the training loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.constants import ANOMALY, IMAGENET_MEAN, IMAGENET_STD
from utils.helper import train_model
from utils.runtime import set_seed
from utils.model import CAMClassifier, class_activation_map, get_spec

# VGG16 `features` indices of its 13 convolutions; 0-22 (conv1_1 .. conv4_3) are frozen.
VGG16_CONVS = {"conv1_1": 0, "conv1_2": 2, "conv2_1": 5, "conv2_2": 7, "conv3_1": 10, "conv3_2": 12,
               "conv3_3": 14, "conv4_1": 17, "conv4_2": 19, "conv4_3": 21,
               "conv5_1": 24, "conv5_2": 26, "conv5_3": 28}
CPU = torch.device("cpu")


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- frozen / trainable split


def test_vgg16_frozen_exactly_conv1_1_to_conv4_3(make_model) -> None:
    model = make_model("vgg16")
    # `frozen` is features[:24] and `trainable` features[24:30]; slicing a Sequential keeps the
    # module names, so features module i is `frozen.i` or `trainable.i`.
    frozen = {f"frozen.{i}.{w}" for i in VGG16_CONVS.values() if i < 24 for w in ("weight", "bias")}
    trained = {f"trainable.{i}.{w}" for i in VGG16_CONVS.values() if i >= 24 for w in ("weight", "bias")}
    trained |= {"fc.weight", "fc.bias"}
    all_names = {n for n, _ in model.named_parameters()}
    assert all_names == frozen | trained
    assert _trainable_names(model) == trained
    assert len(frozen) == 20 and len(trained) == 8
    # conv5_1 is the first trainable layer: 512 -> 512 channels, right after pool4.
    assert isinstance(model.frozen[23], nn.MaxPool2d) and not list(model.frozen[23].parameters())
    assert model.trainable[0].in_channels == 512 and model.frozen[21].out_channels == 512
    assert isinstance(model.trainable[-1], nn.ReLU)  # the CAM uses conv5_3 after its ReLU
    assert model.fc.in_features == 512 and model.fc.out_features == 2
    assert isinstance(model.pool, nn.MaxPool2d)


def test_mobilenet_v2_frozen_first_14_blocks(make_model) -> None:
    model = make_model("mobilenet_v2")
    assert len(model.frozen) == 14 and len(model.trainable) == 5
    assert not any(p.requires_grad for p in model.frozen.parameters())
    assert all(p.requires_grad for p in model.trainable.parameters())
    assert all(p.requires_grad for p in model.fc.parameters())
    # Block 13 ends the 96-channel stage; block 14 opens the 160-channel one; the last is the 1x1 conv to 1280.
    assert model.frozen[13].out_channels == 96 and model.trainable[0].out_channels == 160
    assert model.trainable[-1][0].out_channels == 1280 and model.fc.in_features == 1280
    assert _trainable_names(model) == ({f"trainable.{n}" for n, _ in model.trainable.named_parameters()}
                                       | {"fc.weight", "fc.bias"})


@pytest.mark.parametrize("backbone", ["vgg16", "mobilenet_v2"])
def test_train_keeps_frozen_part_and_batchnorm_in_eval(make_model, backbone: str) -> None:
    model = make_model(backbone).train()
    assert model.training and model.fc.training
    assert not any(m.training for m in model.frozen.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not any(m.training for m in norms)
    trainable_non_bn = [m for m in model.trainable.modules() if not isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.training for m in trainable_non_bn)
    model.eval()
    assert not any(m.training for m in model.modules())


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="resnet.*mobilenet_v2.*vgg16"):
        get_spec("resnet")


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("backbone,size", [("vgg16", 64), ("vgg16", 96), ("vgg16", 224), ("mobilenet_v2", 64),
                                           ("mobilenet_v2", 96)])
def test_outputs_eval_and_train(make_model, backbone: str, size: int) -> None:
    model = make_model(backbone).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        probs, cam = model(x)
    assert probs.shape == (2, 2) and cam.shape == (2, size, size)
    assert cam.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    assert (probs >= 0).all()
    model.train()
    with torch.no_grad():
        scores = model(x)
    assert isinstance(scores, torch.Tensor) and scores.shape == (2, 2)
    torch.testing.assert_close(scores.softmax(1), probs)  # same network in both modes (no dropout, BN frozen)


@pytest.mark.parametrize("shape", [(100, 100), (64, 100), (100, 64), (32, 32), (64, 32), (32, 64), (65, 65)])
def test_size_not_multiple_of_32_or_too_small(make_model, shape: tuple[int, int]) -> None:
    model = make_model("mobilenet_v2").eval()
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.zeros(1, 3, *shape))


def test_non_square_input(make_model) -> None:
    model = make_model("vgg16").eval()
    with torch.no_grad():
        probs, cam = model(torch.randn(1, 3, 64, 96))
    assert probs.shape == (1, 2) and cam.shape == (1, 64, 96)


# --------------------------------------------------------------------------- CAM known answers


def test_class_activation_map_tiny_known_answer() -> None:
    maps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])  # (1, 2, 2, 2)
    out = class_activation_map(maps, torch.tensor([2.0, -1.0]))
    assert torch.equal(out, torch.tensor([[[-8.0, -16.0], [-24.0, -32.0]]]))


def _hand_set_fc(model: CAMClassifier) -> None:
    channels = model.fc.in_features
    with torch.no_grad():
        model.fc.weight[0] = -torch.linspace(0.0, 1.0, channels)  # Good row: must not be used
        model.fc.weight[ANOMALY] = torch.linspace(-1.0, 2.0, channels)
        model.fc.bias[:] = torch.tensor([0.3, -0.2])


def _loop_cam(maps: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Anomaly CAM by an explicit Python loop over channels: sum_c w[c] * maps[:, c] -> (B, h, w)."""
    out = torch.zeros(maps.shape[0], maps.shape[2], maps.shape[3], dtype=torch.float64)
    for c, w in enumerate(weights):
        out += w * maps[:, c].double()
    return out


def test_cam_equals_weighted_loop_and_upsampling(make_model) -> None:
    model = make_model("vgg16").eval()
    _hand_set_fc(model)
    maps = torch.rand(2, 512, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = _loop_cam(maps, model.fc.weight[ANOMALY].tolist())
    torch.testing.assert_close(class_activation_map(maps, model.fc.weight[ANOMALY]).double(), expected,
                               rtol=1e-5, atol=1e-5)  # float32 sums of 512 terms
    upsampled = F.interpolate(expected[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    with torch.no_grad():
        torch.testing.assert_close(model.cam(maps, (64, 64)).double(), upsampled, rtol=1e-5, atol=1e-5)


def test_cam_of_constant_maps_is_constant(make_model) -> None:
    model = make_model("mobilenet_v2").eval()
    _hand_set_fc(model)
    maps = torch.ones(1, 1280, 2, 2)
    expected = float(model.fc.weight[ANOMALY].detach().double().sum())  # sum_c w[c] * 1
    with torch.no_grad():
        cam = model.cam(maps, (64, 64))
    torch.testing.assert_close(cam, torch.full((1, 64, 64), expected, dtype=torch.float32), rtol=1e-5, atol=1e-4)


def test_forward_heatmap_and_scores_from_conv5_3(make_model) -> None:
    model = make_model("vgg16").eval()
    _hand_set_fc(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        maps = model.trainable(model.frozen(x))  # (2, 512, 4, 4) conv5_3 after ReLU at 64 px
        probs, cam = model(x)
    assert maps.shape == (2, 512, 4, 4) and (maps >= 0).all()
    expected_cam = F.interpolate(_loop_cam(maps, model.fc.weight[ANOMALY].tolist())[:, None], size=(64, 64),
                                 mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(cam.double(), expected_cam, rtol=1e-4, atol=1e-4)
    # Head: 2x2 max-pool, global average, dense layer.
    pooled = torch.stack([torch.stack([maps[b, :, i:i + 2, j:j + 2].amax((1, 2)) for i in (0, 2) for j in (0, 2)]).mean(0)
                          for b in range(2)])  # (2, 512)
    logits = pooled @ model.fc.weight.T + model.fc.bias
    torch.testing.assert_close(probs, logits.softmax(1), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- training


def _tiny_data(n: int = 6, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, size, size) uint8 images; the Anomaly half carries a bright square so there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(60, 180, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0] * (n // 2) + [1] * (n - n // 2))
    images[labels == 1, :, 8:24, 8:24] = 255
    return images, labels


def _train(model: CAMClassifier, images: torch.Tensor, labels: torch.Tensor, **kwargs) -> dict:
    args = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, epochs=2, lr=1e-3, class_weight=[1.0, 3.0],
                batch_size=4, target_train_accuracy=None, seed=0, device=CPU, precision="fp32", progress=False)
    args.update(kwargs)
    return train_model(model, images, labels, **args)


@pytest.mark.parametrize("backbone", ["vgg16", "mobilenet_v2"])
def test_cached_and_plain_loops_agree(make_model, backbone: str) -> None:
    images, labels = _tiny_data()
    cached, plain = make_model(backbone), make_model(backbone)
    before = {k: v.clone() for k, v in cached.state_dict().items()}
    h_cached = _train(cached, images, labels, cache=True)
    h_plain = _train(plain, images, labels, cache=False)
    assert h_cached["cached_features"] and not h_plain["cached_features"]
    assert len(h_cached["loss"]) == len(h_plain["loss"]) == 2
    torch.testing.assert_close(torch.tensor(h_cached["loss"]), torch.tensor(h_plain["loss"]), rtol=0, atol=1e-5)
    assert h_cached["accuracy"] == h_plain["accuracy"]
    after_cached, after_plain = cached.state_dict(), plain.state_dict()
    for name, value in after_cached.items():
        torch.testing.assert_close(value, after_plain[name], rtol=0, atol=1e-5, msg=name)
        if name.startswith("frozen."):
            assert torch.equal(value, before[name]), f"frozen {name} changed"
    assert not torch.equal(after_cached["fc.weight"], before["fc.weight"])  # training did something
    conv5 = "trainable.24.weight" if backbone == "vgg16" else "trainable.14.conv.0.0.weight"
    assert not torch.equal(after_cached[conv5], before[conv5])


def test_augment_switches_cache_off(make_model, monkeypatch) -> None:
    images, labels = _tiny_data()
    model = make_model("mobilenet_v2")
    calls = {"frozen": 0, "augment": 0}
    original = model.frozen_features

    def counting_frozen(*args, **kwargs):
        calls["frozen"] += 1
        return original(*args, **kwargs)

    def flip(batch: torch.Tensor) -> torch.Tensor:
        calls["augment"] += 1
        return batch.flip(-1)

    monkeypatch.setattr(model, "frozen_features", counting_frozen)
    history = _train(model, images, labels, cache=True, augment=flip, epochs=2, batch_size=4)
    assert not history["cached_features"]
    assert calls == {"frozen": 4, "augment": 4}  # 2 epochs x 2 batches (4 + 2 images), frozen layers every step
    # The augmented images are what trains: same result as training on pre-flipped images.
    reference = make_model("mobilenet_v2")
    h_ref = _train(reference, images.flip(-1), labels, cache=False, epochs=2, batch_size=4)
    torch.testing.assert_close(torch.tensor(history["loss"]), torch.tensor(h_ref["loss"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.fc.weight, reference.fc.weight, rtol=0, atol=1e-6)


def test_cache_runs_frozen_layers_once(make_model, monkeypatch) -> None:
    images, labels = _tiny_data()
    model = make_model("mobilenet_v2")
    calls = []
    original = model.frozen_features
    monkeypatch.setattr(model, "frozen_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    history = _train(model, images, labels, cache=True, epochs=3, batch_size=4)
    assert history["cached_features"] and len(calls) == 2  # one pass of 2 batches, then 3 epochs on the cache


def test_target_train_accuracy_stops_early(make_model) -> None:
    images, labels = _tiny_data(8)
    # lr 1e-2 makes the accuracy move between epochs (here 0.5, then 0.75), so the stop is not always epoch 1.
    full = _train(make_model("mobilenet_v2"), images, labels, epochs=4, lr=1e-2, target_train_accuracy=None)
    assert full["epochs_run"] == 4 and not full["early_stopped"]
    target = max(full["accuracy"][:3])
    expected_epochs = next(i + 1 for i, a in enumerate(full["accuracy"]) if a >= target)  # first to reach it
    stopped = _train(make_model("mobilenet_v2"), images, labels, epochs=4, lr=1e-2, target_train_accuracy=target)
    assert stopped["early_stopped"] and expected_epochs < 4
    assert stopped["epochs_run"] == expected_epochs and stopped["accuracy"] == full["accuracy"][:expected_epochs]
    always = _train(make_model("mobilenet_v2"), images, labels, epochs=4, target_train_accuracy=0.0)
    assert always["early_stopped"] and always["epochs_run"] == 1
    never = _train(make_model("mobilenet_v2"), images, labels, epochs=2, target_train_accuracy=1.01)
    assert not never["early_stopped"] and never["epochs_run"] == 2


def test_seeded_runs_are_reproducible() -> None:
    images, labels = _tiny_data()

    def run(seed: int) -> tuple[list[float], torch.Tensor]:
        set_seed(seed)
        model = CAMClassifier("mobilenet_v2", pretrained=False)
        history = _train(model, images, labels, seed=seed, epochs=2)
        return history["loss"], model.fc.weight.detach().clone()

    loss_a, w_a = run(3)
    loss_b, w_b = run(3)
    loss_c, _ = run(4)
    assert loss_a == loss_b and torch.equal(w_a, w_b)
    assert loss_a != loss_c
