"""What every experiment prints about the machine it ran on."""

from __future__ import annotations

from secondorder.environment import describe


def machine_line() -> str:
    """The markdown line naming the machine (CPU model, torch, threads, Python)."""
    return f"Machine: {describe()}  "


def train_step(opt, second_order: bool, closure):
    """One step of either kind of optimizer; ``closure()`` returns the loss without backward.

    secondorder's optimizers take the closure and differentiate it themselves (raising
    ``FloatingPointError`` on a non-finite loss); torch's get the classic zero_grad/backward/step.
    Returns the loss.
    """
    if second_order:
        return opt.step(closure)
    opt.zero_grad(set_to_none=True)
    loss = closure()
    loss.backward()
    opt.step()
    return loss


def write_markdown(lines: list[str], out: str):
    """Write the table to ``OUT.md`` and print it; return the PNG path ``OUT.png`` and pyplot (Agg)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    md, png = Path(out + ".md"), Path(out + ".png")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines))
    print("\n".join(lines))
    return png, plt
