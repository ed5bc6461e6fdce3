"""Training schedules driven by curvature: ABS/ABSA adaptive batch size (Yao et al., arXiv:1810.01021) and
the SLQ learning-rate and momentum learner (Granziol, Zohren & Roberts, JMLR 2022).
"""

from secondorder.schedules.adaptive_batch import AdaptiveBatchSize, BatchSizeDecision
from secondorder.schedules.slq import SLQLearningRate, SLQRecord
from secondorder.schedules.training import AdaptiveBatchTrainer, EpochRecord, fgsm, top_eigenvalue

__all__ = ["AdaptiveBatchSize", "AdaptiveBatchTrainer", "BatchSizeDecision", "EpochRecord", "SLQLearningRate",
           "SLQRecord", "fgsm", "top_eigenvalue"]
