"""The built-in diagnosis rules, one module per phenomenon; importing this registers them all."""
# ruff: noqa: I001 - one import line per phenomenon, each added by that module's author

from dynlens.rules import basic  # noqa: F401
from dynlens.rules import coherence  # noqa: F401
from dynlens.rules import hessian  # noqa: F401
from dynlens.rules import ntk  # noqa: F401
from dynlens.rules import opposing_signals  # noqa: F401
from dynlens.rules import softmax_collapse  # noqa: F401
from dynlens.rules import weight_spectrum  # noqa: F401
