"""Second-order unstructured pruning: optimal brain surgeon with M-FAC, optimal brain damage, magnitude.

* :mod:`~secondorder.prune.saliency`: the saliencies (magnitude; OBD's ``w^2 H_qq / 2``, LeCun et al.
  1990; OBS's ``w^2 / (2 [F^-1]_qq)``, Hassibi & Stork 1993) and the OBS compensating update under
  the block-diagonal M-FAC inverse (Frantar, Kurtic & Alistarh 2021);
* :mod:`~secondorder.prune.masks`: which weights are prunable (Linear/Conv weights by default), the
  :class:`PruningMask`, and :func:`masked`, which keeps a mask through training;
* :mod:`~secondorder.prune.pruning`: one-shot :func:`prune` in recomputed increments,
  :func:`prune_gradually` with fine-tuning between stages, and the masked :func:`finetune`.
"""

from secondorder.prune.masks import PRUNABLE_LAYERS, MaskedModel, PruningMask, masked, prunable_parameters
from secondorder.prune.pruning import (
    METHODS,
    GradualStage,
    LayerSparsity,
    PruningResult,
    finetune,
    mean_loss,
    prune,
    prune_gradually,
    target_count,
)
from secondorder.prune.saliency import (
    magnitude_saliency,
    obd_saliency,
    obs_saliency,
    obs_update,
    select_pruned,
)

__all__ = [
    "METHODS",
    "PRUNABLE_LAYERS",
    "GradualStage",
    "LayerSparsity",
    "MaskedModel",
    "PruningMask",
    "PruningResult",
    "finetune",
    "magnitude_saliency",
    "masked",
    "mean_loss",
    "obd_saliency",
    "obs_saliency",
    "obs_update",
    "prune",
    "prune_gradually",
    "prunable_parameters",
    "select_pruned",
    "target_count",
]
