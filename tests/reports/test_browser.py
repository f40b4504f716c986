"""A real browser opens the report: every figure loads, no console error, and a screenshot is
saved as a test artifact (``$DYNLENS_ARTIFACTS``, default ``artifacts/`` in the repository).

Headless Chromium (Debian's ``chromium`` package) is driven from the command line only:
``--dump-dom`` on a *copy* of the report into which a small checking script is injected (it
records errors and writes the state of every image into the DOM), ``--enable-logging=stderr``
on the real report to catch console messages, and ``--screenshot`` for the artifact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import clean_loss, write_run

import dynlens as dl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                "(apt-get install -y chromium; .ci/run installs it)")
ARTIFACTS = Path(os.environ.get("DYNLENS_ARTIFACTS",
                                Path(__file__).resolve().parents[2] / "artifacts"))

CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener("error", function (e) {
  window.__errors.push(String(e.message || (e.target && (e.target.tagName + " failed to load"))));
}, true);
var _consoleError = console.error;
console.error = function () { window.__errors.push(Array.from(arguments).join(" ")); };
window.addEventListener("load", function () {
  var images = Array.from(document.images).map(function (img) {
    return {alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth};
  });
  var out = document.createElement("pre");
  out.id = "dynlens-browser-check";
  out.textContent = JSON.stringify({images: images, errors: window.__errors});
  document.body.appendChild(out);
});
</script>"""


def _chromium(*args: str, user_data_dir: Path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={user_data_dir}",
               *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    loss = clean_loss(1500)
    loss[999] = 25.0
    loss[1400:] = np.nan
    events = [(4, "error", "hessian", "RuntimeError: out of memory",
               "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: out of memory")]
    run_dir = write_run(tmp_path_factory.mktemp("b") / "run", steps=1500, loss=loss,
                                  name="browser-check <b>run</b>", events=events)
    return dl.report(run_dir, quiet=True)


def test_every_image_loads_and_there_are_no_errors(report_path, tmp_path):
    copy = tmp_path / "checked.html"
    text = report_path.path.read_text(encoding="utf-8")
    copy.write_text(text.replace("<head>", "<head>" + CHECK_SCRIPT, 1), encoding="utf-8")
    result = _chromium("--virtual-time-budget=10000", "--dump-dom", copy.as_uri(),
                       user_data_dir=tmp_path / "profile-dom")
    found = re.search(r'<pre id="dynlens-browser-check">(.*?)</pre>', result.stdout, re.S)
    assert found, f"the check did not run; chromium said:\n{result.stderr[-2000:]}"
    state = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")
                       .replace("&lt;", "<").replace("&gt;", ">"))
    assert len(state["images"]) >= 9  # loss, 4 totals, 4 per-layer views
    assert len(state["images"]) == text.count('<img class="figure"')
    for image in state["images"]:
        assert image["complete"] and image["naturalWidth"] > 0, image
    assert state["errors"] == []


def test_the_report_logs_nothing_to_the_console_and_a_screenshot_is_saved(report_path, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    result = _chromium("--enable-logging=stderr", "--v=0", "--hide-scrollbars",
                       "--window-size=1280,3200", "--virtual-time-budget=10000",
                       f"--screenshot={shot}", report_path.path.as_uri(),
                       user_data_dir=tmp_path / "profile-shot")
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert console == [], console
    assert shot.is_file() and shot.stat().st_size > 10_000, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
