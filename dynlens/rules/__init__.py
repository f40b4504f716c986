"""The built-in diagnosis rules, one module per phenomenon; importing this registers them all."""
