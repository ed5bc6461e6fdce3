"""Run the command line on every rank of a launched process group (spawn needs module-level code)."""

from secondorder.cli import main


def run_main(argv: list[str]) -> int:
    return main(argv)


def run_main_as_torchrun_rank(argv: list[str]) -> int:
    """main() with the environment torchrun gives a rank (the group is already joined)."""
    import os

    from secondorder.distributed import current_world

    world = current_world()
    os.environ.update(RANK=str(world.rank), WORLD_SIZE=str(world.size))
    return main(argv)
