r"""Training with an adaptive batch size (ABS/ABSA): gradient accumulation, FGSM mixing, resumable.

:class:`AdaptiveBatchTrainer` applies an :class:`~secondorder.schedules.AdaptiveBatchSize`
controller to any model, loss and training set (``(inputs, targets)`` tensors or a map-style
``Dataset`` of ``(input, target)`` pairs):

* every epoch draws a fresh permutation of the data and cuts it into steps of the controller's
  batch size ``B`` (the last step of an epoch holds the remainder, as a ``DataLoader`` with
  ``drop_last=False`` does); a step is computed as micro-batches of at most ``max_micro_batch``
  samples whose mean losses, weighted by their share of the step, are accumulated, so its
  gradient equals that of the mean loss over all ``B`` samples;
* the first ``floor(p * n)`` samples of a step of ``n`` samples are replaced by FGSM examples
  (:func:`fgsm`, model in eval mode, parameter gradients untouched), ``p`` the controller's
  adversarial fraction (HessianFlow replaces the first ``int(p * 128)`` of every 128-sample
  micro-batch: the same count per step up to rounding);
* at the end of the epoch the top Hessian eigenvalue of the mean loss on a fresh random batch of
  ``eigen_batch_size`` training samples (clean, model in eval mode) is measured with
  :class:`~secondorder.HessianOperator` and :func:`~secondorder.eigenvalues`, and fed to the
  controller, which sets the next epoch's batch size, learning rate and adversarial fraction.

All randomness comes from two private generators seeded by ``seed`` (data order and the
eigenvalue batches), saved in :meth:`AdaptiveBatchTrainer.state_dict`; dropout inside training
draws from a forked global RNG seeded per epoch, so the caller's global RNG is never advanced and
a resumed run is bitwise the run without interruption. The model's train/eval mode is restored
after every call.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from secondorder.data import call_model, seed_global_rng, to_device
from secondorder.linalg import eigenvalues
from secondorder.operators import HessianOperator
from secondorder.schedules.adaptive_batch import AdaptiveBatchSize
from secondorder.validation import non_negative_int, positive_int, scalar_loss

__all__ = ["AdaptiveBatchTrainer", "EpochRecord", "fgsm", "top_eigenvalue"]


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of :class:`AdaptiveBatchTrainer`.

    Attributes:
        epoch: 1-based epoch number.
        batch_size: samples per optimizer step in this epoch (the last step may hold fewer).
        lr: learning rate used in this epoch.
        adversarial_fraction: FGSM fraction used in this epoch.
        top_eigenvalue: top Hessian eigenvalue measured at the end of this epoch (``None`` if
            not measured).
        train_loss: mean loss over the epoch's training samples as trained on (FGSM examples
            included), accumulated during the epoch.
        test_loss, test_accuracy: on ``test_data`` after the epoch, in eval mode (``None``
            without test data; accuracy ``None`` unless outputs are ``[N, C]`` and targets
            class indices).
        steps: optimizer steps in this epoch.
        iterations: optimizer steps since the start of training.
        batch_increase: why the batch grows after this epoch: ``"eigenvalue"``, ``"patience"`` or ``""``.

    """

    epoch: int
    batch_size: int
    lr: float
    adversarial_fraction: float
    top_eigenvalue: float | None
    train_loss: float
    test_loss: float | None
    test_accuracy: float | None
    steps: int
    iterations: int
    batch_increase: str


class _eval_mode:
    """Put a model in eval mode for a block and restore its mode afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def fgsm(model: nn.Module, loss_fn: Callable, inputs: Tensor, targets: Any, epsilon: float,
         clip: tuple[float, float] | None = None) -> Tensor:
    r"""Fast-gradient-sign examples :math:`x' = \mathrm{clip}(x + \epsilon\,\mathrm{sign}(\nabla_x \ell(f(x), y)))`.

    The gradient is taken with the model in eval mode (so BatchNorm statistics are neither used
    from nor written into the batch; the mode is restored afterwards) and with respect to the
    inputs only: parameter ``.grad`` fields are untouched. ``loss_fn(outputs, targets)`` is the
    batch's mean loss; since it is a sum over independent samples (in eval mode), each example's
    sign does not depend on the rest of the batch. ``clip=(lo, hi)`` clamps the result.
    """
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        raise TypeError("FGSM needs floating-point tensor inputs; use adversarial_fraction=0 (ABS) for other inputs")
    epsilon = float(epsilon)
    if not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be a non-negative finite number, got {epsilon!r}")
    x = inputs.detach().clone().requires_grad_(True)
    with _eval_mode(model), torch.enable_grad():
        loss = loss_fn(call_model(model, x), targets)
        (grad,) = torch.autograd.grad(loss, x)
    out = inputs.detach() + epsilon * grad.sign()
    if clip is not None:
        out = out.clamp(float(clip[0]), float(clip[1]))
    return out


def top_eigenvalue(model: nn.Module, loss_fn: Callable, batch: Any, *, method: str = "lanczos",
                   tol: float | None = 1e-3, max_matvecs: int = 20, seed: int = 0) -> float:
    """Largest (algebraic) eigenvalue of the Hessian of the mean loss on ``batch``, the model in eval mode.

    :class:`~secondorder.HessianOperator` and :func:`~secondorder.eigenvalues` (thick-restart
    Lanczos by default; ``method="power"`` for HessianFlow's power iteration) with the given
    relative residual tolerance and product budget; the mode is restored afterwards.
    """
    with _eval_mode(model):
        op = HessianOperator(model, loss_fn, batch, seed=seed)
        result = eigenvalues(op, 1, "largest", tol=tol, method=method, max_matvecs=max_matvecs, seed=seed)
    return float(result.eigenvalues[0])


class _Data:
    """``(inputs, targets)`` tensors or a map-style Dataset, indexed by tensors of sample indices."""

    def __init__(self, data: Any, name: str):
        self.tensors: tuple[Tensor, Tensor] | None
        self.dataset: Any
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            if data[0].ndim == 0 or data[0].shape[0] != data[1].shape[0]:
                raise ValueError(f"{name}: inputs and targets must share their first (sample) dimension, got "
                                 f"{tuple(data[0].shape)} and {tuple(data[1].shape)}")
            self.tensors, self.dataset, self.size = (data[0], data[1]), None, data[0].shape[0]
        elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
            self.tensors, self.dataset, self.size = None, data, len(data)
        else:
            raise TypeError(f"{name} must be (inputs, targets) tensors or a map-style torch Dataset of "
                            f"(input, target) pairs, got {type(data).__name__}")
        if self.size < 1:
            raise ValueError(f"{name} holds no samples")

    def __len__(self) -> int:
        return self.size

    def take(self, idx: Tensor) -> tuple[Any, Any]:
        if self.tensors is not None:
            x, y = self.tensors
            return x[idx.to(x.device)], y[idx.to(y.device)]
        from torch.utils.data import default_collate

        batch = default_collate([self.dataset[i] for i in idx.tolist()])
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("the Dataset's samples must be (input, target) pairs")
        return batch[0], batch[1]

    def chunks(self, size: int):
        for start in range(0, self.size, size):
            yield self.take(torch.arange(start, min(start + size, self.size)))

    def input_range(self) -> tuple[float, float]:
        lo, hi = math.inf, -math.inf
        for x, _ in self.chunks(4096):
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise TypeError("FGSM needs floating-point tensor inputs; use adversarial_fraction=0 (ABS) "
                                "for other inputs")
            lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        return lo, hi


class AdaptiveBatchTrainer:
    """Trains ``model`` under an :class:`AdaptiveBatchSize` controller; see the module docstring.

    Args:
        model: any ``nn.Module``; trained in place (in train mode, its mode restored after
            :meth:`train`).
        loss_fn: ``loss_fn(outputs, targets)``, the batch's **mean** loss.
        train_data: ``(inputs, targets)`` tensors or a map-style ``Dataset`` of pairs. The
            controller's ``max_batch_size`` may not exceed its size (the full batch is the
            largest real batch).
        controller: the batch-size controller (ABS/ABSA, or ``adaptive=False`` for a fixed batch).
        optimizer: default SGD with ``momentum`` on the trainable parameters. Each parameter
            group's learning rate is its initial value times ``controller.lr / controller.base_lr``.
        momentum: of the default SGD (HessianFlow: 0.9).
        test_data: optional tensors or Dataset evaluated after every epoch (loss, accuracy).
        max_micro_batch: largest forward pass; bigger steps are accumulated (default 128, HessianFlow's
            micro-batch, and the fastest on a CPU for the MNIST-1D CNN).
        epsilon: FGSM step in input units (HessianFlow: 0.005 on inputs in [0, 1]).
        adversarial_clip: ``"data"`` (default: the min and max of the training inputs), ``None``
            (no clipping) or ``(lo, hi)``.
        eigen_batch_size: samples of the eigenvalue batch (HessianFlow: 128; at most the data set).
        eigen_method, eigen_tol, eigen_max_matvecs: passed to :func:`top_eigenvalue`.
        track_eigenvalue: measure the eigenvalue every epoch even when the controller does not
            need it (for the schedule figure); ``False`` measures only when needed.
        seed: seeds the data order, the eigenvalue batches and the per-epoch dropout RNG.
        progress: a progress bar of the epochs on stderr.

    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        train_data: Any,
        controller: AdaptiveBatchSize,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        momentum: float = 0.9,
        test_data: Any = None,
        max_micro_batch: int = 128,
        epsilon: float = 0.005,
        adversarial_clip: str | tuple[float, float] | None = "data",
        eigen_batch_size: int = 128,
        eigen_method: str = "lanczos",
        eigen_tol: float | None = 1e-3,
        eigen_max_matvecs: int = 20,
        track_eigenvalue: bool = True,
        seed: int = 0,
        progress: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if not isinstance(controller, AdaptiveBatchSize):
            raise TypeError(f"controller must be an AdaptiveBatchSize, got {type(controller).__name__}")
        self.data = _Data(train_data, "train_data")
        self.test = None if test_data is None else _Data(test_data, "test_data")
        if controller.max_batch_size > len(self.data):
            raise ValueError(
                f"max_batch_size {controller.max_batch_size} exceeds the {len(self.data)} training samples; the "
                f"largest real batch is the full data set: pass max_batch_size <= {len(self.data)} to the controller")
        for name, value in (("max_micro_batch", max_micro_batch), ("eigen_batch_size", eigen_batch_size),
                            ("eigen_max_matvecs", eigen_max_matvecs)):
            positive_int(value, name)
        if not math.isfinite(float(epsilon)) or epsilon < 0:
            raise ValueError(f"epsilon must be a non-negative finite number, got {epsilon!r}")
        if controller.initial_adversarial_fraction > 0 and epsilon == 0:
            raise ValueError("the controller mixes in adversarial examples but epsilon is 0; pass epsilon > 0 "
                             "or adversarial_fraction=0 (ABS)")
        if not (adversarial_clip is None or adversarial_clip == "data" or (
                isinstance(adversarial_clip, (tuple, list)) and len(adversarial_clip) == 2
                and float(adversarial_clip[0]) <= float(adversarial_clip[1]))):
            raise ValueError(f"adversarial_clip must be 'data', None or (lo, hi) with lo <= hi, got {adversarial_clip!r}")
        if eigen_method not in ("lanczos", "power"):
            raise ValueError(f"eigen_method must be 'lanczos' or 'power', got {eigen_method!r}")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.model, self.loss_fn, self.controller = model, loss_fn, controller
        self.device = params[0].device
        self.optimizer = optimizer if optimizer is not None else torch.optim.SGD(params, lr=controller.lr,
                                                                                 momentum=momentum)
        # each group's learning rate at the controller's base batch size
        self._group_lrs = [controller.base_lr if optimizer is None else float(g["lr"])
                           for g in self.optimizer.param_groups]
        self.max_micro_batch, self.epsilon = max_micro_batch, float(epsilon)
        self._clip_spec = adversarial_clip
        self._clip: tuple[float, float] | None = None if adversarial_clip in (None, "data") else \
            (float(adversarial_clip[0]), float(adversarial_clip[1]))
        self.eigen_batch_size = min(eigen_batch_size, len(self.data))
        self.eigen_options: dict[str, Any] = {"method": eigen_method, "tol": eigen_tol, "max_matvecs": eigen_max_matvecs}
        self.track_eigenvalue, self.progress = bool(track_eigenvalue), bool(progress)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.eigen_generator = torch.Generator().manual_seed(int(seed) + 1)
        self.iterations = 0
        self._history: list[EpochRecord] = []

    @property
    def history(self) -> tuple[EpochRecord, ...]:
        """One record per epoch trained so far (including epochs before a resume)."""
        return tuple(self._history)

    # ---- one epoch -------------------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        scale = lr / self.controller.base_lr
        for group, base in zip(self.optimizer.param_groups, self._group_lrs):
            group["lr"] = base * scale

    def _adversarial_clip(self) -> tuple[float, float] | None:
        if self._clip is None and self._clip_spec == "data":
            self._clip = self.data.input_range()
        return self._clip

    def _step(self, idx: Tensor, fraction: float) -> float:
        """One optimizer step on the samples ``idx`` (accumulated); returns the sum of their losses."""
        n = len(idx)
        num_adv = math.floor(fraction * n + 1e-9)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for start in range(0, n, self.max_micro_batch):
            sub = idx[start:start + self.max_micro_batch]
            x, y = to_device(self.data.take(sub), self.device)
            k = min(max(num_adv - start, 0), len(sub))
            if k:
                x = torch.cat([fgsm(self.model, self.loss_fn, x[:k], y[:k], self.epsilon, self._adversarial_clip()),
                               x[k:]])
            loss = self.loss_fn(call_model(self.model, x), y)
            scalar_loss(loss, "a training micro-batch", "loss_fn must return the mean loss (reduction='mean')")
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"the training loss became {loss.item()} in epoch {self.controller.epoch + 1} (batch "
                    f"{self.controller.batch_size}, lr {self.controller.lr:.4g}); lower the learning rate or cap it "
                    "with max_lr")
            (loss * (len(sub) / n)).backward()
            total += float(loss.detach()) * len(sub)
        self.optimizer.step()
        self.iterations += 1
        return total

    def _eigenvalue(self) -> float | None:
        c = self.controller
        if not (c.needs_eigenvalue or self.track_eigenvalue):
            return None
        idx = torch.randperm(len(self.data), generator=self.eigen_generator)[:self.eigen_batch_size]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self.eigen_generator))
        batch = to_device(self.data.take(idx), self.device)
        return top_eigenvalue(self.model, self.loss_fn, batch, seed=seed, **self.eigen_options)

    def _evaluate(self) -> tuple[float | None, float | None]:
        """Mean test loss and, for ``[N, C]`` outputs and class-index targets, accuracy (eval mode, no grad)."""
        if self.test is None:
            return None, None
        total = correct = 0.0
        classify = True
        with _eval_mode(self.model), torch.no_grad():
            for batch in self.test.chunks(self.max_micro_batch):
                x, y = to_device(batch, self.device)
                out = call_model(self.model, x)
                total += float(self.loss_fn(out, y)) * len(y)
                classify = classify and out.ndim == 2 and y.ndim == 1 and not y.is_floating_point()
                if classify:
                    correct += float((out.argmax(-1) == y).sum())
        n = len(self.test)
        return total / n, (correct / n if classify else None)

    def _epoch(self) -> EpochRecord:
        c = self.controller
        batch, lr, fraction = c.batch_size, c.lr, c.adversarial_fraction
        self._set_lr(lr)
        seed_global_rng(int(torch.randint(0, 2**62, (1,), generator=self.generator)), self.device)  # dropout (forked RNG)
        order = torch.randperm(len(self.data), generator=self.generator)
        total, steps = 0.0, 0
        self.model.train()
        for start in range(0, len(order), batch):
            total += self._step(order[start:start + batch], fraction)
            steps += 1
        eigenvalue = self._eigenvalue()
        decision = c.step(eigenvalue)
        test_loss, test_accuracy = self._evaluate()
        return EpochRecord(c.epoch, batch, lr, fraction, eigenvalue, total / len(order), test_loss, test_accuracy,
                           steps, self.iterations, decision.reason)

    # ---- training ----------------------------------------------------------------------------
    def train(self, epochs: int) -> tuple[EpochRecord, ...]:
        """Train ``epochs`` more epochs; returns the whole :attr:`history`."""
        from tqdm import tqdm

        non_negative_int(epochs, "epochs")
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        was_training = self.model.training
        bar = tqdm(range(epochs), desc="training", unit="epoch", disable=not self.progress, leave=False,
                   file=sys.stderr, dynamic_ncols=True)
        try:
            with torch.random.fork_rng(devices=devices):
                for _ in bar:
                    r = self._epoch()
                    self._history.append(r)
                    bar.set_postfix_str(
                        f"batch {r.batch_size}, lr {r.lr:.3g}, loss {r.train_loss:.3f}"
                        + ("" if r.top_eigenvalue is None else f", λ1 {r.top_eigenvalue:.3g}")
                        + ("" if r.test_accuracy is None else f", acc {r.test_accuracy:.3f}"))
        finally:
            bar.close()
            self.model.train(was_training)
            for p in self.model.parameters():
                p.grad = None
        return self.history

    # ---- saving and resuming -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Model, optimizer, controller, both generators, iteration count and history (for ``torch.save``)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "controller": self.controller.state_dict(), "generator": self.generator.get_state(),
                "eigen_generator": self.eigen_generator.get_state(), "iterations": self.iterations,
                "group_lrs": list(self._group_lrs), "history": [asdict(r) for r in self._history]}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (a trainer built with the same model, data and settings)."""
        keys = {"model", "optimizer", "controller", "generator", "eigen_generator", "iterations", "history"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise ValueError(f"not an AdaptiveBatchTrainer state_dict (expected the keys {sorted(keys)})")
        self.controller.load_state_dict(state["controller"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.eigen_generator.set_state(state["eigen_generator"])
        self.iterations = int(state["iterations"])
        if "group_lrs" in state:
            self._group_lrs = [float(v) for v in state["group_lrs"]]
        self._history = [EpochRecord(**r) for r in state["history"]]
