"""The ``dynlens report RUN [RUN ...] [-o FILE] [--quiet]`` subcommand."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_report_command", "report_command"]


def add_report_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to ``subparsers`` (of ``dynlens``'s argument parser)."""
    parser = subparsers.add_parser(
        "report", help="write the self-contained HTML report of one or more runs",
        description="Write one self-contained HTML file with the findings, figures and events "
                    "of RUN (several runs: figures overlaid for comparison).",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run directory (as given to dl.Lens)")
    parser.add_argument("-o", "--out", metavar="FILE", default=None,
                        help="output file (default: RUN/report.html of the first run)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=report_command)
    return parser


def report_command(args: argparse.Namespace) -> int:
    """Write the report; print its path. Exit status 1 (with the reason) for an unreadable run."""
    from dynlens.reports import report
    from dynlens.store import RunError

    try:
        path = report(args.runs, out=args.out, quiet=args.quiet)
    except RunError as err:
        print(f"dynlens report: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0
