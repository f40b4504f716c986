"""Sphinx helpers for dynlens's documentation.

* ``.. dynlens-rules::`` writes the page of findings from the rule registry
  (:func:`dynlens.diagnose.registered_rules`) at build time, so that page cannot go stale: each
  rule module's docstring (what triggers its rules, with their thresholds), then each rule with
  its probe, severities, paper and what it suggests (read from the ``Finding(...)`` calls in the
  rule's source).
* ``.. dynlens-public-names::`` is the table of ``dynlens.__all__``, each name linked to the
  place in the API reference that documents it.
* ``.. dynlens-automodule-if-present:: MODULE`` is ``automodule`` with ``:members:`` when the
  module's file exists in this checkout, and a note otherwise (optional integrations).
* :func:`reset_argv` and :func:`report_scraper` are the gallery's settings (by dotted name in
  ``sphinx_gallery_conf``, which keeps the configuration picklable): each example runs in its
  fast setting unless ``DYNLENS_DOCS_EXAMPLES=full``, and the figures of the report it writes
  are shown under it with a link to the whole report.
"""

from __future__ import annotations

import ast
import base64
import functools
import html
import importlib
import importlib.util
import inspect
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList
from sphinx.util.nodes import nested_parse_with_titles

# Each example's fast setting: its own command-line arguments (the scripts take --steps and the
# like; tests/examples/ checks the phenomenon at the lengths the tests use). With
# DYNLENS_DOCS_EXAMPLES=full the gallery runs every script at its defaults, the paper-length
# commands are in each script's docstring.
FAST_ARGS: dict[str, list[str]] = {
    "edge_of_stability.py": ["--steps", "600"],
    "coherence_real_vs_random.py": ["--steps", "150"],
    "grokking_softmax_collapse.py": ["--steps", "400", "--modulus", "31", "--width", "64"],
    "ntk_lazy_vs_rich.py": ["--steps", "60", "--widths", "32", "512"],
    "opposing_signals.py": ["--steps", "100"],
}


def fast_mode() -> bool:
    """True unless DYNLENS_DOCS_EXAMPLES=full asks for the examples at their default lengths."""
    return os.environ.get("DYNLENS_DOCS_EXAMPLES", "fast") != "full"


def reset_argv(gallery_conf: dict[str, Any], script_vars: dict[str, Any]) -> list[str]:
    """The command-line arguments sphinx-gallery gives an example script."""
    name = Path(script_vars["src_file"]).name
    return list(FAST_ARGS.get(name, [])) if fast_mode() else []


# --- the gallery's report scraper ---------------------------------------------------------------

_REPORTS: list[Path] = []
_FIGURE = re.compile(r'<img class="figure" alt="([^"]*)" src="data:image/svg\+xml;base64,([^"]+)">')


def _record_reports() -> None:
    """Wrap ``dynlens.reports.report`` (what ``dl.report`` calls) to note each report written."""
    import dynlens.reports

    original = dynlens.reports.report
    if getattr(original, "_dynlens_docs", False):
        return

    @functools.wraps(original)  # the same name, module and docstring: the docs link to the original
    def report(*args: Any, **kwargs: Any) -> Any:
        path = original(*args, **kwargs)
        _REPORTS.append(Path(os.fspath(path)))
        return path

    report._dynlens_docs = True  # type: ignore[attr-defined]
    dynlens.reports.report = report


def report_scraper(block: Any, block_vars: dict[str, Any], gallery_conf: dict[str, Any]) -> str:
    """The figures of the reports an example wrote in this block, as reST, and a link to each
    report (copied beside the gallery's images)."""
    import dynlens.probes
    from dynlens.probes.base import LENS, TRAINING

    rst = []
    images = block_vars["image_path_iterator"]
    src_dir = Path(gallery_conf["src_dir"])
    while _REPORTS:
        page = _REPORTS.pop(0)
        text = page.read_text(encoding="utf-8")
        found = [(html.unescape(alt), data) for alt, data in _FIGURE.findall(text)]
        # the phenomenon's figures first (the first is the thumbnail), then the basic probes'
        basic = {p.name for p in dynlens.probes.basic()} | {TRAINING, LENS}
        found.sort(key=lambda figure: figure[0].split(":")[0] in basic)
        figures = []
        for alt, data in found:
            target = Path(next(images)).with_suffix(".svg")
            target.write_bytes(base64.b64decode(data))
            figures.append((alt, target))
        copy = Path(images.image_path.format(0)).with_name(
            f"{Path(block_vars['src_file']).stem}_report.html")
        shutil.copyfile(page, copy)
        rel = "/" + copy.relative_to(src_dir).as_posix()
        command = " ".join(["python", f"examples/{Path(block_vars['src_file']).name}", *sys.argv[1:]])
        rst.append(f"\nThis page ran ``{command}``. "
                   f":download:`The whole report (self-contained HTML) <{rel}>`\n")
        for alt, target in figures:
            path = "/" + target.relative_to(src_dir).as_posix()
            rst.append(f"\n.. figure:: {path}\n   :alt: {_escape(alt)}\n   :class: sphx-glr-single-img\n\n"
                       f"   {_escape(alt)}\n")
    return "".join(rst)


# --- docstrings as reST ---------------------------------------------------------------------------

# dynlens's docstrings are written for people reading the source: |λ| is an absolute value, not a
# substitution; *param.shape is not emphasis; a code example is indented without a "::" before it.
# This hook (run before napoleon) makes them valid reST without changing how they read.
_EMPHASIS = re.compile(r"\*\*[^*\s](?:[^*]*[^*\s])?\*\*|(?<![\w*\\])\*[^*\s](?:[^*]*?[^*\s])?\*(?![\w*])")
_LITERAL = re.compile(r"(``.+?``|:[\w:]+:`[^`]*`)")
_STAR = re.compile(r"(?:^|(?<=[\s(\[{<'\"/:=-]))\*(?=[^\s*])")


def _escape_text(segment: str) -> str:
    """Pipes and stray asterisks backslash-escaped, outside emphasis and strong spans."""
    parts, last = [], 0
    for match in _EMPHASIS.finditer(segment):
        parts.append(_STAR.sub(r"\\*", segment[last:match.start()]))
        parts.append(match.group(0))
        last = match.end()
    parts.append(_STAR.sub(r"\\*", segment[last:]))
    return "".join(parts).replace("|", r"\|")


def _escape_line(line: str) -> str:
    if re.match(r"^\s*([+|][-=+|]|>>>)", line):
        return line
    return "".join(piece if i % 2 else _escape_text(piece)
                   for i, piece in enumerate(_LITERAL.split(line)))


# Google-style sections napoleon reads itself (with conf.py's napoleon_custom_sections)
_SECTIONS = {"args", "arguments", "attributes", "example", "examples", "keyword args",
             "keyword arguments", "methods", "note", "notes", "other parameters", "parameters",
             "return", "returns", "raise", "raises", "references", "see also", "todo", "warning",
             "warnings", "warns", "yield", "yields", "fields"}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _lists(lines: list[str]) -> list[str]:
    """Other "Heading:" lines followed by an indented block of "name: description" lines (with
    further-indented continuations) as a heading and a bullet list."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        head = line.strip()
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if head.endswith(":") and head[:-1].strip().lower() in _SECTIONS:
            # napoleon's own section: left as it is, to its end
            out.append(line)
            i += 1
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > _indent(line)):
                if not lines[i].strip() and not any(
                        x.strip() and _indent(x) > _indent(line) for x in lines[i + 1:i + 2]):
                    break
                out.append(lines[i])
                i += 1
            continue
        if (head.endswith(":") and not head.endswith("::") and not head.startswith(("..", ":"))
                and head[:-1].strip().lower() not in _SECTIONS and following.strip()
                and _indent(following) > _indent(line)):
            base, item = _indent(line), _indent(following)
            out += [line, ""]
            i += 1
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > base:
                text = lines[i].strip()
                out.append(" " * base + ("* " if _indent(lines[i]) <= item else "  ") + text)
                i += 1
            out.append("")
            continue
        out.append(line)
        i += 1
    return out


def rst_safe(lines: list[str]) -> list[str]:
    """``lines`` of a docstring as valid reST: an indented block after a paragraph becomes a
    literal block, other headed blocks become lists, and text outside literals has its pipes
    and stray asterisks escaped."""
    lines = _lists(lines)
    out: list[str] = []
    literal: int | None = None  # the indentation that opened the literal block we are in
    previous: str | None = None  # the last non-blank line outside literal blocks
    for i, line in enumerate(lines):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if literal is not None:
            if not stripped or indent > literal:
                out.append(line)
                continue
            literal = None
        if stripped and previous is not None and i > 0 and not lines[i - 1].strip():
            base = len(previous) - len(previous.lstrip())
            if indent > base:
                head = previous.strip()
                if not (head.endswith("::") or head.startswith(".. ")):
                    out += [" " * base + "::", ""]
                literal = base
                out.append(line)
                continue
        if stripped:
            previous = line
        out.append(_escape_line(line))
    return out


def _process_docstring(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    lines[:] = rst_safe(lines)


# --- the findings page --------------------------------------------------------------------------

def _escape(text: str) -> str:
    """Text as literal reST: every punctuation character backslash-escaped."""
    return re.sub(r"([^\w\s])", r"\\\1", " ".join(text.split()))


def _texts(node: ast.AST, module: Any) -> list[str]:
    """The strings an expression in a rule's source can evaluate to, where that can be read
    without running it (constants, module constants, f-strings with … for their fields, and
    module functions that return one of those)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name):
        value = getattr(module, node.id, None)
        return [value] if isinstance(value, str) else []
    if isinstance(node, ast.JoinedStr):
        return ["".join(v.value if isinstance(v, ast.Constant) else "…" for v in node.values)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _texts(node.left, module), _texts(node.right, module)
        return [a + b for a in left for b in right]
    if isinstance(node, ast.IfExp):
        return _texts(node.body, module) + _texts(node.orelse, module)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        helper = getattr(module, node.func.id, None)
        if inspect.isfunction(helper):
            tree = ast.parse(textwrap.dedent(inspect.getsource(helper)))
            return [t for r in ast.walk(tree) if isinstance(r, ast.Return) and r.value is not None
                    for t in _texts(r.value, module)]
    return []


def finding_texts(fn: Any) -> dict[str, list[str]]:
    """The severities, references and suggestions of the findings a rule function builds."""
    module = inspect.getmodule(fn)
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    found: dict[str, list[str]] = {"severity": [], "reference": [], "suggestion": []}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Finding":
            for keyword in node.keywords:
                if keyword.arg in found:
                    for text in _texts(keyword.value, module):
                        if text not in found[keyword.arg]:
                            found[keyword.arg].append(text)
    return found


def rules_rst() -> list[str]:
    """The findings page's body: one section per rule module, in registration order."""
    from dynlens.diagnose import registered_rules, rule_probe

    by_module: dict[str, list[tuple[str, Any]]] = {}
    for name, fn in registered_rules().items():
        by_module.setdefault(fn.__module__, []).append((name, fn))
    lines: list[str] = []
    for module_name, rules in by_module.items():
        module = importlib.import_module(module_name)
        phenomenon = module_name.rsplit(".", 1)[-1]
        title = f"{phenomenon.replace('_', ' ').capitalize()} (``{module_name}``)"
        lines += [title, "-" * len(title), ""]
        lines += rst_safe(inspect.cleandoc(module.__doc__ or "").splitlines()) + [""]
        for name, fn in rules:
            texts = finding_texts(fn)
            probe = rule_probe(name)
            lines += [f"``{name}``", "~" * (len(name) + 4), ""]
            reads = ("the training loss (``train``)" if probe == "train" else
                     f"the ``{probe}`` probe" if probe else "several probes and the run")
            lines += [f"*Reads:* {reads}"
                      f"{'; *severity:* ' + ', '.join(texts['severity']) if texts['severity'] else ''}.", ""]
            doc = inspect.cleandoc(fn.__doc__ or "")
            if doc:
                lines += [f"*Triggers:* {_escape(doc)}", ""]
            for suggestion in texts["suggestion"]:
                lines += [f"*What to try:* {_escape(suggestion)}", ""]
            for reference in texts["reference"]:
                lines += [f"*Paper:* {_escape(reference)}", ""]
    return lines


class RulesDirective(Directive):
    """``.. dynlens-rules::``: the registered rules, grouped by module."""

    def run(self) -> list[nodes.Node]:
        container = nodes.container()
        nested_parse_with_titles(self.state, StringList(rules_rst(), source="dynlens.rules"), container)
        return container.children


# --- the API reference's table of public names ----------------------------------------------------

def documented_name(obj: Any) -> str:
    """The dotted name under which the API reference documents ``obj``: its defining module's."""
    if inspect.ismodule(obj):
        return obj.__name__
    return f"{obj.__module__}.{obj.__qualname__}"


class PublicNamesDirective(Directive):
    """``.. dynlens-public-names::``: ``dl.<name>`` for each name of ``dynlens.__all__``."""

    def run(self) -> list[nodes.Node]:
        import dynlens

        lines = [".. list-table::", "   :header-rows: 1", "   :widths: 30 70", "",
                 "   * - name", "     - documented as"]
        for name in dynlens.__all__:
            obj = getattr(dynlens, name)
            if isinstance(obj, str):
                target = f"the package version, ``{obj}`` in this build"
            elif inspect.ismodule(obj):
                target = f":py:mod:`{obj.__name__}`"
            else:
                target = f":py:obj:`{documented_name(obj)}`"
            lines += [f"   * - ``dl.{name}``", f"     - {target}"]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="dynlens.__all__"), self.content_offset, container)
        return container.children


class AutomoduleIfPresentDirective(Directive):
    """``.. dynlens-automodule-if-present:: MODULE``: its members, or a note that this checkout
    does not have it."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        name = self.arguments[0]
        package, _, leaf = name.rpartition(".")
        spec = importlib.util.find_spec(package)
        present = spec is not None and spec.submodule_search_locations is not None and any(
            (Path(p) / f"{leaf}.py").exists() or (Path(p) / leaf / "__init__.py").exists()
            for p in spec.submodule_search_locations)
        if present:
            lines = [f".. automodule:: {name}", "   :members:", ""]
        else:
            lines = [f".. note:: ``{name}`` is not part of this version of dynlens.", ""]
        container = nodes.container()
        nested_parse_with_titles(self.state, StringList(lines, source=name), container)
        return container.children


# --- cross-references through public aliases ---------------------------------------------------

def _object(dotted: str) -> Any:
    """The object a dotted name stands for (a module, or attributes below the longest importable
    module), or None."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def _canonical(obj: Any) -> str | None:
    if inspect.ismodule(obj):
        return obj.__name__
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not (isinstance(module, str) and isinstance(qualname, str)) or "<locals>" in qualname:
        return None
    return f"{module}.{qualname}"


def _resolve_alias(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """``dynlens.Lens``, ``dl.probes.Hessian``, ``Probe`` inside a module: the reference goes to
    where the API reference documents the object (its defining module)."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    context = [c for c in (node.get("py:module"), node.get("py:class")) if c]
    candidates = [target] + [f"{c}.{target}" for c in context]
    if node.get("py:module") and node.get("py:class"):
        candidates.append(f"{node['py:module']}.{node['py:class']}.{target}")
    domain = env.get_domain("py")
    for candidate in candidates:
        canonical = _canonical(_object(candidate)) if candidate.startswith("dynlens") else None
        if canonical is None or canonical == target:
            continue
        found = domain.resolve_any_xref(env, node["refdoc"], app.builder, canonical, node, contnode)
        exact = [ref for role, ref in found if role != "py:module" or node["reftype"] == "mod"]
        if exact:
            return exact[0]
    return None


def setup(app: Any) -> dict[str, Any]:
    _record_reports()
    app.connect("autodoc-process-docstring", _process_docstring, priority=400)  # before napoleon
    app.connect("missing-reference", _resolve_alias)
    app.add_directive("dynlens-rules", RulesDirective)
    app.add_directive("dynlens-public-names", PublicNamesDirective)
    app.add_directive("dynlens-automodule-if-present", AutomoduleIfPresentDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
