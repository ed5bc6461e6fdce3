"""Loss regularizers built from second-order quantities.

* :mod:`~secondorder.regularizers.hessian_alignment`: :class:`HessianAlignment`, the classifier-head
  Hessian and gradient alignment across training environments for domain generalisation (Hemati et
  al., ICCV 2023), as the Hessian-gradient product (HGP) or the Hutchinson diagonal.
"""

from secondorder.regularizers.hessian_alignment import (
    VARIANTS,
    AlignmentParts,
    HessianAlignment,
    head_gradient,
    hessian_gradient_product,
    hutchinson_diagonal,
    rademacher_probes,
)

__all__ = ["VARIANTS", "AlignmentParts", "HessianAlignment", "head_gradient", "hessian_gradient_product",
           "hutchinson_diagonal", "rademacher_probes"]
