"""Tests of the evaluation figures against hand-placed boxes, counts and known AUROCs."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from PIL import Image  # noqa: E402

from utils.plots import (  # noqa: E402
    plot_confusion_matrix,
    plot_prediction_grid,
    plot_roc_curves,
    save_figure,
    select_grid_samples,
)

# index:   0  1  2  3  4  5  6  7
Y_TRUE = [1, 1, 1, 0, 0, 0, 1, 0]
Y_PRED = [1, 0, 1, 1, 0, 0, 0, 0]
FN, FP, TP, TN = {1, 6}, {3}, {0, 2}, {4, 5, 7}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_select_grid_samples_one_of_each_errors_first():
    idx = select_grid_samples(Y_TRUE, Y_PRED, n=4, seed=0)
    assert len(idx) == 4
    assert idx[0] in FN and idx[1] in FP and idx[2] in TP and idx[3] in TN


def test_select_grid_samples_round_robin_and_grouped():
    idx = select_grid_samples(Y_TRUE, Y_PRED, n=5, seed=3)
    # second round starts with the false negatives again; picks are listed group by group
    assert set(idx[:2]) == FN and idx[2] in FP and idx[3] in TP and idx[4] in TN
    # six picks: round 2 skips the exhausted FP group, so it gives a second FN then a second TP
    idx6 = select_grid_samples(Y_TRUE, Y_PRED, n=6, seed=3)
    assert set(idx6[:2]) == FN and idx6[2] in FP and idx6[3] in TP and idx6[4] in TP and idx6[5] in TN


def test_select_grid_samples_deterministic_bounded_unique():
    for n in (0, 1, 3, 8, 100):
        a = select_grid_samples(Y_TRUE, Y_PRED, n=n, seed=7)
        b = select_grid_samples(Y_TRUE, Y_PRED, n=n, seed=7)
        np.testing.assert_array_equal(a, b)
        assert len(a) == min(n, 8)
        assert len(set(a.tolist())) == len(a)
    everything = select_grid_samples(Y_TRUE, Y_PRED, n=100)
    assert set(everything[:2]) == FN and everything[2] in FP
    assert set(everything[3:5]) == TP and set(everything[5:]) == TN
    # the seed only reorders within a group: some seed changes the order of the three true negatives
    orders = {tuple(select_grid_samples(Y_TRUE, Y_PRED, n=100, seed=s)[5:]) for s in range(10)}
    assert len(orders) > 1


def test_select_grid_samples_bad_input():
    with pytest.raises(ValueError, match="y_pred"):
        select_grid_samples([0, 1], [0], n=2)
    with pytest.raises(ValueError, match="n=-1"):
        select_grid_samples([0, 1], [0, 1], n=-1)
    with pytest.raises(ValueError, match="y_true"):
        select_grid_samples([0, 2], [0, 1], n=2)


def _grid_inputs(n: int = 2, h: int = 16, w: int = 20):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=gen)
    maps = {"cam": np.random.default_rng(0).random((n, h, w)), "patch_knn": np.zeros((n, h, w))}
    masks = np.zeros((n, h, w), dtype=bool)
    masks[:, 4:8, 5:10] = True
    return images, maps, masks


def test_grid_shape_boxes_and_titles():
    images, maps, masks = _grid_inputs()
    boxes = [np.array([[2.0, 3.0, 7.0, 9.0]]), np.array([[1.0, 1.0, 4.0, 4.0]])]
    fig = plot_prediction_grid(images, maps, y_true=[1, 0], y_pred=[1, 0], scores=[0.93, 0.12],
                               masks=masks, boxes=boxes, defect_types=["crack", "good"], threshold_level=2 / 3)
    assert len(fig.axes) == 2 * 3 + 1  # and the colour bar, with the box threshold marked
    bar = fig.axes[-1]
    assert [t.get_text() for t in bar.get_yticklabels()] == ["good parts", "box threshold", "1.5x"]
    first, second = fig.axes[0], fig.axes[3]  # row-major: column 0 of rows 0 and 1
    rects = [p for p in first.patches if isinstance(p, Rectangle)]
    assert len(rects) == 1
    # pixels 2..6 (x) and 3..8 (y) covered: edges half a pixel outside the first and last centres
    assert rects[0].get_xy() == pytest.approx((1.5, 2.5))
    assert rects[0].get_width() == pytest.approx(5.0) and rects[0].get_height() == pytest.approx(6.0)
    assert not [p for p in second.patches if isinstance(p, Rectangle)]
    assert first.get_title() == "true Anomaly/crack · pred Anomaly · score=0.93"
    assert second.get_title() == "true Good · pred Good · score=0.12"
    assert [ax.get_title() for ax in fig.axes[1:3]] == ["cam", "patch_knn"]
    # the mask contour is drawn on every column
    assert all(ax.collections for ax in fig.axes[:-1])


def test_grid_predicted_good_anomaly_has_no_box_and_red_title():
    images, maps, masks = _grid_inputs(n=1)
    fig = plot_prediction_grid(images, maps, y_true=[1], y_pred=[0], scores=[0.4],
                               masks=masks, boxes=[np.array([[0.0, 0.0, 3.0, 3.0]])])
    assert not [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert fig.axes[0].title.get_color() == "red"


def test_grid_single_image_without_masks_or_boxes():
    images, maps, _ = _grid_inputs(n=1)
    fig = plot_prediction_grid(images.numpy(), {"cam": maps["cam"]}, [0], [1], [0.7])
    assert len(fig.axes) == 2 + 1  # image, map, colour bar
    assert not fig.axes[0].patches and not fig.axes[0].collections


def test_grid_rejects_mismatched_map():
    images, maps, _ = _grid_inputs()
    with pytest.raises(ValueError, match="'cam'"):
        plot_prediction_grid(images, {"cam": maps["cam"][:, :8]}, [0, 1], [0, 1], [0.1, 0.9])


def test_confusion_matrix_cells():
    fig = plot_confusion_matrix({"TP": 7, "FN": 3, "FP": 2, "TN": 11})
    ax = fig.axes[0]
    cells = {tuple(np.round(t.get_position()).astype(int)): t.get_text() for t in ax.texts}
    # (x = predicted column, y = true row), order [Good, Anomaly]
    assert cells == {(0, 0): "11", (1, 0): "2", (0, 1): "3", (1, 1): "7"}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Good", "Anomaly"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Good", "Anomaly"]
    with pytest.raises(ValueError, match="TN"):
        plot_confusion_matrix({"TP": 1, "FN": 0, "FP": 0})


def test_roc_curves_legend_auroc():
    y = [0, 0, 1, 1]
    # "half": positives 0.8, 0.1 against negatives 0.9, 0.2 win 1 of 4 pairs -> AUROC 0.25
    fig = plot_roc_curves(y, {"perfect": np.array([0.1, 0.2, 0.8, 0.9]), "half": torch.tensor([0.9, 0.2, 0.8, 0.1])})
    legend = " | ".join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
    assert "perfect" in legend and "1.00" in legend
    assert "half" in legend and "0.25" in legend


def test_roc_one_class_gives_note():
    fig = plot_roc_curves([1, 1, 1], {"cam": [0.2, 0.5, 0.9]})
    assert any("one class" in t.get_text() for t in fig.axes[0].texts)
    assert not fig.axes[0].lines


def test_save_figure_png_atomic(tmp_path):
    fig = plot_roc_curves([0, 1], {"cam": [0.2, 0.9]})
    path = tmp_path / "new" / "folder" / "curves.png"
    save_figure(fig, path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]
    assert not plt.fignum_exists(fig.number)
    with pytest.raises(ValueError, match=".png"):
        save_figure(plot_roc_curves([0, 1], {"cam": [0.2, 0.9]}), tmp_path / "curves.jpg")
