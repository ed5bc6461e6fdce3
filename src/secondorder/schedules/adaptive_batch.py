r"""ABS / ABSA: grow the batch size when the top Hessian eigenvalue has fallen (Yao et al.).

Z. Yao, A. Gholami, D. Arfeen, R. Liaw, J. Gonzalez, K. Keutzer, M. W. Mahoney, "Large batch size
training of neural networks with adversarial training and second-order information"
(arXiv:1810.01021). The rule below is the one of the authors' public code (HessianFlow's ABSA
driver), restated in our own words; see ``shared/research/algorithms-applications.md`` §3.

:class:`AdaptiveBatchSize` is the controller alone: it takes the top eigenvalue measured at the
end of an epoch and returns the batch size, learning rate and adversarial fraction of the next
epoch. It does no training and no curvature computation, so it can be driven by a scripted
eigenvalue sequence; :class:`~secondorder.schedules.AdaptiveBatchTrainer` applies it to a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from secondorder.validation import non_negative_int, positive_finite, positive_int

__all__ = ["AdaptiveBatchSize", "BatchSizeDecision"]

#: Reasons a decision gives for a batch increase.
EIGENVALUE, PATIENCE = "eigenvalue", "patience"


@dataclass(frozen=True)
class BatchSizeDecision:
    """What :meth:`AdaptiveBatchSize.step` decided at the end of an epoch.

    Attributes:
        epoch: number of epochs completed; the settings below apply to the epoch with this
            (0-based) index, i.e. the next one.
        eigenvalue: the top eigenvalue fed in (``None`` when none was needed or given).
        reference_eigenvalue: the eigenvalue the next measurement is compared with.
        batch_size: effective batch size (samples per optimizer step) of the next epoch.
        lr: learning rate of the next epoch.
        adversarial_fraction: fraction of every batch replaced by FGSM examples next epoch.
        increased: whether the batch size grew at this step.
        reason: ``"eigenvalue"`` (it fell by ``ratio``), ``"patience"`` (forced after
            ``patience`` epochs without growth) or ``""``.
        needs_eigenvalue: whether the controller wants an eigenvalue at the end of the next epoch.

    """

    epoch: int
    eigenvalue: float | None
    reference_eigenvalue: float | None
    batch_size: int
    lr: float
    adversarial_fraction: float
    increased: bool
    reason: str
    needs_eigenvalue: bool


class AdaptiveBatchSize:
    r"""The ABS/ABSA batch-size controller (pure: an eigenvalue in, the next epoch's settings out).

    State: batch size :math:`B` (starting at ``base_batch_size`` :math:`b_0`), reference
    eigenvalue :math:`\lambda_{ref}`, a counter :math:`c` of measured epochs since the last
    increase, and the number of increases. At the end of every epoch, while :math:`B` is below
    ``max_batch_size`` (and ``adaptive`` is true), :meth:`step` takes the top Hessian eigenvalue
    :math:`\lambda` (HessianFlow: a few power iterations on one fresh batch of 128 samples) and

    1. sets :math:`c \leftarrow c + 1`; on the first measurement :math:`\lambda_{ref} \leftarrow \lambda`;
    2. **if** :math:`\lambda \le \lambda_{ref} / \text{ratio}` (the loss surface got flatter):
       grows the batch, :math:`B \leftarrow \min(\text{growth}\cdot B, B_{\max})`, and sets
       :math:`\lambda_{ref} \leftarrow \lambda`, :math:`c \leftarrow 0`;
    3. **if** :math:`c` reaches ``patience`` (no growth for that many measured epochs, "around a
       quadratic bowl"): grows the batch in the same way, :math:`c \leftarrow 0`, and leaves
       :math:`\lambda_{ref}` as it is (as the official code does);
    4. once :math:`B = B_{\max}` it stops asking for eigenvalues and sets the adversarial
       fraction to 0 for good.

    Every growth also multiplies the learning rate by the batch's growth (linear scaling, ×2 for a
    doubling) and divides the adversarial fraction by ``growth``; so

    * ``lr = min(base_lr * B / b0, max_lr) * lr_decay ** (milestones passed) * warm-up factor``,
      where a milestone ``m`` is passed after ``m`` completed epochs (HessianFlow's step schedule,
      0.2 at 30/60/80 of 90 epochs for ResNets) and the warm-up factor is ``(e + 1) /
      warmup_epochs`` in epoch ``e < warmup_epochs`` (Goyal et al.; 0 epochs by default, none in
      ABS/ABSA);
    * ``adversarial_fraction = adversarial_fraction0 / growth ** increases``, or 0 once ``B`` has
      reached ``max_batch_size`` or from epoch ``adversarial_epochs`` on (HessianFlow: only the
      first half of training is adversarial). ABS is ABSA with fraction 0.

    HessianFlow's defaults are ``base_batch_size=128``, ``max_batch_size=128 * 128``,
    ``ratio=growth=2``, ``patience=10``, ``adversarial_fraction=0.2`` (epsilon 0.005 on inputs
    in [0, 1]), SGD with momentum 0.9.

    ``adaptive=False`` gives a fixed schedule with the same learning-rate rules (the plain
    small- or large-batch baseline): the batch stays at ``base_batch_size`` and no eigenvalue is
    asked for.

    Args:
        base_batch_size: initial batch size :math:`b_0`.
        base_lr: learning rate at :math:`b_0`.
        max_batch_size: cap :math:`B_{\max}` (>= ``base_batch_size``).
        ratio: eigenvalue decrease ratio that triggers growth (> 1).
        growth: batch growth factor per increase (integer >= 2).
        patience: measured epochs without growth after which the batch grows anyway; ``None``
            disables the rule.
        adversarial_fraction: initial FGSM fraction in ``[0, 1]`` (0 for ABS).
        adversarial_epochs: epochs with adversarial examples (``None``: no limit).
        lr_milestones: epoch counts after which the learning rate is multiplied by ``lr_decay``.
        lr_decay: the step factor, in ``(0, 1]``.
        max_lr: cap of the linearly scaled learning rate (``None``: no cap, as in ABS).
        warmup_epochs: linear warm-up of the learning rate over the first epochs (0: none).
        adaptive: ``False`` for a fixed batch size.

    """

    def __init__(
        self,
        base_batch_size: int = 128,
        base_lr: float = 0.1,
        *,
        max_batch_size: int = 128 * 128,
        ratio: float = 2.0,
        growth: int = 2,
        patience: int | None = 10,
        adversarial_fraction: float = 0.0,
        adversarial_epochs: int | None = None,
        lr_milestones: Sequence[int] = (),
        lr_decay: float = 0.2,
        max_lr: float | None = None,
        warmup_epochs: int = 0,
        adaptive: bool = True,
    ):
        positive_int(base_batch_size, "base_batch_size")
        positive_int(max_batch_size, "max_batch_size")
        if max_batch_size < base_batch_size:
            raise ValueError(f"max_batch_size ({max_batch_size}) must be >= base_batch_size ({base_batch_size}); "
                             "pass max_batch_size=base_batch_size for a fixed batch")
        base_lr = positive_finite(base_lr, "base_lr")
        if positive_finite(ratio, "ratio") <= 1:
            raise ValueError(f"ratio must exceed 1 (the eigenvalue must fall by this factor), got {ratio!r}")
        if positive_int(growth, "growth") < 2:
            raise ValueError(f"growth must be an integer >= 2 (the batch multiplier per increase), got {growth!r}")
        if patience is not None:
            positive_int(patience, "patience")
        if isinstance(adversarial_fraction, bool) or not isinstance(adversarial_fraction, (int, float)) \
                or not 0 <= adversarial_fraction <= 1:
            raise ValueError(f"adversarial_fraction must lie in [0, 1] (0 for ABS), got {adversarial_fraction!r}")
        if adversarial_epochs is not None:
            non_negative_int(adversarial_epochs, "adversarial_epochs (or None)")
        milestones = tuple(lr_milestones)
        for m in milestones:
            positive_int(m, "every lr milestone")
        if not 0 < lr_decay <= 1:
            raise ValueError(f"lr_decay must lie in (0, 1], got {lr_decay!r}")
        if max_lr is not None:
            positive_finite(max_lr, "max_lr")
        non_negative_int(warmup_epochs, "warmup_epochs")
        self.base_batch_size, self.base_lr, self.max_batch_size = base_batch_size, base_lr, max_batch_size
        self.ratio, self.growth, self.patience = float(ratio), growth, patience
        self.initial_adversarial_fraction = float(adversarial_fraction)
        self.adversarial_epochs = adversarial_epochs
        self.lr_milestones, self.lr_decay = tuple(sorted(milestones)), float(lr_decay)
        self.max_lr, self.warmup_epochs, self.adaptive = max_lr, warmup_epochs, bool(adaptive)
        # state
        self.epoch = 0
        self.batch_size = base_batch_size
        self.reference_eigenvalue: float | None = None
        self.since_increase = 0
        self.increases = 0

    # ---- derived settings ------------------------------------------------------------------
    @property
    def capped(self) -> bool:
        """Whether the batch has reached ``max_batch_size``."""
        return self.batch_size >= self.max_batch_size

    @property
    def needs_eigenvalue(self) -> bool:
        """Whether :meth:`step` needs the top eigenvalue at the end of the current epoch."""
        return self.adaptive and not self.capped

    @property
    def lr(self) -> float:
        """Learning rate of the current epoch."""
        lr = self.base_lr * self.batch_size / self.base_batch_size
        if self.max_lr is not None:
            lr = min(lr, self.max_lr)
        lr *= self.lr_decay ** sum(m <= self.epoch for m in self.lr_milestones)
        if self.epoch < self.warmup_epochs:
            lr *= (self.epoch + 1) / self.warmup_epochs
        return lr

    @property
    def adversarial_fraction(self) -> float:
        """Fraction of each batch replaced by FGSM examples in the current epoch."""
        if (self.adaptive and self.capped and self.increases) or (
                self.adversarial_epochs is not None and self.epoch >= self.adversarial_epochs):
            return 0.0
        return self.initial_adversarial_fraction / self.growth ** self.increases

    def current(self) -> BatchSizeDecision:
        """The settings of the current epoch, as a decision without an eigenvalue."""
        return self._decision(None, False, "")

    # ---- the rule -----------------------------------------------------------------------------
    def step(self, eigenvalue: float | None = None) -> BatchSizeDecision:
        """End of an epoch: feed the top eigenvalue measured now; returns the next epoch's settings.

        ``eigenvalue`` is required while :attr:`needs_eigenvalue` is true and ignored otherwise.
        """
        measured = None
        increased, reason = False, ""
        if self.needs_eigenvalue:
            if eigenvalue is None:
                raise ValueError(
                    f"the controller needs the top Hessian eigenvalue at the end of epoch {self.epoch} "
                    f"(batch {self.batch_size} < max {self.max_batch_size}); pass step(eigenvalue), "
                    "or check needs_eigenvalue first")
            if isinstance(eigenvalue, bool) or not isinstance(eigenvalue, (int, float)) \
                    or not math.isfinite(eigenvalue):
                raise ValueError(f"eigenvalue must be a finite number, got {eigenvalue!r}")
            measured = float(eigenvalue)
            self.since_increase += 1
            if self.reference_eigenvalue is None:
                self.reference_eigenvalue = measured
            elif measured <= self.reference_eigenvalue / self.ratio:
                self._grow()
                self.reference_eigenvalue = measured
                increased, reason = True, EIGENVALUE
            if self.patience is not None and self.since_increase >= self.patience:
                self._grow()
                increased, reason = True, PATIENCE
        elif eigenvalue is not None:
            measured = float(eigenvalue)  # recorded, not used
        self.epoch += 1
        return self._decision(measured, increased, reason)

    def _grow(self) -> None:
        self.batch_size = min(self.batch_size * self.growth, self.max_batch_size)
        self.increases += 1
        self.since_increase = 0

    def _decision(self, eigenvalue, increased, reason) -> BatchSizeDecision:
        return BatchSizeDecision(self.epoch, eigenvalue, self.reference_eigenvalue, self.batch_size, self.lr,
                                 self.adversarial_fraction, increased, reason, self.needs_eigenvalue)

    # ---- saving and resuming ------------------------------------------------------------------
    def config(self) -> dict:
        """The constructor's arguments (what :meth:`load_state_dict` checks)."""
        return {"base_batch_size": self.base_batch_size, "base_lr": self.base_lr,
                "max_batch_size": self.max_batch_size, "ratio": self.ratio, "growth": self.growth,
                "patience": self.patience, "adversarial_fraction": self.initial_adversarial_fraction,
                "adversarial_epochs": self.adversarial_epochs, "lr_milestones": list(self.lr_milestones),
                "lr_decay": self.lr_decay, "max_lr": self.max_lr, "warmup_epochs": self.warmup_epochs,
                "adaptive": self.adaptive}

    def state_dict(self) -> dict:
        """Plain-Python state (JSON-serialisable): the configuration and the counters."""
        return {"config": self.config(), "epoch": self.epoch, "batch_size": self.batch_size,
                "reference_eigenvalue": self.reference_eigenvalue, "since_increase": self.since_increase,
                "increases": self.increases}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters saved by :meth:`state_dict` into a controller built with the same settings."""
        if not isinstance(state, dict) or not {"config", "epoch", "batch_size", "reference_eigenvalue",
                                               "since_increase", "increases"} <= set(state):
            raise ValueError("not an AdaptiveBatchSize state_dict (expected the keys config, epoch, batch_size, "
                             "reference_eigenvalue, since_increase, increases)")
        mine, saved = self.config(), dict(state["config"])
        saved["lr_milestones"] = list(saved.get("lr_milestones", []))
        diff = [f"{k}={saved.get(k)!r} (here {mine[k]!r})" for k in mine if saved.get(k) != mine[k]]
        if diff:
            raise ValueError("the saved controller was built with other settings: " + ", ".join(diff)
                             + "; build it with the saved settings (state['config'])")
        batch = state["batch_size"]
        if not isinstance(batch, int) or not self.base_batch_size <= batch <= self.max_batch_size:
            raise ValueError(f"saved batch_size {batch!r} is outside [{self.base_batch_size}, {self.max_batch_size}]")
        self.epoch, self.batch_size = int(state["epoch"]), batch
        ref = state["reference_eigenvalue"]
        self.reference_eigenvalue = None if ref is None else float(ref)
        self.since_increase, self.increases = int(state["since_increase"]), int(state["increases"])

    def __repr__(self) -> str:
        return (f"AdaptiveBatchSize(epoch={self.epoch}, batch_size={self.batch_size}, lr={self.lr:.4g}, "
                f"adversarial_fraction={self.adversarial_fraction:.4g}, "
                f"reference_eigenvalue={self.reference_eigenvalue})")
