"""The fold pipeline (utils.helper): one frozen pass serves every fold, what a fold trains and scores, cross-validation."""

import numpy as np
import pytest
import torch

from sklearn.metrics import roc_auc_score

from utils import calibration, dataloader, evidence, helper, inference, parameters
from utils.constants import GOOD
from utils.metrics import pixel_auroc
from utils.patchknn import PatchRule
from utils.synthetic import generate_synthetic_subset

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """17 synthetic images at 64 px: samples, decoded images (N, 3, 64, 64) uint8, labels (N,)."""
    root = tmp_path_factory.mktemp("data")
    generate_synthetic_subset(root / "synthetic", seed=0, n_train_good=6, n_test_good=2, n_per_defect=3, image_size=64)
    samples = dataloader.index_subset(root, "synthetic")
    return samples, dataloader.load_images(root, samples, 64), torch.tensor([s.label for s in samples])


def _config(tmp_path, **overrides):
    return parameters.training_config(**{
        "data_dir": str(tmp_path), "subset_name": "synthetic", "download": False, "backbone": "mobilenet_v2",
        "pretrained": False, "image_size": 64, "batch_size": 5, "epochs": 2, "lr": 1e-3, "class_weight": [1, 3],
        "target_train_accuracy": None, "test_size": 0.2, "seed": 0, "heatmap_thres": 0.7, "n_cv_folds": 0,
        "weights_dir": str(tmp_path), "results_dir": str(tmp_path), "device": "cpu", "precision": "fp32",
        "patch_memory_size": 150, "patch_memory_method": "random", "calibration": "holdout", "head": "published",
        **overrides})


def test_frozen_pass_keeps_the_taps_it_is_asked_for(subset, make_model):
    _, images, _ = subset
    net = make_model("mobilenet_v2")
    keep = torch.tensor([i % 3 == 0 for i in range(len(images))])
    frozen = helper.frozen_pass(net, images, (0.5,) * 3, (0.25,) * 3, batch_size=4, device=CPU, precision="fp32",
                                tap_images=keep, progress=False)
    assert frozen.features.shape == (17, 96, 4, 4) and frozen.tap.shape == (int(keep.sum()), 32, 8, 8)
    full = helper.frozen_pass(net, images, (0.5,) * 3, (0.25,) * 3, batch_size=4, device=CPU, precision="fp32",
                              progress=False)
    idx = torch.tensor([9, 0, 3])
    torch.testing.assert_close(frozen.tap_of(idx), full.tap_of(idx))
    # the default embedding is the stride-8 tap's 32 channels; "both" adds the stride-16 output's 96
    assert frozen.patches_of(idx, PatchRule()).shape == (3 * 8 * 8, 32)
    assert frozen.patches_of(idx, PatchRule("both")).shape == (3 * 8 * 8, 32 + 96)
    with pytest.raises(ValueError, match="no stride-8 tap"):
        frozen.tap_of(torch.tensor([1]))


def test_a_fold_scores_from_the_cache_what_predict_scores_from_the_images(subset, make_model, tmp_path):
    samples, images, labels = subset
    config = _config(tmp_path)
    template = make_model("mobilenet_v2")
    untouched = {k: v.clone() for k, v in template.state_dict().items()}
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=5, device=CPU,
                                precision="fp32", progress=False)
    train, test = torch.arange(0, 17, 2), torch.arange(1, 17, 2)
    fold = helper.run_fold(config, template, frozen, labels, train, test, device=CPU, precision="fp32",
                           test_maps=True, progress=False)
    assert all(torch.equal(v, template.state_dict()[k]) for k, v in untouched.items())  # the template stays untrained
    assert fold.classifier and fold.history["epochs_run"] == 2
    # the memory holds patches of the good training images only, less those held back to calibrate
    n_good = int((labels[train] == GOOD).sum())
    held = fold.calibration_images
    assert len(held) == 1 and set(held.tolist()) <= set(train.tolist()) and bool((labels[held] == GOOD).all())
    assert fold.memory_info["n_patches"] == (n_good - 1) * 8 * 8 and len(fold.patch_memory) == 150
    direct = inference.predict(fold.model, images[test], config["mean"], config["std"], batch_size=5, device=CPU,
                               precision="fp32", patch_memory=fold.patch_memory, patch_rule=PatchRule(), explain=True)
    assert set(fold.test) == set(direct)
    for key, value in direct.items():
        np.testing.assert_allclose(fold.test[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    assert set(fold.calibration["thresholds"]) >= {"cam", "patch_knn", "cam_knn", "gradref", "explain"}
    # the image that calibrates is the one `calibration_split` holds back, and the memory is exactly the
    # one built from the other good training images: no calibration image is in it. Catches: the
    # held-back images fitted too (`run_fold` fitting on all of `train`), or calibration on fitted images
    kept, held_back = helper.calibration_split(labels[train], config["calibration_share"], config["seed"])
    assert torch.equal(held, train[held_back])
    fitted_good = train[kept][labels[train[kept]] == GOOD]
    assert torch.equal(fold.patch_memory, helper.patch_memory_of(config, frozen, fitted_good)[0])


def test_cross_validation_holds_out_every_image_once(subset, make_model, tmp_path):
    samples, images, _ = subset
    config = _config(tmp_path, epochs=1, patch_memory_size=0)
    template = make_model("mobilenet_v2")
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=5, device=CPU,
                                precision="fp32", progress=False)
    seen = []
    results = helper.cross_validate(config, samples, template, frozen, n_folds=3, device=CPU, precision="fp32",
                                    on_fold_end=lambda fold, m, held_out, _: seen.append((fold, len(held_out))))
    assert [f for f, _ in seen] == [1, 2, 3] and sum(n for _, n in seen) == 17 and len(results) == 3
    counted = sum(sum(r["confusion_matrix"].values()) for r in results)
    anomalies = sum(r["confusion_matrix"]["TP"] + r["confusion_matrix"]["FN"] for r in results)
    assert counted == len(samples) == 17 and anomalies == 9


def test_cross_fit_never_scores_an_image_with_a_model_that_trained_on_it(subset, make_model, tmp_path, monkeypatch):
    samples, images, labels = subset
    config = _config(tmp_path, calibration="cross_fit", patch_memory_size=100)
    template = make_model("mobilenet_v2")
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=5, device=CPU,
                                precision="fp32", progress=False)
    trained_on, scored = {}, []
    real_fit, real_score = helper.fit, helper.score

    def spy_fit(config, template, frozen, labels, fit_idx, **kwargs):
        fitted = real_fit(config, template, frozen, labels, fit_idx, **kwargs)
        trained_on[id(fitted)] = set(fit_idx.tolist())
        return fitted

    def spy_score(fitted, frozen, idx, **kwargs):
        scored.append((id(fitted), set(idx.tolist())))
        return real_score(fitted, frozen, idx, **kwargs)

    monkeypatch.setattr(helper, "fit", spy_fit)
    monkeypatch.setattr(helper, "score", spy_score)
    train, test = torch.arange(0, 17, 2), torch.arange(1, 17, 2)
    types = [s.defect_type for s in samples]
    fold = helper.run_fold(config, template, frozen, labels, train, test, types=types, device=CPU,
                           precision="fp32", progress=False)
    calibration_calls = [(model, idx) for model, idx in scored if not idx & set(test.tolist())]
    assert len(calibration_calls) >= 2  # one model per group that holds good images
    for model, idx in calibration_calls:
        assert not idx & trained_on[model]  # scored only by a model that never trained on them
    good_train = {int(i) for i in train if labels[i] == GOOD}
    assert sorted(set().union(*(idx for _, idx in calibration_calls))) == sorted(good_train)
    assert sorted(fold.calibration_images.tolist()) == sorted(good_train) and len(fold.calibration_scores) == 4
    assert trained_on[id(fold.fitted)] == set(train.tolist())  # the deployed model trains on every image


def test_assign_groups_deals_each_type_evenly():
    groups = helper.assign_groups(["good"] * 10 + ["crack"] * 5, 5, seed=0)
    assert sorted(groups[:10].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert sorted(groups[10:].tolist()) == [0, 1, 2, 3, 4]
    assert torch.equal(groups, helper.assign_groups(["good"] * 10 + ["crack"] * 5, 5, seed=0))


def test_holdout_calibration_images_stay_out_of_the_fit():
    labels = torch.tensor([0] * 10 + [1] * 4)
    fit, cal = helper.calibration_split(labels, 0.2, seed=3)
    assert len(cal) == 2 and bool((labels[cal] == GOOD).all()) and not set(fit.tolist()) & set(cal.tolist())
    assert sorted(fit.tolist() + cal.tolist()) == list(range(14))
    with pytest.raises(ValueError, match="calibration_share"):
        helper.calibration_split(torch.tensor([0, 1, 1]), 0.5, seed=0)


@pytest.fixture(scope="module")
def larger_subset(tmp_path_factory):
    """64 synthetic images at 64 px (30 + 10 good, 8 per defect type) with masks."""
    root = tmp_path_factory.mktemp("larger")
    generate_synthetic_subset(root / "synthetic", seed=1, n_train_good=30, n_test_good=10, n_per_defect=8,
                              image_size=64)
    samples = dataloader.index_subset(root, "synthetic")
    return (samples, dataloader.load_images(root, samples, 64), dataloader.load_masks(root, samples, 64),
            torch.tensor([s.label for s in samples]))


def _far_normal_patches(n_plain: int, n_far: int, n_defective: int, seed: int):
    """The evidence head's inputs for images of 4 x 4 patches with 4-dim residuals (noise 0.05 per
    dim): `n_plain` good images; `n_far` good images with one normal patch far from the memory
    (residual 3.0 along dim 0: a shade of good part the memory lacks); `n_defective` images with one
    defect patch nearer (1.5 along dim 1). The distance alone ranks the far normal patches above the
    defects; only the residual's direction tells them apart. Returns (inputs, labels (N,), cells (N,))."""
    g = torch.Generator().manual_seed(seed)
    n = n_plain + n_far + n_defective
    residual = 0.05 * torch.randn(n, 4, 4, 4, generator=g)  # (N, D, h, w)
    cells = torch.randint(0, 16, (n,), generator=g)
    for i in range(n_plain, n):
        far = i < n_plain + n_far
        residual[i, 0 if far else 1, cells[i] // 4, cells[i] % 4] += 3.0 if far else 1.5
    labels = torch.tensor([GOOD] * (n_plain + n_far) + [1] * n_defective)
    return evidence.EvidenceInputs(residual.half(), residual.norm(dim=1)), labels, cells


def test_training_teaches_the_evidence_head_what_the_patch_distance_gets_wrong():
    """Before its first step the head is the patch map as a classifier (image AUROC 0.75 on this
    case: it ranks the far normal patches above the defects); trained with its defaults, it tells
    them apart on new images, and its map says why: the far normal patch is colder than the defect.
    Catches: no training (STEPS = 0, or the optimiser's step removed), which leaves the patch map."""
    train, y, _ = _far_normal_patches(30, 10, 20, seed=0)
    test, y_test, cells = _far_normal_patches(30, 10, 20, seed=1)
    scored = {}
    for name, steps in (("untrained", {"steps": 0}), ("trained", {})):  # trained: the defaults
        torch.manual_seed(0)
        head = evidence.EvidenceHead(4)
        evidence.train_head(head, train, y, class_weight=[1, 3], device=CPU, **steps)
        scored[name] = evidence.evidence_scores(head, *test.batch(torch.arange(len(test))))
    (p0, _), (p, patch) = scored["untrained"], scored["trained"]
    assert roc_auc_score(y_test, p0) <= 0.8  # the starting point: the patch distance, fooled
    assert roc_auc_score(y_test, p) >= 0.95 and ((p > 0.5).long() == y_test).float().mean() >= 0.95
    hot = patch.flatten(1)[torch.arange(len(test)), cells]  # each image's planted patch
    assert hot[30:40].max() < hot[40:].min()  # far normal patches below every defect patch


class _FreshCopies(evidence.EvidenceInputs):
    """Inputs that convert each chunk to a fresh float32 tensor, whatever buffer they are given."""

    def batch(self, idx, out=None):
        return super().batch(idx)


def test_training_through_the_reused_buffer_changes_no_weight():
    """Training converts each chunk's residuals into one reused float32 buffer; the head it trains
    is the head a fresh float32 copy per chunk trains, weight for weight (45 images: a short last
    chunk; with inside cells and mask targets).
    Fails when: the buffer is returned without the chunk copied into it, a chunk is read from a
    buffer another chunk refilled, or the last, shorter chunk reads rows left from the one before."""
    g = torch.Generator().manual_seed(0)
    residual = (0.1 * torch.randn(45, 6, 5, 5, generator=g)).half().contiguous(memory_format=torch.channels_last)
    distance = residual.float().norm(dim=1)
    labels = torch.tensor([1] * 9 + [GOOD] * 36)
    inside = torch.ones(45, 5, 5, dtype=torch.bool)
    inside[:, 0] = False
    masks = torch.zeros(45, 40, 40, dtype=torch.bool)
    masks[:9, 8:24, 16:32] = True
    targets = evidence.mask_targets(masks, labels == 1, (5, 5))
    heads = {}
    for kind in (evidence.EvidenceInputs, _FreshCopies):
        torch.manual_seed(0)
        heads[kind] = evidence.EvidenceHead(6, hidden=8)
        evidence.train_head(heads[kind], kind(residual, distance, inside), labels, class_weight=[1, 3], device=CPU,
                            targets=targets, steps=5)
    for (name, a), b in zip(heads[evidence.EvidenceInputs].state_dict().items(),
                            heads[_FreshCopies].state_dict().values()):
        assert torch.equal(a, b), name


def test_the_evidence_heads_patch_logits_are_its_1x1_convolutions_by_hand():
    """A patch's logit is slope * d + offset + net([residual * sqrt(D) / scale, d]) with d = distance
    / scale, net the two 1x1 convolutions of the head's weights (ReLU between), computed here patch
    by patch with plain sums, for residuals stored channels first and channels last.
    Fails when: the distance's column of the first layer's weight is taken as a residual's (or the
    other way round), the rescaling is left out of the weight, or the second layer's bias is dropped."""
    torch.manual_seed(0)
    head = evidence.EvidenceHead(3, hidden=4)
    with torch.no_grad():
        for parameter in head.net.parameters():
            parameter.copy_(torch.randn_like(parameter))
        head.scale.fill_(2.0)
        head.slope.fill_(0.7)
        head.offset.fill_(-0.2)
    residual, distance = torch.randn(2, 3, 2, 2), torch.rand(2, 2, 2) * 3
    w1, b1 = head.net[0].weight[:, :, 0, 0], head.net[0].bias  # (4, 4): 3 residual dims, then the distance
    w2, b2 = head.net[2].weight[0, :, 0, 0], head.net[2].bias[0]
    expected = torch.empty(2, 2, 2)
    for n, i, j in np.ndindex(2, 2, 2):
        d = distance[n, i, j] / 2.0
        x = torch.cat([residual[n, :, i, j] * (3 ** 0.5 / 2.0), d[None]])
        expected[n, i, j] = 0.7 * d - 0.2 + (torch.relu(w1 @ x + b1) * w2).sum() + b2
    for stored in (residual, residual.contiguous(memory_format=torch.channels_last)):
        logits, correction = head.parts(stored, distance)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(correction, expected - 0.7 * distance / 2.0 + 0.2, rtol=1e-5, atol=1e-5)


def test_the_evidence_head_in_the_fold_pipeline_decides_and_its_map_is_hotter_inside_the_defects(
        larger_subset, make_model, tmp_path):
    """The fold pipeline trains the evidence head on the group-excluded memory and scores with it.
    Its thresholds are met by the patch map alone as well: that training changes the decision is
    the test above."""
    samples, images, masks, labels = larger_subset
    config = _config(tmp_path, head="evidence", patch_memory_size=1000, **parameters.PUBLISHED_RECIPE)
    template = make_model("mobilenet_v2")
    frozen = helper.frozen_pass(template, images, config["mean"], config["std"], batch_size=8, device=CPU,
                                precision="fp32", progress=False)
    train, test = dataloader.split_samples(samples, 0.3, seed=0)
    train_idx, test_idx = dataloader.positions(samples, train), dataloader.positions(samples, test)
    fold = helper.run_fold(config, template, frozen, labels, train_idx, test_idx, types=[s.defect_type for s in samples],
                           device=CPU, precision="fp32", test_maps=True, progress=False)
    head = fold.model.evidence_head
    assert head is not None and fold.history["epochs_run"] == 40 and set(fold.test) >= {"p_anomaly", "evidence"}
    y, m = labels[test_idx].numpy(), masks[test_idx].numpy()
    p = fold.test["p_anomaly"]
    # random MobileNetV2 features at 64 px, drawn defects: chance is 0.5 for both
    assert roc_auc_score(y, p) >= 0.9
    assert pixel_auroc(fold.test["evidence"][y == 1], m[y == 1]) >= 0.8
    decided = calibration.decide(p, fold.calibration["decision"])
    assert (decided == y).mean() >= 0.8


def test_evidence_training_inputs_give_each_memory_row_its_images_group():
    """Twelve training images (ten good, two defective, in a shuffled order) of a 4 x 4 patch grid whose
    first channel is 10 x the image's index on every patch (a 3x3 mean keeps it), so each memory
    row names its image. Every good image's distances must be those to the nearest memory row of
    another group than its own. Catches: a memory row given another image's group (e.g.
    `patch_memory_of` mapping rows to images with `rows % len(good)` instead of `rows // cells`),
    under which a good image meets rows of its own group, its own patches among them."""
    g = torch.Generator().manual_seed(0)
    tap = torch.cat([10.0 * torch.arange(12.0).view(12, 1, 1, 1).expand(12, 1, 4, 4),
                     torch.rand(12, 1, 4, 4, generator=g)], dim=1)  # (12, 2, 4, 4) stride-8 taps
    frozen = helper.Frozen(torch.zeros(12, 3, 2, 2), tap, torch.ones(12, dtype=torch.bool))
    labels = torch.tensor([GOOD] * 10 + [1] * 2)
    fit = torch.randperm(12, generator=g)
    config = {"seed": 0, "patch_layers": "fine", "patch_map_sigma": 0.0, "patch_memory_size": 60,
              "patch_memory_method": "coreset"}
    good = fit[labels[fit] == GOOD]
    memory, memory_images, _ = helper.patch_memory_of(config, frozen, good)
    inputs = helper.evidence_training_inputs(config, frozen, labels, fit, memory, memory_images, CPU)
    group_of = dict(zip(good.tolist(), helper.assign_groups(["good"] * 10, helper.GROUPS, 0).tolist()))
    row_groups = torch.tensor([group_of[int(v)] for v in (memory[:, 0] / 10).round().long()])  # (M,)
    for k, image in enumerate(fit.tolist()):
        if labels[image] != GOOD:
            continue
        patches = frozen.patches_of(torch.tensor([image]), PatchRule("fine", 0.0))  # (16, 2)
        allowed = memory[row_groups != group_of[image]]
        expected = torch.cdist(patches.double(), allowed.double()).min(dim=1).values.view(4, 4)
        torch.testing.assert_close(inputs.distance[k].double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("grouped", [False, True])
def test_defective_training_images_see_the_whole_memory_unless_grouped(grouped, monkeypatch):
    """Defective training images meet the whole memory (GROUP_DEFECTS False, the measured choice), or
    with GROUP_DEFECTS the rows of the other groups' good images only (the study's variant). Catches
    either setting taking the other's path: a defective image's distance to the nearest row it may use."""
    monkeypatch.setattr(helper, "GROUP_DEFECTS", grouped)
    g = torch.Generator().manual_seed(1)
    tap = torch.rand(12, 2, 4, 4, generator=g)
    frozen = helper.Frozen(torch.zeros(12, 3, 2, 2), tap, torch.ones(12, dtype=torch.bool))
    labels = torch.tensor([GOOD] * 10 + [1] * 2)
    fit = torch.arange(12)
    config = {"seed": 0, "patch_layers": "fine", "patch_map_sigma": 0.0, "patch_memory_size": 1000,
              "patch_memory_method": "random"}
    memory, memory_images, _ = helper.patch_memory_of(config, frozen, fit[:10])
    inputs = helper.evidence_training_inputs(config, frozen, labels, fit, memory, memory_images, CPU)
    good_groups = helper.assign_groups(["good"] * 10, helper.GROUPS, 0)
    defect_groups = helper.assign_groups(["defect"] * 2, helper.GROUPS, 1)
    for k, image in enumerate((10, 11)):
        allowed = memory[good_groups[memory_images] != defect_groups[k]] if grouped else memory
        patches = frozen.patches_of(torch.tensor([image]), PatchRule("fine", 0.0))
        expected = torch.cdist(patches.double(), allowed.double()).min(dim=1).values.view(4, 4)
        torch.testing.assert_close(inputs.distance[image].double(), expected, rtol=0, atol=1e-4)


def test_group_excluded_memory_never_gives_an_image_its_own_patches():
    """Four images of one 1 x 2 patch grid in one dimension; every patch is in the memory. Images
    0 and 1 form group 0, images 2 and 3 group 1; image 4 (a defective one) belongs to none."""
    values = torch.tensor([[0.0, 0.1], [0.2, 0.3], [1.0, 1.1], [1.2, 1.3], [0.25, 5.0]])  # (5 images, 2 patches)
    embed = lambda idx: values[idx][:, None, None, :]  # (K, 1, 1, 2): D = 1, a 1 x 2 grid  # noqa: E731
    memory = values[:4].reshape(-1, 1)  # rows 0-7: image r // 2
    memory_groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    inputs = evidence.evidence_inputs(embed, 5, memory, image_groups=torch.tensor([0, 0, 1, 1, -1]),
                                      memory_groups=memory_groups)
    # group 0's images find their nearest patch in group 1 (1.0 for all of them), group 1's in group 0 (0.3)
    torch.testing.assert_close(inputs.distance[:2], torch.tensor([[[1.0, 0.9]], [[0.8, 0.7]]]))
    torch.testing.assert_close(inputs.distance[2:4], torch.tensor([[[0.7, 0.8]], [[0.9, 1.0]]]))
    torch.testing.assert_close(inputs.distance[4], torch.tensor([[0.05, 3.7]]))  # the whole memory
    torch.testing.assert_close(inputs.residual[:2, 0].float(), -inputs.distance[:2], atol=1e-3, rtol=0)
