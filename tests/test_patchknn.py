"""Tests for utils/patchknn.py on hand-made feature maps with known answers."""

import pytest
import torch

from utils.evidence import residuals
from utils.postprocess import upsample_maps

from utils.patchknn import (
    argmin_run,
    build_memory,
    first_argmin,
    flatten_patches,
    greedy_coreset,
    greedy_coreset_stepwise,
    memory_nbytes,
    nearest_rows,
    PatchRule,
    patch_embeddings,
    patch_rule_of,
    random_subsample,
)


def good_maps(n_images: int = 4, dim: int = 16, size: int = 8, seed: int = 0) -> torch.Tensor:
    """(n_images, dim, size, size) maps of one constant vector plus noise of std 1e-3."""
    vector = torch.rand(dim, generator=torch.Generator().manual_seed(0)) * 5  # the same for every seed
    noise = torch.randn(n_images, dim, size, size, generator=torch.Generator().manual_seed(seed)) * 1e-3
    return vector[None, :, None, None] + noise


def clustered(sizes=(400, 150, 40, 8, 1), dim: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight clusters (std 1e-3) whose centres are >= 100 apart: points (N, dim), labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(len(sizes), dim) * 100  # pairwise distance 100 * sqrt(2)
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    points = centres[labels] + torch.randn(len(labels), dim, generator=g) * 1e-3
    return points, labels


def coverage_radius(points: torch.Tensor, index: torch.Tensor) -> float:
    """Largest distance from any point to its nearest selected point."""
    return torch.cdist(points, points[index]).min(dim=1).values.max().item()


def test_patch_embeddings_shape_and_constant_map():
    fine = torch.full((2, 3, 8, 8), 2.5)
    coarse = torch.full((2, 5, 4, 4), -1.0)
    emb = patch_embeddings(fine, coarse, kernel_size=3)
    assert emb.shape == (2, 8, 8, 8) and emb.dtype == torch.float32
    assert torch.allclose(emb[:, :3], torch.tensor(2.5))
    assert torch.allclose(emb[:, 3:], torch.tensor(-1.0))


def test_patch_embeddings_local_average_by_hand():
    fine = torch.zeros(1, 1, 3, 3)
    fine[0, 0, 1, 1] = 9.0
    emb = patch_embeddings(fine, torch.zeros(1, 1, 3, 3), kernel_size=3)
    # Corner windows hold 4 real pixels, edge windows 6, the centre 9; each holds the 9 once.
    expected = torch.tensor([[9 / 4, 9 / 6, 9 / 4], [9 / 6, 1.0, 9 / 6], [9 / 4, 9 / 6, 9 / 4]])
    assert torch.allclose(emb[0, 0], expected)


def test_patch_embeddings_upsamples_coarse_bilinearly():
    coarse = torch.tensor([[0.0, 1.0], [0.0, 1.0]])[None, None]
    emb = patch_embeddings(torch.zeros(1, 1, 4, 4), coarse, kernel_size=1)
    # Half-pixel-centred bilinear x2: columns at source coordinates -0.25, 0.25, 0.75, 1.25 (clamped).
    assert torch.allclose(emb[0, 1], torch.tensor([0.0, 0.25, 0.75, 1.0]).expand(4, 4))


def test_patch_embeddings_of_the_fine_layer_alone():
    fine = torch.zeros(1, 1, 3, 3)
    fine[0, 0, 1, 1] = 9.0
    emb = patch_embeddings(fine)  # no coarse layer: the locally averaged fine map, nothing beside it
    assert emb.shape == (1, 1, 3, 3) and torch.allclose(emb[0, 0, 1, 1], torch.tensor(1.0))


def test_patch_rule_picks_the_layers_and_old_checkpoints_keep_theirs():
    fine, coarse = torch.full((2, 3, 8, 8), 2.5), torch.full((2, 5, 4, 4), -1.0)
    assert PatchRule().embed(fine, coarse).shape == (2, 3, 8, 8)  # Training's default: the fine layer
    assert PatchRule("both").embed(fine, coarse).shape == (2, 8, 8, 8)
    # a configuration from before the rule built its memory from both layers and never blurred
    assert patch_rule_of({}) == PatchRule("both", 0.0)
    assert patch_rule_of({"patch_layers": "fine", "patch_map_sigma": 1}) == PatchRule("fine", 1.0)


def test_patch_rule_blurs_a_one_pixel_spike_by_sigma_cells():
    spike = torch.zeros(1, 65, 65)
    spike[0, 32, 32] = 1.0
    blurred = PatchRule(sigma=0.5).smooth(spike)  # 0.5 cells of 8 px: a Gaussian of sigma 4 px
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-4)  # mass kept
    centre = blurred[0, 32]
    # a sampled Gaussian: the value 4 px (one sigma) away is exp(-1/2) of the peak
    assert (centre[36] / centre[32]).item() == pytest.approx(0.6065, abs=2e-3)
    assert torch.equal(PatchRule(sigma=0.0).smooth(spike), spike)


def test_patch_embeddings_rejects_bad_input():
    with pytest.raises(ValueError, match="kernel_size"):
        patch_embeddings(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2), kernel_size=2)
    with pytest.raises(ValueError, match="batch"):
        patch_embeddings(torch.zeros(2, 1, 4, 4), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="fine"):
        patch_embeddings(torch.zeros(1, 4, 4), torch.zeros(1, 1, 2, 2))


def test_flatten_patches_order():
    emb = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    flat = flatten_patches(emb)
    assert flat.shape == (8, 3)
    # Row b*H*W + h*W + w is patch (h, w) of image b: image 1, h=0, w=1 -> row 5.
    assert flat[5].tolist() == [13.0, 17.0, 21.0]


def patch_map(emb: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch map (B, H, W) of embeddings (B, D, H, W) and its image scores (B,), as inference computes them."""
    _, distance = residuals(emb, memory)
    return distance, distance.flatten(1).amax(dim=1)


@pytest.mark.parametrize("method,size", [("coreset", 32), ("random", 32), ("coreset", None)])
def test_planted_odd_patch_is_the_peak(method, size):
    patches = flatten_patches(good_maps())
    memory = patches[build_memory(patches, size, method=method, seed=1)]
    test = good_maps(n_images=2, seed=2)  # same constant vector, fresh noise
    test[1, :, 5, 2] += 10.0  # distance sqrt(16) * 10 = 40 from every good patch
    maps, scores = patch_map(test, memory)
    assert maps.shape == (2, 8, 8)
    assert divmod(int(maps[1].argmax()), 8) == (5, 2)
    others = torch.cat([maps[1].flatten()[: 5 * 8 + 2], maps[1].flatten()[5 * 8 + 3:]])
    assert maps[1, 5, 2] > 39.0 and others.max() < 0.1 and maps[0].max() < 0.1
    assert scores[1] == maps[1, 5, 2] and scores[0] < 0.1

    up = upsample_maps(maps, (32, 32))
    assert up.shape == (2, 32, 32)
    row, col = divmod(int(up[1].argmax()), 32)
    assert 20 <= row <= 23 and 8 <= col <= 11  # the 4x4 block of feature cell (5, 2)


def test_image_in_memory_scores_zero():
    train = good_maps(n_images=3)
    memory = flatten_patches(train)[build_memory(flatten_patches(train), None)]
    maps, scores = patch_map(train[1:2], memory)
    assert maps.max() < 1e-4 and scores.max() < 1e-4


def test_identical_row_gives_zero_for_large_norms():
    # ReLU-like features of norm ~ 200: the plain expansion would leave about sqrt(1e-3) here.
    g = torch.Generator().manual_seed(0)
    memory = torch.rand(500, 768, generator=g) * 10 + 5
    _, dist = nearest_rows(memory[::7], memory, chunk_size=33)
    assert dist.max() < 1e-4


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_nearest_rows_matches_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(103, 24, generator=g)
    memory = torch.randn(57, 24, generator=g)
    expected = torch.cdist(queries.double(), memory.double()).min(dim=1)
    index, distance = nearest_rows(queries, memory, chunk_size)
    assert torch.allclose(distance, expected.values.float(), atol=1e-5)
    assert torch.equal(index, expected.indices)


def test_the_run_wise_argmin_is_argmin_ties_included():
    """The minimum found run by run is the first one, as argmin's: a tie across runs goes to the
    earlier run, a tie within a run to the earlier column, in the last run too.
    Fails when: the index forgets its run's offset, the runs are searched by the last minimum, or
    the column within the run is not the first."""
    scores = torch.rand(4, 12, generator=torch.Generator().manual_seed(0)) + 1.0
    scores[0, [2, 9]] = 0.0  # a tie across runs of 4: column 2 (run 0), not 9 (run 2)
    scores[1, [8, 10]] = 0.0  # a tie within the last run: column 8
    scores[2, 7] = 0.0  # the last column of the second run
    expected = torch.tensor([2, 8, 7, int(scores[3].argmin())])
    for run in (1, 2, 3, 4, 6, 12):
        assert torch.equal(first_argmin(scores, run), expected), run
    big = torch.randn(300, 10000, generator=torch.Generator().manual_seed(1)).round(decimals=1)  # many ties
    assert torch.equal(first_argmin(big, argmin_run(10000)), big.argmin(dim=1))


def test_the_run_length_divides_the_columns():
    """Fails when: a run length does not divide the columns (the reshape would mix rows), or a prime
    count is not searched in one argmin."""
    assert (argmin_run(10000), argmin_run(2048), argmin_run(1808)) == (125, 128, 113)
    assert argmin_run(9973) == 1 and argmin_run(7) == 1


def test_nearest_rows_rejects_mismatch():
    with pytest.raises(ValueError, match="dims"):
        nearest_rows(torch.zeros(3, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="empty"):
        nearest_rows(torch.zeros(3, 4), torch.zeros(0, 4))


def test_greedy_coreset_on_a_line_by_hand():
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    # From 0: farthest is 10; then 2 (distance 2 to {0, 10}) beats 1 (distance 1).
    assert greedy_coreset(points, 3, seed=0, start=0).tolist() == [0, 3, 2]
    # From 2: 10 (distance 8); then 0 (distance 2) beats 1 (distance 1).
    assert greedy_coreset(points, 3, seed=0, start=2).tolist() == [2, 3, 0]
    # Adding 0.5: from 0, 10 then 2 then 1 (distance 0.5 to 0 or 1 would be next).
    line = torch.tensor([[0.0], [1.0], [2.0], [10.0], [0.5]])
    assert greedy_coreset(line, 4, seed=0, start=0).tolist() == [0, 3, 2, 1]


def test_greedy_coreset_distinct_and_deterministic():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(300, 200, generator=g)
    points[100:200] = points[:100]  # duplicate rows must still not be picked twice
    first = greedy_coreset(points, 250, seed=3)
    assert len(set(first.tolist())) == 250
    assert torch.equal(first, greedy_coreset(points, 250, seed=3))
    assert not torch.equal(first, greedy_coreset(points, 250, seed=4))
    assert greedy_coreset(points, 500, seed=0).tolist() == list(range(300))


@pytest.mark.parametrize("projection_dim", [128, None])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_coreset_finds_every_cluster(projection_dim, seed):
    points, labels = clustered(seed=seed)
    index = greedy_coreset(points, 5, seed=seed, projection_dim=projection_dim)
    assert sorted(labels[index].tolist()) == [0, 1, 2, 3, 4]
    # Every point is within its tight cluster of a chosen one; a random subset misses the single-point
    # cluster (or another small one), leaving a point ~141 away from every chosen point.
    assert coverage_radius(points, index) < 0.1
    random_index = random_subsample(points, 5, seed=seed)
    assert coverage_radius(points, random_index) > 100.0


@pytest.mark.parametrize("candidates", [1, 7, 64, 1024])
def test_blocked_greedy_selects_what_the_stepwise_loop_selects(candidates):
    # Any candidate count, even one (a block per step), must give the stepwise loop's choice, in order.
    g = torch.Generator().manual_seed(1)
    points = torch.randn(3000, 40, generator=g) * torch.linspace(0.1, 3, 40)  # uneven spread, no ties
    reference = greedy_coreset_stepwise(points, 400, seed=5)
    assert torch.equal(greedy_coreset(points, 400, seed=5, candidates=candidates), reference)


def test_blocked_greedy_same_rows_on_clustered_patches():
    # Clusters make near-ties within rounding (the two loops round differently): the order of two picks
    # may swap, and rarely the other of two equally far rows is chosen; the coverage stays the same.
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(30, 200, generator=g) * 5
    points = centres[torch.randint(30, (6000,), generator=g)] + torch.randn(6000, 200, generator=g) * 0.3
    reference = greedy_coreset_stepwise(points, 600, seed=1)
    blocked = greedy_coreset(points, 600, seed=1)
    assert len(set(blocked.tolist()) & set(reference.tolist())) >= 0.99 * len(reference)
    assert coverage_radius(points, blocked) == pytest.approx(coverage_radius(points, reference))


def test_random_subsample():
    points = torch.zeros(20, 3)
    index = random_subsample(points, 8, seed=5)
    assert index.shape == (8,) and len(set(index.tolist())) == 8 and int(index.max()) < 20
    assert torch.equal(index, random_subsample(points, 8, seed=5))
    assert random_subsample(points, 50, seed=5).tolist() == list(range(20))


def test_build_memory_sizes_and_errors():
    patches = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    assert build_memory(patches, None).tolist() == list(range(40))
    assert len(set(build_memory(patches, 10, "random").tolist())) == 10
    index = build_memory(patches, 10, "coreset")
    assert index.shape == (10,) and len(set(index.tolist())) == 10 and int(index.max()) < 40
    # the first row is drawn with the seed, each next one is the row farthest from those chosen
    first = int(index[0])
    assert int(index[1]) == int(torch.cdist(patches[first:first + 1], patches).argmax())
    assert sorted(build_memory(patches, 100, "coreset").tolist()) == list(range(40))
    assert memory_nbytes(patches[index]) == 10 * 6 * 4
    with pytest.raises(ValueError, match="method"):
        build_memory(patches, 10, "kmeans")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="size"):
            build_memory(patches, bad)
    with pytest.raises(ValueError, match="patches"):
        build_memory(patches[None], 10)
