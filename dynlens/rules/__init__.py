"""The built-in diagnosis rules, one module per phenomenon; importing this registers them all."""
from dynlens.rules import basic  # noqa: F401
from dynlens.rules import coherence  # noqa: F401
