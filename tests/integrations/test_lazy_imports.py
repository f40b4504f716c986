"""``import dynlens`` (and ``import dynlens.integrations``) never imports the optional
frameworks: Lightning, transformers and accelerate load only with their callbacks."""

from __future__ import annotations

import subprocess
import sys

OPTIONAL = ("lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate")


def test_import_dynlens_imports_no_framework() -> None:
    code = (
        "import sys, dynlens, dynlens.integrations, dynlens.probes\n"
        f"loaded = sorted({{m.split('.')[0] for m in sys.modules}} & set({OPTIONAL!r}))\n"
        "print(loaded)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
