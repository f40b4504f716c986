"""The documentation: it builds with warnings as errors, documents every public name, shows
every example with its report, and the code points to it rather than to documents outside the
project."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"

# The measurement modules whose public functions and results the API reference documents.
MEASURE_MODULES = ("hessian", "stability", "coherence", "ntk", "softmax", "attention_logits",
                   "opposing", "weight_spectrum")
INTEGRATIONS = ("lightning", "hf", "tensorboard")


def _missing_docs_packages() -> list[str]:
    return [name for name in ("sphinx", "sphinx_gallery", "furo")
            if importlib.util.find_spec(name) is None]


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The HTML site, built once for this module as CI builds it (-W: any warning fails)."""
    missing = _missing_docs_packages()
    if missing:
        pytest.skip(f"the docs build needs {', '.join(missing)}: pip install -e \".[docs]\"")
    out = tmp_path_factory.mktemp("docs")
    # a copy of the sources: the gallery writes its pages beside them, and a build running in
    # the checkout at the same time must not share them
    generated = shutil.ignore_patterns("_build", "auto_examples", "sg_execution_times.rst", "__pycache__")
    shutil.copytree(DOCS, out / "src" / "docs", ignore=generated)
    shutil.copytree(EXAMPLES, out / "src" / "examples", ignore=generated)
    env = {**os.environ, "MPLBACKEND": "Agg"}
    env.pop("DYNLENS_DOCS_EXAMPLES", None)  # the gallery's fast setting
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-d", str(out / "doctrees"),
         str(out / "src" / "docs"), str(out / "html")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout[-6000:]}\n{result.stderr[-12000:]}"
    return out / "html"


def _public_objects() -> dict[str, object]:
    """Every public name by its dotted path: dynlens.__all__, the probes, the remedies and the
    measurement modules' functions and classes."""
    import dynlens
    import dynlens.probes
    import dynlens.remedies

    names: dict[str, object] = {}
    for module in (dynlens, dynlens.probes, dynlens.remedies):
        for name in module.__all__:
            obj = getattr(module, name)
            if not isinstance(obj, str):
                names[f"{module.__name__}.{name}"] = obj
    modules = [importlib.import_module(f"dynlens.measures.{leaf}") for leaf in MEASURE_MODULES]
    for leaf in INTEGRATIONS:  # those whose framework is installed (the docs mock the others)
        try:
            modules.append(importlib.import_module(f"dynlens.integrations.{leaf}"))
        except ImportError:
            continue
    for module in modules:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                names[f"{module.__name__}.{name}"] = obj
    return names


def test_every_public_name_has_a_docstring() -> None:
    undocumented = [name for name, obj in _public_objects().items()
                    if not (inspect.getdoc(obj) or "").strip()]
    assert not undocumented, f"public names without a docstring: {undocumented}"


def _documented_objects(html: Path) -> set[int]:
    """The Python objects the built reference documents (read from its objects.inv)."""
    from sphinx.util.inventory import InventoryFile

    with open(html / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", os.path.join)
    found: set[int] = set()
    for role, entries in inventory.items():
        if not role.startswith("py:"):
            continue
        for dotted in entries:
            obj = _resolve(dotted, module=role == "py:module")
            if obj is not None:
                found.add(id(obj))
    return found


def _resolve(dotted: str, module: bool) -> object | None:
    """The object a documented name stands for: a module, or an attribute of the longest
    importable module above it (``dynlens.probes.basic`` the function is not the module)."""
    parts = dotted.split(".")
    for cut in range(len(parts) if module else len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def test_docs_build_and_every_public_name_is_in_the_api_reference(built_docs: Path) -> None:
    documented = _documented_objects(built_docs)
    absent = [name for name, obj in _public_objects().items() if id(obj) not in documented]
    assert not absent, f"public names missing from the API reference: {absent}"


def test_every_rule_is_on_the_findings_page(built_docs: Path) -> None:
    from dynlens.diagnose import registered_rules

    page = (built_docs / "findings.html").read_text(encoding="utf-8")
    missing = [name for name in registered_rules() if f">{name}<" not in page]
    assert not missing, f"rules missing from the findings page: {missing}"


def test_every_example_runs_and_shows_its_report_in_the_gallery(built_docs: Path) -> None:
    for script in sorted(EXAMPLES.glob("*.py")):
        page = built_docs / "auto_examples" / f"{script.stem}.html"
        assert page.exists(), f"no gallery page for {script.name}"
        text = page.read_text(encoding="utf-8")
        assert "report.html" in text or "_report.html" in text, f"{script.name}: no report link"
        figures = re.findall(r'<img[^>]+src="[^"]*sphx_glr_' + re.escape(script.stem) + r'_\d+\.svg"', text)
        assert figures, f"{script.name}: no figure of its report in the gallery"


def test_the_code_refers_to_no_document_outside_the_project() -> None:
    outside = re.compile("|".join(re.escape(n + ".md") for n in ("METRICS", "DESIGN", "STYLE")))
    files = [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md"]
    for folder in ("dynlens", "examples", "tests", "benchmarks", "docs"):
        files += [p for p in (ROOT / folder).rglob("*")
                  if p.suffix in (".py", ".rst", ".md", ".txt") and "_build" not in p.parts
                  and "auto_examples" not in p.parts]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files if p.resolve() != Path(__file__).resolve()
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)]
    assert not hits, f"references to documents outside the project (point to the docs instead): {hits}"


def test_the_written_pages_refer_only_to_documented_objects(built_docs: Path) -> None:
    # an unresolved reference is a <code class="xref py ..."> outside a link (Sphinx warns of
    # these only in nitpicky mode, which the docstrings' type hints to torch and numpy would fail)
    unresolved = re.compile(r'(?<!">)<code class="xref py[^"]*"[^>]*><span class="pre">([^<]*)')
    pages = [p.relative_to(DOCS).with_suffix(".html") for p in DOCS.glob("*.rst") if p.stem != "sg_execution_times"]
    pages.append(Path("api") / "index.html")
    broken = {str(page): found for page in pages
              if (found := unresolved.findall((built_docs / page).read_text(encoding="utf-8")))}
    assert not broken, f"references to objects the API reference does not document: {broken}"
