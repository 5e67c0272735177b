"""Patch-memory anomaly maps (PatchCore, Roth et al. 2022): distance of each test patch to its nearest good patch."""

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .postprocess import gaussian_smooth

MEMORY_METHODS = ("random", "coreset")
# Which frozen layers make a patch embedding: "fine", the stride-8 tap alone, or "both", with the
# stride-16 frozen output bilinearly upsampled beside it (the rule before the official-split study).
PATCH_LAYERS = ("fine", "both")
PATCH_STRIDE = 8  # input pixels per cell of the patch grid: the stride-8 tap of either backbone


@dataclass(frozen=True)
class PatchRule:
    """How patches become the patch map: the layers of an embedding (`PATCH_LAYERS`), and the
    Gaussian blur of the map, sigma in cells of the patch grid (0: none). The defaults are the rule
    MobileNetV2's map localises best with (benchmarks/official_split.py): the fine layer alone, a
    half-cell blur; Training picks the layers per backbone and head (`parameters.resolve_patch_layers`)."""

    layers: str = "fine"
    sigma: float = 0.5

    def embed(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Patch embeddings (B, D, h8, w8) of a stride-8 tap (B, C8, h8, w8) and the stride-16 output (B, C16, h16, w16)."""
        return patch_embeddings(fine, coarse if self.layers == "both" else None)

    def smooth(self, maps: torch.Tensor) -> torch.Tensor:
        """Upsampled maps (B, H, W) blurred by sigma cells (`postprocess.gaussian_smooth`)."""
        return gaussian_smooth(maps, self.sigma * PATCH_STRIDE)


def patch_rule_of(config: Mapping[str, Any]) -> PatchRule:
    """The PatchRule a checkpoint's configuration was trained with; checkpoints from before the
    rule had both layers and no blur, and their memory and calibration keep that rule."""
    return PatchRule(config.get("patch_layers", "both"), float(config.get("patch_map_sigma", 0.0)))


def _check_ndim(name: str, tensor: torch.Tensor, ndim: int, shape: str) -> None:
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _generator(seed: int) -> torch.Generator:
    # CPU generator: the same seed gives the same draw whatever device the data lives on.
    return torch.Generator().manual_seed(seed)


def patch_embeddings(fine: torch.Tensor, coarse: torch.Tensor | None = None, kernel_size: int = 3) -> torch.Tensor:
    """Locally averaged fine (B,C1,H1,W1) and coarse (B,C2,H2,W2) maps on the fine grid -> (B,C1+C2,H1,W1)
    float32; without coarse, the fine map alone -> (B,C1,H1,W1)."""
    _check_ndim("fine", fine, 4, "(B, C1, H1, W1)")
    _check_positive("kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd so the map keeps its size, got {kernel_size}")
    # count_include_pad=False: border patches average only real neighbours, so a constant map stays constant.
    pool = dict(kernel_size=kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=False)
    fine = F.avg_pool2d(fine.float(), **pool)
    if coarse is None:
        return fine
    _check_ndim("coarse", coarse, 4, "(B, C2, H2, W2)")
    if fine.shape[0] != coarse.shape[0]:
        raise ValueError(f"fine and coarse need the same batch size, got {fine.shape[0]} and {coarse.shape[0]}")
    coarse = F.avg_pool2d(coarse.float(), **pool)
    coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([fine, coarse], dim=1)


def flatten_patches(emb: torch.Tensor) -> torch.Tensor:
    """(B,D,H,W) -> (B*H*W, D); row b*H*W + h*W + w is patch (h, w) of image b."""
    _check_ndim("emb", emb, 4, "(B, D, H, W)")
    return emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])


def random_subsample(patches: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Indices (M,) of a seeded random subset of the N rows of patches (N, D); M = min(size, N)."""
    _check_positive("size", size)
    n = patches.shape[0]
    if size >= n:
        return torch.arange(n, device=patches.device)
    return torch.randperm(n, generator=_generator(seed))[:size].to(patches.device)


def _project(patches: torch.Tensor, projection_dim: int | None, seed: int, chunk_size: int) -> torch.Tensor:
    """(N, D) -> (N, K) float32: a seeded Gaussian projection when D > projection_dim, else the rows as float32."""
    n, d = patches.shape
    if projection_dim is None or d <= projection_dim:
        return patches.float()
    # Entries N(0, 1/K) keep squared distances unbiased (Johnson-Lindenstrauss).
    proj = torch.randn(d, projection_dim, generator=_generator(seed)) / projection_dim**0.5
    proj = proj.to(patches.device)
    out = torch.empty(n, projection_dim, device=patches.device)
    # Chunks: a float16/float64 input is never copied whole to float32 (N x D) before projecting.
    for start in range(0, n, chunk_size):
        out[start:start + chunk_size] = patches[start:start + chunk_size].float() @ proj
    return out


def _prepare_coreset(
    patches: torch.Tensor, size: int, seed: int, projection_dim: int | None, chunk_size: int, start: int | None
) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Checks shared by both greedy loops; None when every row is kept, else (feats (N, K), ||feats||^2 (N,), start)."""
    _check_ndim("patches", patches, 2, "(N, D)")
    _check_positive("size", size)
    _check_positive("chunk_size", chunk_size)
    if projection_dim is not None:
        _check_positive("projection_dim", projection_dim)
    n = patches.shape[0]
    if n == 0:
        raise ValueError("patches is empty: there is nothing to select")
    if start is not None and not 0 <= start < n:
        raise ValueError(f"start must be a row index in [0, {n}), got {start}")
    if size >= n:
        return None
    feats = _project(patches, projection_dim, seed, chunk_size)  # (N, K)
    if start is None:
        start = int(torch.randint(n, (1,), generator=_generator(seed)))
    return feats, (feats * feats).sum(dim=1), start


def greedy_coreset_stepwise(
    patches: torch.Tensor,
    size: int,
    seed: int,
    projection_dim: int | None = 128,
    chunk_size: int = 16384,
    start: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The textbook greedy k-center loop, one full pass over the (N, K) projection per chosen row.

    Same arguments and result as `greedy_coreset`; kept as its reference (tests and the memory
    benchmark compare the two). On a CPU each step re-reads the whole projection from memory,
    so it is memory-bound: ~70 s for 143k x 128 -> 10k.
    """
    prepared = _prepare_coreset(patches, size, seed, projection_dim, chunk_size, start)
    if prepared is None:
        return torch.arange(patches.shape[0], device=patches.device)
    feats, sq_norms, start = prepared
    n = feats.shape[0]
    chosen = torch.empty(size, dtype=torch.long, device=patches.device)
    chosen[0] = start
    current = chosen[:1]  # (1,) tensor index: no host sync per step on a GPU
    min_sq = torch.full((n,), float("inf"), device=patches.device)  # squared distance to the selection
    for k in tqdm(range(1, size), desc="greedy coreset", disable=not progress):
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, one matrix-vector product per step.
        centre = feats.index_select(0, current)[0]  # (K,)
        dist = torch.addmv(sq_norms, feats, centre, alpha=-2.0).add_(sq_norms.index_select(0, current))
        torch.minimum(min_sq, dist, out=min_sq)
        # -inf marks chosen rows so rounding or duplicate rows never choose one twice.
        min_sq.index_fill_(0, current, float("-inf"))
        current = torch.argmax(min_sq).view(1)
        chosen[k] = current[0]
    return chosen


def _lower_min_sq(
    min_sq: torch.Tensor, feats: torch.Tensor, sq_norms: torch.Tensor, centres: torch.Tensor, chunk_size: int
) -> None:
    """In place: min_sq (N,) = min(min_sq, squared distance of each row of feats (N, K) to the rows `centres` (b,)).

    One matrix product per chunk of rows: the projection is read once for b centres, not b times.
    """
    c = feats[centres]  # (b, K)
    c_sq = sq_norms[centres]  # (b,)
    for lo in range(0, feats.shape[0], chunk_size):
        hi = min(lo + chunk_size, feats.shape[0])
        # (c, b) = ||c||^2 - 2 x.c, then + ||x||^2 after the min over centres (it is the same for all).
        part = torch.addmm(c_sq, feats[lo:hi], c.T, alpha=-2.0).amin(dim=1).add_(sq_norms[lo:hi])
        torch.minimum(min_sq[lo:hi], part, out=min_sq[lo:hi])
    min_sq[centres] = float("-inf")  # chosen rows are never chosen again, whatever the rounding


def greedy_coreset(
    patches: torch.Tensor,
    size: int,
    seed: int,
    projection_dim: int | None = 128,
    chunk_size: int = 16384,
    start: int | None = None,
    progress: bool = False,
    candidates: int = 1024,
) -> torch.Tensor:
    """Indices (M,) of the greedy k-center coreset of patches (N, D), in selection order; M = min(size, N).

    Starts at row `start` (None: a row drawn with `seed`), then repeatedly adds the row farthest from
    the rows chosen so far. Distances are computed on a seeded Gaussian projection to projection_dim
    dims when D > projection_dim (None: never project). chunk_size rows are projected at a time.

    The same selection as `greedy_coreset_stepwise` (up to exact ties), found in blocks: the
    `candidates` rows farthest from the selection are taken aside with tau, the largest distance
    of any other row; greedy steps then run on the candidates alone (their distances updated
    exactly), and stay exact while the farthest candidate is at least tau away, since a row outside
    can only have come closer. Then one matrix product updates all N rows for the whole block.
    Memory: the (N, K) float32 projection plus a few (N,) vectors on patches.device.
    """
    prepared = _prepare_coreset(patches, size, seed, projection_dim, chunk_size, start)
    if prepared is None:
        return torch.arange(patches.shape[0], device=patches.device)
    _check_positive("candidates", candidates)
    feats, sq_norms, start = prepared
    n = feats.shape[0]
    chosen = [torch.tensor([start], device=patches.device)]
    n_chosen = 1
    min_sq = torch.full((n,), float("inf"), device=patches.device)  # squared distance to the selection
    _lower_min_sq(min_sq, feats, sq_norms, chosen[0], chunk_size)
    bar = tqdm(total=size, initial=1, desc="greedy coreset", disable=not progress)
    while n_chosen < size:
        top_sq, top = torch.topk(min_sq, min(candidates + 1, n))  # sorted, farthest first
        tau = float(top_sq[-1]) if len(top) > candidates else float("-inf")
        top, cand_sq = top[:candidates], top_sq[:candidates].clone()  # (L,)
        cand, cand_norms = feats[top], sq_norms[top]  # (L, K), (L,)
        block = []
        while n_chosen + len(block) < size:
            j = int(torch.argmax(cand_sq))
            # The first pick is the global farthest row; later ones only while no outside row can beat them.
            if block and not float(cand_sq[j]) >= tau:
                break
            block.append(j)
            dist = torch.addmv(cand_norms, cand, cand[j], alpha=-2.0).add_(cand_norms[j])
            torch.minimum(cand_sq, dist, out=cand_sq)
            cand_sq[j] = float("-inf")
        rows = top[torch.tensor(block, device=top.device)]
        _lower_min_sq(min_sq, feats, sq_norms, rows, chunk_size)
        chosen.append(rows)
        n_chosen += len(block)
        bar.update(len(block))
    bar.close()
    return torch.cat(chosen)


def build_memory(patches: torch.Tensor, size: int | None, method: str = "coreset", seed: int = 0) -> torch.Tensor:
    """Indices (M,) of the rows of good patches (N, D) that form the memory bank: all rows (size
    None), or `size` rows chosen by `method`. The memory is `patches[index]`; the indices tell
    which image each row came from."""
    _check_ndim("patches", patches, 2, "(N, D)")
    if method not in MEMORY_METHODS:
        raise ValueError(f"method must be one of {MEMORY_METHODS}, got {method!r}")
    if size is None:
        return torch.arange(len(patches), device=patches.device)
    _check_positive("size", size)
    if method == "random":
        return random_subsample(patches, size, seed)
    return greedy_coreset(patches, size, seed)


# Columns per run of `first_argmin`: the largest divisor of the row count up to this many. On 4096 x
# 10,000 float32 scores (one chunk of `nearest_rows` against the default memory) runs of 125 took
# 2.0-2.3x less time than one argmin, 250 2.3-2.6x, 25 1.1x; on 2,048 columns 64 and 128 did best
# (3.2-3.4x): benchmarks/argmin_run.py, results/reference/argmin_run.json.
ARGMIN_RUN = 128


def argmin_run(columns: int, largest: int = ARGMIN_RUN) -> int:
    """The run length `first_argmin` uses for `columns` columns: their largest divisor up to
    `largest`, or 1 (a plain argmin) when that is below 8 and runs would gain nothing."""
    run = next(g for g in range(min(largest, columns), 0, -1) if columns % g == 0)
    return run if run >= 8 else 1


def first_argmin(scores: torch.Tensor, run: int) -> torch.Tensor:
    """Column (Q,) of each row's minimum of scores (Q, M), the first one at a tie: exactly
    scores.argmin(dim=1), found in three steps (run divides M): the minimum of each run of `run`
    columns, the first run holding the smallest, the first column in it. A row minimum is
    vectorised where an argmin is not (under PyTorch and ONNX Runtime alike), so over 10 000
    memory rows this beats one argmin; the first run with the minimum holds its first column, so
    the index is the same."""
    if run <= 1:
        return scores.argmin(dim=1)
    runs = scores.reshape(-1, scores.shape[1] // run, run)  # (Q, M / run, run)
    first = runs.amin(dim=2).argmin(dim=1)  # (Q,): the first run holding the row's minimum
    within = runs.gather(1, first[:, None, None].expand(-1, 1, run))[:, 0].argmin(dim=1)
    return first * run + within


def nearest_rows(queries: torch.Tensor, memory: torch.Tensor, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Index (Q,) of each query row's (Q, D) nearest memory row (M, D), and its Euclidean distance (Q,).

    The nearest row is found with the fast matrix-product expansion on mean-centred data, then its
    distance is recomputed directly as ||q - m||: the result is an exact distance to a memory row,
    so a query equal to a memory row gets exactly 0 (the expansion alone, like torch.cdist's
    default mode, leaves sqrt(rounding): 0.18 for rows of norm ~280). Only near-ties within
    rounding can pick a marginally farther row. Peak memory is about chunk_size x M floats.
    """
    _check_ndim("queries", queries, 2, "(Q, D)")
    _check_ndim("memory", memory, 2, "(M, D)")
    _check_positive("chunk_size", chunk_size)
    if memory.shape[0] == 0:
        raise ValueError("memory is empty: build it from at least one good patch")
    if queries.shape[1] != memory.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} dims but memory rows have {memory.shape[1]}")
    memory = memory.float()
    # Centring shrinks the norms the expansion subtracts, and with them its rounding error.
    mean = memory.mean(dim=0)
    centred = memory - mean  # (M, D)
    mem_sq = (centred * centred).sum(dim=1)  # (M,)
    run = argmin_run(memory.shape[0])
    index = torch.empty(queries.shape[0], dtype=torch.long, device=memory.device)
    distance = torch.empty(queries.shape[0], device=memory.device)
    # One scores buffer for every chunk: a fresh (4096, 10 000) float32 tensor per chunk (164 MB)
    # costs its page faults each time; the same products land in it, so the same rows and distances.
    buffer = torch.empty((min(chunk_size, queries.shape[0]), memory.shape[0]), device=memory.device)
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start:start + chunk_size].to(memory.device).float()  # (c, D)
        # ||q||^2 is the same for every memory row, so argmin needs only ||m||^2 - 2 q.m: (c, M)
        scores = torch.addmm(mem_sq, q - mean, centred.T, alpha=-2.0, out=buffer[:len(q)])
        nearest = first_argmin(scores, run)  # (c,)
        index[start:start + chunk_size] = nearest
        distance[start:start + chunk_size] = torch.linalg.vector_norm(q - memory[nearest], dim=1)
    return index, distance


def memory_nbytes(memory: torch.Tensor) -> int:
    """Bytes held by the memory tensor's elements (M * D * element size)."""
    return memory.nelement() * memory.element_size()
