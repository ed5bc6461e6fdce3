"""Every linalg result round-trips through to_dict / JSON / from_dict exactly, and == is bitwise."""

import json

import pytest
import torch

import secondorder
from secondorder.linalg.results import (
    DiagonalResult,
    EigenResult,
    SolveResult,
    SpectralDensityResult,
    TraceResult,
)

DT = torch.float64


def _matrix():
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(0), dtype=DT))
    A = (Q * torch.linspace(0.5, 4.0, 12, dtype=DT)) @ Q.T
    return (A + A.T) / 2


def _results():
    A = _matrix()
    return {
        TraceResult: [secondorder.trace(A, 9, method=m, seed=0) for m in ("hutchinson", "hutch++", "xtrace")],
        DiagonalResult: [secondorder.diagonal(A, 8, method=m, seed=0) for m in ("hutchinson", "xdiag")],
        EigenResult: [secondorder.eigenvalues(A, 3, seed=0), secondorder.eigenvalues(A.float(), 2, seed=1)],
        SolveResult: [secondorder.solve(A, torch.ones(12, dtype=DT))],
        SpectralDensityResult: [secondorder.spectral_density(A, 2, 6, seed=0)],
    }


@pytest.mark.parametrize("cls", [TraceResult, DiagonalResult, EigenResult, SolveResult, SpectralDensityResult])
def test_round_trip_is_exact(cls):
    for result in _results()[cls]:
        assert type(result) is cls
        again = cls.from_dict(json.loads(json.dumps(result.to_dict())))
        assert again == result
        for name, value in vars(result).items():
            if isinstance(value, torch.Tensor):
                other = getattr(again, name)
                assert other.dtype == value.dtype and other.shape == value.shape and torch.equal(other, value)


def test_equality_is_bitwise():
    r = secondorder.eigenvalues(_matrix(), 2, seed=0)
    nudged = EigenResult(**{**vars(r), "eigenvalues": r.eigenvalues + 1e-15 * r.eigenvalues.abs().max()})
    assert nudged != r and r == EigenResult(**vars(r))


def test_from_dict_accepts_a_dict_without_fields_that_have_defaults():
    r = secondorder.trace(_matrix(), 9, method="hutch++", seed=0)
    d = r.to_dict()
    del d["samples"]
    assert TraceResult.from_dict(d).samples == ()
