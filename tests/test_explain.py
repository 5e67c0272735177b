"""Grad-CAM and LayerCAM against hand-computed cases; the heads' pooling; explanations through predict."""

import numpy as np
import pytest
import torch

from utils import inference
from utils import explain, localizers, postprocess
from utils.model import CAMClassifier, class_activation_map


def test_grad_cam_by_hand():
    # two channels on a 1x2 grid; channel weights are the mean gradients: (1+3)/2 = 2 and (-2+0)/2 = -1
    a = torch.tensor([[[[1.0, 2.0]], [[4.0, 1.0]]]])  # (1, 2, 1, 2)
    g = torch.tensor([[[[1.0, 3.0]], [[-2.0, 0.0]]]])
    # 2*[1, 2] - 1*[4, 1] = [-2, 3] -> ReLU -> [0, 3]
    assert explain.grad_cam(a, g).tolist() == [[[0.0, 3.0]]]


def test_layer_cam_by_hand():
    a = torch.tensor([[[[1.0, 2.0]], [[4.0, 1.0]]]])
    g = torch.tensor([[[[1.0, 3.0]], [[-2.0, 0.5]]]])
    # position 0: 1*1 + 0*4 = 1 (negative gradient dropped); position 1: 3*2 + 0.5*1 = 6.5
    assert explain.layer_cam(a, g).tolist() == [[[1.0, 6.5]]]


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    return CAMClassifier("mobilenet_v2", pretrained=False).eval()


def test_last_layer_grad_cam_of_the_published_head_is_the_margin_cam(mobilenet):
    # With global average pooling the margin is (w_a - w_g) . GAP(A) + b, so dMargin/dA_c =
    # (w_a - w_g)_c / (h w) everywhere, and Grad-CAM = ReLU(CAM of w_a - w_g) / (h w).
    x = torch.randn(2, 3, 64, 64)
    frozen, (tapped,) = mobilenet.frozen_features(x, (6,))
    _, maps = mobilenet.head(frozen)
    _, ex = explain.explanation_maps(mobilenet, tapped, 6)
    w = mobilenet.fc.weight
    expected = torch.relu(class_activation_map(maps, w[1] - w[0])) / (maps.shape[2] * maps.shape[3])
    assert torch.allclose(ex["gradcam"], expected.detach(), atol=1e-6, rtol=1e-4)
    assert ex["gradcam_s8"].shape == ex["layercam_s8"].shape == tapped.shape[:1] + tapped.shape[2:]  # stride 8


def test_stride8_maps_follow_the_evidence():
    # A network whose margin is the sum of one channel at the tap: LayerCAM at the tap is that
    # channel's (positive) activation, so its maximum sits where the activation is largest.
    torch.manual_seed(0)
    net = CAMClassifier("vgg16", pretrained=False).eval()
    tapped = torch.zeros(1, 512, 8, 8)
    tapped[0, 7, 5, 2] = 3.0
    net.trainable = torch.nn.Identity()  # pool4 -> head directly
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.weight[1, 7] = 1.0
    _, ex = explain.explanation_maps(net, tapped, 22)
    m = ex["layercam_s8"][0]
    assert m.shape == (8, 8) and divmod(int(m.argmax()), 8) == (5, 2) and m.sum() > 0


def test_pooling_heads_by_hand():
    net = CAMClassifier("mobilenet_v2", pretrained=False)
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.copy_(torch.tensor([0.5, -1.0]))
        net.fc.weight[1, 0] = 2.0  # Anomaly score at a position = 2 * channel 0 - 1
    maps = torch.zeros(1, 1280, 10, 10)
    maps[0, 0, 3, 4] = 5.0  # one hot position: anomaly score 9 there, -1 elsewhere
    net.pooling = "max"
    assert net.head_from_maps(maps).tolist() == [[0.5, 9.0]]
    net.pooling = "topk"  # top 10 of 100 positions: (9 + 9 * -1) / 10 = 0
    assert net.head_from_maps(maps)[0, 1].item() == pytest.approx(0.0)
    net.pooling = "avg"  # the published head: (9 + 99 * -1) / 100 = -0.9
    assert net.head_from_maps(maps)[0, 1].item() == pytest.approx(-0.9)
    with pytest.raises(ValueError, match="pooling='mean'"):
        CAMClassifier("mobilenet_v2", pretrained=False, pooling="mean")


def test_predict_returns_explanations_and_localizers_offer_them(mobilenet):
    images = torch.randint(0, 255, (3, 3, 64, 64), dtype=torch.uint8)
    kwargs = dict(batch_size=2, device=torch.device("cpu"), precision="fp32", progress=False)
    without = inference.predict(mobilenet, images, (0.5,) * 3, (0.25,) * 3, explain=True, **kwargs)
    assert "gradref" not in without  # no reference: the map that needs it is left out, the others stay
    assert all(name in without for name in explain.EXPLANATIONS if name not in explain.REFERENCE_EXPLANATIONS)
    mobilenet.explain_reference = torch.rand(96, 4, 4)  # the frozen output at 64 px: (96, 4, 4)
    try:
        out = inference.predict(mobilenet, images, (0.5,) * 3, (0.25,) * 3, explain=True, **kwargs)
    finally:
        mobilenet.explain_reference = None
    plain = inference.predict(mobilenet, images, (0.5,) * 3, (0.25,) * 3, **kwargs)
    np.testing.assert_allclose(out["p_anomaly"], plain["p_anomaly"], rtol=1e-5)
    assert all(out[name].shape == (3, 64, 64) for name in explain.EXPLANATIONS)
    maps = localizers.maps_of(out)
    assert set(maps) == {"cam", *explain.EXPLANATIONS, "explain"}
    np.testing.assert_array_equal(maps["explain"], maps[explain.EXPLAIN])
    # comparable across images: each map's maximum is its image's Anomaly probability
    np.testing.assert_allclose(maps["explain"].reshape(3, -1).max(1), out["p_anomaly"], rtol=1e-5)
    scores = localizers.localizer_image_scores(maps, out["p_anomaly"])
    assert set(scores) == set(maps)


def test_reference_attribution_by_hand():
    a = torch.tensor([[[[1.0, 2.0]], [[4.0, 1.0]]]])  # (1, 2, 1, 2)
    g = torch.tensor([[[[1.0, 3.0]], [[-2.0, 0.5]]]])
    r = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])  # (2, 1, 2): the reference per channel and position
    # position 0: 1*(1-1) + -2*(4-1) = -6 -> 0; position 1: 3*(2-0) + 0.5*(1-1) = 6
    assert explain.reference_attribution(a, g, r).tolist() == [[[0.0, 6.0]]]
    # LayerCAM keeps position 0's normal activation that the reference cancels: 1*1 + 0 = 1
    assert explain.layer_cam(a, g)[0, 0, 0].item() == 1.0
    with pytest.raises(ValueError, match="another image size"):
        explain.reference_attribution(a, g, torch.zeros(2, 2, 2))


def test_reference_features_are_the_good_images_mean():
    f = torch.arange(12.0).view(3, 1, 2, 2)
    labels = torch.tensor([0, 1, 0])
    assert explain.reference_features(f, labels).tolist() == [[[4.0, 5.0], [6.0, 7.0]]]  # (f0 + f2) / 2
    with pytest.raises(ValueError, match="no"):
        explain.reference_features(f, torch.ones(3, dtype=torch.long))


def test_gradref_estimates_the_margin_lost_by_restoring_the_reference():
    # gradref at a position is the first-order drop of the decision margin when that position's
    # frozen features are replaced by the reference's: check it against the real drop for a
    # reference close to the features, position by position (VGG16: conv4_3 tap -> pool4 -> conv5 head).
    torch.manual_seed(1)
    net = CAMClassifier("vgg16", pretrained=False).eval()
    tapped = torch.relu(torch.randn(1, 512, 8, 8))  # conv4_3 output of a 64 px image
    frozen = net.frozen[23:](tapped)  # (1, 512, 4, 4)
    reference = (frozen[0] - 0.01 * torch.rand_like(frozen[0])).detach()
    net.explain_reference = reference
    _, ex = explain.explanation_maps(net, tapped, 22)
    with torch.no_grad():
        margin = explain.decision_margin(net.head(frozen)[0])[0]
        drops = torch.zeros(frozen.shape[2:])
        for i in range(frozen.shape[2]):
            for j in range(frozen.shape[3]):
                restored = frozen.clone()
                restored[0, :, i, j] = reference[:, i, j]
                drops[i, j] = margin - explain.decision_margin(net.head(restored)[0])[0]
    expected = torch.relu(drops)
    assert ex["gradref"].shape == (1, *frozen.shape[2:])
    assert expected.max() > 0
    assert torch.allclose(ex["gradref"][0], expected, atol=0.05 * expected.max().item())
    assert int(ex["gradref"][0].argmax()) == int(expected.argmax())
