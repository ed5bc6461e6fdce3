r"""Which weights are prunable, the masks that record what was pruned, and keeping them through training.

A :class:`PruningMask` maps parameter names to boolean tensors of the parameters' shapes
(``True``: kept, ``False``: pruned). :func:`masked` ties one to a model: it zeroes the pruned
weights, zeroes their gradients in every backward (so optimizer states such as momentum never
move them) and, for the optimizers it is given, re-applies the mask after every step (weight
decay, Adam's :math:`\epsilon` or a hand-made update cannot revive a weight). The masks are plain
tensors, so ``mask.state_dict()`` / :meth:`PruningMask.from_state_dict` save and restore them beside
the model's own ``state_dict`` (the CLI's checkpoints hold both).
"""

from __future__ import annotations

import difflib
from typing import Callable, Iterable, Iterator, Mapping, Union

import torch
from torch import Tensor, nn

__all__ = ["MaskedModel", "PruningMask", "masked", "prunable_parameters"]

PRUNABLE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                                nn.ConvTranspose2d, nn.ConvTranspose3d)
"""Layers whose ``weight`` is prunable by default (biases and normalization parameters are not)."""

Selector = Union[None, str, Iterable[str], Callable[[str, nn.Parameter], bool]]


def prunable_parameters(model: nn.Module, params: Selector = None) -> list[tuple[str, nn.Parameter]]:
    """The parameters to prune, ``[(name, parameter), ...]`` in the model's order.

    ``None``: the ``weight`` of every :data:`PRUNABLE_LAYERS` module (Linear and Conv layers), not
    biases or normalization parameters. Strings: an exact parameter name selects that parameter (a
    bias too, if named); a module name selects the Linear/Conv weights at or under that module. A
    callable ``(name, parameter) -> bool`` filters all parameters. Unknown names raise a
    ``ValueError`` naming the close matches; so does a selection that is empty.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    ids = {id(p) for _, p in named}
    default = [(f"{m}.weight" if m else "weight", mod.weight) for m, mod in model.named_modules()
               if isinstance(mod, PRUNABLE_LAYERS) and isinstance(getattr(mod, "weight", None), nn.Parameter)
               and id(mod.weight) in ids]
    default_names = {n for n, _ in default}
    if params is None:
        chosen_names = default_names
    elif callable(params):
        chosen_names = {n for n, p in named if params(n, p)}
    else:
        wanted = [params] if isinstance(params, str) else list(params)
        if not all(isinstance(w, str) for w in wanted):
            raise TypeError("params must be None, parameter names / module names, or a callable filter")
        names = [n for n, _ in named]
        modules = [m for m, _ in model.named_modules() if m]
        chosen_names = set()
        for w in wanted:
            if w in names:
                chosen_names.add(w)
                continue
            under = {n for n in default_names if n.startswith(w + ".")}
            if not under:
                hint = difflib.get_close_matches(w, names + modules, n=3)
                known = w in modules
                raise ValueError(
                    (f"module {w!r} holds no Linear/Conv weight to prune" if known else
                     f"parameter or module {w!r} is not in the model")
                    + (f"; did you mean {', '.join(map(repr, hint))}?" if hint and not known else "")
                    + f" Prunable weights: {', '.join(sorted(default_names)) or 'none'}")
            chosen_names |= under
    chosen = [(n, p) for n, p in named if n in chosen_names]
    if not chosen:
        raise ValueError("no parameters to prune: the model has no Linear/Conv weights (name the parameters)"
                         if params is None else "the parameter filter selected no parameters")
    frozen = [n for n, p in chosen if not p.requires_grad]
    if frozen:
        raise ValueError(f"parameters to prune do not require grad: {frozen}; call requires_grad_() or deselect them")
    return chosen


class PruningMask:
    """Boolean masks by parameter name (``True``: kept); each a detached copy, never changed in place.

    Args:
        masks: ``{name: bool tensor}``; any dtype is read as ``!= 0``.

    """

    def __init__(self, masks: Mapping[str, Tensor]) -> None:
        if not isinstance(masks, Mapping) or not masks:
            raise ValueError("a PruningMask needs at least one {parameter name: tensor} entry")
        for name, m in masks.items():
            if not isinstance(name, str) or not isinstance(m, Tensor):
                raise TypeError(f"masks must map parameter names to tensors, got {name!r}: {type(m).__name__}")
        self._masks = {name: (m.detach() != 0).clone() for name, m in masks.items()}

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def dense(cls, model: nn.Module, params: Selector = None) -> "PruningMask":
        """Everything kept, over :func:`prunable_parameters` ``(model, params)``."""
        return cls({n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model, params)})

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> "PruningMask":
        """The mask saved by :meth:`state_dict`."""
        return cls(state)

    # ---- reading -------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._masks)

    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def items(self) -> Iterable[tuple[str, Tensor]]:
        return self._masks.items()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PruningMask):
            return NotImplemented
        return self.names == other.names and all(torch.equal(self[n], other[n]) for n in self.names)

    __hash__ = None  # type: ignore[assignment]  # mutable tensors inside: not hashable

    def numel(self) -> int:
        return sum(m.numel() for m in self._masks.values())

    def num_pruned(self) -> int:
        return sum(int((~m).sum()) for m in self._masks.values())

    def sparsity(self) -> float:
        """The pruned fraction over all masked entries."""
        return self.num_pruned() / self.numel()

    def layer_sparsity(self) -> dict[str, float]:
        return {n: float((~m).sum()) / m.numel() for n, m in self._masks.items()}

    def flat(self) -> Tensor:
        """The masks concatenated in order, ``[d]`` bool (the layout of the pruning algorithms)."""
        return torch.cat([m.reshape(-1).cpu() for m in self._masks.values()])

    def state_dict(self) -> dict[str, Tensor]:
        return {n: m.clone() for n, m in self._masks.items()}

    def __repr__(self) -> str:
        return f"PruningMask({len(self)} tensors, {self.numel()} entries, sparsity {self.sparsity():.4f})"

    # ---- using ---------------------------------------------------------------------------
    def check(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The model's parameters the masks name, checked to exist with the masks' shapes (``ValueError``)."""
        params = dict(model.named_parameters())
        missing = [n for n in self._masks if n not in params]
        if missing:
            raise ValueError(f"the mask names parameters the model does not have: {missing}")
        wrong = [f"{n}: mask {list(m.shape)} vs parameter {list(params[n].shape)}" for n, m in self._masks.items()
                 if m.shape != params[n].shape]
        if wrong:
            raise ValueError(f"mask shapes do not match the parameters: {'; '.join(wrong)}")
        return {n: params[n] for n in self._masks}

    def apply(self, model: nn.Module) -> None:
        """Zero the pruned weights of ``model`` in place (no autograd record)."""
        params = self.check(model)
        with torch.no_grad():
            for name, p in params.items():
                p.mul_(self._masks[name].to(p.device, p.dtype))

    def holds(self, model: nn.Module) -> bool:
        """Whether every pruned weight of ``model`` is exactly zero."""
        params = self.check(model)
        return all(bool((p.detach()[~self._masks[n].to(p.device)] == 0).all()) for n, p in params.items())

    def union(self, other: "PruningMask") -> "PruningMask":
        """Pruned where either mask prunes (same names required)."""
        if self.names != other.names:
            raise ValueError(f"masks over different parameters: {self.names} vs {other.names}")
        return PruningMask({n: self[n] & other[n] for n in self.names})


class MaskedModel:
    """The hooks of :func:`masked` (a context manager; :meth:`remove` takes them off)."""

    def __init__(self, model: nn.Module, mask: PruningMask, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        params = mask.check(model)
        self.model, self.mask = model, mask
        self._handles: list = []
        mask.apply(model)
        for name, p in params.items():
            keep = mask[name].to(p.device)
            self._handles.append(p.register_hook(lambda g, keep=keep: g * keep.to(g.dtype)))
        for opt in optimizers:
            self.attach(opt)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply the mask after every ``optimizer.step()``."""
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.mask.apply(self.model)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """``{"model": model.state_dict(), "masks": mask.state_dict()}``."""
        return {"model": self.model.state_dict(), "masks": self.mask.state_dict()}

    def __enter__(self) -> "MaskedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def masked(model: nn.Module, mask: PruningMask, *optimizers: torch.optim.Optimizer) -> MaskedModel:
    """Keep ``mask`` on ``model`` while it trains: the pruned weights are zeroed now, their gradients
    are zeroed in every backward, and after every step of each of ``optimizers`` the mask is applied
    again. Use as ``with masked(model, mask, opt): ...`` or keep the handle and call ``remove()``.
    """
    return MaskedModel(model, mask, optimizers)
