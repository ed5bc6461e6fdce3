"""Run the command line on every rank of a launched process group (spawn needs module-level code)."""

from secondorder.cli import main


def run_main(argv: list[str]) -> int:
    return main(argv)
