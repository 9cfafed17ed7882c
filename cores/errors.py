"""The project's one error type for bad input (a leaf module: anything may import it)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad setting or input, reported by `posterior_sample.py` as one line (exit code 2)
    before any heavy work."""
