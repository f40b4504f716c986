"""The ``dynlens`` command: ``dynlens demo``, ``dynlens show RUN``, ``dynlens report RUN [RUN ...]``,
``dynlens export RUN --tensorboard DIR``."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

__all__ = ["main", "show"]


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}"


def show(run_dir: str, out=None) -> None:  # noqa: ANN001 - a text stream
    """Print a terminal summary of a run: steps, probes and their latest values, events,
    findings and, when the run recorded them, what each probe cost (time and deferrals)."""
    from dynlens.store import load_run

    out = out or sys.stdout
    run = load_run(run_dir)
    meta = run.meta
    model = meta.get("model") or {}
    print(f"run      {run.name}  ({run.path})", file=out)
    print(f"status   {meta.get('status', '?')}, last step {run.last_step}", file=out)
    if model:
        print(f"model    {model.get('class')}  {model.get('trainable_parameters', 0):,} trainable parameters", file=out)
    opt = meta.get("optimizer")
    if opt:
        print(f"optimizer {opt.get('class')} {opt.get('defaults')}", file=out)
    if run.config:
        print("config   " + ", ".join(f"{k}={v}" for k, v in run.config.items()), file=out)
    scalars = run.scalars()
    print("\nlatest values", file=out)
    if scalars.empty:
        print("  (none yet)", file=out)
    for probe in dict.fromkeys(["train", *run.probes()]):
        rows = scalars[scalars.probe == probe]
        if rows.empty:
            continue
        last = rows.groupby("name", sort=False).tail(1)
        items = ", ".join(f"{n}={_fmt(v)} (step {s})" for n, v, s in zip(last.name, last.value, last.step))
        print(f"  {probe:<20} {items}", file=out)
    events = run.events()
    print(f"\nevents   {len(events)}", file=out)
    for _, e in events.tail(10).iterrows():
        print(f"  step {e.step}: [{e.level}] {e.probe or ''} {e.message}", file=out)
    try:
        from dynlens.diagnose import diagnose
    except ImportError:  # pragma: no cover - diagnose is part of the package
        return
    findings = diagnose(run)
    print(f"\nfindings {len(findings)}", file=out)
    for f in findings:
        print(f"  [{f.severity}] steps {f.steps[0]}-{f.steps[1]}: {f.title}", file=out)
    record = meta.get("costs")
    if isinstance(record, dict):
        wall = float(record.get("wall_seconds") or 0.0)
        spent = float(record.get("probe_seconds") or 0.0) + float(record.get("lens_seconds") or 0.0)
        budget = record.get("budget")
        print(f"\ncosts:   dynlens took {spent:.2f} s of {wall:.2f} s wall time"
              + (f" ({spent / wall:.1%})" if wall > 0 else "")
              + (f", budget {float(budget):.1%}" if budget is not None else ", no time budget"),
              file=out)
        for c in run.costs().itertuples(index=False):
            share = "-" if math.isnan(c.share) else f"{c.share:.1%}"
            if c.probe == "lens":  # the Lens's own time outside measurements
                print(f"  {'lens (bookkeeping)':<20} {c.seconds:.2f} s, {share}", file=out)
                continue
            print(f"  {c.probe:<20} {c.measurements} measurements, {c.seconds:.2f} s, {share}, "
                  f"{c.deferred} deferred", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dynlens`` command."""
    parser = argparse.ArgumentParser(prog="dynlens", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small network with every probe attached and write its report")
    demo.add_argument("--run-dir", default="runs/demo", help="where the run goes (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=600, help="optimizer steps (default: 600)")
    demo.add_argument("--quiet", action="store_true", help="no progress output")

    show_cmd = commands.add_parser("show", help="print a terminal summary of a run")
    show_cmd.add_argument("run", help="a run directory")

    export = commands.add_parser("export", help="write a run to another tool's format (TensorBoard)")
    export.add_argument("run", help="a run directory")
    export.add_argument("--tensorboard", metavar="DIR", required=True,
                        help="write TensorBoard event files to DIR (scalars; arrays as histograms)")

    try:
        from dynlens.reports.cli import add_report_command
    except ImportError:
        add_report_command = None
    if add_report_command is not None:
        add_report_command(commands)

    args = parser.parse_args(argv)
    from dynlens.store import RunError

    try:
        if args.command == "demo":
            from dynlens.demo import run_demo

            path = run_demo(args.run_dir, steps=args.steps, quiet=args.quiet)
            print(f"run: {path}")
            return 0
        if args.command == "show":
            show(args.run)
            return 0
        if args.command == "export":
            from dynlens.integrations.tensorboard import export_tensorboard

            try:
                print(f"tensorboard: {export_tensorboard(args.run, args.tensorboard)}")
            except ImportError as err:
                print(f"dynlens: {err}", file=sys.stderr)
                return 2
            return 0
        return int(args.func(args) or 0)
    except RunError as err:
        print(f"dynlens: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
