"""The benchmark of the whole Training.ipynb compares like with like: its plain loop trains on the
images the notebook trains on, and the notebook reads a folder holding exactly the chosen images."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

from utils.dataloader import index_subset, split_subset
from utils.synthetic import generate_synthetic_subset

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_under_test", ROOT / "benchmarks" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_mirror_holds_exactly_the_chosen_images_and_the_split_matches_the_notebooks(tmp_path):
    bench = load_benchmark()
    data = tmp_path / "data"
    generate_synthetic_subset(data / "synth", seed=0, n_train_good=6, n_test_good=3, n_per_defect=3, image_size=32)
    samples = index_subset(data, "synth")
    chosen = samples[: len(samples) - 4]  # the first N, as --n-images picks them
    mirror = tmp_path / "mirror"
    bench.mirror_samples(data, chosen, mirror)

    seen = index_subset(mirror, "synth")  # what Training.ipynb indexes in the mirrored folder
    assert [s.path for s in seen] == [s.path for s in chosen]
    assert [s.mask_path for s in seen] == [s.mask_path for s in chosen]
    assert all((mirror / s.mask_path).is_file() for s in seen if s.mask_path)

    # the plain loop's images are the training split Training.ipynb draws from the mirror (test_size 0.2, seed)
    args = SimpleNamespace(seed=3)
    notebook_train, _ = split_subset(seen, "pooled", test_size=0.2, seed=3)
    assert [s.path for s in bench.notebook_train_split(chosen, args)] == [s.path for s in notebook_train]
    assert len(notebook_train) < len(chosen)
