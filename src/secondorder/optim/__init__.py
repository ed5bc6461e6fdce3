"""Second-order optimizers as drop-in ``torch.optim`` optimizers (no ``backward(create_graph=True)``)."""

from secondorder.optim.adahessian import AdaHessian, spatial_average

__all__ = ["AdaHessian", "spatial_average"]
