"""The self-contained HTML report: findings first, then one section per probe (its figures and
the table of its scalars' latest values), then what dynlens cost the run (time and memory per probe, when the run recorded it), then events.

Everything is in one file: figures are inline SVG (text kept as text, escaped by matplotlib;
heat maps as ``data:`` PNG inside the SVG), the CSS is inline, and nothing refers to anything
outside the document. The page is rendered by a jinja2 template with autoescaping on, so no
string from a run (names, configuration, messages, tracebacks) can inject markup.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import jinja2
import numpy as np
from markupsafe import Markup
from tqdm import tqdm

from dynlens.diagnose import SEVERITIES, Finding, diagnose
from dynlens.reports.registry import figures_for
from dynlens.reports.style import (
    RunLike,
    as_runs,
    log_scale_if_spans_decades,
    mark_findings,
    new_figure,
    plot_series,
    report_style,
    run_labels,
)
from dynlens.store import Run

__all__ = ["report", "Report", "render_html", "ProgressBar"]

MAX_GENERIC_PANELS = 12
REPORT_NAME = "report.html"


class Report(str):
    """The path of a written report (a ``str``, usable wherever a path is); in a notebook it
    displays the report inline (an ``<iframe srcdoc=...>``, the document escaped)."""

    def __fspath__(self) -> str:
        return str(self)

    @property
    def path(self) -> Path:
        """The report file as a :class:`~pathlib.Path`."""
        return Path(str(self))

    def _repr_html_(self) -> str:
        document = self.path.read_text(encoding="utf-8")
        return (f'<iframe srcdoc="{html.escape(document, quote=True)}" '
                'style="width:100%;height:800px;border:1px solid #ccc"></iframe>')


class ProgressBar:
    """A one-line ``tqdm`` progress bar on a stream (stderr by default); silent when ``quiet``."""

    def __init__(self, total: int, quiet: bool = False, stream: TextIO | None = None,
                 width: int = 30) -> None:
        self.total, self.done, self.quiet = max(total, 1), 0, quiet
        self.stream = stream if stream is not None else sys.stderr
        self._bar = tqdm(total=self.total, file=self.stream, disable=quiet, ascii=".#",
                         bar_format=f"dynlens report [{{bar:{width}}}] {{n_fmt}}/{{total_fmt}} "
                                    "{elapsed} {desc}")

    def update(self, label: str) -> None:
        """Count one unit of work done and show ``label`` beside the bar."""
        if self.done >= self.total:
            return
        self.done += 1
        self._bar.set_description_str(label[:40], refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


@dataclass
class _Figure:
    title: str
    anchor: str
    svg: Markup | None = None
    error: str | None = None


@dataclass
class _Section:
    probe: str
    anchor: str
    figures: list[_Figure] = field(default_factory=list)
    table: list[dict[str, Any]] = field(default_factory=list)
    findings: list[int] = field(default_factory=list)


def _anchor(prefix: str, name: str, used: set[str]) -> str:
    """An HTML id made of ``[a-z0-9-]`` only, unique within ``used``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "x"
    anchor, i = f"{prefix}-{slug}", 2
    while anchor in used:
        anchor, i = f"{prefix}-{slug}-{i}", i + 1
    used.add(anchor)
    return anchor


def _svg(fig: Any, alt: str) -> Markup:
    """A Figure as an ``<img>`` holding its SVG as a ``data:`` URI. An SVG loaded as an image
    runs no script and loads nothing, and matplotlib escapes every text it writes."""
    buffer = io.BytesIO()
    with report_style():
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Markup('<img class="figure" alt="{}" src="data:image/svg+xml;base64,{}">').format(
        alt, Markup(data))


def _generic_figure(runs: Sequence[Run], probe: str, findings: Sequence[Finding]) -> Any:
    """Every scalar of a probe with no registered figure, one panel each, runs overlaid."""
    names = sorted({n for run in runs for n in run.scalar_names(probe)})[:MAX_GENERIC_PANELS]
    if not names:
        return None
    with report_style():
        fig, axes = new_figure(f"{probe}: scalars", nrows=len(names), height=2.2)
        for ax, name in zip(axes[:, 0], names, strict=True):
            values = plot_series(ax, runs, probe, name)
            log_scale_if_spans_decades(ax, values)
            ax.set_ylabel(name)
            mark_findings(ax, findings, probe)
            if len(runs) > 1:
                ax.legend(loc="best")
    return fig


def _latest_table(runs: Sequence[Run], probe: str) -> list[dict[str, Any]]:
    """Rows (run, name, last step, last value, min, max, steps recorded) of a probe's scalars,
    read from the runs' series (which the figures and the rules have read already)."""
    rows = []
    labels = run_labels(runs)
    for run, label in zip(runs, labels, strict=True):
        for name in sorted(run.scalar_names(probe)):
            series = run.series(probe, name)
            if series.empty:
                continue
            values = series.to_numpy()
            finite = values[np.isfinite(values)]
            rows.append({
                "run": label, "name": name, "step": int(series.index[-1]),
                "value": _fmt(values[-1]),
                "min": _fmt(finite.min()) if finite.size else "–",
                "max": _fmt(finite.max()) if finite.size else "–",
                "count": len(values),
            })
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "NaN" if math.isnan(value) else f"{float(value):.4g}"
    return str(value)


def _flatten(config: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Nested configuration as (dotted key, value text) rows."""
    if isinstance(config, dict):
        rows: list[tuple[str, str]] = []
        for key, value in config.items():
            rows += _flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}")
        return rows
    return [(prefix.rstrip("."), _fmt(config))]


def _run_header(run: Run, label: str, anchor: str) -> dict[str, Any]:
    meta = run.meta
    model = meta.get("model") or {}
    optimizer = meta.get("optimizer") or {}
    tensors = model.get("tensors") or []
    return {
        "label": label, "anchor": anchor, "path": str(run.path),
        "status": str(meta.get("status", "unknown")), "last_step": run.last_step,
        "started": str(meta.get("started", "")), "finished": str(meta.get("finished", "")),
        "config": _flatten(run.config),
        "model_class": str(model.get("class", "?")),
        "parameters": model.get("parameters", "?"),
        "trainable": model.get("trainable_parameters", "?"),
        "tensors": len(tensors), "layers": len(meta.get("layers") or []),
        "device": str(model.get("device", "")),
        "model_text": str(model.get("text", "")),
        "optimizer": (f"{optimizer.get('class', '?')} "
                      + ", ".join(f"{k}={_fmt(v)}" for k, v in (optimizer.get("defaults") or {}).items())
                      ) if optimizer else "none",
        "loss_fn": str(meta.get("loss_fn", "")),
        "probes": [{k: _fmt(v) for k, v in p.items()} for p in meta.get("probes") or []
                   if isinstance(p, dict)],
        "versions": ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()),
    }


def _bytes(value: float) -> str:
    """A byte count in binary units (B, KiB, MiB, GiB); "–" for NaN (not measured)."""
    if math.isnan(value):
        return "–"
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _percent(fraction: float) -> str:
    """A fraction as a percentage with one decimal ("–" for NaN)."""
    return "–" if math.isnan(fraction) else f"{100 * fraction:.1f}%"


def _seconds(value: float) -> str:
    """Seconds to three significant digits without an exponent: whole seconds from 1000 s on,
    "<0.001" below a millisecond."""
    if 0 < value < 0.001:
        return "<0.001"
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _costs(run: Run, label: str) -> dict[str, Any]:
    """What dynlens cost one run, from its meta key ``costs``: ``summary``, one sentence (probe
    time against wall time and the budgets), and ``rows``, one per probe (measurements, total
    seconds, share of wall time, deferred measurements, peak extra memory, Hessian-vector
    products). ``summary`` is None for a run written before costs were kept."""
    record = run.meta.get("costs")
    if not isinstance(record, dict):
        return {"run": label, "summary": None, "rows": [], "products": False}
    frame = run.costs()
    wall = float(record.get("wall_seconds") or 0.0)
    spent = record.get("probe_seconds")
    spent = float(frame["seconds"].sum()) if spent is None else float(spent)
    spent += float(record.get("lens_seconds") or 0.0)
    budget, memory_budget = record.get("budget"), record.get("memory_budget")
    summary = (f"dynlens took {_seconds(spent)} s of {_seconds(wall)} s wall time "
               f"({_percent(spent / wall if wall > 0 else math.nan)}) against "
               + (f"a budget of {100 * float(budget):.3g}%" if budget is not None
                  else "no time budget (exact schedules)")
               + (f", and a memory budget of {_bytes(float(memory_budget))}"
                  if memory_budget is not None else "") + ".")
    rows = [{
        "probe": str(row.probe), "measurements": int(row.measurements),
        "seconds": _seconds(row.seconds), "share": _percent(row.share),
        "deferred": int(row.deferred), "peak_memory": _bytes(row.peak_memory),
        "products": "–" if math.isnan(row.products) else f"{row.products:.0f}",
    } for row in frame.itertuples(index=False)]
    return {"run": label, "summary": summary, "rows": rows,
            "products": bool(frame["products"].notna().any())}


def _events(runs: Sequence[Run], labels: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for run, label in zip(runs, labels, strict=True):
        for event in run.events().itertuples(index=False):
            rows.append({
                "run": label, "step": "" if event.step is None or event.step != event.step
                else int(event.step),
                "time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.time)),
                "level": str(event.level), "probe": "" if event.probe is None else str(event.probe),
                "message": str(event.message),
                "traceback": None if event.traceback is None else str(event.traceback),
            })
    return rows


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("dynlens.reports", "templates"),
        autoescape=True, trim_blocks=True, lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["fmt"] = _fmt
    return env


def render_html(runs: RunLike | Sequence[RunLike], quiet: bool = False,
                stream: TextIO | None = None) -> str:
    """The report of ``runs`` (one, or several compared) as an HTML document string."""
    runs = as_runs(runs)
    labels = run_labels(runs)
    probes = list(dict.fromkeys(p for run in runs for p in run.probes()))
    probes.sort(key=lambda p: {"train": 0, "lens": 2}.get(p, 1))  # the loss first, timings last
    plan = [(probe, spec) for probe in probes for spec in (figures_for(probe) or [None])]
    bar = ProgressBar(len(runs) + len(plan) + 1, quiet=quiet, stream=stream)

    findings: list[Finding] = []
    finding_runs: list[str] = []
    for run, label in zip(runs, labels, strict=True):
        run_findings = diagnose(run)
        findings += run_findings
        finding_runs += [label] * len(run_findings)
        bar.update(f"diagnosis of {label}")
    order = sorted(range(len(findings)),
                   key=lambda i: (SEVERITIES.index(findings[i].severity), findings[i].steps[0]))
    findings = [findings[i] for i in order]
    finding_runs = [finding_runs[i] for i in order]

    used: set[str] = {"findings", "costs", "events", "runs"}
    sections: dict[str, _Section] = {}
    for probe, spec in plan:
        with_probe = [r for r in runs if probe in r.probes()]
        section = sections.get(probe)
        if section is None:
            # every section keeps its table of latest values, registered figures or not
            section = sections[probe] = _Section(probe, _anchor("probe", probe, used),
                                                 table=_latest_table(with_probe, probe))
        title = spec.title if spec else f"{probe} (all scalars)"
        item = _Figure(title, _anchor("fig", f"{probe}-{title}", used))
        try:
            fig = spec.fn(with_probe, findings) if spec else _generic_figure(with_probe, probe, findings)
            if fig is not None:
                item.svg = _svg(fig, f"{probe}: {title}")
        except Exception as err:  # noqa: BLE001 - one broken figure must not lose the report
            item.error = f"{type(err).__name__}: {err}"
        if item.svg is not None or item.error is not None:
            section.figures.append(item)
        bar.update(f"{probe}: {title}")

    items = []
    for i, (finding, label) in enumerate(zip(findings, finding_runs, strict=True)):
        target = sections.get(finding.probe or "")
        if target is not None:
            target.findings.append(i)
        items.append({
            "finding": finding, "run": label if len(runs) > 1 else "",
            "anchor": f"finding-{i + 1}",
            "target": target.anchor if target else "events",
            "target_name": target.probe if target else "events",
            "steps": (f"step {finding.steps[0]}" if finding.steps[0] == finding.steps[1]
                      else f"steps {finding.steps[0]}–{finding.steps[1]}"),
            "evidence": [(k, _fmt(v)) for k, v in finding.evidence.items() if k != "traceback"],
            "traceback": finding.evidence.get("traceback"),
        })
    counts = {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}
    headers = [_run_header(run, label, _anchor("run", label, used))
               for run, label in zip(runs, labels, strict=True)]
    costs = [_costs(run, label) for run, label in zip(runs, labels, strict=True)]
    page = _environment().get_template("report.html.j2").render(
        title=" vs ".join(labels), runs=headers, findings=items, counts=counts,
        sections=list(sections.values()), events=_events(runs, labels),
        costs=costs if any(c["summary"] is not None for c in costs) else [],
        generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        version=_version(),
    )
    bar.update("page")
    bar.close()
    return page


def _version() -> str:
    from dynlens import __version__

    return __version__


def report(runs: RunLike | Sequence[RunLike], out: str | os.PathLike[str] | None = None,
           quiet: bool = False) -> Report:
    """Write the self-contained HTML report of one run, or of several compared, and return its
    path (a :class:`Report`, which a notebook displays inline).

    Args:
        runs: a run directory (or Run), or a list of them; several are overlaid in every figure.
        out: the file to write; default ``<first run dir>/report.html``.
        quiet: no progress bar on stderr.

    A run that is still being written is reported as it stands (its last committed step).
    """
    runs = as_runs(runs)
    if not runs:
        raise ValueError("dl.report needs at least one run directory")
    target = Path(out) if out is not None else runs[0].path / REPORT_NAME
    page = render_html(runs, quiet=quiet)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(page, encoding="utf-8")
    os.replace(temporary, target)
    return Report(str(target))
