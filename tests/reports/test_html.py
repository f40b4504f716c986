"""The HTML report: one self-contained file, findings first, a figure per probe, escaping."""

from __future__ import annotations

import base64
import io
import os
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from helpers import BASIC_PROBES, clean_loss, write_run

import dynlens as dl
from dynlens.reports.cli import add_report_command
from dynlens.store import RunWriter

EVIL = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.ids: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if attrs.get("id"):
            self.ids.add(attrs["id"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(path) -> _Collector:
    parser = _Collector()
    parser.feed(open(path, encoding="utf-8").read())
    parser.close()
    return parser


@pytest.fixture(scope="module")
def spiky_report(tmp_path_factory):
    loss = clean_loss(600)
    loss[399] = 40.0
    events = [(3, "error", "hessian", "RuntimeError: out of memory",
               "Traceback (most recent call last):\n  ...\nRuntimeError: out of memory")]
    run_dir = write_run(tmp_path_factory.mktemp("r") / "run", steps=600, loss=loss,
                                  events=events)
    return run_dir, dl.report(run_dir, quiet=True)


def test_report_is_one_file_in_the_run_dir_by_default(spiky_report):
    run_dir, path = spiky_report
    assert os.fspath(path) == str(run_dir / "report.html") and path.path.is_file()
    assert [p.name for p in run_dir.iterdir() if p.name.startswith("report")] == ["report.html"]


def test_report_references_nothing_outside_the_document(spiky_report):
    _, path = spiky_report
    parser = _parse(path)
    for tag, attrs in parser.tags:
        for key in ("src", "href", "srcset", "action", "poster", "data", "xlink:href"):
            value = attrs.get(key)
            if value is not None:
                assert value.startswith(("data:", "#")), (tag, key, value[:80])
        if tag == "a":
            assert attrs["href"][1:] in parser.ids, f"dangling anchor {attrs['href']}"
    assert not any(tag in ("link", "script", "iframe", "object", "embed") for tag, _ in parser.tags)
    text = open(path, encoding="utf-8").read()
    assert "@import" not in text and "url(http" not in text


def test_svg_figures_hold_no_external_reference(spiky_report):
    _, path = spiky_report
    for tag, attrs in _parse(path).tags:
        if tag == "img":
            svg = base64.b64decode(attrs["src"].split(",", 1)[1]).decode()
            for ref in re.findall(r'(?:href|src)="([^"]*)"', svg):
                assert ref.startswith(("data:", "#")), ref


def test_every_basic_probe_has_a_section_with_a_figure(spiky_report):
    _, path = spiky_report
    parser = _parse(path)
    for probe in BASIC_PROBES:
        assert f"probe-{probe.replace('_', '-')}" in parser.ids
    text = open(path, encoding="utf-8").read()
    for probe in BASIC_PROBES:
        section = text.split(f'id="probe-{probe.replace("_", "-")}"', 1)[1].split("</section>")[0]
        assert '<img class="figure"' in section, probe


def test_findings_come_first_most_severe_first_and_link_to_their_evidence(spiky_report):
    _, path = spiky_report
    text = open(path, encoding="utf-8").read()
    assert text.index('id="findings"') < text.index('id="runs"') < text.index('id="probe-train"')
    findings = re.findall(r'<div class="finding (\w+)" id="finding-\d+">', text)
    assert findings == sorted(findings, key=("critical", "warning", "info").index)
    spike = text.split("Loss spike at step 400")[0].rsplit('<div class="finding', 1)[1]
    assert 'id="finding-' in spike
    block = text.split("Loss spike at step 400", 1)[1].split('<div class="finding', 1)[0]
    assert 'href="#probe-train"' in block


def test_events_show_the_traceback_in_details(spiky_report):
    _, path = spiky_report
    events = open(path, encoding="utf-8").read().split('id="events"', 1)[1]
    assert "<details><summary>traceback</summary><pre>Traceback (most recent call last)" in events


def test_untrusted_strings_from_the_run_render_as_text(tmp_path):
    run_dir = write_run(
        tmp_path / "run", steps=60, name=EVIL, model_class=EVIL,
        config={EVIL: EVIL, "nested": {"x": EVIL}},
        events=[(2, "error", EVIL, EVIL, EVIL)])
    extra = write_run(tmp_path / "extra", 2, basic=False, name=EVIL, model_class=EVIL, layers=[EVIL],
                      measurements={EVIL: {step: {EVIL: float(step)} for step in range(3)},
                                    "grad_norm": {step: {"per_layer": np.ones(1)} for step in range(3)}})
    path = dl.report([run_dir, extra], out=tmp_path / "r.html", quiet=True)
    parser = _parse(path)
    assert [t for t, _ in parser.tags].count("script") == 0
    imgs = [a for t, a in parser.tags if t == "img"]
    assert all(a["src"].startswith("data:image/svg+xml;base64,") for a in imgs)
    assert all("onerror" not in a for t, a in parser.tags)
    assert EVIL in "".join(parser.text)
    for img in imgs:
        svg = base64.b64decode(img["src"].split(",", 1)[1]).decode()
        assert "<script" not in svg and "<img" not in svg
    for anchor in parser.ids:
        assert re.fullmatch(r"[a-z0-9-]+", anchor), anchor


def test_several_runs_give_one_header_each_and_overlaid_figures(tmp_path):
    a = write_run(tmp_path / "a", steps=100, name="lr-0.1")
    b = write_run(tmp_path / "b", steps=150, name="lr-0.01", seed=1)
    path = dl.report([a, b], quiet=True)
    assert path.path == a / "report.html"
    text = open(path, encoding="utf-8").read()
    assert "lr-0.1 vs lr-0.01" in text
    assert 'id="run-lr-0-1"' in text and 'id="run-lr-0-01"' in text
    loss_svg = base64.b64decode(
        text.split('id="probe-train"', 1)[1].split('base64,', 1)[1].split('"', 1)[0]).decode()
    assert "lr-0.1" in loss_svg and "lr-0.01" in loss_svg


def test_a_run_still_being_written_is_reported_as_it_stands(tmp_path):
    writer = RunWriter(tmp_path / "live")
    writer.set_meta({"name": "live", "status": "running", "layers": ["0"]})
    for step in range(1, 30):
        writer.scalar(step, "train", "loss", 1.0 / step)
        writer.commit()
    try:
        path = dl.report(tmp_path / "live", quiet=True)
        text = open(path, encoding="utf-8").read()
        assert "still being written" in text and 'id="probe-train"' in text
    finally:
        writer.close()


def test_probe_without_a_registered_figure_gets_a_generic_plot_and_table(tmp_path):
    run_dir = write_run(tmp_path / "run", 19, basic=False, name="custom", measurements={
        "weight_sparsity": {step: {"zero_fraction": step / 20} for step in range(20)}})
    text = open(dl.report(run_dir, quiet=True), encoding="utf-8").read()
    section = text.split('id="probe-weight-sparsity"', 1)[1].split("</section>")[0]
    assert '<img class="figure"' in section
    assert ["<code>zero_fraction</code>", "19", "0.95", "0", "0.95", "20"] in _cells(section)


def test_a_section_with_registered_figures_keeps_the_table_of_latest_values(spiky_report):
    run_dir, path = spiky_report
    text = open(path, encoding="utf-8").read()
    section = text.split('id="probe-grad-norm"', 1)[1].split("</section>")[0]
    assert '<img class="figure"' in section
    total = dl.load_run(run_dir).series("grad_norm", "total")
    assert ["<code>total</code>", "600", f"{total.iloc[-1]:.4g}", f"{total.min():.4g}",
            f"{total.max():.4g}", "601"] in _cells(section)
    for probe in BASIC_PROBES:
        section = text.split(f'id="probe-{probe.replace("_", "-")}"', 1)[1].split("</section>")[0]
        assert "<th>last value</th>" in section, probe


def test_report_repr_html_is_an_escaped_iframe(spiky_report):
    _, path = spiky_report
    shown = path._repr_html_()
    assert shown.startswith("<iframe srcdoc=\"") and "<script" not in shown
    assert "&lt;!DOCTYPE html&gt;" in shown


def test_progress_bar_goes_to_stderr_unless_quiet(tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", steps=30)
    dl.report(run_dir)
    assert "dynlens report [" in capsys.readouterr().err
    dl.report(run_dir, quiet=True)
    assert capsys.readouterr().err == ""


def test_report_command_writes_the_file_and_prints_its_path(tmp_path, capsys):
    import argparse

    run_dir = write_run(tmp_path / "run", steps=30)
    parser = argparse.ArgumentParser()
    add_report_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(run_dir), "-o", str(tmp_path / "out.html"), "-q"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out.html")


@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_database_gives_a_clear_run_error(tmp_path, damage, capsys):
    import argparse

    run_dir = write_run(tmp_path / "run", steps=200)
    db = run_dir / "dynlens.sqlite"
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    with pytest.raises(dl.RunError, match="damaged"):
        dl.report(run_dir, quiet=True)
    parser = argparse.ArgumentParser()
    add_report_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(run_dir), "-q"])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "damaged" in err and "Traceback" not in err and "sqlite3" not in err


def test_progress_stream_is_configurable():
    from dynlens.reports.html import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(2, stream=stream)
    bar.update("a")
    bar.update("b")
    bar.close()
    assert "2/2" in stream.getvalue()


COSTS = {
    "budget": 0.05, "memory_budget": 3 * 2**30, "wall_seconds": 40.0, "training_seconds": 36.0,
    "probe_seconds": 4.0,
    "probes": {
        "hessian": {"measurements": 5, "seconds": 3.0, "deferred": 12, "peak_memory": 5 * 2**20,
                    "products": 30},
        "grad_norm": {"measurements": 20, "seconds": 0.6, "deferred": 0, "peak_memory": None,
                      "products": None},
        EVIL: {"measurements": 2, "seconds": 0.4, "deferred": 3, "peak_memory": 1536,
               "products": None},
    },
}


def _write_costed_run(path, name: str, costs):
    return write_run(path, 19, loss=1.0 / np.arange(1, 20), basic=False, name=name, costs=costs)


def _costs_section(text: str) -> str:
    return text.split('id="costs"', 1)[1].split("</section>", 1)[0]


def _cells(section: str) -> list[list[str]]:
    """The data rows of the tables in ``section`` as lists of cell texts (markup left escaped)."""
    rows = re.findall(r"<tr>(<td.*?)</tr>", section, flags=re.S)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S) for row in rows]


@pytest.fixture(scope="module")
def costs_report(tmp_path_factory):
    run_dir = _write_costed_run(tmp_path_factory.mktemp("c") / "run", "costed", COSTS)
    return dl.report(run_dir, quiet=True)


def test_costs_section_sits_after_the_probes_before_the_events_and_is_in_the_nav(costs_report):
    text = open(costs_report, encoding="utf-8").read()
    parser = _parse(costs_report)
    assert "costs" in parser.ids
    nav = text.split("<nav>", 1)[1].split("</nav>", 1)[0]
    assert 'href="#costs"' in nav
    assert text.index('id="probe-train"') < text.index('id="costs"') < text.index('id="events"')
    assert "What dynlens cost this run" in _costs_section(text)


def test_costs_section_states_probe_time_against_wall_time_and_the_budgets(costs_report):
    section = _costs_section(open(costs_report, encoding="utf-8").read())
    assert ("dynlens took 4 s of 40 s wall time (10.0%) against a budget of 5%, "
            "and a memory budget of 3.0 GiB.") in section


def test_costs_table_has_one_row_per_probe_with_share_deferred_memory_and_products(costs_report):
    rows = _cells(_costs_section(open(costs_report, encoding="utf-8").read()))
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&gt;&lt;img src=x onerror=alert(2)&gt;"
    assert rows == [
        ["hessian", "5", "3", "7.5%", "12", "5.0 MiB", "30"],
        ["grad_norm", "20", "0.6", "1.5%", "0", "–", "–"],
        [escaped, "2", "0.4", "1.0%", "3", "1.5 KiB", "–"],
    ]


def test_probe_names_in_the_costs_table_render_as_text(costs_report):
    parser = _parse(costs_report)
    assert [t for t, _ in parser.tags].count("script") == 0
    assert all("onerror" not in a for _, a in parser.tags)
    assert EVIL in "".join(parser.text)


def test_a_run_without_costs_has_no_costs_section(spiky_report):
    _, path = spiky_report
    text = open(path, encoding="utf-8").read()
    assert 'id="costs"' not in text and 'href="#costs"' not in text
    assert "What dynlens cost" not in text


def test_compared_runs_get_one_costs_table_each_and_an_unbudgeted_run_says_so(tmp_path):
    exact = {**COSTS, "budget": None, "memory_budget": None, "probe_seconds": 1.0,
             "probes": {"hessian": {"measurements": 4, "seconds": 1.0, "deferred": 0}}}
    a = _write_costed_run(tmp_path / "a", "exact", exact)
    b = _write_costed_run(tmp_path / "b", "old", None)
    c = _write_costed_run(tmp_path / "c", "budgeted", COSTS)
    section = _costs_section(open(dl.report([a, b, c], quiet=True), encoding="utf-8").read())
    blocks = dict(re.findall(r"<h3>(.*?)</h3>(.*?)</div>", section, flags=re.S))
    assert list(blocks) == ["exact", "old", "budgeted"]
    assert ("dynlens took 1 s of 40 s wall time (2.5%) against no time budget (exact schedules)."
            in blocks["exact"])
    assert "memory budget" not in blocks["exact"] and "<th>products</th>" not in blocks["exact"]
    assert _cells(blocks["exact"]) == [["hessian", "4", "1", "2.5%", "0", "–"]]
    assert "Not recorded" in blocks["old"] and "<table>" not in blocks["old"]
    assert "against a budget of 5%" in blocks["budgeted"] and len(_cells(blocks["budgeted"])) == 3


@pytest.mark.parametrize(("count", "text"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (5 * 2**20, "5.0 MiB"), (3 * 2**30, "3.0 GiB"),
    (2048 * 2**30, "2048.0 GiB"), (float("nan"), "–"),
])
def test_memory_is_shown_in_binary_units(count, text):
    from dynlens.reports.html import _bytes

    assert _bytes(float(count)) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (0.0, "0"), (1.83e-05, "<0.001"), (0.00614, "0.00614"), (3.0, "3"), (123.45, "123"),
    (1234.4, "1234"),
])
def test_seconds_are_shown_without_an_exponent(seconds, text):
    from dynlens.reports.html import _seconds

    assert _seconds(seconds) == text
