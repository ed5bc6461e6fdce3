"""The ``secondorder`` command line: ``analyze`` (the Hessian report) and ``quantize`` (HAWQ).

Each subcommand module registers itself with ``add_parser(sub)`` and returns ``(summary dict,
table text)`` from ``run(args)``; bad input (a :class:`UsageError`, raised where a command checks
what the user gave, or the user's model giving a non-finite loss) is one line on stderr and exit status 2, a :class:`DistributedError` one line
and exit status 1; any other exception propagates with its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from secondorder.cli import analyze, batch_scaling, newton, prune, quantize, train
from secondorder.cli.common import UsageError
from secondorder.distributed import DistributedError
from secondorder.operators import NonFiniteError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="secondorder", description="Second-order analysis of PyTorch models.",
        epilog="run 'secondorder COMMAND --help' for a command's options and examples",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    analyze.add_parser(sub)
    quantize.add_parser(sub)
    newton.add_parser(sub)
    train.add_parser(sub)
    prune.add_parser(sub)
    batch_scaling.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``secondorder`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        summary, table = args.run(args)
    except (UsageError, NonFiniteError, DistributedError) as err:  # anything else is a bug: its traceback shows
        print(f"secondorder: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 1 if isinstance(err, DistributedError) else 2
    if summary is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(table)
    return 0

