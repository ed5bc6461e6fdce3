"""Which parameters a curvature operator differentiates, and their block structure."""

from __future__ import annotations

import difflib
from typing import Callable, Iterable, Sequence, Union

from torch import Tensor, nn

from secondorder.operators.base import Block

ParamSelector = Union[None, str, Iterable[str], Callable[[str, nn.Parameter], bool]]


def select_parameters(model: nn.Module, params: ParamSelector) -> list[tuple[str, nn.Parameter]]:
    """Resolve ``params`` to ``[(name, parameter), ...]`` in the model's order.

    ``None``: every parameter that requires grad. A string or an iterable of strings: each
    is an exact parameter name or a module prefix (``"fc1"`` selects ``fc1.weight`` and
    ``fc1.bias``). A callable ``(name, parameter) -> bool``: a filter.
    """
    named = [(n, p) for n, p in model.named_parameters()]
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        wanted = [params] if isinstance(params, str) else list(params)
        if not all(isinstance(w, str) for w in wanted):
            raise TypeError("params must be None, parameter names / module prefixes, or a callable filter")
        names = [n for n, _ in named]
        for w in wanted:
            if not any(n == w or n.startswith(w + ".") for n in names):
                hint = difflib.get_close_matches(w, names, n=3)
                raise ValueError(
                    f"parameter or module {w!r} is not in the model"
                    + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else "")
                    + f" Available parameters: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
                )
        chosen = [(n, p) for n, p in named if any(n == w or n.startswith(w + ".") for w in wanted)]
    if not chosen:
        raise ValueError("no parameters selected: pass params=None for all trainable parameters, or names that exist")
    frozen = [n for n, p in chosen if not p.requires_grad]
    if frozen:
        raise ValueError(f"selected parameters do not require grad: {frozen}; call requires_grad_() or deselect them")
    return chosen


def make_blocks(named: list[tuple[str, nn.Parameter]], granularity: str) -> tuple[Block, ...]:
    """Contiguous blocks over the flattened parameters.

    ``granularity="module"`` groups the parameters of one module (one layer: weight and
    bias); ``"parameter"`` makes one block per parameter tensor.
    """
    if granularity not in ("module", "parameter"):
        raise ValueError(f"blocks must be 'module' or 'parameter', got {granularity!r}")
    blocks: list[Block] = []
    offset = 0
    for name, p in named:
        key = name if granularity == "parameter" else (name.rsplit(".", 1)[0] if "." in name else name)
        stop = offset + p.numel()
        if blocks and blocks[-1].name == key:
            last = blocks[-1]
            blocks[-1] = Block(key, last.start, stop, last.params + (name,))
        else:
            blocks.append(Block(key, offset, stop, (name,)))
        offset = stop
    return tuple(blocks)


def split_rows(V: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """Views of a ``[K, P]`` block as ``[K, *p.shape]`` pieces, one per parameter."""
    out, offset = [], 0
    for p in params:
        n = p.numel()
        out.append(V[:, offset : offset + n].view(V.shape[0], *p.shape))
        offset += n
    return out
