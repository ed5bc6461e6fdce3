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


def ms(xs, scale: float = 1.0, fmt: str = ".2f") -> str:
    """``mean ± std`` of ``xs`` times ``scale`` (sample std over seeds; 0 for one value)."""
    import statistics

    xs = [x * scale for x in xs]
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):{fmt}} ± {s:{fmt}}"


QUANT_MODELS = {"mnist1d": "MNIST-1D CNN", "transformer": "digit transformer"}


def load_quant_data(kinds) -> dict:
    """The fixed data of each network in ``kinds`` (None for the others): MNIST-1D and the digit tokens."""
    from secondorder.datasets import load_digit_tokens, load_mnist1d

    loaders = {"mnist1d": load_mnist1d, "transformer": load_digit_tokens}
    return {kind: loader() if kind in kinds else None for kind, loader in loaders.items()}


def train_quant_model(kind: str, seed: int, data, calibration: int | None = None):
    """One trained network of the quantization experiments and its calibration batches.

    ``kind`` is "mnist1d" (``train_mnist1d(seed, epochs=20)``, batches of 1000) or "transformer"
    (``train_digit_transformer(seed)``, batches of 500); the calibration set is the first
    ``calibration`` training samples (None: all). Returns the training result and the batches.
    """
    from secondorder.datasets import batches, train_digit_transformer, train_mnist1d

    if kind == "mnist1d":
        result, size = train_mnist1d(seed=seed, epochs=20, data=data), 1000
    else:
        result, size = train_digit_transformer(seed=seed, data=data), 500
    x, y = result.train
    return result, batches(x[:calibration], y[:calibration], size)


def run_quant_experiment(a, script: str, run_case, report, figure) -> None:
    """Every (seed, network) case of a quantization experiment, then its table and figure.

    ``run_case(kind, seed, data)`` gives one case; ``report(a, results, seconds, command)`` the
    markdown lines, written to ``a.out`` with the exact command; ``figure(a, results, plt, png)``.
    """
    import sys
    import time

    t_start = time.perf_counter()
    data = load_quant_data(a.models)
    res = {(k, seed): run_case(k, seed, data[k]) for seed in a.seeds for k in a.models}
    total = time.perf_counter() - t_start
    cmd = f"OMP_NUM_THREADS=1 .venv/bin/python experiments/{script}" + "".join(f" {x}" for x in sys.argv[1:])
    png, plt = write_markdown(report(a, res, total, cmd), a.out)
    figure(a, res, plt, png)
    print(f"wrote {a.out}.md and {png}; total {total:.0f} s")
