"""The built-in diagnosis rules, one module per phenomenon; importing this registers them all."""
from dynlens.rules import basic  # noqa: F401
