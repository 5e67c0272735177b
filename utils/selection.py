"""head="auto": choosing the decision and the map from out-of-fold evidence inside the training split.

Pure functions: scores in, a choice out. `helper.fit` computes the out-of-fold scores (each
training image scored by models and memory rows that never saw it) and calls these.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import aupro, image_shares, ranking_metrics

# Groups of the training split for the out-of-fold scores: each group is scored by models fitted on
# the other. Two cost one fit of each head on all images (two on halves), the least that scores
# every image out of fold: the whole notebook took 2.31x the published head's time (docs/results.md;
# benchmarks/auto_cost.py for where it goes), where three groups cost two fits more. A head fitted on
# half the defect images is judged pessimistically (the published head most: docs/results.md), so
# the patch map keeps near-ties: the safe side.
INNER_FOLDS = 2
# The decisions, simplest first: the patch map learns nothing from defect images, the evidence head
# starts as the patch map and departs from it a little, the published head learns from scratch, and
# "fused" keeps both heads and sums their standardised logits (`model.fused_logit`).
DECISIONS = ("patch_knn", "evidence", "published", "fused")
# Blurs of the patch map tried, in patch cells (0.5: PatchCore's 4 px at 224 px, the default first).
SIGMAS = (0.5, 0.0, 1.0)
# Out-of-fold differences this small are noise at the sizes of a training split: within it, the
# simpler candidate wins. A decision (image AUROC) also needs a difference beyond its standard error
# (`margin_of`), which is what grows when the defect images are few.
TOLERANCE = 0.005
# The explanations of a published decision weighed as maps, in this order after its CAM (each is a
# backward pass per image): the gradient times the departure from the good reference at the frozen
# output (stride 16), and the stride-8 LayerCAM, the finer of the two; both export to ONNX.
MAP_EXPLANATIONS = ("explain", "layercam_s8")
# Pixel metrics of the candidate maps are computed at half the input resolution: the choice needs
# their order, and a quarter of the pixels makes it four times cheaper (maps are smooth at 8 px).
MAP_POOL = 2


def choose(scores: Mapping[str, float | None], order: Sequence[str],
           tolerance: float | Callable[[str, str], float] = TOLERANCE) -> str:
    """The name in `order` with the highest score, the earliest one unless a later one is more than
    `tolerance` higher: a number, or a function of (best so far, challenger) giving the margin the
    challenger must clear (`margin_of`). Names without a score (None, or absent) are skipped;
    raises without any."""
    margin = tolerance if callable(tolerance) else (lambda best, challenger: tolerance)
    best = None
    for name in order:
        value = scores.get(name)
        if value is None:
            continue
        if best is None or value > scores[best] + margin(best, name):
            best = name
    if best is None:
        raise ValueError(f"no candidate among {list(order)} has a score")
    return best


def auroc_difference_se(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """DeLong's standard error of AUROC(a) - AUROC(b), two scorings (N,) of the same images with
    labels y (N,) (1 defective), from each image's placement among the other class (ties count
    half; DeLong, DeLong and Clarke-Pearson 1988). Infinite with fewer than two images of a class:
    no difference is then measurable."""
    y = np.asarray(y).astype(bool)
    if y.sum() < 2 or (~y).sum() < 2:
        return float("inf")

    def placements(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        above = np.sign(s[y][:, None] - s[~y][None, :])  # (defective, good): +1, 0 (tie), -1
        wins = (above + 1) / 2
        return wins.mean(axis=1), wins.mean(axis=0)  # per defective image (m,), per good image (n,)

    (a10, a01), (b10, b01) = placements(np.asarray(a, float)), placements(np.asarray(b, float))
    d10, d01 = a10 - b10, a01 - b01
    return float(np.sqrt(d10.var(ddof=1) / len(d10) + d01.var(ddof=1) / len(d01)))


def margin_of(y: np.ndarray, scores: Mapping[str, np.ndarray]) -> Callable[[str, str], float]:
    """The margin (for `choose`) a challenger's out-of-fold image AUROC must clear over the best so
    far: TOLERANCE, or the standard error of their difference where that is larger (few defect
    images: one image's luck must not choose). scores: {name: out-of-fold scores (N,)}."""
    return lambda best, challenger: max(TOLERANCE, auroc_difference_se(y, scores[challenger], scores[best]))


def oof_auroc(y: np.ndarray, scores: np.ndarray | None) -> float | None:
    """Image AUROC (None with one class or without scores) of out-of-fold scores (N,) for labels (N,)."""
    return None if scores is None else ranking_metrics(y, scores)["image_auroc"]


def on_good_scale(y: np.ndarray, groups: np.ndarray, scores: np.ndarray) -> np.ndarray | None:
    """Out-of-fold scores (K,) with each inner group's (groups (K,)) standardised by the mean and
    standard deviation over that group's good images (labels y (K,), 1 defective). Each group is
    scored by its own inner fit, whose scores run on its own scale (a published head's logits to
    tens, differently in each fit); pooled raw, the two scales would rank images by which fit
    scored them. The deployed candidate is one fit, so its test images share one scale: on the good
    images' scale the pooled ranking asks what that one fit is asked. None where a group has fewer
    than two good images or its good images have no spread."""
    y, groups, scores = np.asarray(y).astype(bool), np.asarray(groups), np.asarray(scores, float)
    scaled = np.empty(len(scores))
    for g in np.unique(groups):
        member = groups == g
        good = scores[member & ~y]
        if len(good) < 2 or not good.std(ddof=1) > 0:
            return None
        scaled[member] = (scores[member] - good.mean()) / good.std(ddof=1)
    return scaled


def comparable(y: np.ndarray, groups: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The out-of-fold scores (K,) every candidate is judged on: `on_good_scale`, or the scores as
    they are where a group's good images give them no scale (that candidate is then judged pooled
    raw; the fused candidate, which needs the scale, is not scored: `fused_scores`)."""
    scaled = on_good_scale(y, groups, scores)
    return np.asarray(scores, float) if scaled is None else scaled


def fused_scores(y: np.ndarray, groups: np.ndarray, published: np.ndarray, evidence: np.ndarray) -> np.ndarray | None:
    """Out-of-fold scores (K,) of the fused decision (`model.fused_logit`) from each head's
    out-of-fold image logits (K,): each head's logits on its groups' good images' scale
    (`on_good_scale`, groups (K,), labels y (K,), 1 defective), summed. The deployed model is scaled
    the same way, by good images its heads never saw (the calibration images). None where a group
    has fewer than two good images, or a head gives its good images no spread: no scale to put it on."""
    scaled = [on_good_scale(y, groups, logits) for logits in (published, evidence)]
    return None if any(s is None for s in scaled) else scaled[0] + scaled[1]


def pooled(maps: torch.Tensor, masks: torch.Tensor, factor: int = MAP_POOL) -> tuple[np.ndarray, np.ndarray]:
    """Maps (N, H, W) float and masks (N, H, W) bool at 1/factor resolution: the maps averaged, a
    pixel defective when at least half of its cell is."""
    small = F.avg_pool2d(maps[:, None].float(), factor)[:, 0]
    defect = F.avg_pool2d(masks[:, None].float(), factor)[:, 0] >= 0.5
    return small.numpy(), defect.numpy()


def map_quality(maps: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, float | None]:
    """Out-of-fold pixel AUROC and AUPRO of maps (N, H, W) against masks (N, H, W) bool, at
    1/MAP_POOL resolution, and "score", their mean (None without defect pixels). valid (N, H, W)
    bool: the part's pixels (resize="pad"), the only ones counted (a pooled pixel wholly on it)."""
    return map_evidence(maps, masks, valid)[0]


def map_evidence(maps: torch.Tensor, masks: torch.Tensor,
                 valid: torch.Tensor | None = None) -> tuple[dict[str, float | None], np.ndarray | None]:
    """`map_quality` and the share of its score of each image with defect pixels (M,), in order
    (`metrics.image_shares`; None without defect pixels): what `map_margin` needs to say how much
    of a lead the masked images can carry."""
    small, defect = pooled(maps, masks)
    on_part = None if valid is None else F.avg_pool2d(valid[:, None].float(), MAP_POOL)[:, 0].numpy() == 1.0
    shares = image_shares(small, defect, valid=on_part)
    # pixel AUROC is exactly the sum of the images' shares (tests/test_metrics.py): summed, not sorted
    # again by `pixel_auroc`, which took most of a candidate map's metric time
    auc = None if shares is None else float(shares[0].sum())
    pro = aupro(small, defect, valid=on_part)
    quality = {"pixel_auroc": auc, "aupro": pro, "score": None if auc is None or pro is None else (auc + pro) / 2}
    if shares is None:
        return quality, None
    masked = (defect if on_part is None else defect & on_part).reshape(len(defect), -1).any(axis=1)
    return quality, ((shares[0] + shares[1]) / 2)[masked]


def map_difference_se(a: np.ndarray, b: np.ndarray) -> float:
    """The standard error of the difference of two maps' scores from their masked images' shares a,
    b (M,) (`map_evidence`, the same images): the images are the units and the difference is the sum
    of theirs, so SE = sqrt(M) * their standard deviation; the defect-free pixels are held fixed.
    Infinite with fewer than two masked images."""
    d = np.asarray(a, float) - np.asarray(b, float)
    return float("inf") if len(d) < 2 else float(np.sqrt(len(d)) * d.std(ddof=1))


def map_margin(shares: Mapping[str, np.ndarray]) -> Callable[[str, str], float]:
    """The margin (for `choose`) a challenger map's out-of-fold score must clear over the best so
    far: TOLERANCE, or the standard error of their difference where that is larger (few masked
    images: as for the decision, one image's luck must not choose a map). shares: {name: (M,)}."""
    return lambda best, challenger: max(TOLERANCE, map_difference_se(shares[challenger], shares[best]))


def shown_no_worse(challenger: tuple[dict, np.ndarray], incumbent: tuple[dict, np.ndarray]) -> bool:
    """Whether a map (`map_evidence` of the challenger) is shown to be no worse than another's
    (the incumbent's, the same images): its score's lead plus TOLERANCE exceeds the standard error
    of that lead. Few masked images cannot show a map no worse any more than they can show one
    better: then the incumbent stays."""
    (quality, shares), (incumbent_quality, incumbent_shares) = challenger, incumbent
    lead = quality["score"] - incumbent_quality["score"]
    return lead + TOLERANCE > map_difference_se(shares, incumbent_shares)


def describe(selection: dict) -> str:
    """A few lines saying what head="auto" chose and the out-of-fold figures it chose from."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"decision: {selection['decision']} (out-of-fold image AUROC over {selection['n_images']} training "
             f"images, {selection['n_defects']} defective, {selection['inner_folds']} groups)"]
    errors = selection.get("image_auroc_se", {})
    lines += [f"  {name:<20}{fmt(value)}" + (f"  (standard error of its lead {errors[name]:.3f})"
                                              if name in errors else "")
              for name, value in selection["image_auroc"].items()]
    if not selection["heads_eligible"]:
        lines.append("  the heads and the layers were not scored: each of the groups needs a defect image "
                     "(at least 2 in all)")
    else:
        lines += [f"  {name:<20}not fitted: it would need an AUROC above 1 to beat the simpler ones"
                  for name in ("evidence", "published") if name not in selection["image_auroc"]]
        if "fused" not in selection["image_auroc"] and selection.get("fused_note"):
            lines.append(f"  {'fused':<20}not scored: {selection['fused_note']}")
    lines.append(f"map: {selection['map']}, patch layers {selection['patch_layers']!r}, blur "
                 f"{selection['patch_map_sigma']:g} cells")
    lines += [f"  {name:<20}pixel AUROC {fmt(m['pixel_auroc'])}  AUPRO {fmt(m['aupro'])}"
              + (f"  (standard error of its difference from the map shown {m['se_against_chosen']:.3f})"
                 if m.get("se_against_chosen") is not None else "")
              for name, m in selection["maps"].items()]
    if not selection["maps"]:
        lines.append("  not chosen: each of the groups needs a defect image with a mask; the head's own map, "
                     "or the patch map, with the default layers and blur")
    return "\n".join(lines)
