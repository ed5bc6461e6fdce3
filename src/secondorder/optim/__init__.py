"""Second-order optimizers as drop-in ``torch.optim`` optimizers (no ``backward(create_graph=True)``)."""

from secondorder.optim.adahessian import AdaHessian, spatial_average
from secondorder.optim.sophia import SophiaG, SophiaH

__all__ = ["AdaHessian", "SophiaG", "SophiaH", "spatial_average"]
