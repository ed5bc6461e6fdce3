"""Curvature operators: the one abstraction every algorithm multiplies with."""

from secondorder.operators.activations import ActivationHessianOperator
from secondorder.operators.base import (
    Block,
    CongruenceOperator,
    DenseOperator,
    IdentityOperator,
    LinearOperator,
    ScaledOperator,
    SumOperator,
    as_operator,
)
from secondorder.operators.curvature import CurvatureOperator, GGNOperator, HessianOperator
from secondorder.operators.kfac import KFACOperator, KroneckerFactors
from secondorder.operators.mfac import MFACInverse, MFACOperator
from secondorder.operators.risk import EmpiricalRisk, NonFiniteError

__all__ = [
    "ActivationHessianOperator",
    "Block",
    "CongruenceOperator",
    "CurvatureOperator",
    "DenseOperator",
    "EmpiricalRisk",
    "GGNOperator",
    "HessianOperator",
    "IdentityOperator",
    "KFACOperator",
    "MFACInverse",
    "MFACOperator",
    "KroneckerFactors",
    "LinearOperator",
    "NonFiniteError",
    "ScaledOperator",
    "SumOperator",
    "as_operator",
]
