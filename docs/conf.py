"""Sphinx configuration of dynlens's documentation.

Build: ``.venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html`` (after
``pip install -e ".[docs]"``). The gallery runs each script of ``examples/`` in its fast setting;
``DYNLENS_DOCS_EXAMPLES=full`` runs them at their default lengths.

Why Sphinx and not MkDocs: the API reference is generated from the Google-style docstrings
(autodoc + napoleon read them as they are, including the signatures with their type hints),
the gallery is built by *running* the examples and keeping their output and figures
(sphinx-gallery has no MkDocs equivalent that executes plain scripts), the findings page is
generated from the rule registry by a small directive (``_ext/dynlens_docs.py``), and ``-W``
turns every broken cross-reference into a build failure.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

os.environ.setdefault("MPLBACKEND", "Agg")

import dynlens  # noqa: E402

project = "dynlens"
author = "the dynlens authors"
copyright = "the dynlens authors"  # noqa: A001 - Sphinx's name for it
release = dynlens.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_gallery.gen_gallery",
    "dynlens_docs",
]

exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py", "auto_examples/*.zip",
                    "auto_examples/*.codeobj.json", "sg_execution_times.rst"]
templates_path: list[str] = []
html_theme = "furo"
html_title = f"dynlens {release}"
html_static_path: list[str] = []

# autodoc: members in the order of the source, signatures with their type hints; the
# integrations' frameworks are optional extras, mocked where they are not installed.
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": True}
autodoc_typehints = "signature"
napoleon_custom_sections = [("Fields", "params_style")]  # dataclass fields, listed as arguments are
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


autodoc_mock_imports = [m for m in ("lightning", "pytorch_lightning", "transformers", "tensorboard")
                        if _missing(m)]
if "tensorboard" in autodoc_mock_imports:
    autodoc_mock_imports.append("torch.utils.tensorboard")

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"\.py$",  # run every example, not only plot_*.py
    "reset_argv": "dynlens_docs.reset_argv",  # the fast setting (DYNLENS_DOCS_EXAMPLES=full: defaults)
    "image_scrapers": ("matplotlib", "dynlens_docs.report_scraper"),
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "show_memory": False,
    "plot_gallery": "True",
    "within_subsection_order": "FileNameSortKey",
}
smartquotes_action = "qe"  # no dashes: "--steps" stays a command-line option
