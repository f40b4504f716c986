"""Integrations with other tools (PyTorch Lightning, the Hugging Face Trainer, TensorBoard).

Each lives in its own module, imported only when asked for: ``import dynlens`` imports none of
them, and their packages are optional extras (``pip install dynlens[tensorboard]``).
"""
