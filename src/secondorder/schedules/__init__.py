"""Training schedules driven by curvature: ABS/ABSA adaptive batch size (Yao et al., arXiv:1810.01021)."""

from secondorder.schedules.adaptive_batch import AdaptiveBatchSize, BatchSizeDecision
from secondorder.schedules.training import AdaptiveBatchTrainer, EpochRecord, fgsm, top_eigenvalue

__all__ = ["AdaptiveBatchSize", "AdaptiveBatchTrainer", "BatchSizeDecision", "EpochRecord", "fgsm",
           "top_eigenvalue"]
